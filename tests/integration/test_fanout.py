"""Release blobs fanned out through the broker: the cloud publishes each target
once, retained (``cloud.fanout.BlobFanout``); the broker copies it to every
device; each device assembles it from chunks (``device.blob_fetcher``) and TUF
verifies it. Metadata still comes from the HTTP repository.

Everything is real: Mosquitto (logging who subscribes to what), the cloud's TUF
repository, the repository over HTTP (``RangeServer`` logs every request), and
device agents running LiteRT models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud.broker import MosquittoProcess
from cloud.config import CloudSettings
from cloud.fanout import FANOUT_SERVICE, BlobFanout
from cloud.tuf_repo import ReleaseRepository
from device.agent import Agent
from device.blob_fetcher import DATA_SUFFIX, LEDGER_SUFFIX, BlobFetcher
from device.config import load_config, provision
from device.inputs import RandomSource
from device.tuf_client import ReleaseClient
from shared.errors import TransferError
from shared.manifest import MODEL_FILE, target_path
from shared.messages import EventKind
from shared.topics import blob_chunk_topic
from tests.attacks.harness import cloud_session, start_device
from tests.attacks.secure_env import NOT_AUTHORIZED, probe, secure_broker
from tests.faults.harness import (
    MODEL,
    PROXY_VARS,
    Controller,
    RangeServer,
    controller,
    publish_release,
)

pytestmark = pytest.mark.integration

#: The test models are a few KB: small chunks make several of them per file.
CHUNK = 1024


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto that logs every SUBSCRIBE: who asked for which blobs."""
    with MosquittoProcess(tmp_path / "broker", extra_lines=["log_type subscribe"]) as b:
        yield b


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    publish_release(repo, 1, seed=0)
    publish_release(repo, 2, seed=1)  # the same drift baseline bytes as release 1
    return repo


@pytest.fixture
def served(repo: ReleaseRepository) -> Iterator[RangeServer]:
    with RangeServer(repo.repo_dir) as server:
        yield server


@pytest.fixture
def ctl(broker: MosquittoProcess) -> Iterator[Controller]:
    with controller(broker.port) as c:
        yield c


@pytest.fixture
def fanout(repo: ReleaseRepository, broker: MosquittoProcess) -> Iterator[BlobFanout]:
    with BlobFanout(repo, "127.0.0.1", broker.port, chunk_bytes=CHUNK) as f:
        yield f


def make_agent(
    tmp_path: Path,
    device_id: str,
    port: int,
    repo: ReleaseRepository,
    url: str,
    **config: Any,
) -> Agent:
    """Provision a device (``config`` goes into its agent.toml) and build its agent."""
    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes())
    data = tmp_path / device_id
    provision(
        data,
        device_id=device_id,
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=port,
        repo_url=url,
        inference_interval=0.005,
        telemetry_interval=60.0,
        **config,
    )
    fast = {"retry_min": 0.2, "retry_max": 1.0, "probation_s": 0.3, "probation_min_inferences": 5}
    return Agent(dataclasses.replace(load_config(data), **fast), RandomSource(seed=1))


def target_requests(served: RangeServer, release: int | None = None) -> list[str]:
    """Paths of the target files devices fetched over HTTP (not metadata)."""
    out = []
    for path, _ in served.requests:
        if path.startswith("targets/") and (
            release is None or f"/{MODEL}/{release}/" in f"/{path}"
        ):
            out.append(path)
    return out


def blob_subscribers(broker: MosquittoProcess) -> set[str]:
    """Client ids that subscribed to any blob topic (from the broker's log)."""
    who = set()
    for line in broker.log_path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith("edgefleet/v1/blobs/"):
            who.add(parts[1])
    return who


