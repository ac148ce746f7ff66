"""A device fetches a signed release over real HTTP from the repository directory.

The server is ``http.server.ThreadingHTTPServer`` serving the repository as
static files, like any web server or CDN in front of the cloud would; the
device uses ngclient's default urllib3 transport.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api import exceptions as tuf_errors

from cloud.tuf_repo import ReleaseRepository
from device.tuf_client import ReleaseClient, ReleaseNotFoundError
from shared.errors import TransferError, VerificationError
from shared.manifest import (
    BASELINE_FILE,
    SELFTEST_FILE,
    DriftSpec,
    ReleaseManifest,
    SelfTestSpec,
    TensorSpec,
    target_path,
)

PROXY_VARS = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys", now=datetime.now(UTC))
    manifest = ReleaseManifest(
        model="digits",
        release=3,
        created_at=1_732_000_000.5,
        quantization="int8",
        input=TensorSpec(name="x", shape=[1, 8, 8, 1], dtype="int8", scale=0.5, zero_point=0),
        output=TensorSpec(name="y", shape=[1, 10], dtype="float32"),
        selftest=SelfTestSpec(target=target_path("digits", 3, SELFTEST_FILE), count=2, atol=0.1),
        drift=DriftSpec(
            target=target_path("digits", 3, BASELINE_FILE),
            features="flatten",
            n_features=64,
            bins=8,
        ),
    )
    repo.publish(
        {
            manifest.model_target: b"TFL3" + bytes(range(256)) * 2000,  # ~0.5 MB, several chunks
            manifest.selftest.target: b"vectors",
            target_path("digits", 3, BASELINE_FILE): b"baseline",
        },
        {manifest.model_target: manifest.to_custom()},
    )
    return repo


@pytest.fixture
def server(repo: ReleaseRepository) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(repo.repo_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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


@pytest.fixture
def client(
    repo: ReleaseRepository, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ReleaseClient:
    for var in PROXY_VARS:  # loopback must not go through a proxy
        monkeypatch.delenv(var, raising=False)
    return ReleaseClient(tmp_path / "device" / "tuf", repo.root_bytes(), server)


def test_release_fetched_and_verified_over_http(
    repo: ReleaseRepository, client: ReleaseClient, tmp_path: Path
) -> None:
    progress: list[tuple[int, int]] = []
    got = client.fetch_release(
        "digits", 3, tmp_path / "slot", progress=lambda d, t: progress.append((d, t))
    )
    info = repo.list_targets()["digits/3/model.tflite"]
    assert got.model_sha256 == info.hashes["sha256"]
    assert got.model_path == tmp_path / "slot" / "model.tflite"
    assert got.model_path.stat().st_size == info.length
    assert got.manifest.release == 3 and got.manifest.input.scale == 0.5
    assert got.baseline_path is not None and got.baseline_path.read_bytes() == b"baseline"
    assert progress[-1][0] == progress[-1][1] == sum(t.length for t in repo.list_targets().values())


def test_tampered_target_rejected(
    repo: ReleaseRepository, client: ReleaseClient, tmp_path: Path
) -> None:
    info = repo.list_targets()["digits/3/model.tflite"]
    blob = repo.targets_dir / "digits" / "3" / f"{info.hashes['sha256']}.model.tflite"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as err:
        client.fetch_release("digits", 3, tmp_path / "slot")
    assert isinstance(err.value.__cause__, tuf_errors.LengthOrHashMismatchError)
    assert list((tmp_path / "slot").iterdir()) == []  # nothing at the final path, no temp files


def test_unknown_release_rejected(client: ReleaseClient, tmp_path: Path) -> None:
    with pytest.raises(ReleaseNotFoundError, match="release 7 of digits is not in the signed"):
        client.fetch_release("digits", 7, tmp_path / "slot")
    assert not (tmp_path / "slot" / "model.tflite").exists()


def test_repository_missing_on_server_is_a_transfer_error(
    repo: ReleaseRepository, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    client = ReleaseClient(tmp_path / "dev", repo.root_bytes(), server + "nothing-here/")
    with pytest.raises(TransferError, match="retry later"):
        client.fetch_release("digits", 3, tmp_path / "slot")
