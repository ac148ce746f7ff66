"""The device's MQTT 5 session: presence, desired state in, reports out.

One paho client per device. On connect it publishes ``status`` online
(retained; the broker publishes the offline last will if the link dies),
subscribes to its own retained ``desired`` topic and hands each valid desired
state to the agent. Invalid messages are counted, logged and dropped: the
session never raises into paho's network thread.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import ConfigError, MessageError
from shared.messages import Desired, Event, Reported, Status, Telemetry, decode, encode
from shared.topics import Channel, device_topic

__all__ = ["MqttSession", "TlsSettings", "tls_context"]

log = logging.getLogger(__name__)

#: Publishes queued in memory while the link is down, beyond which paho drops.
MAX_OFFLINE_QUEUE = 1000


@dataclass(frozen=True)
class TlsSettings:
    """Mutual TLS: the cloud CA, and this device's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client context for mutual TLS: TLS 1.2 or newer, the broker's certificate
    checked against the cloud CA *and* the host name, this device's key pair.

    Raises ``ConfigError`` naming the file that is missing or unusable."""
    for what, path in (
        ("CA certificate", tls.ca_file),
        ("device certificate", tls.cert_file),
        ("device key", tls.key_file),
    ):
        if not Path(path).is_file():
            raise ConfigError(
                f"TLS {what} {path} does not exist: enroll the device (`edgefleet-device enroll`)"
            )
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise ConfigError(
            f"TLS files {tls.cert_file} / {tls.key_file} / {tls.ca_file} are unusable: {e}"
        ) from e
    return ctx


class MqttSession:
    """A device's connection to the broker."""

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        *,
        agent_version: str,
        on_desired: Callable[[Desired], None],
        tls: TlsSettings | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        clock: Callable[[], float],
    ) -> None:
        self.device_id = device_id
        self.host, self.port = host, port
        self.agent_version = agent_version
        self._on_desired = on_desired
        self._clock = clock
        self.invalid_messages = 0
        self.connected = threading.Event()
        self._keepalive = keepalive
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,  # type: ignore[attr-defined]
            client_id=device_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.max_queued_messages_set(MAX_OFFLINE_QUEUE)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if tls is not None:
            self._client.tls_set_context(tls_context(tls))
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.will_set(
            device_topic(device_id, Channel.STATUS),
            encode(Status(device_id=device_id, online=False, agent_version=agent_version)),
            qos=1,
            retain=True,
        )
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    @property
    def mqtt_client(self) -> mqtt.Client:
        """The paho client, for protocols that share this connection (the MQTT
        repository fetcher: a secure broker allows one connection per device)."""
        return self._client

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; paho reconnects by itself after a link loss."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        self._client.connect_async(
            self.host, self.port, keepalive=self._keepalive, clean_start=True, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Say goodbye (retained offline status) and disconnect."""
        if self.connected.is_set():
            info = self._client.publish(
                device_topic(self.device_id, Channel.STATUS),
                encode(
                    Status(
                        device_id=self.device_id,
                        online=False,
                        agent_version=self.agent_version,
                        ts=self._clock(),
                    )
                ),
                qos=1,
                retain=True,
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    # -- publishing ------------------------------------------------------
    def publish_reported(self, msg: Reported) -> None:
        self._publish(Channel.REPORTED, encode(msg), retain=True)

    def publish_event(self, msg: Event) -> None:
        self._publish(Channel.EVENTS, encode(msg))

    def publish_telemetry(self, msg: Telemetry) -> bool:
        """Publish a telemetry window; ``False`` if the link is down (caller buffers)."""
        if not self.connected.is_set():
            return False
        self._publish(Channel.TELEMETRY, encode(msg))
        return True

    def _publish(self, channel: Channel, payload: bytes, retain: bool = False) -> None:
        info = self._client.publish(
            device_topic(self.device_id, channel), payload, qos=1, retain=retain
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("publish on %s failed: %s", channel.value, mqtt.error_string(info.rc))

    # -- callbacks (paho network thread: never raise) -------------------------
    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused connection: %s", reason_code)
            return
        log.info("connected to broker %s:%s", self.host, self.port)
        client.publish(
            device_topic(self.device_id, Channel.STATUS),
            encode(
                Status(
                    device_id=self.device_id,
                    online=True,
                    agent_version=self.agent_version,
                    ts=self._clock(),
                )
            ),
            qos=1,
            retain=True,
        )
        client.subscribe(device_topic(self.device_id, Channel.DESIRED), qos=1)
        self.connected.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        self.connected.clear()
        if reason_code != 0:
            log.warning("lost broker connection: %s; reconnecting", reason_code)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        try:
            if message.topic != device_topic(self.device_id, Channel.DESIRED):
                raise MessageError(f"unexpected message on topic {message.topic!r}")
            if not message.payload:
                log.info("desired state cleared")
                return
            desired = decode(Desired, bytes(message.payload))
            if desired.device_id != self.device_id:
                raise MessageError(f"desired state addressed to {desired.device_id!r}")
        except MessageError as e:
            self.invalid_messages += 1
            log.warning("dropped invalid message: %s", e)
            return
        try:
            self._on_desired(desired)
        except Exception:  # the network thread must survive a bug in the agent
            log.exception("desired-state handler failed")