def slots_snapshot(data_dir: Path) -> dict[str, str]:
    files = sorted(p for p in (data_dir / "slots").rglob("*") if p.is_file())
    files += [p for p in [data_dir / "slots.json"] if p.exists()]
    return {str(p.relative_to(data_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def wait_inferences(agent: Agent, more: int = 20, timeout: float = 10.0) -> None:
    start = agent.server.inferences
    deadline = time.monotonic() + timeout
    while agent.server.inferences < start + more:
        assert time.monotonic() < deadline, "inferences stopped"
        time.sleep(0.02)


def model_blob(fanout: BlobFanout, release: int) -> tuple[str, bytes]:
    """sha256 and bytes of the model target of ``release``."""
    info = fanout.release_targets(MODEL, release)[target_path(MODEL, release, MODEL_FILE)]
    sha = info.hashes["sha256"]
    return sha, (
        fanout.repo.targets_dir / MODEL / str(release) / f"{sha}.{MODEL_FILE}"
    ).read_bytes()


def chunks_of(fanout: BlobFanout, release: int) -> int:
    return sum(-(-i.length // CHUNK) for i in fanout.release_targets(MODEL, release).values())


def test_one_published_copy_reaches_every_agent_through_the_broker(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
    fanout: BlobFanout,
) -> None:
    fanout.ensure_release(MODEL, 1)
    size = sum(i.length for i in fanout.release_targets(MODEL, 1).values())
    chunks = chunks_of(fanout, 1)
    assert (fanout.published_blobs, fanout.published_bytes) == (3, size)
    assert fanout.published_chunks == chunks
    fanout.ensure_release(MODEL, 1)  # already there: nothing is sent again
    assert fanout.published_bytes == size

    agents = [make_agent(tmp_path, f"dev-{i}", broker.port, repo, served.url) for i in range(3)]
    try:
        for a in agents:
            a.start()
            ctl.deploy(a.cfg.device_id, 1)
        for a in agents:
            ctl.wait_event(a.cfg.device_id, EventKind.COMMITTED, 1)
        # A device that comes along afterwards (offline until now) gets the same
        # retained copy, also with the broker as its only source.
        late = make_agent(tmp_path, "dev-late", broker.port, repo, served.url, blob_source="mqtt")
        agents.append(late)
        late.start()
        ctl.deploy("dev-late", 1)
        ctl.wait_event("dev-late", EventKind.COMMITTED, 1)
        for a in agents:
            assert a.running_manifest is not None and a.running_manifest.release == 1
            blobs = a.updater.blobs
            assert blobs is not None
            assert (blobs.received_chunks, blobs.fallbacks) == (chunks, 0), a.cfg.device_id
        wait_inferences(late)
    finally:
        for a in agents:
            a.stop()
    assert fanout.published_bytes == size, "the cloud sent each blob exactly once"
    assert target_requests(served) == [], "no device downloaded a target from the cloud"
    assert {"dev-0", "dev-1", "dev-2", "dev-late"} <= blob_subscribers(broker)


def test_tampered_chunk_is_refused_by_tuf_and_the_running_model_keeps_serving(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
    fanout: BlobFanout,
) -> None:
    fanout.ensure_release(MODEL, 1)
    fanout.ensure_release(MODEL, 2)
    agent = make_agent(tmp_path, "dev-t", broker.port, repo, served.url, blob_source="mqtt")
    agent.start()
    try:
        ctl.deploy("dev-t", 1)
        ctl.wait_event("dev-t", EventKind.COMMITTED, 1)
        # Whoever can write the blob topics (here: anyone, on a plain broker)
        # swaps one chunk of release 2's model for other bytes of the same length.
        sha, data = model_blob(fanout, 2)
        evil = bytes(b ^ 0xFF for b in data[CHUNK : 2 * CHUNK])
        with probe(broker.port, client_id="evil") as attacker:
            assert attacker.publish(blob_chunk_topic(sha, 1), evil, retain=True) < NOT_AUTHORIZED
        before = slots_snapshot(agent.cfg.data_dir)
        ctl.deploy("dev-t", 2)
        failed = ctl.wait_event("dev-t", EventKind.FAILED, 2)
        assert failed.reason is not None and failed.reason.code == "verification_failed"
        assert "broker" in failed.reason.message and "hashes" in failed.reason.message
        assert agent.running_manifest is not None and agent.running_manifest.release == 1
        wait_inferences(agent)
        assert slots_snapshot(agent.cfg.data_dir) == before, "the slots changed on disk"
        partial = agent.cfg.data_dir / "download" / "partial"
        assert not list(partial.glob(f"{sha}*")), "the refused bytes were kept"
    finally:
        agent.stop()
    assert target_requests(served, 2) == [], "blob_source = mqtt fetched a target over HTTP"


def test_auto_takes_from_the_repository_what_the_broker_got_wrong(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
    fanout: BlobFanout,
) -> None:
    fanout.ensure_release(MODEL, 2)
    sha, data = model_blob(fanout, 2)
    with probe(broker.port, client_id="evil") as attacker:
        evil = bytes(b ^ 0xFF for b in data[:CHUNK])
        assert attacker.publish(blob_chunk_topic(sha, 0), evil, retain=True) < NOT_AUTHORIZED
    agent = make_agent(tmp_path, "dev-a", broker.port, repo, served.url)  # blob_source auto
    agent.start()
    try:
        ctl.deploy("dev-a", 2)
        ctl.wait_event("dev-a", EventKind.COMMITTED, 2)
        blobs = agent.updater.blobs
        assert blobs is not None and blobs.fallbacks == 1
        assert agent.running_manifest is not None and agent.running_manifest.release == 2
    finally:
        agent.stop()
    # Only the file the broker got wrong came over HTTP, and TUF checked it too.
    assert [p.rpartition("/")[2] for p in target_requests(served)] == [f"{sha}.{MODEL_FILE}"]


def test_resumed_blob_download_fetches_only_the_chunks_it_lacks(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    fanout: BlobFanout,
) -> None:
    fanout.ensure_release(MODEL, 1)
    sha, data = model_blob(fanout, 1)
    total = -(-len(data) // CHUNK)
    assert total >= 4
    partial = tmp_path / "partial"
    with probe(broker.port, client_id="ops") as ops:
        # Only the first two chunks of the model are on the broker yet.
        for i in range(2, total):
            assert ops.publish(blob_chunk_topic(sha, i), b"", retain=True) < NOT_AUTHORIZED
        first = BlobFetcher.connect(
            "dev-r", "127.0.0.1", broker.port, partial, mode="mqtt", stall_timeout=1.0
        )
        try:
            client = ReleaseClient(tmp_path / "tuf", repo.root_bytes(), served.url, blobs=first)
            with pytest.raises(TransferError, match="no chunk from the broker"):
                client.fetch_release(MODEL, 1, tmp_path / "dest")
            assert first.received_chunks == 2
        finally:
            first.close()  # the agent dies; its partial file and ledger stay
        assert (partial / f"{sha}{DATA_SUFFIX}").is_file()
        assert (partial / f"{sha}{LEDGER_SUFFIX}").is_file()
        for i in range(2, total):
            chunk = data[i * CHUNK : (i + 1) * CHUNK]
            assert ops.publish(blob_chunk_topic(sha, i), chunk, retain=True) < NOT_AUTHORIZED

    second = BlobFetcher.connect("dev-r", "127.0.0.1", broker.port, partial, mode="mqtt")
    try:
        client = ReleaseClient(tmp_path / "tuf", repo.root_bytes(), served.url, blobs=second)
        verified = client.fetch_release(MODEL, 1, tmp_path / "dest")
    finally:
        second.close()
    assert verified.model_path.read_bytes() == data
    assert second.resumed_bytes == 2 * CHUNK and second.used_partial
    assert second.received_chunks == chunks_of(fanout, 1) - 2, "kept chunks were fetched again"
    assert second.duplicate_chunks == 0
    assert target_requests(served) == []
    assert not list(partial.iterdir()), "partial files outlived the download"


def test_blob_download_goes_on_after_the_link_drops(
    tmp_path: Path, repo: ReleaseRepository, served: RangeServer
) -> None:
    with MosquittoProcess(tmp_path / "persistent", persist=True) as b:
        with BlobFanout(repo, "127.0.0.1", b.port, chunk_bytes=CHUNK) as fanout:
            fanout.ensure_release(MODEL, 1)
            sha, data = model_blob(fanout, 1)
            chunks = chunks_of(fanout, 1)
        total = -(-len(data) // CHUNK)
        with probe(b.port, client_id="ops") as ops:
            for i in range(2, total):
                assert ops.publish(blob_chunk_topic(sha, i), b"", retain=True) < NOT_AUTHORIZED
        fetcher = BlobFetcher.connect("dev-b", "127.0.0.1", b.port, tmp_path / "p", mode="mqtt")
        client = ReleaseClient(tmp_path / "tuf", repo.root_bytes(), served.url, blobs=fetcher)
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                outcome["ok"] = client.fetch_release(MODEL, 1, tmp_path / "dest")
            except Exception as e:
                outcome["error"] = e

        worker = threading.Thread(target=fetch)
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while fetcher.received_chunks < 2:
                assert time.monotonic() < deadline and worker.is_alive(), outcome
                time.sleep(0.02)
            b.restart()  # the link drops: the new connection has none of the subscriptions
            with probe(b.port, client_id="ops") as ops:
                for i in range(2, total):
                    chunk = data[i * CHUNK : (i + 1) * CHUNK]
                    assert ops.publish(blob_chunk_topic(sha, i), chunk, retain=True) < 0x80
            worker.join(timeout=60)
        finally:
            fetcher.close()
            worker.join(timeout=60)
    assert "error" not in outcome, outcome
    assert outcome["ok"].model_path.read_bytes() == data
    assert (fetcher.received_chunks, fetcher.duplicate_chunks) == (chunks, 0)


def test_http_blob_source_never_touches_the_blob_topics(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
    fanout: BlobFanout,
) -> None:
    fanout.ensure_release(MODEL, 1)
    agent = make_agent(tmp_path, "dev-h", broker.port, repo, served.url, blob_source="http")
    agent.start()
    try:
        ctl.deploy("dev-h", 1)
        ctl.wait_event("dev-h", EventKind.COMMITTED, 1)
        assert agent.updater.blobs is None
    finally:
        agent.stop()
    assert "dev-h" not in blob_subscribers(broker)
    assert len(target_requests(served, 1)) == 3


def test_auto_falls_back_to_the_repository_when_the_broker_holds_nothing(
    tmp_path: Path,
    broker: MosquittoProcess,
    repo: ReleaseRepository,
    served: RangeServer,
    ctl: Controller,
) -> None:
    agent = make_agent(tmp_path, "dev-f", broker.port, repo, served.url)
    agent.start()
    try:
        ctl.deploy("dev-f", 1)
        ctl.wait_event("dev-f", EventKind.COMMITTED, 1)
        blobs = agent.updater.blobs
        assert blobs is not None and blobs.received_chunks == 0
    finally:
        agent.stop()
    assert "dev-f" in blob_subscribers(broker), "auto asked the broker first"
    assert len(target_requests(served, 1)) == 3
    # Knowing that the broker holds nothing takes one round trip, not the timeout.
    fetcher = BlobFetcher.connect(
        "dev-g", "127.0.0.1", broker.port, tmp_path / "p", probe_timeout=30.0
    )
    try:
        start = time.monotonic()
        assert fetcher.locate(["ab" * 32]) == {}
        assert time.monotonic() - start < 10.0
    finally:
        fetcher.close()


def test_retire_clears_only_blobs_no_newer_release_needs(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository, fanout: BlobFanout
) -> None:
    fanout.ensure_release(MODEL, 1)
    fanout.ensure_release(MODEL, 2)
    old = {i.hashes["sha256"] for i in fanout.release_targets(MODEL, 1).values()}
    new = {i.hashes["sha256"] for i in fanout.release_targets(MODEL, 2).values()}
    assert len(old & new) == 1, "the two releases share their drift baseline"
    fanout.retire(MODEL, 1)
    assert fanout.cleared_blobs == 2
    look = BlobFetcher.connect("dev-l", "127.0.0.1", broker.port, tmp_path / "p")
    try:
        assert set(look.locate(old | new)) == new
    finally:
        look.close()
    sha, _ = model_blob(fanout, 1)
    with probe(broker.port, client_id="watch") as watch:
        watch.subscribe(blob_chunk_topic(sha, 0))
        assert watch.wait_message(blob_chunk_topic(sha, 0), timeout=0.5) is None
    published = fanout.published_blobs
    fanout.ensure_release(MODEL, 1)  # needed again: published again
    assert fanout.published_blobs == published + 2


def test_a_damaged_repository_file_is_not_fanned_out(
    tmp_path: Path, broker: MosquittoProcess, repo: ReleaseRepository, fanout: BlobFanout
) -> None:
    sha, data = model_blob(fanout, 2)
    path = repo.targets_dir / MODEL / "2" / f"{sha}.{MODEL_FILE}"
    path.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    fanout.ensure_release(MODEL, 2)  # devices get it from the repository, and refuse it
    assert (fanout.skipped_blobs, fanout.published_blobs) == (1, 2)
    look = BlobFetcher.connect("dev-l", "127.0.0.1", broker.port, tmp_path / "p")
    try:
        assert sha not in look.locate([sha])
        path.write_bytes(data)  # restored from backup: the next call publishes it
        fanout.ensure_release(MODEL, 2)
        assert fanout.published_blobs == 3 and sha in look.locate([sha])
    finally:
        look.close()


def test_secure_broker_fanout_identity_and_one_device_connection(
    tmp_path: Path, repo: ReleaseRepository, served: RangeServer
) -> None:
    with secure_broker(tmp_path / "secure") as sec:
        # An identity without write access to the blob topics is told so.
        with BlobFanout(repo, "127.0.0.1", sec.port, tls=sec.repo.as_tls_dict()) as wrong:
            with pytest.raises(TransferError, match=r"refused .* needs write access"):
                wrong.ensure_release(MODEL, 1)
            assert wrong.published_blobs == 0
        # The service's own settings: it connects as edgefleet-fanout (issued from the
        # CA in <data dir>/pki), never as the cloud's identity, which it would kick off.
        settings = CloudSettings(
            data_dir=tmp_path / "secure",
            broker_port=sec.port,
            broker_tls_ca=sec.ca.ca_cert_path,
            broker_tls_cert=sec.cloud.cert_file,
            broker_tls_key=sec.cloud.key_file,
            fanout_chunk_bytes=CHUNK,
        )
        fanout = BlobFanout.from_settings(settings, repo)
        assert fanout is not None
        assert sec.ca.service_identity(FANOUT_SERVICE).cert_file.is_file()
        cloud = cloud_session(sec.port, tls=sec.cloud.as_tls_dict())
        with fanout:
            fanout.ensure_release(MODEL, 1)
            dev = start_device(
                tmp_path, port=sec.port, repo=repo, repo_url=served.url, cloud=cloud, secure=sec
            )
            try:
                dev.install(1)
                blobs = dev.agent.updater.blobs
                assert blobs is not None and blobs.received_chunks == chunks_of(fanout, 1)
                assert cloud.mqtt.connected.is_set(), "the fan-out took the cloud's session"
            finally:
                dev.agent.stop()
                cloud.mqtt.stop()
    assert target_requests(served) == []
