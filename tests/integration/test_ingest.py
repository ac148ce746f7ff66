"""Telemetry ingest against a real Mosquitto and a real database: workers split a
shared subscription, writes are idempotent, nothing is lost when a worker or the
broker restarts, and bad telemetry is counted and dropped, never stored."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import func, select, text

from cloud.broker import MosquittoProcess
from cloud.db import Database
from cloud.ingest import IngestConfig, IngestWorker, cached_release_lookup
from cloud.ingest.store import StoredWindow, TelemetryStore, decode_counts
from cloud.ingest.tables import DeviceSeen, DriftPartial, TelemetryWindow
from cloud.ingest.testing import FakeDevice, SyntheticRelease, publish_synthetic_release
from cloud.releases import ReleaseService
from cloud.tuf_repo import ReleaseRepository
from shared.messages import MAX_FEATURES, PackedCounts, Telemetry, encode
from shared.topics import Channel

pytestmark = pytest.mark.integration


class Publisher:
    """A device-side MQTT client with a persistent session that waits for every PUBACK."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=30)
        assert info.is_published()

    def announce(self, dev: FakeDevice) -> None:
        self.send(dev.topic(Channel.STATUS), dev.status(), retain=True)
        self.send(dev.topic(Channel.REPORTED), dev.reported(), retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def release(tmp_path: Path) -> tuple[ReleaseService, SyntheticRelease]:
    repo = ReleaseRepository.open_or_init(tmp_path / "repo", tmp_path / "keys")
    return ReleaseService(repo), publish_synthetic_release(repo, n_features=6, bins=8)


def _worker(
    db: Database,
    port: int,
    index: int,
    releases: ReleaseService | None = None,
    group: str = "store",
) -> IngestWorker:
    cfg = IngestConfig(
        port=port,
        share_group=group,
        client_id=f"test-ingest-{index}",
        batch_size=200,
        batch_interval=0.05,
        bucket_seconds=3600,
    )
    w = IngestWorker(db, cfg, releases=cached_release_lookup(releases) if releases else None)
    w.start(wait=10)
    assert w.subscribed.is_set()
    return w


def _count(db: Database, device: str | None = None) -> int:
    with db.session() as s:
        q = select(func.count()).select_from(TelemetryWindow)
        if device is not None:
            q = q.where(TelemetryWindow.device_id == device)
        return int(s.scalar(q) or 0)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_workers_split_the_stream_and_store_each_window_once(broker, db) -> None:  # type: ignore[no-untyped-def]
    workers = [_worker(db, broker.port, i) for i in range(2)]
    pub = Publisher(broker.port)
    try:
        devs = [FakeDevice(f"dev-{i}") for i in range(4)]
        for d in devs:
            pub.announce(d)
        time.sleep(0.5)  # announcements committed before the first window
        for _ in range(50):
            for d in devs:
                pub.send(d.topic(Channel.TELEMETRY), encode(d.telemetry()))
        _wait(lambda: _count(db) == 200, "200 windows stored")
        shares = [w.stats.stored for w in workers]
        assert sum(shares) == 200 and min(shares) > 0, f"shared subscription split {shares}"
        with db.session() as s:
            groups = dict(s.execute(select(DeviceSeen.device_id, DeviceSeen.group)).all())
        assert groups == {d.device_id: "default" for d in devs}
    finally:
        pub.close()
        for w in workers:
            w.stop()


def test_worker_restart_loses_nothing(tmp_path: Path, db: Database) -> None:
    with MosquittoProcess(tmp_path / "broker", persist=True) as b:
        w0, w1 = _worker(db, b.port, 0), _worker(db, b.port, 1)
        pub = Publisher(b.port)
        try:
            dev = FakeDevice("dev-r")
            pub.announce(dev)
            _wait(lambda: w0.stats.seen + w1.stats.seen >= 2, "announcement stored")
            w1.stop()  # a worker goes away; its share queues at the broker
            for _ in range(100):
                pub.send(dev.topic(Channel.TELEMETRY), encode(dev.telemetry()))
            _wait(lambda: w0.stats.received >= 49, "the live worker's share")
            time.sleep(0.3)
            assert _count(db) < 100  # the other share waits for its worker
            w1 = _worker(db, b.port, 1)  # same client id: same session
            _wait(lambda: _count(db) == 100, "every window after the restart")
        finally:
            pub.close()
            w0.stop()
            w1.stop()


def test_broker_restart_loses_nothing(tmp_path: Path, db: Database) -> None:
    with MosquittoProcess(tmp_path / "broker", persist=True) as b:
        w = _worker(db, b.port, 0)
        pub = Publisher(b.port)
        dev = FakeDevice("dev-b")
        try:
            pub.announce(dev)
            for _ in range(30):
                pub.send(dev.topic(Channel.TELEMETRY), encode(dev.telemetry()))
            _wait(lambda: _count(db) == 30, "first 30 windows")
            w.stop()
            for _ in range(30):  # queued for the absent worker
                pub.send(dev.topic(Channel.TELEMETRY), encode(dev.telemetry()))
            pub.close()
            b.restart()  # persistence keeps sessions and queued messages
            w = _worker(db, b.port, 0)
            pub = Publisher(b.port)
            for _ in range(30):
                pub.send(dev.topic(Channel.TELEMETRY), encode(dev.telemetry()))
            _wait(lambda: _count(db) == 90, "all 90 windows across the broker restart")
            assert w.stats.dropped == {}
        finally:
            pub.close()
            w.stop()


def test_redelivered_window_counts_once(db: Database, release) -> None:  # type: ignore[no-untyped-def]
    _, rel = release
    store = TelemetryStore(db, worker="w", bucket_seconds=60)
    dev = FakeDevice("dev-d", release=rel)
    msg = dev.telemetry(samples=300)
    window = StoredWindow(msg, received_at=1000.0, group="default")
    first = store.write_batch([window, window])
    again = store.write_batch([window])
    assert (first.stored, first.duplicates, again.stored, again.duplicates) == (1, 1, 0, 1)
    assert _count(db) == 1
    with db.session() as s:
        part = s.scalars(select(DriftPartial)).one()
        counts = decode_counts(part.input_counts, (part.n_features, part.bins))
    assert part.windows == 1 and int(counts[0].sum()) == 300  # histograms added once


def test_bad_telemetry_is_counted_and_never_stored(broker, db, release) -> None:  # type: ignore[no-untyped-def]
    service, rel = release
    w = _worker(db, broker.port, 0, releases=service)
    pub = Publisher(broker.port)
    try:
        good = FakeDevice("dev-good", release=rel, group="lab")
        pub.announce(good)
        _wait(lambda: w.stats.seen >= 2, "announcement stored")
        topic = good.topic(Channel.TELEMETRY)
        # Histograms in both forms: nested lists (older agents) and packed.
        valid = json.loads(encode(replace(good, packed=False).telemetry()))
        packed = json.loads(encode(good.telemetry()))
        short = {**packed["input_hist_packed"]}
        short["data"] = short["data"][:-4]
        bad: dict[str, bytes] = {
            "not json": b"\x00\xffgarbage",
            "wrong types": json.dumps({**valid, "inferences": "many"}).encode(),
            "negative count": json.dumps({**valid, "errors": -1}).encode(),
            "huge histogram": json.dumps(
                {**valid, "input_hist": [[1] * 8] * (MAX_FEATURES + 1)}
            ).encode(),
            "ragged histogram": json.dumps({**valid, "input_hist": [[1, 2], [3]]}).encode(),
            "forged counts": json.dumps({**valid, "input_hist": [[2**40] * 8] * 6}).encode(),
            "uneven features": json.dumps(
                {**valid, "input_hist": [[1] * 8] * 5 + [[2] * 8]}
            ).encode(),
            "wrong shape": json.dumps({**valid, "input_hist": [[1] * 8] * 5}).encode(),
            "packed data too short": json.dumps({**packed, "input_hist_packed": short}).encode(),
            "packed forged counts": encode(
                Telemetry.model_validate(
                    {**packed, "input_hist_packed": PackedCounts.of([[2**40] * 8] * 6)}
                )
            ),
            "packed wrong shape": encode(
                Telemetry.model_validate(
                    {**packed, "input_hist_packed": PackedCounts.of([[1] * 8] * 5)}
                )
            ),
            "both forms": json.dumps({**packed, "input_hist": valid["input_hist"]}).encode(),
            "unknown release": json.dumps({**valid, "release": 99}).encode(),
            "another device's id": json.dumps({**valid, "device_id": "dev-other"}).encode(),
            "oversized": b'{"schema": "edgefleet.telemetry/1", "pad": "' + b"x" * 300_000 + b'"}',
        }
        for payload in bad.values():
            pub.send(topic, payload)
        stranger = FakeDevice("dev-stranger", release=rel)  # never announced itself
        pub.send(stranger.topic(Channel.TELEMETRY), encode(stranger.telemetry()))
        pub.send(topic, encode(good.telemetry()))  # a good one after the bad ones
        _wait(lambda: _count(db) == 1, "the good window")
        _wait(lambda: sum(w.stats.dropped.values()) == len(bad) + 1, "every drop counted")
        assert w.stats.dropped == {
            "invalid": 9,
            "inconsistent_histogram": 3,
            "histogram_shape": 2,
            "unknown_release": 1,
            "unknown_device": 1,
        }
        assert _count(db, "dev-stranger") == 0
        with db.session() as s:
            row = s.scalars(select(TelemetryWindow)).one()
            assert (row.device_id, row.group, row.release) == ("dev-good", "lab", 1)
        assert w.alive  # never a crash
    finally:
        pub.close()
        w.stop()


def _postgres_url() -> str | None:
    import sqlalchemy

    admin = sqlalchemy.create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
    )
    name = f"edgefleet_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        return None
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def test_postgresql_store_is_idempotent_across_workers(release) -> None:  # type: ignore[no-untyped-def]
    url = _postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    db = Database(url)
    try:
        db.create_all()
        _, rel = release
        dev = FakeDevice("dev-pg", release=rel)
        windows = [
            StoredWindow(dev.telemetry(samples=100), 1000.0 + i, "default") for i in range(20)
        ]
        a = TelemetryStore(db, worker="a", bucket_seconds=60)
        b = TelemetryStore(db, worker="b", bucket_seconds=60)
        ra, rb = a.write_batch(windows[:15]), b.write_batch(windows[5:])
        assert ra.stored + rb.stored == 20 and rb.duplicates == 10
        assert _count(db) == 20
        with db.session() as s:
            total = sum(
                int(decode_counts(p.input_counts, (p.n_features, p.bins))[0].sum())
                for p in s.scalars(select(DriftPartial))
            )
        assert total == 20 * 100
    finally:
        db.dispose()
        import sqlalchemy

        admin = sqlalchemy.create_engine(
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()
