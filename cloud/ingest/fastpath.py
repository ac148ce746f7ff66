"""A faster route to the *same* telemetry validation, for the ingest hot path.

``shared.messages.decode`` parses with ``json.loads`` and then validates the
Python objects with pydantic: about 60 us for a telemetry window with a 64 x 10
histogram, and validation was most of an ingest worker's CPU. Here msgspec
decodes and checks the JSON in one C pass against a typed mirror of
``shared.messages.Telemetry`` (every bound of the pydantic model is restated
as a ``msgspec.Meta``), in about a sixth of that.

This module only ever *accepts* faster; it never rejects on its own: whatever
the fast path does not accept goes through ``shared.messages.decode``, so a bad
message is refused (and counted, and explained) exactly as before, and a
message that pydantic's lax mode accepts but msgspec's strict mode does not
(``"seq": 3.0``, ``"seq": "3"``) is still accepted, through the slow path.
The fast path accepts only when every rule of ``decode`` holds: the payload is
within ``MAX_MESSAGE_BYTES``; the fields validate (same types, same bounds,
no unknown field, NaN and infinities refused); the ``schema`` field is present
and right; the windows are ordered; the histogram is rectangular; and the
device id matches the topic. ``tests/integration/test_ingest_decode.py``
checks the equivalence on random payloads.

A packed input histogram (``input_hist_packed``) is checked by the very function
the pydantic model uses (``shared.messages.packed_counts_bytes``).

The result is a ``FastTelemetry`` (a msgspec struct with the fields of
``Telemetry``), not the pydantic model: building the model again would cost
what the fast path saves.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Annotated, Literal

import msgspec

from cloud.ingest.histograms import PackedHistogram, pack_histogram, unpack_histograms
from shared.errors import MessageError
from shared.messages import (
    MAX_BINS,
    MAX_FEATURES,
    MAX_MESSAGE_BYTES,
    MODEL_NAME_PATTERN,
    PackedCounts,
    Telemetry,
    decode,
    packed_counts_bytes,
)

__all__ = ["FastLatency", "FastPacked", "FastTelemetry", "decode_telemetry"]

_FINITE = sys.float_info.max
_Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
_Timestamp = Annotated[float, msgspec.Meta(ge=0, le=_FINITE)]
_Millis = Annotated[float, msgspec.Meta(ge=0, le=_FINITE)]
# pydantic's patterns run on Rust's regex, where ``$`` is the end of the text; in
# Python's ``re`` it also matches before a final newline, hence ``\Z``.
_ModelName = Annotated[str, msgspec.Meta(pattern=r"\A" + MODEL_NAME_PATTERN[1:-1] + r"\Z")]
_Release = Annotated[int, msgspec.Meta(ge=1, le=2**53)]
_Cpu = Annotated[float, msgspec.Meta(ge=0, le=100_000)]
# The counts of the input histogram are plain ``int`` here: a bound checked per count
# costs msgspec a fifth of the whole decode. ``pack_histogram`` checks them instead,
# on the packed bytes, and the fast path accepts only what it vouches for.
_Hist = Annotated[
    list[Annotated[list[int], msgspec.Meta(max_length=MAX_BINS)]],
    msgspec.Meta(max_length=MAX_FEATURES),
]
_Classes = Annotated[list[_Count], msgspec.Meta(max_length=MAX_FEATURES)]
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class FastLatency(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """``shared.messages.LatencyStats``."""

    p50_ms: _Millis
    p95_ms: _Millis
    p99_ms: _Millis
    max_ms: _Millis


class FastPacked(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """``shared.messages.PackedCounts``; ``data`` is checked by the same function."""

    shape: tuple[
        Annotated[int, msgspec.Meta(ge=1, le=MAX_FEATURES)],
        Annotated[int, msgspec.Meta(ge=1, le=MAX_BINS)],
    ]
    dtype: Literal["u1", "u2", "u4", "u8"]
    data: str


class FastTelemetry(
    msgspec.Struct, forbid_unknown_fields=True, rename={"schema_": "schema"}, gc=False
):
    """``shared.messages.Telemetry``, field for field (``schema`` is required here, as
    ``decode`` requires it). Not frozen: ``decode_telemetry`` takes the input histogram
    out once it is packed. Not tracked by the cyclic GC: it holds no cycles."""

    schema_: Literal["edgefleet.telemetry/1"]
    device_id: str
    seq: _Count
    window_start: _Timestamp
    window_end: _Timestamp
    inferences: _Count
    errors: _Count
    model: _ModelName | None = None
    release: _Release | None = None
    latency: FastLatency | None = None
    cpu_percent: _Cpu | None = None
    rss_bytes: _Count | None = None
    input_hist: _Hist | None = None
    input_hist_packed: FastPacked | None = None
    output_hist: _Classes | None = None

    @classmethod
    def from_message(cls, m: Telemetry) -> FastTelemetry:
        lat, pk = m.latency, m.input_hist_packed
        return cls(
            schema_=m.schema_,
            device_id=m.device_id,
            seq=m.seq,
            window_start=m.window_start,
            window_end=m.window_end,
            inferences=m.inferences,
            errors=m.errors,
            model=m.model,
            release=m.release,
            latency=(FastLatency(lat.p50_ms, lat.p95_ms, lat.p99_ms, lat.max_ms) if lat else None),
            cpu_percent=m.cpu_percent,
            rss_bytes=m.rss_bytes,
            input_hist=m.input_hist,
            input_hist_packed=FastPacked(pk.shape, pk.dtype, pk.data) if pk else None,
            output_hist=m.output_hist,
        )

    def to_message(self, packed: PackedHistogram | None = None) -> Telemetry:
        """The pydantic model, with the input histogram ``packed`` put back in the form it
        came in (validated again: for tests and rare paths only)."""
        data = msgspec.to_builtins(self)
        if packed is not None and packed[1] in _PACKED_KINDS.values():
            shape, kind, raw = packed
            data["input_hist_packed"] = PackedCounts.from_raw(shape, kind[1:], raw)  # type: ignore[arg-type]
        elif packed is not None:
            arrays = unpack_histograms([packed]).arrays[0]
            assert arrays is not None
            data["input_hist"] = arrays.tolist()
        return Telemetry.model_validate(data)


_decoder = msgspec.json.Decoder(FastTelemetry)
#: ``PackedCounts.dtype`` -> the numpy dtype of its items (a ``PackedHistogram`` kind).
_PACKED_KINDS = {"u1": "<u1", "u2": "<u2", "u4": "<u4", "u8": "<u8"}


def _packed(p: FastPacked) -> PackedHistogram | None:
    """``p``'s counts, or ``None`` if ``packed_counts_bytes`` refuses them."""
    try:
        raw = packed_counts_bytes(p.shape, p.dtype, p.data)
    except ValueError:
        return None
    return p.shape, _PACKED_KINDS[p.dtype], raw


