"""Watch a device's persisted update state, to time faults on it.

The agent persists every update step to ``<data_dir>/update.json`` (field
``state``) *before* it acts on it, by writing a temp file and renaming it into
place. ``StateWatcher`` wakes on that rename through inotify (Linux), so a
power cut "at downloading" lands within a millisecond or so of the state being
written, well inside the download; elsewhere it polls every millisecond.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import time
from pathlib import Path

__all__ = ["StateWatcher", "read_state"]

JOURNAL = "update.json"
_IN_MOVED_TO = 0x00000080
_IN_CLOSE_WRITE = 0x00000008
_IN_CREATE = 0x00000100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000


def read_state(data_dir: Path) -> str | None:
    """The ``state`` field of ``update.json`` (None if absent or unreadable)."""
    try:
        value = json.loads((Path(data_dir) / JOURNAL).read_bytes())
    except (OSError, ValueError):
        return None
    state = value.get("state") if isinstance(value, dict) else None
    return state if isinstance(state, str) else None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


class StateWatcher:
    """Wait until a device's data dir records one of some update states."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._fd = -1
        libc = _libc()
        if libc is not None:
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
            if (
                fd >= 0
                and libc.inotify_add_watch(
                    fd, str(self.data_dir).encode(), _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_CREATE
                )
                >= 0
            ):
                self._fd = fd
            elif fd >= 0:
                os.close(fd)

    def wait(self, states: set[str], timeout: float, cancel: object = None) -> str | None:
        """Block until the persisted state is in ``states``; return it (None on timeout).

        ``cancel`` may be a ``threading.Event``; setting it ends the wait early.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = read_state(self.data_dir)
            if state in states:
                return state
            left = deadline - time.monotonic()
            if left <= 0 or (cancel is not None and cancel.is_set()):  # type: ignore[attr-defined]
                return None
            if self._fd >= 0:
                ready, _, _ = select.select([self._fd], [], [], min(left, 0.2))
                if ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._fd, 65536)
            else:
                time.sleep(0.001)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> StateWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
