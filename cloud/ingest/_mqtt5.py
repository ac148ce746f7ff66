"""The MQTT 5 packets an ingest subscriber needs, encoded and parsed without I/O.

Only the client side of a QoS 1 subscriber: CONNECT, SUBSCRIBE, PUBACK,
PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH, PINGRESP and DISCONNECT
in (OASIS MQTT 5.0, sections 2 and 3). ``cloud.ingest.mqtt_reader`` does the
socket work. ``parse`` splits a receive buffer into packets and stops at the
first incomplete one, so a caller appends what ``recv`` gave and parses again;
it reads PUBLISH packets in a tight loop because they are nearly all of the
traffic, and it never copies more than the topic and the payload.

Everything received is untrusted: lengths are checked against the buffer and
against ``max_packet``, and a packet that breaks the protocol raises
``ProtocolError`` (the caller drops the connection, as the standard asks).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "PINGREQ",
    "ConnAck",
    "Control",
    "ProtocolError",
    "connect_packet",
    "disconnect_packet",
    "parse",
    "puback_packets",
    "subscribe_packet",
]

#: Packet types (high nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ_T, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

PINGREQ = b"\xc0\x00"
#: Largest value of a variable byte integer (four bytes).
_MAX_VARINT = 268_435_455

#: Property identifier -> wire type, MQTT 5.0 section 2.2.2.2.
_BYTE, _U16, _U32, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE,  # payload format indicator
    0x02: _U32,  # message expiry interval
    0x03: _UTF8,  # content type
    0x08: _UTF8,  # response topic
    0x09: _BINARY,  # correlation data
    0x0B: _VARINT,  # subscription identifier
    0x11: _U32,  # session expiry interval
    0x12: _UTF8,  # assigned client identifier
    0x13: _U16,  # server keep alive
    0x15: _UTF8,  # authentication method
    0x16: _BINARY,  # authentication data
    0x17: _BYTE,  # request problem information
    0x18: _U32,  # will delay interval
    0x19: _BYTE,  # request response information
    0x1A: _UTF8,  # response information
    0x1C: _UTF8,  # server reference
    0x1F: _UTF8,  # reason string
    0x21: _U16,  # receive maximum
    0x22: _U16,  # topic alias maximum
    0x23: _U16,  # topic alias
    0x24: _BYTE,  # maximum QoS
    0x25: _BYTE,  # retain available
    0x26: _PAIR,  # user property
    0x27: _U32,  # maximum packet size
    0x28: _BYTE,  # wildcard subscription available
    0x29: _BYTE,  # subscription identifier available
    0x2A: _BYTE,  # shared subscription available
}
PROP_SESSION_EXPIRY = 0x11
PROP_SERVER_KEEP_ALIVE = 0x13
PROP_REASON_STRING = 0x1F
PROP_RECEIVE_MAXIMUM = 0x21
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_SHARED_SUBSCRIPTION_AVAILABLE = 0x2A


class ProtocolError(Exception):
    """The broker sent something MQTT 5 does not allow; the connection must go."""

    def __init__(self, message: str, reason: int = 0x82) -> None:
        super().__init__(message)
        #: DISCONNECT reason code to send (0x81 malformed, 0x82 protocol error, 0x95 too large).
        self.reason = reason


# -- encoding -------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if not 0 <= n <= _MAX_VARINT:
        raise ValueError(f"{n} does not fit an MQTT variable byte integer")
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    data = s.encode()
    if len(data) > 0xFFFF or "\x00" in s:
        raise ValueError(f"string {s[:40]!r}... is not a valid MQTT UTF-8 string")
    return struct.pack(">H", len(data)) + data


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return struct.pack(">H", len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    maximum_packet_size: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A CONNECT asking for a session that outlives the connection (``session_expiry``
    seconds), at most ``receive_maximum`` unacknowledged QoS 1 messages in flight to
    us and no packet above ``maximum_packet_size`` bytes."""
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("keepalive must fit two bytes")
    if not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError("receive maximum must be 1..65535")
    if password is not None and username is None:
        raise ValueError("MQTT 5 allows a password without a user name, but edgefleet does not")
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0)
    flags |= 0x40 if password is not None else 0
    props = (
        struct.pack(">BI", PROP_SESSION_EXPIRY, session_expiry)
        + struct.pack(">BH", PROP_RECEIVE_MAXIMUM, receive_maximum)
        + struct.pack(">BI", PROP_MAXIMUM_PACKET_SIZE, maximum_packet_size)
    )
    body = _utf8("MQTT") + bytes([5, flags]) + struct.pack(">H", keepalive)
    body += _varint(len(props)) + props + _utf8(client_id)
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _binary(password.encode())
    return _packet(CONNECT << 4, body)


