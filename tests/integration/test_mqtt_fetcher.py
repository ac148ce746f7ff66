"""TUF over MQTT 5: ``MqttFetcher`` (device) against ``MqttRepoServer`` (cloud), real broker.

The device side is the real ``ReleaseClient`` (tuf.ngclient) with the MQTT
transport swapped in; every check TUF makes over HTTP it makes here too. The
hostile-server tests answer the device's requests themselves, with frames a
broken or malicious server could send.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tuf.api import exceptions as tuf_errors

from cloud.broker import MosquittoProcess
from cloud.mqtt_repo import DeviceBudget, MqttRepoServer
from cloud.tuf_repo import ReleaseRepository
from device.mqtt_fetcher import MQTT_REPO_URL, MqttFetcher
from device.mqtt_session import MqttSession
from device.tuf_client import ReleaseClient
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
from shared.repo_wire import (
    RepoRequest,
    RepoResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from shared.topics import repo_request_topic, repo_response_topic
from tests.attacks.secure_env import probe, secure_broker

pytestmark = pytest.mark.integration

MODEL = b"TFL3" + os.urandom(300_000)  # several 64 KiB chunks


def _publish_release(repo: ReleaseRepository, release: int, model: bytes = MODEL) -> None:
    manifest = ReleaseManifest(
        model="digits",
        release=release,
        created_at=1_732_000_000.5,
        quantization="int8",
        input=TensorSpec(name="x", shape=[1, 8, 8, 1], dtype="int8", scale=0.5, zero_point=0),
        output=TensorSpec(name="y", shape=[1, 10], dtype="float32"),
        selftest=SelfTestSpec(
            target=target_path("digits", release, SELFTEST_FILE), count=2, atol=0.1
        ),
        drift=DriftSpec(
            target=target_path("digits", release, BASELINE_FILE),
            features="flatten",
            n_features=64,
            bins=8,
        ),
    )
    repo.publish(
        {
            manifest.model_target: model,
            manifest.selftest.target: b"vectors",
            manifest.drift.target: b"baseline",  # type: ignore[union-attr]
        },
        {manifest.model_target: manifest.to_custom()},
    )


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys", now=datetime.now(UTC))
    _publish_release(repo, 1)
    return repo


@pytest.fixture
def server(repo: ReleaseRepository, broker: MosquittoProcess) -> Iterator[MqttRepoServer]:
    with MqttRepoServer(repo.repo_dir, broker.host, broker.port) as srv:
        yield srv


@pytest.fixture
def fetcher(broker: MosquittoProcess) -> Iterator[MqttFetcher]:
    f = MqttFetcher.connect(
        "dev-1", broker.host, broker.port, request_timeout=2.0, stall_timeout=20.0
    )
    try:
        yield f
    finally:
        f.close()


def _client(repo: ReleaseRepository, fetcher: MqttFetcher, tmp_path: Path) -> ReleaseClient:
    return ReleaseClient(
        tmp_path / "device" / "tuf", repo.root_bytes(), MQTT_REPO_URL, fetcher=fetcher
    )


def test_release_fetched_and_verified_over_mqtt(
    repo: ReleaseRepository, server: MqttRepoServer, fetcher: MqttFetcher, tmp_path: Path
) -> None:
    got = _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
    assert got.model_path.read_bytes() == MODEL
    assert got.model_sha256 == repo.list_targets()["digits/1/model.tflite"].hashes["sha256"]
    assert fetcher.requests >= len(MODEL) // fetcher.chunk_bytes
    assert server.served_bytes >= len(MODEL)


def test_tampered_target_over_mqtt_rejected(
    repo: ReleaseRepository, server: MqttRepoServer, fetcher: MqttFetcher, tmp_path: Path
) -> None:
    info = repo.list_targets()["digits/1/model.tflite"]
    blob = repo.targets_dir / "digits" / "1" / f"{info.hashes['sha256']}.model.tflite"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="LengthOrHashMismatchError"):
        _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
    assert list((tmp_path / "slot").iterdir()) == []


def test_download_resumes_from_offset_after_link_cut(
    repo: ReleaseRepository, broker: MosquittoProcess, tmp_path: Path
) -> None:
    # A slow server (byte budget) so the cut lands mid-file; both sides reconnect.
    budget = DeviceBudget(bytes_per_s=400_000, byte_burst=64 * 1024)
    offsets: list[tuple[str, int]] = []
    with MqttRepoServer(repo.repo_dir, broker.host, broker.port, budget=budget) as srv:
        original = srv._read

        def recording(req: RepoRequest) -> RepoResponse:
            offsets.append((req.path, req.offset))
            return original(req)

        srv._read = recording  # type: ignore[method-assign]
        fetcher = MqttFetcher.connect(
            "dev-1", broker.host, broker.port, request_timeout=1.0, stall_timeout=30.0
        )
        try:
            client = _client(repo, fetcher, tmp_path)
            cut = threading.Thread(target=_cut_when, args=(offsets, broker))
            cut.start()
            try:
                got = client.fetch_release("digits", 1, tmp_path / "slot")
            finally:
                cut.join()
        finally:
            fetcher.close()
    assert got.model_path.read_bytes() == MODEL
    model_offsets = [o for p, o in offsets if p.endswith(".model.tflite")]
    assert model_offsets.count(0) == 1, f"the model restarted from 0: {model_offsets}"
    assert fetcher.retries >= 1, "the link cut should have cost at least one retry"
    assert model_offsets == sorted(model_offsets)


def _cut_when(offsets: list[tuple[str, int]], broker: MosquittoProcess) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(p.endswith(".model.tflite") and o > 0 for p, o in offsets):
            broker.restart()  # every connection drops; same port
            return
        time.sleep(0.01)


def test_several_servers_share_the_requests(
    repo: ReleaseRepository, broker: MosquittoProcess, fetcher: MqttFetcher, tmp_path: Path
) -> None:
    with (
        MqttRepoServer(repo.repo_dir, broker.host, broker.port) as a,
        MqttRepoServer(repo.repo_dir, broker.host, broker.port) as b,
    ):
        _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
    assert a.served > 0 and b.served > 0, (a.served, b.served)


@pytest.mark.parametrize(
    "path",
    [
        "metadata/../../keys/online/targets.pem",
        "../keys/online/timestamp.pem",
        "/etc/passwd",
        ".lock",
        "metadata/.lock",
        "targets",
        "keys/online/x.pem",
        "metadata\\..\\..\\keys",
    ],
)
def test_path_traversal_refused(
    repo: ReleaseRepository, server: MqttRepoServer, broker: MosquittoProcess, path: str
) -> None:
    with probe(broker.port, client_id="dev-9") as p:
        assert p.subscribe(repo_response_topic("dev-9")) == 1
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = repo_response_topic("dev-9")
        props.CorrelationData = b"c1"
        payload = b'{"schema":"edgefleet.repo_get/1","path":%s,"offset":0,"length":100}' % (
            b'"' + path.replace("\\", "\\\\").encode() + b'"'
        )
        p.client.publish(repo_request_topic("dev-9"), payload, qos=1, properties=props)
        answer = p.wait_message(repo_response_topic("dev-9"))
    assert answer is not None
    resp = decode_response(answer)
    assert resp.status in ("bad_request", "not_found") and resp.data == b""


def test_symlink_out_of_repository_not_served(
    repo: ReleaseRepository, server: MqttRepoServer, broker: MosquittoProcess, tmp_path: Path
) -> None:
    secret = tmp_path / "keys" / "online"
    (repo.metadata_dir / "escape.json").symlink_to(next(secret.glob("*.pem")))
    with probe(broker.port, client_id="dev-9") as p:
        p.subscribe(repo_response_topic("dev-9"))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = repo_response_topic("dev-9")
        props.CorrelationData = b"c2"
        p.client.publish(
            repo_request_topic("dev-9"),
            encode_request(RepoRequest("metadata/escape.json")),
            qos=1,
            properties=props,
        )
        answer = p.wait_message(repo_response_topic("dev-9"))
    assert answer is not None and decode_response(answer).status == "not_found"
    assert server.refused.get("outside_repository") == 1


def test_response_topic_of_another_device_ignored(
    repo: ReleaseRepository, server: MqttRepoServer, broker: MosquittoProcess
) -> None:
    with (
        probe(broker.port, client_id="victim") as victim,
        probe(broker.port, client_id="dev-9") as p,
    ):
        victim.subscribe(repo_response_topic("victim"))
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = repo_response_topic("victim")
        props.CorrelationData = b"c3"
        p.client.publish(
            repo_request_topic("dev-9"),
            encode_request(RepoRequest("metadata/1.root.json")),
            qos=1,
            properties=props,
        )
        assert victim.wait_message(repo_response_topic("victim"), timeout=1.0) is None
    assert server.refused.get("bad_response_topic") == 1


class _HostileServer:
    """Answers the device's requests with whatever ``answer(request)`` returns."""

    def __init__(self, port: int, answer) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id="hostile",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(repo_request_topic("dev-1"), qos=1)
        self.client.loop_start()
        time.sleep(0.2)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = msg.properties.CorrelationData
        frame = self.answer(decode_request(msg.payload))
        client.publish(msg.properties.ResponseTopic, frame, qos=1, properties=props)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        # A chunk at another offset than asked for.
        (
            lambda r: encode_response(
                RepoResponse("ok", offset=r.offset + 1, total=10**6, data=b"x" * 10)
            ),
            "at offset",
        ),
        # More bytes than asked for.
        (
            lambda r: encode_response(
                RepoResponse("ok", offset=r.offset, total=10**6, data=b"x" * (r.length + 1))
            ),
            "asked for",
        ),
        # A file size that grows between chunks (an endless stream in disguise).
        (
            lambda r: encode_response(
                RepoResponse(
                    "ok", offset=r.offset, total=r.offset + 2 * r.length, data=b"x" * r.length
                )
            ),
            "changed the file size",
        ),
        # A total above what the device accepts at all.
        (
            lambda r: encode_response(RepoResponse("ok", offset=0, total=2**39, data=b"x")),
            "over this device's limit",
        ),
        # Garbage instead of a frame.
        (lambda r: b"\x00garbage", "EFR1 frame header"),
    ],
)
def test_hostile_server_frames_refused(broker: MosquittoProcess, answer, error: str) -> None:  # type: ignore[no-untyped-def]
    hostile = _HostileServer(broker.port, answer)
    fetcher = MqttFetcher.connect(
        "dev-1",
        broker.host,
        broker.port,
        request_timeout=2.0,
        chunk_bytes=1000,
        max_file_bytes=10**7,
    )
    try:
        with pytest.raises(tuf_errors.DownloadError, match=error):
            b"".join(fetcher.fetch(MQTT_REPO_URL + "targets/digits/1/x.model.tflite"))
    finally:
        fetcher.close()
        hostile.close()


