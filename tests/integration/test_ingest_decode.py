"""The ingest fast path accepts exactly what ``shared.messages`` accepts, with the
same result, on random mutations of telemetry messages (hypothesis)."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.ingest.fastpath import FastTelemetry, decode_telemetry
from cloud.ingest.histograms import PackedHistogram, pack_histogram, unpack_histograms
from shared.errors import MessageError
from shared.messages import MAX_BINS, MAX_FEATURES, Message, decode_device_message
from shared.topics import parse_topic

TOPIC = "edgefleet/v1/devices/dev-1/telemetry"
VALID: dict[str, Any] = {
    "schema": "edgefleet.telemetry/1",
    "device_id": "dev-1",
    "seq": 3,
    "window_start": 10.0,
    "window_end": 11.5,
    "model": "digits",
    "release": 2,
    "inferences": 40,
    "errors": 1,
    "latency": {"p50_ms": 0.1, "p95_ms": 0.2, "p99_ms": 0.3, "max_ms": 0.9},
    "cpu_percent": 4.5,
    "rss_bytes": 1000,
    "input_hist": [[1, 2], [3, 0]],
    "output_hist": [2, 1],
}
#: Values near every bound the schema has, plus the types lax mode converts.
edge_numbers = st.sampled_from(
    [0, 1, -1, 2**53, 2**53 + 1, 2**63, 2**64, -0.0, 0.5, 1e308, 100_000, 100_000.5, 1e999]
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | edge_numbers
    | st.text(max_size=8)
    | st.sampled_from(["digits", "dev-1", "dev-1\n", "Digits", "3", "edgefleet.telemetry/1"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _outcome(topic: str, payload: bytes) -> tuple[str, Message | None]:
    try:
        return "ok", decode_device_message(topic, payload)
    except MessageError:
        return "refused", None


def _fast(topic: str, payload: bytes) -> tuple[str, Message | None]:
    try:
        device_id, _ = parse_topic(topic)
    except ValueError:
        return "refused", None
    try:
        msg, packed = decode_telemetry(device_id, payload)
    except MessageError:
        return "refused", None
    return "ok", msg.to_message(packed)


def _fields(msg: FastTelemetry, packed: PackedHistogram | None) -> str:
    """Every field, floats bit for bit (``-0.0`` is not ``0.0``), counts as numbers."""
    counts = None
    if packed is not None:
        arrays = unpack_histograms([packed]).arrays[0]
        assert arrays is not None
        counts = arrays.tolist()
    return repr((msg, counts))


def _same(topic: str, payload: bytes) -> None:
    fast, canon = _fast(topic, payload), _outcome(topic, payload)
    assert fast == canon, (payload[:300], fast, canon)
    if canon[1] is not None:
        got = decode_telemetry(parse_topic(topic)[0], payload)
        want = FastTelemetry.from_message(canon[1])  # type: ignore[arg-type]
        hist, pk = want.input_hist, want.input_hist_packed
        want_packed = pack_histogram(hist) if hist else None
        if pk is not None:  # decoded here independently of the code under test
            want_packed = (tuple(pk.shape), f"<{pk.dtype}", base64.b64decode(pk.data))
            want.input_hist_packed = None
        if hist:
            want.input_hist = None
        assert _fields(*got) == _fields(want, want_packed)


@settings(max_examples=600, deadline=None)
@given(field=st.sampled_from([*VALID, "extra", "schema_"]), value=json_values, drop=st.booleans())
def test_fast_path_agrees_on_mutated_fields(field: str, value: Any, drop: bool) -> None:
    msg = dict(VALID)
    if drop and field in msg:
        del msg[field]
    else:
        msg[field] = value
    _same(TOPIC, json.dumps(msg).encode())


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from(["p50_ms", "p95_ms", "p99_ms", "max_ms", "extra"]),
    value=json_values,
    hist=st.lists(st.lists(st.integers(min_value=-1, max_value=2**53 + 1), max_size=4), max_size=4),
    out=st.lists(st.integers(min_value=-1, max_value=2**53 + 1), max_size=4),
)
def test_fast_path_agrees_on_nested_values(
    field: str, value: Any, hist: list[list[int]], out: list[int]
) -> None:
    msg = {**VALID, "latency": {**VALID["latency"], field: value}}
    _same(TOPIC, json.dumps(msg).encode())
    _same(TOPIC, json.dumps({**VALID, "input_hist": hist, "output_hist": out}).encode())


@settings(max_examples=200, deadline=None)
@given(
    raw=st.binary(max_size=64),
    topic_device=st.sampled_from(["dev-1", "dev-2", "a/b", "dev-1\n", "-dev", "x" * 65]),
)
def test_fast_path_agrees_on_raw_bytes_and_topics(raw: bytes, topic_device: str) -> None:
    _same(f"edgefleet/v1/devices/{topic_device}/telemetry", raw)
    _same(f"edgefleet/v1/devices/{topic_device}/telemetry", json.dumps(VALID).encode())
    msg = {**VALID, "device_id": topic_device}
    _same(f"edgefleet/v1/devices/{topic_device}/telemetry", json.dumps(msg).encode())


#: Counts at every edge of the packing: msgpack fixints, int64, the schema's 2**53.
edge_counts = st.sampled_from(
    [0, 1, 127, 128, 255, 256, -1, -32, -33, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30]
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.sampled_from([1, 2, 15, 16, 224, 255, 256, 300]),
    bins=st.sampled_from([1, 10, 15, 16, 64]),
    small=st.integers(min_value=0, max_value=127),
    odd=st.lists(st.tuples(st.integers(0, 10**6), edge_counts), max_size=3),
)
def test_fast_path_agrees_on_histogram_counts(
    rows: int, bins: int, small: int, odd: list[tuple[int, int]]
) -> None:
    """Every count small but a few at an edge, in histograms of every header size."""
    hist = [[small] * bins for _ in range(rows)]
    for pos, value in odd:
        hist[(pos // bins) % rows][pos % bins] = value
    msg = {**VALID, "input_hist": hist, "inferences": 2**53}
    _same(TOPIC, json.dumps(msg).encode())


_ITEM = {"u1": "B", "u2": "H", "u4": "I", "u8": "Q"}


@settings(max_examples=400, deadline=None)
@given(
    shape=st.tuples(st.sampled_from([0, 1, 2, 64, 65]), st.sampled_from([0, 1, 3, 64, 65])),
    dtype=st.sampled_from(["u1", "u2", "u4", "u8"]),
    count=st.sampled_from([0, 1, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**53, 2**53 + 1]),
    said=st.one_of(st.none(), st.sampled_from(["i1", "U1", "u16", 1]), json_values),
    cut=st.sampled_from([0, 0, 0, 1, -1, 3]),
    extra=st.booleans(),
    lists_too=st.booleans(),
)
def test_fast_path_agrees_on_packed_histograms(
    shape: tuple[int, int],
    dtype: str,
    count: int,
    said: Any,
    cut: int,
    extra: bool,
    lists_too: bool,
) -> None:
    """Well-formed packed counts and every way to get them wrong: shapes out of
    bounds, counts too large for their type or for a count, a wrong ``dtype``, data
    one byte short or long, padding removed, both forms at once, unknown fields."""
    f, b = shape
    item = _ITEM[dtype]
    top = (1 << (8 * struct.calcsize(f"<{item}"))) - 1
    raw = struct.pack(f"<{f * b}{item}", *([min(count, top)] * (f * b)))
    if cut > 0:
        raw = raw[:-cut] if len(raw) >= cut else raw + b"\0"
    elif cut < 0:
        raw += b"\0"
    data = base64.b64encode(raw).decode()
    if cut == 3:
        data = data.rstrip("=")
    # ``said``: another dtype than the data's (``None``: the right one).
    packed: dict[str, Any] = {"shape": [f, b], "dtype": dtype if said is None else said}
    packed["data"] = data
    if extra:
        packed["x"] = 1
    msg = {**VALID, "input_hist_packed": packed, "inferences": 2**53}
    if not lists_too:
        del msg["input_hist"]
    _same(TOPIC, json.dumps(msg).encode())


@settings(max_examples=200, deadline=None)
@given(data=st.one_of(st.text(max_size=24), st.binary(max_size=12).map(base64.b64encode)))
def test_fast_path_agrees_on_packed_data_strings(data: str | bytes) -> None:
    text = data.decode() if isinstance(data, bytes) else data
    packed = {"shape": [1, 2], "dtype": "u2", "data": text}
    msg = {k: v for k, v in VALID.items() if k != "input_hist"}
    _same(TOPIC, json.dumps({**msg, "input_hist_packed": packed}).encode())


def test_fast_path_agrees_on_json_corner_cases() -> None:
    good = json.dumps(VALID)
    for payload in [
        good,
        good.replace('"cpu_percent": 4.5', '"cpu_percent": NaN'),
        good.replace('"window_start": 10.0', '"window_start": Infinity'),
        good.replace('"window_start": 10.0', '"window_start": 12.0'),
        good.replace('"window_start": 10.0', '"window_start": 11.5'),
        good.replace('"seq": 3', '"seq": 3, "seq": 4'),
        good.replace('"seq": 3', '"seq": true'),
        good.replace('"seq": 3', '"seq": "3"'),
        good.replace('"seq": 3', '"seq": 3.0'),
        good.replace('"seq": 3', '"seq": 3.5'),
        good.replace('"seq": 3', '"seq": 3e0'),
        good.replace('"seq": 3', '"seq": 9007199254740993'),
        good.replace('"seq": 3', '"seq": -0'),
        good.replace('"model": "digits"', '"model": "\\ud800"'),
        good.replace('"model": "digits"', '"model": "digits\\n"'),
        good.replace('"model": "digits"', '"model": "dig\\u0069ts"'),
        good.replace('"device_id": "dev-1"', '"device_id": "dev-1\\n"'),
        good.replace('"schema": ', '"schema_": '),
        good.replace('"schema": "edgefleet.telemetry/1"', '"schema": "edgefleet.telemetry/2"'),
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": [[1, 2], [3]]'),
        # Ragged, yet as many msgpack bytes as a 3 x 2 rectangle.
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": [[1, 2], [3], [4, 5, 6]]'),
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": [[], []]'),
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": []'),
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": null'),
        good.replace('"input_hist": [[1, 2], [3, 0]]', '"input_hist": [[1, true]]'),
        good.replace('"cpu_percent": 4.5', '"cpu_percent": 1' + "0" * 400),
        good.replace('"cpu_percent": 4.5', '"cpu_percent": 100000'),
        good.replace('"cpu_percent": 4.5', '"cpu_percent": -0.0'),
        good + " ",
        good + "x",
        "\ufeff" + good,
        good.replace('"schema": "edgefleet.telemetry/1", ', ""),
        "[]",
        "null",
        '"x"',
        good.replace('"cpu_percent": 4.5', '"cpu_percent": 1e999'),
    ]:
        _same(TOPIC, payload.encode())
    _same(TOPIC, json.dumps(VALID).encode("utf-16"))
    _same(TOPIC, json.dumps({**VALID, "pad": "x" * 300_000}).encode())
    big = {**VALID, "input_hist": [[0] * MAX_BINS] * MAX_FEATURES, "inferences": 0}
    _same(TOPIC, json.dumps(big).encode())
    too_wide = {**VALID, "input_hist": [[0] * (MAX_BINS + 1)]}
    _same(TOPIC, json.dumps(too_wide).encode())
    too_long = {**VALID, "output_hist": [0] * (MAX_FEATURES + 1)}
    _same(TOPIC, json.dumps(too_long).encode())
