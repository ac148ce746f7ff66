"""The MQTT message schemas: valid messages round-trip, bad ones are refused
with an error that names the problem, and no input crashes the parser."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import MessageError
from shared.messages import (
    MAX_MESSAGE_BYTES,
    Desired,
    Event,
    EventKind,
    HardwareInfo,
    PackedCounts,
    Reported,
    Status,
    Telemetry,
    UpdateState,
    decode,
    decode_device_message,
    encode,
)
from shared.topics import Channel, device_topic, parse_topic, subscription

HW = HardwareInfo(machine="aarch64", system="Linux", runtime="ai-edge-litert 2.3.0")


def _desired(**kw: object) -> Desired:
    base: dict[str, object] = {
        "device_id": "dev-1",
        "model": "digits",
        "release": 2,
        "issued_at": 1.0,
    }
    base.update(kw)
    return Desired(**base)  # type: ignore[arg-type]


def test_desired_round_trips_with_schema_field() -> None:
    msg = _desired(rollout_id="r-1", deadline=100.0)
    wire = encode(msg)
    assert json.loads(wire)["schema"] == "edgefleet.desired/1"
    assert decode(Desired, wire) == msg


@pytest.mark.parametrize(
    "msg",
    [
        Reported(device_id="d", agent_version="0.1.0", state=UpdateState.IDLE, hardware=HW, ts=2.0),
        Event(device_id="d", seq=1, ts=2.0, kind=EventKind.SWAPPED, model="digits", release=3),
        Telemetry(
            device_id="d",
            seq=1,
            window_start=1.0,
            window_end=2.0,
            inferences=5,
            errors=0,
            input_hist=[[1, 2], [3, 4]],
            output_hist=[1, 2, 3],
        ),
        Status(device_id="d", online=False),
    ],
)
def test_every_message_kind_round_trips(msg: object) -> None:
    assert decode(type(msg), encode(msg)) == msg  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"schema": "edgefleet.desired/2", "device_id": "d"}', "edgefleet.desired/2"),
        (
            b'{"schema": "edgefleet.desired/1", "device_id": "d", "model": "digits", '
            b'"release": 0, "issued_at": 1}',
            "release",
        ),
        (
            b'{"schema": "edgefleet.desired/1", "device_id": "d", "model": "Digits!", '
            b'"release": 1, "issued_at": 1}',
            "model",
        ),
        (
            b'{"schema": "edgefleet.desired/1", "device_id": "d", "model": "digits", '
            b'"release": 1, "issued_at": 1, "surprise": 1}',
            "surprise",
        ),
        (
            b'{"schema": "edgefleet.desired/1", "device_id": "d", "model": "digits", '
            b'"release": 1, "issued_at": NaN}',
            "not valid JSON",
        ),
    ],
)
def test_bad_desired_is_rejected_with_a_reason(payload: bytes, needle: str) -> None:
    with pytest.raises(MessageError, match=needle):
        decode(Desired, payload)


def test_oversized_message_rejected_before_parsing() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        decode(Telemetry, b" " * (MAX_MESSAGE_BYTES + 1))


def test_ragged_histogram_rejected() -> None:
    bad = {
        "schema": "edgefleet.telemetry/1",
        "device_id": "d",
        "seq": 1,
        "window_start": 1,
        "window_end": 2,
        "inferences": 1,
        "errors": 0,
        "input_hist": [[1, 2], [3]],
    }
    with pytest.raises(MessageError, match="same number of bins"):
        decode(Telemetry, json.dumps(bad).encode())


def test_huge_histogram_rejected() -> None:
    bad = {
        "schema": "edgefleet.telemetry/1",
        "device_id": "d",
        "seq": 1,
        "window_start": 1,
        "window_end": 2,
        "inferences": 1,
        "errors": 0,
        "input_hist": [[1] * 65],
    }
    with pytest.raises(MessageError, match="input_hist"):
        decode(Telemetry, json.dumps(bad).encode())


_WINDOW = {
    "schema": "edgefleet.telemetry/1",
    "device_id": "d",
    "seq": 1,
    "window_start": 1,
    "window_end": 2,
    "inferences": 300,
    "errors": 0,
}


@pytest.mark.parametrize(
    ("rows", "dtype"),
    [([[1, 2], [0, 255]], "u1"), ([[256, 0]], "u2"), ([[2**32]], "u8"), ([[2**53]], "u8")],
)
def test_packed_histogram_round_trips_in_the_narrowest_type(
    rows: list[list[int]], dtype: str
) -> None:
    packed = PackedCounts.of(rows)
    assert packed.dtype == dtype and packed.shape == (len(rows), len(rows[0]))
    msg = decode(
        Telemetry, encode(Telemetry.model_validate({**_WINDOW, "input_hist_packed": packed}))
    )
    assert msg.input_hist is None and msg.input_rows() == rows


@pytest.mark.parametrize(
    ("packed", "reason"),
    [
        (
            {"shape": [2, 2], "dtype": "u1", "data": "AQID"},
            "holds 3 bytes; 2 x 2 counts of u1 need 4",
        ),
        ({"shape": [1, 1], "dtype": "u1", "data": "AQ"}, "not base64"),
        ({"shape": [1, 1], "dtype": "u1", "data": "A Q=="}, "not base64"),
        ({"shape": [1, 1], "dtype": "i1", "data": "AQ=="}, "dtype"),
        ({"shape": [1, 65], "dtype": "u1", "data": "AQ=="}, "less than or equal to 64"),
        ({"shape": [0, 1], "dtype": "u1", "data": ""}, "greater than or equal to 1"),
        # 2**53 + 1 as u8: beyond what a count may be.
        ({"shape": [1, 1], "dtype": "u8", "data": "AQAAAAAAIAA="}, "exceeds"),
        ({"shape": [1, 1], "dtype": "u1", "data": "AQ==", "extra": 1}, "extra"),
    ],
)
def test_bad_packed_histogram_is_refused_with_the_reason(packed: dict, reason: str) -> None:
    wire = json.dumps({**_WINDOW, "input_hist_packed": packed}).encode()
    with pytest.raises(MessageError, match="input_hist_packed") as e:
        decode(Telemetry, wire)
    assert reason in str(e.value)


def test_both_histogram_forms_at_once_are_refused() -> None:
    both = {
        **_WINDOW,
        "input_hist": [[1]],
        "input_hist_packed": {"shape": [1, 1], "dtype": "u1", "data": "AQ=="},
    }
    with pytest.raises(MessageError, match="two forms of one histogram"):
        decode(Telemetry, json.dumps(both).encode())


def test_device_cannot_speak_for_another_device() -> None:
    wire = encode(Status(device_id="dev-2", online=True))
    with pytest.raises(MessageError, match="claims to be from 'dev-2'"):
        decode_device_message(device_topic("dev-1", Channel.STATUS), wire)


def test_topics_parse_and_refuse_wildcards() -> None:
    assert parse_topic("edgefleet/v1/devices/dev-1/events") == ("dev-1", Channel.EVENTS)
    with pytest.raises(ValueError, match="invalid device id"):
        device_topic("dev/+", Channel.DESIRED)
    with pytest.raises(ValueError, match="unknown channel"):
        parse_topic("edgefleet/v1/devices/dev-1/secrets")
    assert (
        subscription(Channel.TELEMETRY, share_group="ingest")
        == "$share/ingest/edgefleet/v1/devices/+/telemetry"
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_parser_never_crashes_on_arbitrary_bytes(payload: bytes) -> None:
    for cls in (Desired, Reported, Event, Telemetry, Status):
        with contextlib.suppress(MessageError):
            decode(cls, payload)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "schema",
                "device_id",
                "model",
                "release",
                "seq",
                "ts",
                "kind",
                "inferences",
                "input_hist",
                "input_hist_packed",
                "state",
                "online",
            ]
        ),
        _json,
        max_size=8,
    )
)
def test_parser_never_crashes_on_json_objects(obj: dict[str, object]) -> None:
    for cls, schema in (
        (Desired, "edgefleet.desired/1"),
        (Telemetry, "edgefleet.telemetry/1"),
        (Event, "edgefleet.event/1"),
        (Reported, "edgefleet.reported/1"),
    ):
        with contextlib.suppress(MessageError):
            decode(cls, json.dumps({**obj, "schema": schema}).encode())
