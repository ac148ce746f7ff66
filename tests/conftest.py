"""Fixtures shared by every test: a private Mosquitto per test, and a guard
that no test leaves a child process behind."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import MosquittoProcess


def _children(pid: int) -> set[int]:
    """Live child pids of ``pid`` (Linux /proc), ignoring zombies."""
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = _children(os.getpid())
    yield
    left = _children(os.getpid()) - before
    assert not left, f"test left child processes running: {sorted(left)}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto on a free loopback port with its own config file."""
    with MosquittoProcess(tmp_path / "broker") as b:
        yield b
