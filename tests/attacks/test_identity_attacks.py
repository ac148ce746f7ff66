"""Attacks on device identity and the broker: mutual TLS, the ACL, revocation.

The broker is Mosquitto with the configuration ``cloud.broker`` renders:
certificate CN = username = client id, and ACL patterns confining each device
to its own topics. MQTT 5 throughout, so a refusal is visible: PUBACK reason
0x87 "Not authorized" (MQTT 3.1.1 would drop the publish silently). Every test
also checks the device under attack: still serving, nothing changed on disk.
"""

from __future__ import annotations

import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from cloud.enrollment import BootstrapTokens
from cloud.pki import CertificateAuthority, EnrollmentError
from cloud.tuf_repo import ReleaseRepository
from shared.messages import (
    Desired,
    EventKind,
    HardwareInfo,
    Reported,
    Status,
    Telemetry,
    UpdateState,
    encode,
)
from shared.topics import Channel, device_topic
from tests.attacks.harness import (
    MODEL,
    DeviceUnderAttack,
    RepoServer,
    publish_release,
)
from tests.attacks.secure_env import (
    NOT_AUTHORIZED,
    Probe,
    SecureBroker,
    make_csr,
    probe,
)

pytestmark = pytest.mark.integration

VICTIM = "dev-victim"


def _reason_name(code: int) -> str:
    return ReasonCode(PacketTypes.PUBACK, identifier=code).getName()


def _forged_reports(now: float) -> dict[Channel, bytes]:
    """Messages another device writes in the victim's name."""
    hw = HardwareInfo(machine="x", system="y", runtime="z")
    return {
        Channel.REPORTED: encode(
            Reported(
                device_id=VICTIM,
                agent_version="9.9.9",
                model=MODEL,
                release=99,
                state=UpdateState.IDLE,
                hardware=hw,
                ts=now,
            )
        ),
        Channel.TELEMETRY: encode(
            Telemetry(
                device_id=VICTIM,
                seq=1,
                window_start=now,
                window_end=now,
                inferences=10**9,
                errors=0,
            )
        ),
        Channel.STATUS: encode(Status(device_id=VICTIM, online=False)),
        Channel.EVENTS: b'{"schema":"edgefleet.event/1"}',
    }


def test_device_publishing_on_another_devices_topic_refused(
    device: DeviceUnderAttack, secure: SecureBroker, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="good-1")  # signed, but nobody deployed it
    served.sync(repo)
    before = device.snapshot()
    with probe(secure.port, tls=secure.device_tls("dev-mallory"), client_id="dev-mallory") as m:
        for channel, payload in _forged_reports(time.time()).items():
            code = m.publish(
                device_topic(VICTIM, channel),
                payload,
                retain=channel in (Channel.REPORTED, Channel.STATUS),
            )
            assert code == NOT_AUTHORIZED and _reason_name(code) == "Not authorized", channel
        forged = Desired(device_id=VICTIM, model=MODEL, release=2, issued_at=time.time())
        assert (
            m.publish(device_topic(VICTIM, Channel.DESIRED), encode(forged), retain=True)
            == NOT_AUTHORIZED
        )
    time.sleep(0.5)
    # Nothing forged reached the cloud, and the victim was offered nothing.
    for msg in device.messages:
        assert getattr(msg, "release", None) != 99 and getattr(msg, "inferences", 0) < 10**9
    assert not [m for m in device.messages if getattr(m, "release", None) == 2]
    device.assert_untouched(before, release=1)