@functools.lru_cache(maxsize=1 << 16)
def _valid_id(device_id: str) -> bool:
    return _DEVICE_ID.fullmatch(device_id) is not None


def decode_telemetry(
    device_id: str, payload: bytes
) -> tuple[FastTelemetry, PackedHistogram | None]:
    """A telemetry window received on the topic of ``device_id``, and its input
    histogram packed (``cloud.ingest.histograms``; the message's ``input_hist`` is
    then ``None``, and stays ``None`` or ``[]`` if it had no counts). Raises
    ``MessageError`` if ``shared.messages.decode_device_message`` would refuse it."""
    if len(payload) <= MAX_MESSAGE_BYTES and _valid_id(device_id):
        try:
            msg: FastTelemetry | None = _decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            msg = None
        if msg is not None and msg.device_id == device_id and msg.window_end >= msg.window_start:
            hist, pk = msg.input_hist, msg.input_hist_packed
            if pk is not None:
                packed = _packed(pk) if hist is None else None  # both forms: refused below
                if packed is not None:
                    msg.input_hist_packed = None
                    return msg, packed
            elif not hist:
                return msg, None
            else:
                packed = pack_histogram(hist)  # None if ragged or a count is out of range
                if packed is not None:
                    msg.input_hist = None
                    return msg, packed
    slow = decode(Telemetry, payload)
    if slow.device_id != device_id:
        raise MessageError(
            f"message on the topic of device {device_id!r} claims to be from {slow.device_id!r}"
        )
    fast = FastTelemetry.from_message(slow)
    pk = slow.input_hist_packed
    if pk is not None:  # the model decoded and checked the counts already
        fast.input_hist_packed = None
        return fast, (pk.shape, _PACKED_KINDS[pk.dtype], pk.raw)
    if not fast.input_hist:
        return fast, None
    packed = pack_histogram(fast.input_hist)
    if packed is None:  # cannot be: pydantic checked every count
        raise MessageError("input histogram counts out of range")
    fast.input_hist = None
    return fast, packed
