"""Helpers for tests against a secure broker: a CA, certificates, MQTT 5 probes.

``SecureBroker`` is the production set-up in miniature: the cloud CA
(``cloud.pki``), a Mosquitto with the mutual-TLS listener and the ACL that
``cloud.broker`` renders, and the cloud's own service identities. ``Probe``
is a bare paho MQTT 5 client that reports broker reason codes (PUBACK/SUBACK),
which is how a test sees an ACL refusal (0x87) instead of a silent drop.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud.broker import BrokerSecurity, MosquittoProcess
from cloud.pki import CertificateAuthority, ServiceIdentity
from device.mqtt_session import TlsSettings

NOT_AUTHORIZED = 0x87


def make_csr(common_name: str) -> tuple[bytes, bytes]:
    """(private key PEM, CSR PEM) for ``common_name``, made the way a device makes them."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, csr.public_bytes(serialization.Encoding.PEM)


@dataclass
class SecureBroker:
    """A CA, a secure Mosquitto, and the cloud's identities."""

    ca: CertificateAuthority
    broker: MosquittoProcess
    cloud: ServiceIdentity
    repo: ServiceIdentity
    workdir: Path

    @property
    def port(self) -> int:
        return self.broker.port

    def device_tls(self, device_id: str) -> TlsSettings:
        """A key and certificate for ``device_id``, issued from a CSR (not provisioned)."""
        key, csr = make_csr(device_id)
        cert = self.ca.sign_device_csr(csr)
        base = self.workdir / "identities" / device_id
        base.mkdir(parents=True, exist_ok=True)
        (base / "device.key").write_bytes(key)
        (base / "device.key").chmod(0o600)
        (base / "device.pem").write_bytes(cert)
        return TlsSettings(
            ca_file=self.ca.ca_cert_path,
            cert_file=base / "device.pem",
            key_file=base / "device.key",
        )

    def service_tls(self, ident: ServiceIdentity) -> TlsSettings:
        return TlsSettings(
            ca_file=ident.ca_file, cert_file=ident.cert_file, key_file=ident.key_file
        )

    def revoke(self, device_id: str, *, disconnect: bool = False) -> None:
        self.ca.revoke(device_id)
        self.broker.sync_with_ca(self.ca, disconnect=disconnect)


@contextmanager
def secure_broker(workdir: Path, *, persist: bool = False) -> Iterator[SecureBroker]:
    ca = CertificateAuthority.init(workdir / "pki")
    ca.issue_server_cert()
    cloud = ca.issue_service_identity("edgefleet-cloud")
    repo = ca.issue_service_identity("edgefleet-repo")
    broker = MosquittoProcess(
        workdir / "broker", persist=persist, security=BrokerSecurity.from_ca(ca)
    )
    with broker:
        yield SecureBroker(ca=ca, broker=broker, cloud=cloud, repo=repo, workdir=workdir)


class Probe:
    """A raw MQTT 5 client that records messages and the broker's reason codes."""

    def __init__(
        self,
        port: int,
        *,
        tls: TlsSettings | None = None,
        client_id: str = "probe",
        ca_only: Path | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connect_error: BaseException | None = None
        self.connack: Any = None
        self.disconnects: list[Any] = []
        self._cond = threading.Condition()
        self._acks: dict[int, Any] = {}
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if context is not None:
            self.client.tls_set_context(context)
        elif tls is not None:
            self.client.tls_set(
                ca_certs=str(tls.ca_file), certfile=str(tls.cert_file), keyfile=str(tls.key_file)
            )
        elif ca_only is not None:
            self.client.tls_set(ca_certs=str(ca_only))
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_suback
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.port = port

    def connect(self, timeout: float = 5.0) -> bool:
        """True once the broker accepted the session; False if it refused or the TLS
        handshake failed (``connect_error`` says why)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            self.connect_error = e
            return False
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.client.is_connected():
                return True
            if self.connack is not None or self.disconnects:
                break
            time.sleep(0.02)
        self.client.loop_stop()
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def refusal(self) -> str:
        """What the client saw of a refused connection (for messages)."""
        return f"error={self.connect_error!r} connack={self.connack} disconnects={self.disconnects}"

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 5.0
    ) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (below 0x80 accepted, 0x87 denied)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return int(self._wait(info.mid, timeout))

    def subscribe(self, topic: str, timeout: float = 5.0) -> int:
        """Subscribe at QoS 1 and return the SUBACK reason code (1 granted, 0x87 denied)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        return int(self._wait(mid, timeout))

    def wait_message(self, topic: str, timeout: float = 5.0) -> bytes | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, payload, _ in self.messages:
                    if t == topic:
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _wait(self, mid: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._acks:
                left = deadline - time.monotonic()
                assert left > 0, f"no acknowledgement for message {mid} in {timeout}s"
                self._cond.wait(left)
            return self._acks.pop(mid)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnects.append(rc)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_ack(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = rc.value
            self._cond.notify_all()

    def _on_suback(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        with self._cond:
            self._acks[mid] = rcs[0].value
            self._cond.notify_all()


@contextmanager
def probe(port: int, **kw: Any) -> Iterator[Probe]:
    p = Probe(port, **kw)
    assert p.connect(), f"probe could not connect: {p.connect_error or p.connack}"
    try:
        yield p
    finally:
        p.close()