def test_device_writing_its_own_desired_state_refused(
    device: DeviceUnderAttack, secure: SecureBroker, repo: ReleaseRepository, served: RepoServer
) -> None:
    # On the device's own, authenticated connection: it may pick no release for
    # itself, not even one the cloud signed.
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    before = device.snapshot()
    client = device.agent.session.mqtt_client
    acks: dict[int, int] = {}
    done = threading.Event()

    def on_publish(c: Any, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        acks[mid] = rc.value
        done.set()

    client.on_publish = on_publish
    try:
        forged = Desired(device_id=VICTIM, model=MODEL, release=2, issued_at=time.time())
        info = client.publish(
            device_topic(VICTIM, Channel.DESIRED), encode(forged), qos=1, retain=True
        )
        assert done.wait(5)
    finally:
        client.on_publish = None
    assert acks[info.mid] == NOT_AUTHORIZED
    with probe(secure.port, tls=secure.service_tls(secure.cloud), client_id="x") as cloud:
        cloud.subscribe(device_topic(VICTIM, Channel.DESIRED))
        retained = cloud.wait_message(device_topic(VICTIM, Channel.DESIRED))
    assert retained is not None and b'"release":1' in retained, "the cloud's desired state stays"
    time.sleep(0.5)
    assert not [m for m in device.messages if getattr(m, "release", None) == 2]
    device.assert_untouched(before, release=1)


def test_client_without_a_certificate_refused(
    device: DeviceUnderAttack, secure: SecureBroker, tmp_path: Path
) -> None:
    before = device.snapshot()
    no_cert = Probe(secure.port, ca_only=secure.ca.ca_cert_path, client_id=VICTIM)
    assert not no_cert.connect()
    plaintext = Probe(secure.port, client_id=VICTIM)
    assert not plaintext.connect()
    # A certificate with the victim's name, from a CA the broker does not trust.
    rogue = CertificateAuthority.init(tmp_path / "rogue-ca")
    key, csr = make_csr(VICTIM)
    (tmp_path / "k.pem").write_bytes(key)
    (tmp_path / "c.pem").write_bytes(rogue.sign_device_csr(csr))
    ctx = ssl.create_default_context(cafile=str(secure.ca.ca_cert_path))
    ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert not Probe(secure.port, context=ctx, client_id=VICTIM).connect()
    # Not asserted: which OpenSSL verdict Mosquitto logs. In CI it logged none for some
    # refused handshakes, and another connection's verdict for others.
    device.assert_untouched(before, release=1)
    assert device.agent.session.connected.is_set(), "the victim's session was not disturbed"


def test_revoked_device_is_cut_off_and_keeps_serving(
    device: DeviceUnderAttack, secure: SecureBroker, repo: ReleaseRepository, served: RepoServer
) -> None:
    # A stolen or retired device: revoked, its session gets nothing more, it cannot
    # reconnect; the model it runs keeps serving locally.
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    before = device.snapshot()
    secure.revoke(VICTIM)
    device.deploy(2)
    with pytest.raises(AssertionError, match="no offered event"):
        device.wait_event(EventKind.OFFERED, 2, timeout=2.0)
    tls = device.agent.cfg.tls
    assert tls is not None
    again = Probe(secure.port, tls=tls, client_id=VICTIM)
    assert not again.connect(), "a revoked certificate must not get a session"
    device.assert_untouched(before, release=1)


def test_device_cannot_enroll_as_the_cloud(device: DeviceUnderAttack, secure: SecureBroker) -> None:
    before = device.snapshot()
    with pytest.raises(EnrollmentError, match="reserved for the cloud"):
        secure.ca.sign_device_csr(make_csr("edgefleet-cloud")[1])
    token = BootstrapTokens(secure.ca).create("dev-mallory")
    with pytest.raises(EnrollmentError, match="bootstrap token refused"):
        BootstrapTokens(secure.ca).redeem(token, make_csr("edgefleet-cloud")[1])
    # Nor read the fleet's streams through the cloud's shared subscription.
    with probe(secure.port, tls=secure.device_tls("dev-mallory"), client_id="m") as m:
        m.subscribe("$share/edgefleet-ingest/edgefleet/v1/devices/+/reported")
        m.subscribe("edgefleet/v1/#")
        device.deploy(1)  # the victim re-reports
        time.sleep(0.5)
        assert m.messages == []
    device.assert_untouched(before, release=1)
