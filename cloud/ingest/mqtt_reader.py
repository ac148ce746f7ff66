"""A small MQTT 5 subscriber for the ingest hot path: many messages per ``recv``,
acknowledged in bulk only when the caller says their batch is committed.

paho spends about 160 us of Python per received message (a ``MQTTMessage``
object, callbacks, a lock per acknowledgement); an ingest worker needs none
of that. This reader is one blocking socket (TLS optional) driven by the
worker's own thread: ``read`` receives whatever the kernel holds (up to the
buffer), parses every complete PUBLISH in it (``cloud.ingest._mqtt5``) and
returns them; ``ack`` sends the PUBACKs of a committed batch in one
``sendall``. Nothing is acknowledged implicitly.

Session rules, all from the standard and relied on by ingest:

* CONNECT with Clean Start 0 and a Session Expiry Interval: a restarted worker
  with the same client id gets its session back, and the broker resends every
  message it had not acknowledged, and whatever queued meanwhile;
* Receive Maximum caps the unacknowledged messages the broker may have in
  flight to us, and Maximum Packet Size caps one packet. What we hold is
  bounded by how we read, not by those: ``read`` takes at most ``RECV_CHUNK``
  bytes from the kernel, the caller reads no more than a batch before it
  commits, and TCP flow control keeps the rest at the broker;
* a packet id is only valid on the connection that delivered it. Every new
  connection bumps ``generation``; ``ack`` refuses ids of an older one (the
  broker redelivers those, and ingest's unique key makes the copy a no-op).

Keepalive: a PINGREQ when we have sent nothing for half the keepalive, and the
connection is declared dead when the broker stays silent for one and a half.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cloud.ingest import _mqtt5
from cloud.ingest._mqtt5 import ConnAck, Control, ProtocolError, Publish
from shared.errors import TransferError

__all__ = [
    "BrokerConnectionError",
    "MqttReader",
    "Publish",
    "ReaderConfig",
]

log = logging.getLogger(__name__)

#: Bytes asked of the kernel per ``recv``: ~400 telemetry windows.
RECV_CHUNK = 1 << 20
_SUBSCRIBE_ID = 1


class BrokerConnectionError(TransferError):
    """The broker could not be reached, refused us, or dropped the connection."""

    code = "broker_connection"


@dataclass(frozen=True)
class ReaderConfig:
    """Where to connect, as whom, and the limits we announce to the broker."""

    host: str
    port: int
    client_id: str
    subscriptions: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    #: ``cloud.mqtt_bridge.client_tls_context`` settings (``ca_file``, ``cert_file``, ...).
    tls: Mapping[str, str] | None = None
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    receive_maximum: int = 4000
    max_packet_size: int = 1 << 20
    connect_timeout: float = 10.0


class MqttReader:
    """One broker connection at a time; not thread-safe (one worker thread owns it)."""

    def __init__(self, config: ReaderConfig) -> None:
        if not config.subscriptions:
            raise ValueError("a reader needs at least one subscription")
        self.config = config
        #: Bumped by every successful ``connect``.
        self.generation = 0
        self.session_present = False
        self._sock: socket.socket | None = None
        self._buf = bytearray(RECV_CHUNK * 2)
        self._start = self._end = 0
        self._controls: list[Control] = []
        self._early: list[Publish] = []
        #: When the SUBACK of the connection's SUBSCRIBE is due (``None``: received).
        self._suback_due: float | None = None
        self._keepalive = config.keepalive
        self._last_sent = self._last_heard = 0.0
        self._tls = None
        if config.tls is not None:
            from cloud.mqtt_bridge import client_tls_context

            self._tls = client_tls_context(config.tls)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # -- connection -------------------------------------------------------------------
    def connect(self) -> bool:
        """Open a connection, resume the session and subscribe; ``session_present``.

        A new session is subscribed when this returns (nothing can arrive for it
        before the SUBACK). A resumed one already has its subscriptions, and the
        broker starts sending its backlog right after the CONNACK: the SUBACK of the
        renewal then comes later, in ``read``, so the backlog is never buffered here
        (with a large Receive Maximum it could be hundreds of megabytes)."""
        self.close()
        cfg = self.config
        try:
            sock = socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
        except OSError as e:
            raise BrokerConnectionError(f"cannot reach {cfg.host}:{cfg.port}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # No SO_RCVBUF: setting it turns off the kernel's receive-buffer autotuning,
            # which grows past what ``net.core.rmem_max`` lets a process ask for.
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=cfg.host)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise BrokerConnectionError(f"TLS with {cfg.host}:{cfg.port} failed: {e}") from e
        self._sock = sock
        self._last_sent = self._last_heard = time.monotonic()
        self._start = self._end = 0
        self._controls.clear()
        self._early.clear()
        try:
            self._send(
                _mqtt5.connect_packet(
                    cfg.client_id,
                    keepalive=cfg.keepalive,
                    clean_start=False,
                    session_expiry=cfg.session_expiry,
                    receive_maximum=cfg.receive_maximum,
                    maximum_packet_size=cfg.max_packet_size,
                    username=cfg.username,
                    password=cfg.password,
                )
            )
            ack = self._await(_mqtt5.CONNACK).connack
            assert ack is not None
            self._check_connack(ack)
            self._send(_mqtt5.subscribe_packet(_SUBSCRIBE_ID, cfg.subscriptions, qos=1))
            self._suback_due = time.monotonic() + cfg.connect_timeout
            if not ack.session_present:
                self._check_suback(self._await(_mqtt5.SUBACK))
        except BaseException:
            self.close()
            raise
        self.session_present = ack.session_present
        self.generation += 1
        return ack.session_present

    def _check_suback(self, suback: Control) -> None:
        subs = self.config.subscriptions
        failed = [(f, rc) for f, rc in zip(subs, suback.reasons, strict=False) if rc >= 0x80]
        if failed or len(suback.reasons) != len(subs):
            self.close()
            raise BrokerConnectionError(
                f"broker refused subscriptions {failed or suback.reasons} of "
                f"{self.config.client_id} (0x87: not authorized by the ACL, 0x9e: no shared "
                "subscriptions)"
            )
        self._suback_due = None

    def _check_connack(self, ack: ConnAck) -> None:
        if ack.reason >= 0x80:
            why = ack.properties.get(_mqtt5.PROP_REASON_STRING, "")
            raise BrokerConnectionError(
                f"broker refused client {self.config.client_id}: reason 0x{ack.reason:02x} {why}"
                " (0x86: bad user name or password, 0x87: not authorized, 0x85: client id)"
            )
        if ack.properties.get(_mqtt5.PROP_SHARED_SUBSCRIPTION_AVAILABLE, 1) == 0 and any(
            s.startswith("$share/") for s in self.config.subscriptions
        ):
            raise BrokerConnectionError("the broker does not support shared subscriptions")
        server_keepalive = ack.properties.get(_mqtt5.PROP_SERVER_KEEP_ALIVE)
        self._keepalive = (
            int(server_keepalive) if isinstance(server_keepalive, int) else self.config.keepalive
        )
        if ack.properties.get(_mqtt5.PROP_SESSION_EXPIRY, 1) == 0:
            log.warning(
                "broker keeps no session for %s: a restart may lose messages",
                self.config.client_id,
            )

    def _await(self, kind: int) -> Control:
        deadline = time.monotonic() + self.config.connect_timeout
        while True:
            for i, c in enumerate(self._controls):
                if c.kind == kind:
                    del self._controls[i]
                    return c
                if c.kind == _mqtt5.DISCONNECT:
                    raise BrokerConnectionError(f"broker disconnected us: 0x{c.reasons[0]:02x}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerConnectionError(f"no {'CONNACK' if kind == 2 else 'SUBACK'} in time")
            self._receive(self._early, remaining)

    def disconnect(self, linger: float = 2.0) -> None:
        """A normal DISCONNECT (the session stays for its expiry), then close once the
        broker has closed its side (at most ``linger`` seconds).

        Waiting matters: closing a socket with unread data in it sends a TCP reset,
        and a broker that gets the reset may drop what it had not read yet, such as
        our last acknowledgements (measured with Mosquitto 2.0.11 on a resumed
        session: about half of the batch came back)."""
        sock = self._sock
        if sock is not None:
            try:
                self._send(_mqtt5.disconnect_packet(0))
                sock.settimeout(linger)
                deadline = time.monotonic() + linger
                while time.monotonic() < deadline and sock.recv(65536):
                    pass
            except (BrokerConnectionError, OSError, ssl.SSLError):
                pass
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- traffic --------------------------------------------------------------------------
    def read(self, out: list[Publish], timeout: float) -> int:
        """Append the messages that arrive within ``timeout`` (or are already buffered)
        to ``out``; their count. Raises ``BrokerConnectionError`` if the connection is
        gone (the caller reconnects; nothing unacknowledged is lost)."""
        if self._sock is None:
            raise BrokerConnectionError("not connected")
        n = len(out)
        if self._early:
            out.extend(self._early)
            self._early.clear()
            timeout = 0.0
        self._receive(out, timeout)
        self._check_alive()
        self.ping_if_due()
        for c in self._controls:
            if c.kind == _mqtt5.SUBACK:
                self._check_suback(c)
            elif c.kind == _mqtt5.DISCONNECT:
                self.close()
                why = c.properties.get(_mqtt5.PROP_REASON_STRING, "")
                raise BrokerConnectionError(
                    f"broker disconnected {self.config.client_id}: 0x{c.reasons[0]:02x} {why}"
                    " (0x8e: another client took over this client id)"
                )
        self._controls.clear()
        # On resume the broker sends what it queued before it answers SUBSCRIBE, so a
        # backlog drained slowly delays the SUBACK without end: only a broker that has
        # also gone quiet is judged.
        if self._suback_due is not None and time.monotonic() > max(
            self._suback_due, self._last_heard + self.config.connect_timeout
        ):
            self.close()
            raise BrokerConnectionError("the broker did not answer our SUBSCRIBE in time")
        return len(out) - n

    def ack(self, packet_ids: Sequence[int], generation: int) -> bool:
        """Acknowledge ``packet_ids`` received on connection ``generation``; ``False``
        (and nothing sent) if that connection is gone."""
        if generation != self.generation or self._sock is None:
            return False
        ids = [p for p in packet_ids if p]
        if ids:
            self._send(_mqtt5.puback_packets(ids))
        return True

    def ping_if_due(self) -> None:
        """Send a PINGREQ if we have been quiet for half the keepalive (also while the
        caller is busy elsewhere, e.g. retrying a database write)."""
        if self._keepalive and time.monotonic() - self._last_sent >= self._keepalive / 2:
            self._send(_mqtt5.PINGREQ)

    def _check_alive(self) -> None:
        silent = time.monotonic() - self._last_heard
        if self._keepalive and silent > 1.5 * self._keepalive:
            self.close()
            raise BrokerConnectionError(
                f"broker silent for {silent:.0f}s (keepalive {self._keepalive}s)"
            )

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None:
            raise BrokerConnectionError("not connected")
        try:
            sock.settimeout(self.config.connect_timeout)
            sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise BrokerConnectionError(f"sending to the broker failed: {e}") from e
        self._last_sent = time.monotonic()

    def _receive(self, out: list[Publish], timeout: float) -> None:
        """One ``recv`` (waiting up to ``timeout``), then parse what is complete."""
        sock = self._sock
        assert sock is not None
        buf = self._buf
        if len(buf) - self._end < RECV_CHUNK:
            # Move the unparsed tail to the front; grow for a packet bigger than the buffer.
            tail = self._end - self._start
            buf[:tail] = buf[self._start : self._end]
            self._start, self._end = 0, tail
            if len(buf) - tail < RECV_CHUNK:
                buf.extend(bytes(RECV_CHUNK))
        try:
            sock.settimeout(max(timeout, 0.0))
            with memoryview(buf) as mv:
                n = sock.recv_into(mv[self._end : self._end + RECV_CHUNK])
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return
        except (OSError, ssl.SSLError) as e:
            self.close()
            raise BrokerConnectionError(f"connection to the broker lost: {e}") from e
        if n == 0:
            self.close()
            raise BrokerConnectionError("the broker closed the connection")
        self._end += n
        self._last_heard = time.monotonic()
        try:
            self._start, controls = _mqtt5.parse(
                buf, self._start, self._end, out, self.config.max_packet_size
            )
        except ProtocolError as e:
            with contextlib.suppress(BrokerConnectionError):
                self._send(_mqtt5.disconnect_packet(e.reason))
            self.close()
            raise BrokerConnectionError(f"broker broke the MQTT 5 protocol: {e}") from e
        if self._start == self._end:
            self._start = self._end = 0
        self._controls.extend(controls)
        # The buffer only grows past two chunks for one big packet; shrink back after it.
        if self._start == 0 and self._end == 0 and len(buf) > 2 * RECV_CHUNK:
            del buf[2 * RECV_CHUNK :]
