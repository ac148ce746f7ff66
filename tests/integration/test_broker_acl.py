"""The secure broker as ``cloud.broker`` renders it: mutual TLS, identities, ACL.

MQTT 5 everywhere, so an ACL refusal is visible: PUBACK/SUBACK reason 0x87
(under MQTT 3.1.1 a denied publish is silently dropped).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.broker import (
    DEFAULT_MAX_PACKET,
    DEFAULT_MAX_QUEUED,
    BrokerConfig,
    BrokerSecurity,
    BrokerTls,
    render_acl,
    render_mosquitto_conf,
)
from cloud.pki import CertificateAuthority
from shared.errors import ConfigError
from shared.topics import (
    Channel,
    blob_chunk_topic,
    blob_filter,
    blob_meta_topic,
    device_topic,
    repo_request_topic,
    repo_response_topic,
)
from tests.attacks.secure_env import (
    NOT_AUTHORIZED,
    Probe,
    SecureBroker,
    probe,
    secure_broker,
)

pytestmark = pytest.mark.integration

OWN_WRITES = [Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY, Channel.STATUS]


@pytest.fixture
def sec(tmp_path: Path) -> Iterator[SecureBroker]:
    with secure_broker(tmp_path) as s:
        yield s


def test_device_writes_only_its_own_channels(sec: SecureBroker) -> None:
    with probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a:
        for ch in OWN_WRITES:
            assert a.publish(device_topic("dev-a", ch), b"{}") < NOT_AUTHORIZED, ch
            assert a.publish(device_topic("dev-b", ch), b"{}") == NOT_AUTHORIZED, ch
        assert a.publish(repo_request_topic("dev-a"), b"{}") < NOT_AUTHORIZED
        assert a.publish(repo_request_topic("dev-b"), b"{}") == NOT_AUTHORIZED
        for topic in (
            device_topic("dev-a", Channel.DESIRED),
            repo_response_topic("dev-a"),
            "edgefleet/v1/fleet",
            "anything/else",
        ):
            assert a.publish(topic, b"{}") == NOT_AUTHORIZED, topic


def test_device_reads_only_its_own_desired_state(sec: SecureBroker) -> None:
    # Mosquitto 2.0 grants any SUBSCRIBE (SUBACK 1) and applies read access per
    # message delivered, so what counts is what arrives.
    with (
        probe(sec.port, tls=sec.service_tls(sec.cloud), client_id="c") as cloud,
        probe(sec.port, tls=sec.device_tls("dev-b"), client_id="dev-b") as b,
        probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a,
    ):
        for topic in (
            device_topic("dev-b", Channel.DESIRED),
            device_topic("dev-b", Channel.TELEMETRY),
            "edgefleet/v1/devices/+/desired",
            "edgefleet/v1/#",
            "#",
            "$share/g/edgefleet/v1/devices/+/reported",
            device_topic("dev-a", Channel.DESIRED),
        ):
            a.subscribe(topic)
        assert cloud.publish(device_topic("dev-b", Channel.DESIRED), b"b", retain=True) < 0x80
        assert b.publish(device_topic("dev-b", Channel.TELEMETRY), b"t") < NOT_AUTHORIZED
        assert b.publish(device_topic("dev-b", Channel.REPORTED), b"r") < NOT_AUTHORIZED
        assert cloud.publish(device_topic("dev-a", Channel.DESIRED), b"a", retain=True) < 0x80
        assert a.wait_message(device_topic("dev-a", Channel.DESIRED)) == b"a"
        time.sleep(0.3)
        assert {t for t, _, _ in a.messages} == {device_topic("dev-a", Channel.DESIRED)}


def test_cloud_ingests_through_shared_subscriptions_and_writes_desired(
    sec: SecureBroker,
) -> None:
    cloud_tls = sec.service_tls(sec.cloud)
    with (
        probe(sec.port, tls=cloud_tls, client_id="x") as cloud,
        probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a,
    ):
        assert cloud.subscribe("$share/ingest/edgefleet/v1/devices/+/reported") == 1
        assert a.subscribe(device_topic("dev-a", Channel.DESIRED)) == 1
        assert a.publish(device_topic("dev-a", Channel.REPORTED), b"r") < NOT_AUTHORIZED
        assert cloud.wait_message(device_topic("dev-a", Channel.REPORTED)) == b"r"
        assert (
            cloud.publish(device_topic("dev-a", Channel.DESIRED), b"d", retain=True)
            < NOT_AUTHORIZED
        )
        assert a.wait_message(device_topic("dev-a", Channel.DESIRED)) == b"d"


def test_repository_service_has_least_privilege(sec: SecureBroker) -> None:
    with (
        probe(sec.port, tls=sec.service_tls(sec.repo), client_id="x") as repo,
        probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a,
    ):
        assert repo.subscribe("$share/edgefleet-repo/edgefleet/v1/devices/+/repo/req") == 1
        repo.subscribe(device_topic("dev-a", Channel.TELEMETRY))
        assert repo.publish(repo_response_topic("dev-a"), b"chunk") < NOT_AUTHORIZED
        assert repo.publish(device_topic("dev-a", Channel.DESIRED), b"d") == NOT_AUTHORIZED
        assert a.publish(repo_request_topic("dev-a"), b"req") < NOT_AUTHORIZED
        assert a.publish(device_topic("dev-a", Channel.TELEMETRY), b"t") < NOT_AUTHORIZED
        assert repo.wait_message(repo_request_topic("dev-a")) == b"req"
        time.sleep(0.3)
        assert {t for t, _, _ in repo.messages} == {repo_request_topic("dev-a")}


def test_devices_read_release_blobs_but_never_write_them(sec: SecureBroker) -> None:
    sha = "ab" * 32
    fanout = sec.service_tls(sec.ca.issue_service_identity("edgefleet-fanout"))
    chunk0, chunk1 = blob_chunk_topic(sha, 0), blob_chunk_topic(sha, 1)
    with (
        probe(sec.port, tls=fanout, client_id="f") as f,
        probe(sec.port, tls=sec.service_tls(sec.repo), client_id="r") as repo,
        probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a,
    ):
        # No device (nor the repository server) can put bytes in front of the fleet ...
        for topic in (blob_meta_topic(sha), chunk0, chunk1):
            assert a.publish(topic, b"evil", retain=True) == NOT_AUTHORIZED, topic
            assert repo.publish(topic, b"evil", retain=True) == NOT_AUTHORIZED, topic
        # ... the fan-out's identity can, and nothing else.
        assert f.publish(chunk0, b"chunk", retain=True) < NOT_AUTHORIZED
        assert f.publish(device_topic("dev-a", Channel.DESIRED), b"d") == NOT_AUTHORIZED
        assert a.subscribe(blob_filter()) == 1
        assert a.wait_message(chunk0) == b"chunk"
        time.sleep(0.3)
        assert [(t, p) for t, p, _ in a.messages] == [(chunk0, b"chunk")]
        # A revoked device gets no more blobs either.
        sec.revoke("dev-a")
        assert f.publish(chunk1, b"next", retain=True) < NOT_AUTHORIZED
        assert a.wait_message(chunk1, timeout=1.0) is None


def test_new_service_identity_is_granted_after_sync(sec: SecureBroker) -> None:
    # A second cloud connection (ingest identities get the read-only ingest role:
    # tests/integration/test_ingest_tls.py).
    second = sec.service_tls(sec.ca.issue_service_identity("edgefleet-cloud-2"))
    with probe(sec.port, tls=second, client_id="x") as p:
        # Not in the ACL yet: only the device patterns apply to an unknown name.
        assert p.publish(device_topic("dev-a", Channel.DESIRED), b"d") == NOT_AUTHORIZED
        sec.broker.sync_with_ca(sec.ca)
        assert p.publish(device_topic("dev-a", Channel.DESIRED), b"d") < NOT_AUTHORIZED
    assert "user edgefleet-cloud-2" in sec.broker.config.acl_file.read_text()  # type: ignore[union-attr]


def test_broker_acl_command_rewrites_only_the_acl_and_reloads(sec: SecureBroker) -> None:
    """``broker acl``: after issuing an identity, grant it without regenerating (and
    losing the hand-tuning of) ``mosquitto.conf``."""
    from cloud.cli import main as cloud_main

    acl = sec.broker.config.acl_file
    assert acl is not None and sec.broker._proc is not None
    conf_before = sec.broker.conf_path.read_bytes()
    reloads = sec.broker.log_path.read_text().count("Reloading config")
    third = sec.service_tls(sec.ca.issue_service_identity("edgefleet-cloud-3"))
    with probe(sec.port, tls=third, client_id="x") as p:
        assert p.publish(device_topic("dev-a", Channel.DESIRED), b"d") == NOT_AUTHORIZED
        argv = ["broker", "acl", "--data-dir", str(sec.workdir), "--out", str(acl)]
        assert cloud_main([*argv, "--broker-pid", str(sec.broker._proc.pid)]) == 0
        deadline = time.monotonic() + 10
        while sec.broker.log_path.read_text().count("Reloading config") == reloads:
            assert time.monotonic() < deadline, "the broker was not told to reload"
            time.sleep(0.05)
        assert p.publish(device_topic("dev-a", Channel.DESIRED), b"d") < NOT_AUTHORIZED
    assert "user edgefleet-cloud-3" in acl.read_text()
    assert sec.broker.conf_path.read_bytes() == conf_before


def test_client_id_is_forced_to_the_certificate_cn(sec: SecureBroker) -> None:
    # Reusing another device's client id would kick it off (session takeover).
    b_tls, a_tls = sec.device_tls("dev-b"), sec.device_tls("dev-a")
    with (
        probe(sec.port, tls=b_tls, client_id="dev-b") as b,
        probe(sec.port, tls=a_tls, client_id="dev-b"),
    ):
        time.sleep(0.3)
        assert b.client.is_connected() and not b.disconnects


def test_clients_without_a_valid_certificate_are_refused(sec: SecureBroker, tmp_path: Path) -> None:
    no_cert = Probe(sec.port, ca_only=sec.ca.ca_cert_path)
    assert not no_cert.connect()
    plain = Probe(sec.port)
    assert not plain.connect()
    rogue = CertificateAuthority.init(tmp_path / "rogue-ca")
    rogue_tls = secure_broker_device(rogue, tmp_path, "dev-a")
    ctx = ssl.create_default_context(cafile=str(sec.ca.ca_cert_path))
    ctx.load_cert_chain(str(rogue_tls[0]), str(rogue_tls[1]))
    assert not Probe(sec.port, context=ctx).connect()


def secure_broker_device(ca: CertificateAuthority, tmp: Path, name: str) -> tuple[Path, Path]:
    from tests.attacks.secure_env import make_csr

    key, csr = make_csr(name)
    (tmp / f"{name}.key").write_bytes(key)
    (tmp / f"{name}.pem").write_bytes(ca.sign_device_csr(csr))
    return tmp / f"{name}.pem", tmp / f"{name}.key"


def test_revoked_device_is_cut_off_at_once_and_cannot_reconnect(sec: SecureBroker) -> None:
    tls = sec.device_tls("dev-a")
    with (
        probe(sec.port, tls=sec.service_tls(sec.cloud), client_id="c") as cloud,
        probe(sec.port, tls=tls, client_id="dev-a") as a,
    ):
        assert a.subscribe(device_topic("dev-a", Channel.DESIRED)) == 1
        sec.revoke("dev-a")  # CRL + ACL deny + SIGHUP; the connection stays open
        assert a.publish(device_topic("dev-a", Channel.REPORTED), b"r") == NOT_AUTHORIZED
        assert (
            cloud.publish(device_topic("dev-a", Channel.DESIRED), b"d", retain=True)
            < NOT_AUTHORIZED
        )
        assert a.wait_message(device_topic("dev-a", Channel.DESIRED), timeout=1.0) is None
    again = Probe(sec.port, tls=tls, client_id="dev-a")
    assert not again.connect(), "a revoked certificate must fail the TLS handshake"
    assert again.connack is None, f"refused in the handshake, not by CONNACK: {again.refusal()}"
    # Another device is unaffected, and a new enrollment of dev-a works again.
    with probe(sec.port, tls=sec.device_tls("dev-b"), client_id="dev-b") as b:
        assert b.publish(device_topic("dev-b", Channel.REPORTED), b"r") < NOT_AUTHORIZED
    with probe(sec.port, tls=sec.device_tls("dev-a"), client_id="dev-a") as a2:
        sec.broker.sync_with_ca(sec.ca)  # the deny entry goes with the new cert
        assert a2.publish(device_topic("dev-a", Channel.REPORTED), b"r") < NOT_AUTHORIZED


def test_revocation_with_disconnect_drops_the_socket(tmp_path: Path) -> None:
    with secure_broker(tmp_path, persist=True) as sec:
        tls = sec.device_tls("dev-a")
        with probe(sec.port, tls=tls, client_id="dev-a") as a:
            sec.revoke("dev-a", disconnect=True)
            deadline = time.monotonic() + 5
            while not a.disconnects and time.monotonic() < deadline:
                time.sleep(0.05)
            assert a.disconnects, "the revoked device's connection must be closed"
            time.sleep(1.5)  # paho retries; the handshake now fails
            assert not a.client.is_connected()


def test_rendered_config_keeps_limits_raised_and_identity_bound(tmp_path: Path) -> None:
    tls = BrokerTls(
        tmp_path / "ca.pem", tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "crl.pem"
    )
    conf = render_mosquitto_conf(
        BrokerConfig(port=8883, security=BrokerSecurity(tls), acl_file=tmp_path / "acl")
    )
    for line in (
        f"max_queued_messages {DEFAULT_MAX_QUEUED}",
        f"max_packet_size {DEFAULT_MAX_PACKET}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        f"crlfile {tmp_path / 'crl.pem'}",
    ):
        assert line in conf.splitlines(), line
    acl = render_acl(BrokerSecurity(tls, denied=("dev-x",)))
    assert "pattern write edgefleet/v1/devices/%u/desired" not in acl
    assert "pattern read edgefleet/v1/devices/%u/desired" in acl
    assert "pattern read edgefleet/v1/blobs/#" in acl.splitlines()
    assert not any(
        line.startswith("pattern") and "blobs" in line and "read " not in line
        for line in acl.splitlines()
    ), "devices never write blobs"
    assert acl.rstrip().endswith("user dev-x\ntopic deny #")
    with pytest.raises(ConfigError, match="cannot be an MQTT username"):
        BrokerSecurity(tls, services={"evil\ntopic readwrite #": "cloud"})
