"""The ingest fast path accepts exactly what ``shared.messages`` accepts, with the
same result, on random mutations of telemetry messages (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.ingest.fastpath import decode_fast
from shared.errors import MessageError
from shared.messages import Message, decode_device_message

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
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def _outcome(fn: Any, topic: str, payload: bytes) -> tuple[str, Message | None]:
    try:
        return "ok", fn(topic, payload)
    except MessageError:
        return "refused", None


def _same(topic: str, payload: bytes) -> None:
    fast, canon = (
        _outcome(decode_fast, topic, payload),
        _outcome(decode_device_message, topic, payload),
    )
    assert fast == canon, (payload[:300], fast, canon)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from([*VALID, "extra"]), value=json_values, drop=st.booleans())
def test_fast_path_agrees_on_mutated_fields(field: str, value: Any, drop: bool) -> None:
    msg = dict(VALID)
    if drop and field in msg:
        del msg[field]
    else:
        msg[field] = value
    _same(TOPIC, json.dumps(msg).encode())


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64), topic_device=st.sampled_from(["dev-1", "dev-2", "a/b"]))
def test_fast_path_agrees_on_raw_bytes_and_topics(raw: bytes, topic_device: str) -> None:
    _same(f"edgefleet/v1/devices/{topic_device}/telemetry", raw)
    _same(f"edgefleet/v1/devices/{topic_device}/telemetry", json.dumps(VALID).encode())


def test_fast_path_agrees_on_json_corner_cases() -> None:
    good = json.dumps(VALID)
    for payload in [
        good,
        good.replace('"cpu_percent": 4.5', '"cpu_percent": NaN'),
        good.replace('"window_start": 10.0', '"window_start": Infinity'),
        good.replace('"seq": 3', '"seq": 3, "seq": 4'),
        good.replace('"seq": 3', '"seq": true'),
        good.replace('"seq": 3', '"seq": "3"'),
        good.replace('"seq": 3', '"seq": 3.0'),
        good.replace('"seq": 3', '"seq": 3.5'),
        good.replace('"seq": 3', '"seq": 9007199254740993'),
        good.replace('"model": "digits"', '"model": "\\ud800"'),
        good + " ",
        good + "x",
        good.replace('"schema": "edgefleet.telemetry/1", ', ""),
        "[]",
        "null",
        '"x"',
        good.replace('"cpu_percent": 4.5', '"cpu_percent": 1e999'),
    ]:
        _same(TOPIC, payload.encode())
    _same(TOPIC, json.dumps({**VALID, "pad": "x" * 300_000}).encode())
