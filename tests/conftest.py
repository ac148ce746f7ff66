"""Fixtures shared by every test: a private Mosquitto per test, and a guard
that no test leaves a child process behind."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

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


class RunningCloud:
    """A cloud service (real uvicorn on a free port) with tokens for each role."""

    def __init__(self, url: str, settings: object, tokens: dict[str, str]) -> None:
        self.url, self.settings, self.tokens = url, settings, tokens

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


@contextmanager
def _running_cloud(
    data_dir: Path, broker: MosquittoProcess, **overrides: Any
) -> Iterator[RunningCloud]:
    """The cloud service (real uvicorn on a free port) on ``data_dir``, which may
    hold a database already; ``overrides`` are ``CloudSettings`` fields."""
    import threading
    import time

    import uvicorn

    from cloud.app import create_app
    from cloud.auth import create_token
    from cloud.broker import free_port
    from cloud.config import CloudSettings
    from cloud.db import Database

    settings = CloudSettings(
        data_dir=data_dir, broker_port=broker.port, http_port=free_port(), **overrides
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    db.create_all()
    tokens = {
        role: create_token(db, f"test-{role}", role) for role in ("viewer", "operator", "admin")
    }
    db.dispose()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.http_port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "cloud did not start"
        time.sleep(0.05)
    try:
        yield RunningCloud(f"http://127.0.0.1:{settings.http_port}", settings, tokens)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture
def cloud(tmp_path: Path, broker: MosquittoProcess) -> Iterator[RunningCloud]:
    """The cloud service in this process, connected to the test's broker."""
    with _running_cloud(tmp_path / "cloud", broker) as running:
        yield running


@pytest.fixture
def cloud_with(tmp_path: Path, broker: MosquittoProcess) -> Iterator[Callable[..., RunningCloud]]:
    """Start the cloud service with other settings: ``cloud_with(api_rate_burst=5)``
    (``data_dir=`` to serve a database prepared beforehand); stopped after the test."""
    started = itertools.count()
    with ExitStack() as stack:

        def start(**overrides: Any) -> RunningCloud:
            overrides.setdefault("data_dir", tmp_path / f"cloud-{next(started)}")
            return stack.enter_context(_running_cloud(broker=broker, **overrides))

        yield start