def test_missing_file_is_404_for_ngclient(server: MqttRepoServer, fetcher: MqttFetcher) -> None:
    # ngclient ends its walk along the root chain on a 404 for the next version.
    with pytest.raises(tuf_errors.DownloadHTTPError) as err:
        fetcher.fetch(MQTT_REPO_URL + "metadata/99.root.json")
    assert err.value.status_code == 404


def test_no_server_is_a_transfer_error(
    repo: ReleaseRepository, broker: MosquittoProcess, tmp_path: Path
) -> None:
    fetcher = MqttFetcher.connect(
        "dev-1", broker.host, broker.port, request_timeout=0.3, stall_timeout=1.0
    )
    try:
        with pytest.raises(TransferError, match="no answer from the MQTT repository"):
            _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
    finally:
        fetcher.close()


def test_fetch_over_secure_broker_on_the_agents_own_connection(
    repo: ReleaseRepository, tmp_path: Path
) -> None:
    with secure_broker(tmp_path / "secure") as sec:
        tls = sec.device_tls("dev-7")
        session = MqttSession(
            "dev-7",
            "127.0.0.1",
            sec.port,
            agent_version="0.1.0",
            on_desired=lambda d: None,
            tls=tls,
            clock=time.time,
        )
        with MqttRepoServer(
            repo.repo_dir,
            "127.0.0.1",
            sec.port,
            tls=sec.repo.as_tls_dict(),
            client_id="edgefleet-repo",
        ):
            session.start()
            try:
                assert session.connected.wait(10)
                fetcher = MqttFetcher.for_session(session, request_timeout=2.0)
                got = _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
                fetcher.close()
            finally:
                session.stop()
    assert got.model_path.read_bytes() == MODEL


def test_cli_repo_server_serves_until_sigterm(broker: MosquittoProcess, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    data = tmp_path / "cloud"
    repo = ReleaseRepository.init(data / "repository", data / "keys")
    _publish_release(repo, 1)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "repo-mqtt",
            "--data-dir",
            str(data),
            "--broker-port",
            str(broker.port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "serving" in proc.stdout.readline()
        fetcher = MqttFetcher.connect("dev-1", broker.host, broker.port, request_timeout=2.0)
        try:
            got = _client(repo, fetcher, tmp_path).fetch_release("digits", 1, tmp_path / "slot")
        finally:
            fetcher.close()
        assert got.model_path.read_bytes() == MODEL
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
