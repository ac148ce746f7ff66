"""The resumable TUF transport against real servers: the cloud's own static
files (Starlette ``StaticFiles`` under uvicorn, as ``cloud.app`` mounts ``/tuf``)
honour ``Range``; a server that ignores it is read from the start again."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device.http_fetcher import ResumableHttpFetcher
from tests.faults.harness import PROXY_VARS

pytestmark = pytest.mark.integration

BLOB = bytes(range(256)) * 1000  # 256 kB
NAME = f"{hashlib.sha256(BLOB).hexdigest()}.model.tflite"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "targets" / "m" / "1").mkdir(parents=True)
    (root / "targets" / "m" / "1" / NAME).write_bytes(BLOB)
    (root / "metadata").mkdir()
    (root / "metadata" / "timestamp.json").write_bytes(b'{"signed": {}}')
    return root


@pytest.fixture
def starlette_url(files: Path) -> Iterator[str]:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    from cloud.broker import free_port

    port = free_port()
    app = Starlette(routes=[Mount("/tuf", StaticFiles(directory=files), name="tuf")])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/tuf/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def plain_url(files: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(files))
    )
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _fetch_with_partial(base: str, tmp_path: Path, kept: bytes) -> ResumableHttpFetcher:
    fetcher = ResumableHttpFetcher(tmp_path / "partial")
    url = f"{base}targets/m/1/{NAME}"
    partial = fetcher.partial_path(url)
    assert partial is not None
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(kept)
    assert b"".join(fetcher.fetch(url)) == BLOB
    assert not partial.exists(), "a whole download leaves no partial file behind"
    return fetcher


def test_cloud_static_files_serve_ranges_and_downloads_resume(
    starlette_url: str, tmp_path: Path
) -> None:
    f = _fetch_with_partial(starlette_url, tmp_path, BLOB[:100_000])
    assert f.resumed_bytes == 100_000 and f.received_bytes == len(BLOB) - 100_000
    assert f.used_partial


def test_server_without_range_support_is_read_from_the_start(
    plain_url: str, tmp_path: Path
) -> None:
    f = _fetch_with_partial(plain_url, tmp_path, BLOB[:100_000])
    assert f.resumed_bytes == 0 and f.received_bytes == len(BLOB)


def test_partial_longer_than_the_file_is_dropped(starlette_url: str, tmp_path: Path) -> None:
    f = _fetch_with_partial(starlette_url, tmp_path, BLOB + b"extra")
    assert f.resumed_bytes == 0


def test_metadata_is_never_resumed(starlette_url: str, tmp_path: Path) -> None:
    fetcher = ResumableHttpFetcher(tmp_path / "partial")
    assert fetcher.partial_path(f"{starlette_url}metadata/timestamp.json") is None
    assert b"".join(fetcher.fetch(f"{starlette_url}metadata/timestamp.json")) == b'{"signed": {}}'
    assert not (tmp_path / "partial").exists()
