"""The cloud's MQTT 5 connection: desired state out, device streams in.

Ingest uses shared subscriptions (``$share/<group>/...``) so several cloud
workers split the device streams instead of each processing all of it. Every
message is validated (``shared.messages``); an invalid one is counted, logged
and dropped. Desired states are published retained with QoS 1 and the publish
waits for the broker's PUBACK, so an API call that returns 200 means the broker
holds the new desired state.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import ConfigError, MessageError, TransferError
from shared.messages import Desired, Message, decode_device_message, encode
from shared.topics import Channel, device_topic, subscription

__all__ = ["CloudMqtt", "client_tls_context"]

log = logging.getLogger(__name__)

INGEST_CHANNELS = (Channel.REPORTED, Channel.EVENTS, Channel.TELEMETRY, Channel.STATUS)


def client_tls_context(tls: Mapping[str, str]) -> ssl.SSLContext:
    """Mutual TLS for one of the cloud's broker connections.

    ``tls`` has ``ca_file`` (the cloud CA) and, on a secure broker, ``cert_file``
    and ``key_file`` (a service identity from ``cloud.pki``;
    ``ServiceIdentity.as_tls_dict()``). TLS 1.2 or newer; the broker's
    certificate is checked against the CA and the host name."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls["ca_file"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.get("cert_file"):
            ctx.load_cert_chain(certfile=tls["cert_file"], keyfile=tls.get("key_file"))
    except KeyError as e:
        raise ConfigError(f"broker TLS settings lack {e}") from e
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"broker TLS files {dict(tls)} are unusable: {e}") from e
    return ctx


class CloudMqtt:
    """One cloud worker's broker session."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        on_message: Callable[[Message, float], None],
        on_invalid: Callable[[str, str], None] | None = None,
        share_group: str | None = "edgefleet-ingest",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._on_message = on_message
        self._on_invalid = on_invalid
        self._share_group = share_group
        self.connected = threading.Event()
        self.invalid = 0
        self._client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefleet-cloud-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.max_inflight_messages_set(1000)
        if username is not None:
            self._client.username_pw_set(username, password)
        if tls is not None:
            self._client.tls_set_context(client_tls_context(tls))
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message

    def start(self, timeout: float = 10.0) -> None:
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise TransferError(f"cloud could not connect to MQTT broker {self.host}:{self.port}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def publish_desired(self, desired: Desired, timeout: float = 10.0) -> None:
        """Publish a retained desired state and wait until the broker has it."""
        info = self._client.publish(
            device_topic(desired.device_id, Channel.DESIRED), encode(desired), qos=1, retain=True
        )
        deadline = time.monotonic() + timeout
        try:
            info.wait_for_publish(timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise TransferError(f"desired state for {desired.device_id} not published: {e}") from e
        if not info.is_published() or time.monotonic() > deadline:
            raise TransferError(f"broker did not acknowledge desired state for {desired.device_id}")

    def publish_desired_many(self, desired: list[Desired], timeout: float = 30.0) -> None:
        """Publish many retained desired states, then wait for every PUBACK: one
        round trip for the batch instead of one per device (paho keeps up to
        ``max_inflight_messages`` in flight and queues the rest)."""
        infos = [
            (
                d.device_id,
                self._client.publish(
                    device_topic(d.device_id, Channel.DESIRED), encode(d), qos=1, retain=True
                ),
            )
            for d in desired
        ]
        deadline = time.monotonic() + timeout
        for device_id, info in infos:
            try:
                info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                raise TransferError(f"desired state for {device_id} not published: {e}") from e
            if not info.is_published():
                raise TransferError(
                    f"broker did not acknowledge the desired state of {device_id} "
                    f"(batch of {len(infos)}) within {timeout:g} s"
                )

    def clear_desired(self, device_id: str) -> None:
        """Remove a device's retained desired state (an empty retained message)."""
        info = self._client.publish(
            device_topic(device_id, Channel.DESIRED), b"", qos=1, retain=True
        )
        info.wait_for_publish(timeout=10)

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
            log.error("broker refused the cloud: %s", reason_code)
            return
        subs = [(subscription(ch, share_group=self._share_group), 1) for ch in INGEST_CHANNELS]
        # Desired states are read back (not shared) so every worker knows them.
        subs.append((subscription(Channel.DESIRED), 1))
        client.subscribe(subs)
        self.connected.set()
        log.info("cloud connected to broker %s:%s", self.host, self.port)

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
            log.warning("cloud lost the broker: %s; reconnecting", reason_code)

    def _handle_message(
        self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        now = time.time()
        if not message.payload:  # a cleared retained message
            return
        try:
            msg = decode_device_message(message.topic, message.payload)
        except MessageError as e:
            self.invalid += 1
            log.warning("dropped invalid message on %s: %s", message.topic, e)
            if self._on_invalid is not None:
                self._on_invalid(message.topic, str(e))
            return
        try:
            self._on_message(msg, now)
        except Exception:
            log.exception("ingest handler failed for %s", message.topic)
