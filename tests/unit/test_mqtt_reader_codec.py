"""The ingest subscriber's MQTT 5 codec (``cloud.ingest._mqtt5``), without a network:
packets split at any byte still parse to the same messages, and no input makes the
parser do anything but return packets or raise ``ProtocolError``."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.ingest import _mqtt5
from cloud.ingest._mqtt5 import ProtocolError

MAX = 1 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, d = n >> 7, n & 0x7F
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(
    topic: bytes, payload: bytes, qos: int = 1, pid: int = 1, props: bytes = b"", dup: bool = False
) -> bytes:
    """A broker-side PUBLISH, encoded independently of the code under test."""
    body = struct.pack(">H", len(topic)) + topic
    if qos:
        body += struct.pack(">H", pid)
    body += _varint(len(props)) + props + payload
    first = 0x30 | (qos << 1) | (0x08 if dup else 0)
    return bytes([first]) + _varint(len(body)) + body


def _parse_all(data: bytes, max_packet: int = MAX) -> tuple[list[_mqtt5.Publish], list, int]:
    buf = bytearray(data)
    out: list[_mqtt5.Publish] = []
    end, controls = _mqtt5.parse(buf, 0, len(buf), out, max_packet)
    return out, controls, end


def test_connect_asks_for_a_lasting_session_with_bounded_flow() -> None:
    pkt = _mqtt5.connect_packet(
        "edgefleet-ingest-3",
        keepalive=30,
        clean_start=False,
        session_expiry=3600,
        receive_maximum=4000,
        maximum_packet_size=123456,
        username="svc",
        password="s3cret",
    )
    assert pkt[0] == 0x10
    length, i = _mqtt5._read_varint(pkt, 1, len(pkt))
    body = pkt[i:]
    assert len(body) == length
    assert body[:7] == b"\x00\x04MQTT\x05"
    flags, keepalive = body[7], struct.unpack(">H", body[8:10])[0]
    assert flags == 0x80 | 0x40  # user name, password; Clean Start 0; no will
    assert keepalive == 30
    plen, j = _mqtt5._read_varint(body, 10, len(body))
    props = _mqtt5.parse_properties(body[j : j + plen])
    assert props == {0x11: 3600, 0x21: 4000, 0x27: 123456}
    rest = body[j + plen :]
    fields = []
    while rest:
        n = struct.unpack(">H", rest[:2])[0]
        fields.append(rest[2 : 2 + n])
        rest = rest[2 + n :]
    assert fields == [b"edgefleet-ingest-3", b"svc", b"s3cret"]


def test_connect_refuses_values_that_do_not_fit() -> None:
    kw = dict(keepalive=30, clean_start=False, session_expiry=1, maximum_packet_size=1)
    with pytest.raises(ValueError):
        _mqtt5.connect_packet("c", receive_maximum=0, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _mqtt5.connect_packet("c", receive_maximum=70_000, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _mqtt5.connect_packet("c\x00", receive_maximum=10, **kw)  # type: ignore[arg-type]


def test_subscribe_and_puback_wire_forms() -> None:
    sub = _mqtt5.subscribe_packet(7, ["$share/g/a/+/b", "c"], qos=1)
    body = b"\x00\x07\x00" + b"\x00\x0e$share/g/a/+/b\x01" + b"\x00\x01c\x01"
    assert sub == b"\x82" + _varint(len(body)) + body
    assert _mqtt5.puback_packets([1, 0x1234]) == b"\x40\x02\x00\x01\x40\x02\x12\x34"
    assert _mqtt5.disconnect_packet() == b"\xe0\x00"
    assert _mqtt5.disconnect_packet(0x81) == b"\xe0\x01\x81"


def test_publishes_and_controls_parse_in_order() -> None:
    props = b"\x01\x01" + b"\x0b" + _varint(300) + b"\x26\x00\x01k\x00\x01v"  # format, sub id, user
    data = (
        b"\x20\x03\x01\x00\x00"  # CONNACK, session present
        + _publish(b"t/1", b"one", qos=1, pid=10, props=props)
        + _publish(b"t/2", b"", qos=0)
        + b"\xd0\x00"  # PINGRESP
        + _publish(b"t/3", b"x" * 20_000, qos=1, pid=65535, dup=True)
        + b"\x90\x04\x00\x01\x00\x01"  # SUBACK id 1, granted QoS 1
    )
    out, controls, end = _parse_all(data)
    assert end == len(data)
    assert out == [(b"t/1", b"one", 10, 1), (b"t/2", b"", 0, 0), (b"t/3", b"x" * 20_000, 65535, 1)]
    kinds = [c.kind for c in controls]
    assert kinds == [_mqtt5.CONNACK, _mqtt5.PINGRESP, _mqtt5.SUBACK]
    assert controls[0].connack.session_present and controls[0].connack.reason == 0
    assert controls[2].packet_id == 1 and controls[2].reasons == (1,)


def test_connack_properties_and_refusal_are_read() -> None:
    props = b"\x13\x00\x3c" + b"\x2a\x00" + b"\x1f\x00\x03bad"
    body = b"\x00\x87" + _varint(len(props)) + props
    _, controls, _ = _parse_all(b"\x20" + _varint(len(body)) + body)
    ack = controls[0].connack
    assert (ack.session_present, ack.reason) == (False, 0x87)
    assert ack.properties == {0x13: 60, 0x2A: 0, 0x1F: "bad"}


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.binary(min_size=1, max_size=40),
            st.binary(max_size=3000),
            st.integers(1, 65535),
            st.sampled_from([0, 1]),
        ),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=40_000), max_size=8),
)
def test_a_stream_cut_anywhere_parses_to_the_same_messages(
    messages: list[tuple[bytes, bytes, int, int]], cuts: list[int]
) -> None:
    """``recv`` returns arbitrary pieces: parsing as the pieces arrive gives what
    parsing the whole stream gives, and nothing is returned twice."""
    stream = b"".join(_publish(t, p, qos=q, pid=i) for t, p, i, q in messages)
    expected = [(t, p, i if q else 0, q) for t, p, i, q in messages]
    buf = bytearray()
    start, out = 0, []
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        buf += stream[len(buf) : cut]
        start, controls = _mqtt5.parse(buf, start, len(buf), out, MAX)
        assert controls == []
    assert start == len(stream)
    assert out == expected


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x30\xff\xff\xff\xff\x01", 0x81),  # remaining length of five bytes
        (b"\x32\x05\x00\x09abc", 0x81),  # topic runs past the packet
        (b"\x32\x06\x00\x01t\x00\x00\x00", 0x82),  # packet id 0
        (b"\x34\x07\x00\x01t\x00\x01\x00x", 0x82),  # QoS 2 on a QoS 1 subscription
        (b"\x36\x07\x00\x01t\x00\x01\x00x", 0x81),  # QoS 3
        (b"\x32\x05\x00\x00\x00\x01\x00", 0x81),  # empty topic: a topic alias we never allowed
        (b"\x32\x06\x00\x01t\x00\x01\x09", 0x81),  # properties run past the packet
        (b"\x32\x07\x00\x01t\x00\x01\x80\x80", 0x81),  # property length varint cut short
        (b"\x10\x00", 0x82),  # a CONNECT from the broker
        (b"\x20\x01\x00", 0x81),  # CONNACK too short
        (b"\x20\x03\x02\x00\x00", 0x81),  # CONNACK reserved flag
        (b"\x20\x05\x00\x00\x02\x99\x00", 0x81),  # unknown property
    ],
)
def test_protocol_violations_are_refused(data: bytes, reason: int) -> None:
    with pytest.raises(ProtocolError) as e:
        _parse_all(data)
    assert e.value.reason == reason


def test_a_packet_above_the_maximum_is_refused_before_it_is_buffered() -> None:
    head = b"\x32" + _varint(5_000_000)  # only the header has arrived
    with pytest.raises(ProtocolError) as e:
        _parse_all(head + b"\x00\x01t", max_packet=1 << 20)
    assert e.value.reason == 0x95


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=300))
def test_garbage_never_crashes_the_parser(data: bytes) -> None:
    try:
        out, _, end = _parse_all(data, max_packet=4096)
    except ProtocolError:
        return
    assert 0 <= end <= len(data)
    for topic, payload, pid, qos in out:
        assert topic and qos in (0, 1) and (pid > 0) == (qos == 1)
        assert len(payload) <= len(data)
