"""Telemetry ingest on the secure broker: mutual TLS, one identity per worker, and
an ACL that lets those identities read the device streams and write nothing.

The broker, CA and device identities are the production set-up in miniature
(``tests.attacks.secure_env``); the ingest identities are issued with the
operator's command (``edgefleet-cloud ca ingest``) and found by the workers the
way ``edgefleet-cloud ingest`` and ``serve`` find them (``worker_configs``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cloud.broker import INGEST_ROLE, BrokerSecurity, render_acl
from cloud.cli import main
from cloud.config import CloudSettings
from cloud.db import Database
from cloud.ingest import IngestConfig, IngestPool, IngestWorker, worker_configs
from cloud.ingest.tables import TelemetryWindow
from cloud.ingest.testing import FakeDevice
from cloud.ingest.worker import STORE_CHANNELS
from shared.errors import ConfigError
from shared.messages import encode
from shared.topics import Channel, blob_chunk_topic, device_topic, subscription
from tests.attacks.secure_env import NOT_AUTHORIZED, SecureBroker, probe, secure_broker

pytestmark = pytest.mark.integration

WINDOWS = 40


@pytest.fixture
def sec(tmp_path: Path) -> Iterator[SecureBroker]:
    with secure_broker(tmp_path) as s:
        yield s


def _settings(sec: SecureBroker) -> CloudSettings:
    """The cloud host's settings: its own identity for the service, the CA in
    ``<data dir>/pki`` (``secure_broker`` made it in ``workdir/pki``)."""
    return CloudSettings(
        data_dir=sec.workdir,
        broker_port=sec.port,
        broker_tls_ca=sec.ca.ca_cert_path,
        broker_tls_cert=sec.cloud.cert_file,
        broker_tls_key=sec.cloud.key_file,
    )


def _issue_ingest_identities(sec: SecureBroker, workers: int) -> None:
    assert main(["ca", "ingest", "--workers", str(workers), "--data-dir", str(sec.workdir)]) == 0
    sec.broker.sync_with_ca(sec.ca)  # the ACL now names them


def _stored(db: Database) -> tuple[int, int]:
    """(rows, distinct (device, seq)) of the stored telemetry windows."""
    with db.session() as s:
        rows = s.scalar(select(func.count()).select_from(TelemetryWindow)) or 0
        keys = s.execute(select(TelemetryWindow.device_id, TelemetryWindow.seq)).all()
    return int(rows), len(set(keys))


def _wait(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_ingest_identities_store_every_window_exactly_once(
    sec: SecureBroker, db: Database
) -> None:
    _issue_ingest_identities(sec, 2)
    configs = worker_configs(_settings(sec), 2)
    assert [c.client_id for c in configs] == ["edgefleet-ingest-0", "edgefleet-ingest-1"]
    for c in configs:
        # Each worker presents the certificate issued for its own client id.
        assert c.tls == sec.ca.service_identity(c.client_id).as_tls_dict()
        c.batch_interval = 0.05
    pool = IngestPool(db, configs)
    pool.start(wait=10)
    try:
        assert all(w.subscribed.is_set() and w.stats.connected for w in pool.workers)
        dev = FakeDevice("dev-t")
        with probe(sec.port, tls=sec.device_tls(dev.device_id), client_id=dev.device_id) as d:
            for channel, payload in (
                (Channel.STATUS, dev.status()),
                (Channel.REPORTED, dev.reported()),
            ):
                assert d.publish(dev.topic(channel), payload, retain=True) < NOT_AUTHORIZED
            _wait(lambda: sum(w.stats.seen for w in pool.workers) >= 2, "the announcement")
            for _ in range(WINDOWS):
                msg = encode(dev.telemetry())
                assert d.publish(dev.topic(Channel.TELEMETRY), msg) < NOT_AUTHORIZED
        _wait(lambda: _stored(db)[0] >= WINDOWS, f"{WINDOWS} windows stored")
        time.sleep(0.5)  # a duplicate or a late redelivery would show up now
        assert _stored(db) == (WINDOWS, WINDOWS)
        shares = [w.stats.stored for w in pool.workers]
        assert sum(shares) == WINDOWS and min(shares) > 0, f"both identities read: {shares}"
        assert all(w.stats.duplicates == 0 and not w.stats.dropped for w in pool.workers)
    finally:
        pool.stop()


def test_ingest_identity_cannot_write_desired_state_blobs_or_device_streams(
    sec: SecureBroker,
) -> None:
    _issue_ingest_identities(sec, 1)
    ingest = sec.service_tls(sec.ca.service_identity("edgefleet-ingest-0"))
    desired = device_topic("dev-v", Channel.DESIRED)
    with (
        probe(sec.port, tls=sec.device_tls("dev-v"), client_id="dev-v") as victim,
        probe(sec.port, tls=ingest, client_id="edgefleet-ingest-0") as i,
    ):
        assert victim.subscribe(desired) == 1
        assert i.publish(desired, b'{"release": 99}', retain=True) == NOT_AUTHORIZED
        for topic in (
            device_topic("dev-v", Channel.TELEMETRY),  # no forged device reports either
            device_topic("dev-v", Channel.REPORTED),
            blob_chunk_topic("ab" * 32, 0),
        ):
            assert i.publish(topic, b"x") == NOT_AUTHORIZED, topic
        assert victim.wait_message(desired, timeout=1.0) is None, "the broker delivered it"
        # The path itself works: the cloud's identity gets the same publish through.
        with probe(sec.port, tls=sec.service_tls(sec.cloud), client_id="c") as cloud:
            assert cloud.publish(desired, b"ok", retain=True) < NOT_AUTHORIZED
        assert victim.wait_message(desired) == b"ok"
    acl = sec.broker.config.acl_file.read_text()  # type: ignore[union-attr]
    grants = acl.split("user edgefleet-ingest-0\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert grants == [f"topic read {subscription(ch)}" for ch in STORE_CHANNELS]


def test_acl_grants_each_issued_ingest_identity_what_the_workers_subscribe_to(
    sec: SecureBroker,
) -> None:
    _issue_ingest_identities(sec, 3)
    security = BrokerSecurity.from_ca(sec.ca)
    names = [n for n, role in security.services.items() if role == INGEST_ROLE]
    assert sorted(names) == [f"edgefleet-ingest-{i}" for i in range(3)]
    acl = render_acl(security)
    for name in names:
        assert f"user {name}\n" in acl
    # Mosquitto has no wildcard user names: nothing but the issued ones is granted.
    assert "edgefleet-ingest-3" not in acl and "edgefleet-ingest-*" not in acl


def test_worker_without_its_certificate_fails_at_start_naming_the_file(
    sec: SecureBroker, db: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    _issue_ingest_identities(sec, 1)
    missing = sec.ca.service_identity("edgefleet-ingest-1").cert_file
    settings = _settings(sec)
    with pytest.raises(
        ConfigError, match=f"ingest worker edgefleet-ingest-1 .*{re.escape(str(missing))}"
    ):
        worker_configs(settings, 2)
    # The command line says the same and starts no worker (no process to restart forever).
    argv = ["ingest", "--data-dir", str(sec.workdir), "--broker-port", str(sec.port)]
    argv += ["--broker-tls-ca", str(sec.ca.ca_cert_path)]
    started = time.monotonic()
    assert main([*argv, "--workers", "2"]) == 2
    assert main([*argv, "--workers", "1", "--index", "1"]) == 2
    assert time.monotonic() - started < 10, "a missing certificate must not hang"
    err = capsys.readouterr().err
    assert err.count(str(missing)) == 2 and "edgefleet-cloud ca ingest" in err
    # An ingest-only host keeps the copies in a directory of its own.
    elsewhere = settings.model_copy(update={"broker_tls_ingest_dir": sec.workdir / "copies"})
    copy = sec.workdir / "copies" / "edgefleet-ingest-0.pem"
    with pytest.raises(ConfigError, match=re.escape(str(copy))):
        worker_configs(elsewhere, 1)
    # A worker built by hand with a missing file fails on construction too.
    tls = {**sec.ca.service_identity("edgefleet-ingest-0").as_tls_dict(), "key_file": "/nope"}
    with pytest.raises(ConfigError, match="/nope"):
        IngestWorker(db, IngestConfig(port=sec.port, tls=tls))


def test_ingest_identities_outside_the_ingest_prefix_are_refused(
    sec: SecureBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ca", "ingest", "--workers", "1", "--data-dir", str(sec.workdir)]
    assert main([*argv, "--client-prefix", "edgefleet-cloudy"]) == 2
    assert "read-only ingest role" in capsys.readouterr().err
    assert not sec.ca.service_identity("edgefleet-cloudy-0").cert_file.exists()
