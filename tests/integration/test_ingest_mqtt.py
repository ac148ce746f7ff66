"""The ingest subscriber (``cloud.ingest.mqtt_reader``) against a real Mosquitto:
the session outlives the connection, nothing is acknowledged unless asked,
the broker never has more than Receive Maximum messages in flight to us,
keepalive holds an idle connection, and TLS works with a service identity."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.broker import BrokerSecurity, MosquittoProcess
from cloud.ingest.mqtt_reader import BrokerConnectionError, MqttReader, Publish, ReaderConfig
from cloud.pki import CertificateAuthority
from shared.topics import Channel, device_topic, subscription

pytestmark = pytest.mark.integration

SUBS = (subscription(Channel.TELEMETRY, share_group="readers"),)


def _config(port: int, **kw: object) -> ReaderConfig:
    return ReaderConfig("127.0.0.1", port, kw.pop("client_id", "reader-0"), SUBS, **kw)  # type: ignore[arg-type]


@pytest.fixture
def publish(broker: MosquittoProcess) -> Iterator[object]:
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.connect("127.0.0.1", broker.port)
    client.loop_start()

    def send(n: int, start: int = 0) -> list[bytes]:
        payloads = [f"m{start + i}".encode() for i in range(n)]
        infos = [
            client.publish(device_topic(f"dev-{i % 3}", Channel.TELEMETRY), p, qos=1)
            for i, p in enumerate(payloads)
        ]
        for info in infos:
            info.wait_for_publish(10)
        return payloads

    yield send
    client.disconnect()
    client.loop_stop()


def _read(reader: MqttReader, n: int, timeout: float = 10.0) -> list[Publish]:
    out: list[Publish] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        reader.read(out, 0.1)
    return out


def test_unacknowledged_messages_come_back_on_the_next_connection(broker, publish) -> None:  # type: ignore[no-untyped-def]
    reader = MqttReader(_config(broker.port))
    assert reader.connect() is False  # a new session
    sent = publish(20)
    first = _read(reader, 20)
    assert sorted(p[1] for p in first) == sorted(sent)
    reader.disconnect()  # nothing acknowledged
    assert reader.connect() is True  # the session survived
    again = _read(reader, 20)
    assert sorted(p[1] for p in again) == sorted(sent)
    assert reader.ack([p[2] for p in again], reader.generation)
    reader.disconnect()
    reader.connect()
    assert _read(reader, 1, timeout=1.0) == []  # acknowledged means gone
    reader.disconnect()


def test_messages_queued_while_away_arrive_on_resume(broker, publish) -> None:  # type: ignore[no-untyped-def]
    reader = MqttReader(_config(broker.port))
    reader.connect()
    reader.disconnect()
    sent = publish(30)
    assert reader.connect() is True
    got = _read(reader, 30)
    assert sorted(p[1] for p in got) == sorted(sent)
    reader.ack([p[2] for p in got], reader.generation)
    reader.disconnect()


def test_receive_maximum_bounds_the_first_flight(broker, publish) -> None:  # type: ignore[no-untyped-def]
    """Measured with Mosquitto 2.0.11: the broker holds back once Receive Maximum
    messages are unacknowledged, but after acknowledgements it refills past it
    (5, then 25, then 70 of 100). Ingest's memory bound does not rest on it: a
    worker reads no more than a batch before it commits, and the kernel's socket
    buffer holds the rest."""
    reader = MqttReader(_config(broker.port, receive_maximum=5))
    reader.connect()
    publish(20)
    got = _read(reader, 20, timeout=1.5)
    assert len(got) == 5  # the broker waits for acknowledgements
    while len(got) < 20:
        assert reader.ack([p[2] for p in got[-5:]], reader.generation) or True
        more = _read(reader, 20, timeout=1.5)
        assert more, "acknowledging lets the broker send on"
        got += more
    assert len(got) == 20
    reader.disconnect()


def test_a_backlog_ahead_of_the_suback_is_not_a_dead_broker(broker) -> None:  # type: ignore[no-untyped-def]
    """On resume, Mosquitto sends the queued messages before it answers SUBSCRIBE. A
    worker that drains a large backlog slowly (a slow database) must not take the late
    SUBACK for a broker that never answered: it would drop the connection and meet the
    same backlog again on the next one, for ever."""
    reader = MqttReader(_config(broker.port, connect_timeout=1.0, receive_maximum=20_000))
    reader.connect()
    reader.disconnect()
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    n, body = 3000, b"x" * 8000  # 24 MB queued: more than the socket buffers hold
    infos = [
        client.publish(device_topic("dev-1", Channel.TELEMETRY), body, qos=1) for _ in range(n)
    ]
    for info in infos:
        info.wait_for_publish(30)
    client.disconnect()
    client.loop_stop()
    assert reader.connect() is True
    got: list[Publish] = []
    started = time.monotonic()
    deadline = started + 60
    while len(got) < n and time.monotonic() < deadline:
        reader.read(got, 0.1)  # raises if the connection is given up
        time.sleep(0.05)  # ~20 MB/s at most: the backlog takes longer than connect_timeout
    assert len(got) == n
    assert time.monotonic() - started > 1.0, "the backlog must outlast connect_timeout"
    reader.ack([p[2] for p in got], reader.generation)
    reader.disconnect()


def test_an_older_connection_cannot_be_acknowledged(broker, publish) -> None:  # type: ignore[no-untyped-def]
    reader = MqttReader(_config(broker.port))
    reader.connect()
    publish(3)
    got = _read(reader, 3)
    old = reader.generation
    reader.close()  # the connection drops before the batch is committed
    reader.connect()
    assert not reader.ack([p[2] for p in got], old)
    redelivered = _read(reader, 3)
    assert sorted(p[1] for p in redelivered) == sorted(p[1] for p in got)
    reader.ack([p[2] for p in redelivered], reader.generation)
    reader.disconnect()


def test_keepalive_holds_an_idle_connection(broker, publish) -> None:  # type: ignore[no-untyped-def]
    reader = MqttReader(_config(broker.port, keepalive=1))
    reader.connect()
    generation = reader.generation
    out: list[Publish] = []
    deadline = time.monotonic() + 3.5  # the broker drops a silent client after 1.5 s
    while time.monotonic() < deadline:
        reader.read(out, 0.2)
    assert out == [] and reader.connected and reader.generation == generation
    publish(1)
    assert len(_read(reader, 1)) == 1
    reader.disconnect()


def test_a_second_client_with_the_same_id_takes_the_session(broker, publish) -> None:  # type: ignore[no-untyped-def]
    first, second = MqttReader(_config(broker.port)), MqttReader(_config(broker.port))
    first.connect()
    second.connect()
    with pytest.raises(BrokerConnectionError):  # Mosquitto closes the older connection
        _read(first, 1, timeout=2.0)
    second.disconnect()


def test_an_unreachable_broker_is_a_connection_error(tmp_path: Path) -> None:
    from cloud.broker import free_port

    reader = MqttReader(_config(free_port(), connect_timeout=1.0))
    with pytest.raises(BrokerConnectionError, match="cannot reach"):
        reader.connect()


def test_tls_with_a_service_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "pki")
    ca.issue_server_cert()
    ident = ca.issue_service_identity("edgefleet-ingest-0")
    device = ca.issue_service_identity("edgefleet-testpub")
    tls = {"ca_file": str(ident.ca_file), "cert_file": str(ident.cert_file)}
    tls["key_file"] = str(ident.key_file)
    with MosquittoProcess(tmp_path / "broker", security=BrokerSecurity.from_ca(ca)) as b:
        # The certificate's CN is the client id on this broker.
        reader = MqttReader(_config(b.port, client_id="edgefleet-ingest-0", tls=tls))
        reader.connect()
        pub = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id="edgefleet-testpub",
            protocol=mqtt.MQTTv5,
        )
        pub.tls_set(
            ca_certs=str(device.ca_file),
            certfile=str(device.cert_file),
            keyfile=str(device.key_file),
        )
        pub.connect("127.0.0.1", b.port)
        pub.loop_start()
        try:
            pub.publish(
                device_topic("dev-1", Channel.TELEMETRY), b"over tls", qos=1
            ).wait_for_publish(10)
            got = _read(reader, 1)
            assert [p[1] for p in got] == [b"over tls"]
            assert reader.ack([got[0][2]], reader.generation)
        finally:
            pub.disconnect()
            pub.loop_stop()
            reader.disconnect()
        anonymous = MqttReader(
            _config(b.port, client_id="x", tls={"ca_file": str(ident.ca_file)}, connect_timeout=3)
        )
        with pytest.raises(BrokerConnectionError):
            anonymous.connect()  # no client certificate: the handshake or the broker refuses
            _read(anonymous, 1, timeout=1.0)