def subscribe_packet(packet_id: int, filters: Sequence[str], qos: int = 1) -> bytes:
    """One SUBSCRIBE for ``filters`` (shared ones included) at ``qos``; no properties.
    No Local stays off: it is a protocol error on a shared subscription."""
    if not filters or not 1 <= packet_id <= 0xFFFF or qos not in (0, 1, 2):
        raise ValueError("SUBSCRIBE needs filters, a packet id 1..65535 and QoS 0..2")
    body = struct.pack(">HB", packet_id, 0)
    for f in filters:
        body += _utf8(f) + bytes([qos])
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def puback_packets(packet_ids: Iterable[int]) -> bytes:
    """PUBACKs (success, no properties: the four-byte form) for ``packet_ids``, joined."""
    ids = [0x40020000 | pid for pid in packet_ids]
    return struct.pack(f">{len(ids)}I", *ids)


def disconnect_packet(reason: int = 0) -> bytes:
    """DISCONNECT; reason 0 keeps the session (and its queue) for its expiry interval."""
    return bytes([DISCONNECT << 4, 1, reason]) if reason else b"\xe0\x00"


# -- parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnAck:
    session_present: bool
    reason: int
    properties: dict[int, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Control:
    """A packet that is not a PUBLISH: CONNACK, SUBACK, PINGRESP or DISCONNECT."""

    kind: int
    packet_id: int = 0
    #: SUBACK: the reason codes; DISCONNECT: one reason code.
    reasons: tuple[int, ...] = ()
    connack: ConnAck | None = None
    properties: dict[int, object] = field(default_factory=dict)


def _read_varint(buf: bytes | bytearray | memoryview, i: int, end: int) -> tuple[int, int]:
    """``(value, next index)``; ``(-1, i)`` if the buffer ends inside the integer."""
    value, shift = 0, 0
    for k in range(4):
        if i + k >= end:
            return -1, i
        b = buf[i + k]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i + k + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than four bytes", 0x81)


def parse_properties(data: bytes) -> dict[int, object]:
    """The properties in ``data`` (the bytes after the property length). Repeated
    properties (user properties) keep the last value: nothing here needs them all."""
    props: dict[int, object] = {}
    i, end = 0, len(data)
    while i < end:
        pid = data[i]
        i += 1
        kind = _PROPERTY_TYPES.get(pid)
        try:
            if kind == _BYTE:
                value: object = data[i]
                i += 1
            elif kind == _U16:
                value = int.from_bytes(data[i : i + 2], "big")
                i += 2
            elif kind == _U32:
                value = int.from_bytes(data[i : i + 4], "big")
                i += 4
            elif kind == _VARINT:
                value, i = _read_varint(data, i, end)
                if value < 0:
                    raise IndexError
            elif kind in (_UTF8, _BINARY, _PAIR):
                value = b""
                for _ in range(2 if kind == _PAIR else 1):
                    n = int.from_bytes(data[i : i + 2], "big")
                    value = data[i + 2 : i + 2 + n]
                    if len(data[i : i + 2]) < 2 or len(value) != n:
                        raise IndexError
                    i += 2 + n
                if kind != _BINARY:
                    value = bytes(value).decode(errors="replace")
            else:
                raise ProtocolError(f"unknown property 0x{pid:02x}", 0x81)
        except IndexError:
            raise ProtocolError(f"property 0x{pid:02x} runs past its packet", 0x81) from None
        if i > end:
            raise ProtocolError(f"property 0x{pid:02x} runs past its packet", 0x81)
        props[pid] = value
    return props


def _reason_and_properties(body: bytes, start: int) -> tuple[int, dict[int, object]]:
    """Reason code at ``start`` then optional properties (CONNACK, DISCONNECT)."""
    if len(body) <= start:
        return 0, {}
    reason = body[start]
    if len(body) == start + 1:
        return reason, {}
    plen, i = _read_varint(body, start + 1, len(body))
    if plen < 0 or i + plen != len(body):
        raise ProtocolError("property length does not match the packet", 0x81)
    return reason, parse_properties(body[i:])


def _control(kind: int, flags: int, body: bytes) -> Control:
    if kind == PINGRESP:
        return Control(PINGRESP)
    if kind == CONNACK:
        if len(body) < 2 or body[0] & 0xFE:
            raise ProtocolError("malformed CONNACK", 0x81)
        reason, props = _reason_and_properties(body, 1)
        return Control(CONNACK, connack=ConnAck(bool(body[0] & 1), reason, props))
    if kind == SUBACK:
        if len(body) < 3:
            raise ProtocolError("malformed SUBACK", 0x81)
        plen, i = _read_varint(body, 2, len(body))
        if plen < 0 or i + plen > len(body):
            raise ProtocolError("malformed SUBACK properties", 0x81)
        props = parse_properties(body[i : i + plen])
        pid = int.from_bytes(body[:2], "big")
        return Control(SUBACK, packet_id=pid, reasons=tuple(body[i + plen :]), properties=props)
    if kind == DISCONNECT:
        reason, props = _reason_and_properties(body, 0)
        return Control(DISCONNECT, reasons=(reason,), properties=props)
    raise ProtocolError(f"a subscriber does not expect packet type {kind} (flags {flags:#x})")


#: One received message: (topic bytes, payload, packet id (0 for QoS 0), QoS).
Publish = tuple[bytes, bytes, int, int]


def parse(
    buf: bytearray, start: int, end: int, publishes: list[Publish], max_packet: int
) -> tuple[int, list[Control]]:
    """Parse complete packets in ``buf[start:end]``: PUBLISHes are appended to
    ``publishes``, other packets returned. Returns the index after the last complete
    packet (where the next ``parse`` starts) and the control packets in order."""
    controls: list[Control] = []
    mv = memoryview(buf)
    pos = start
    append = publishes.append
    try:
        while pos + 1 < end:
            first = buf[pos]
            # Remaining length: one byte for any packet below 128 bytes, else a varint.
            b = buf[pos + 1]
            if b < 0x80:
                length, i = b, pos + 2
            elif pos + 2 < end and buf[pos + 2] < 0x80:  # 128 B .. 16 KB: most telemetry
                length, i = (b & 0x7F) | (buf[pos + 2] << 7), pos + 3
            else:
                length, i = _read_varint(buf, pos + 1, end)
                if length < 0:
                    break
            stop = i + length
            if stop - pos > max_packet:
                raise ProtocolError(
                    f"packet of {stop - pos} bytes exceeds the {max_packet}-byte maximum", 0x95
                )
            if stop > end:
                break
            if first >> 4 == PUBLISH:
                qos = (first >> 1) & 3
                tlen = (buf[i] << 8) | buf[i + 1]
                j = i + 2 + tlen
                topic = bytes(mv[i + 2 : j])
                if qos:
                    if qos == 3:
                        raise ProtocolError("PUBLISH with QoS 3", 0x81)
                    pid = (buf[j] << 8) | buf[j + 1]
                    j += 2
                    if qos == 2 or pid == 0:
                        raise ProtocolError("QoS 2 or packet id 0 on a QoS 1 subscription")
                else:
                    pid = 0
                plen = buf[j]
                if plen < 0x80:
                    j += 1 + plen
                else:
                    plen, j = _read_varint(buf, j, stop)
                    if plen < 0:
                        raise ProtocolError("malformed PUBLISH property length", 0x81)
                    j += plen
                if j > stop or tlen == 0:
                    # A zero-length topic needs a topic alias, which we never allowed.
                    raise ProtocolError("malformed PUBLISH (lengths or topic alias)", 0x81)
                append((topic, bytes(mv[j:stop]), pid, qos))
            else:
                controls.append(_control(first >> 4, first & 0x0F, bytes(mv[i:stop])))
            pos = stop
    except IndexError:
        # A length field pointed outside its own packet.
        raise ProtocolError("malformed packet: a length runs past the packet", 0x81) from None
    finally:
        mv.release()
    return pos, controls
