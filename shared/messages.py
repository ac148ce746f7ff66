"""JSON message schemas of the edgefleet MQTT protocol, validated on both sides.

Each message carries ``"schema": "edgefleet.<kind>/<major>"``. A receiver
accepts exactly the schemas it knows and rejects unknown fields, so a peer that
speaks a newer major version is refused with a clear ``MessageError`` instead
of being half-understood. Every size is bounded by a named constant: a device
message can never make the cloud allocate without limit.

Time is passed in by the caller (seconds since the Unix epoch); nothing here
reads a clock.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import MessageError
from shared.topics import Channel, parse_topic

__all__ = [
    "MAX_BINS",
    "MAX_FEATURES",
    "MAX_MESSAGE_BYTES",
    "MODEL_NAME_PATTERN",
    "PACKED_ITEM_BYTES",
    "Desired",
    "ErrorInfo",
    "Event",
    "EventKind",
    "HardwareInfo",
    "LatencyStats",
    "Message",
    "PackedCounts",
    "Reported",
    "Status",
    "Telemetry",
    "UpdateState",
    "decode",
    "decode_device_message",
    "encode",
    "packed_counts_bytes",
]

#: Largest MQTT payload any edgefleet message may have (the broker's
#: ``max_packet_size`` is set above this so the check happens here, with a reason).
MAX_MESSAGE_BYTES = 256 * 1024
#: Most features a drift histogram may describe, and most bins per feature.
MAX_FEATURES = 1024
MAX_BINS = 64
MAX_TEXT = 1000

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"

DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
ReleaseNumber = Annotated[int, Field(ge=1, le=2**53)]
Timestamp = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ShortText = Annotated[str, Field(max_length=MAX_TEXT)]
Count = Annotated[int, Field(ge=0, le=2**53)]
MAX_COUNT = 2**53
Ident = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]


class UpdateState(enum.StrEnum):
    """Where a device is in the update state machine (DESIGN.md)."""

    IDLE = "idle"
    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGED = "staged"
    SELFTEST = "selftest"
    SWAPPED = "swapped"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class EventKind(enum.StrEnum):
    """Update lifecycle events a device publishes."""

    OFFERED = "offered"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    STAGED = "staged"
    SELFTEST = "selftest"
    SWAPPED = "swapped"
    PROBATION_PASSED = "probation_passed"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=False)
    SCHEMA: ClassVar[str]
    CHANNEL: ClassVar[Channel]


class ErrorInfo(BaseModel):
    """A machine reason code plus a human explanation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    code: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    message: ShortText


class HardwareInfo(BaseModel):
    """What the device runs on; rollouts use it for compatibility checks."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    machine: Annotated[str, Field(max_length=64)]
    system: Annotated[str, Field(max_length=64)]
    runtime: Annotated[str, Field(max_length=128)]
    tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)] = []


class Desired(_Message):
    """The release a device should run. Retained; written only by the cloud."""

    SCHEMA: ClassVar[str] = "edgefleet.desired/1"
    CHANNEL: ClassVar[Channel] = Channel.DESIRED
    schema_: Literal["edgefleet.desired/1"] = Field(default="edgefleet.desired/1", alias="schema")
    device_id: DeviceId
    model: ModelName
    release: ReleaseNumber
    rollout_id: Ident | None = None
    deadline: Timestamp | None = None
    issued_at: Timestamp


class Reported(_Message):
    """What a device runs and where it is in an update. Retained."""

    SCHEMA: ClassVar[str] = "edgefleet.reported/1"
    CHANNEL: ClassVar[Channel] = Channel.REPORTED
    schema_: Literal["edgefleet.reported/1"] = Field(default="edgefleet.reported/1", alias="schema")
    device_id: DeviceId
    agent_version: Annotated[str, Field(max_length=32)]
    model: ModelName | None = None
    release: ReleaseNumber | None = None
    slot: Literal["a", "b"] | None = None
    state: UpdateState
    target_release: ReleaseNumber | None = None
    rollout_id: Ident | None = None
    last_error: ErrorInfo | None = None
    hardware: HardwareInfo
    ts: Timestamp


class Event(_Message):
    """One step of an update's life on a device."""

    SCHEMA: ClassVar[str] = "edgefleet.event/1"
    CHANNEL: ClassVar[Channel] = Channel.EVENTS
    schema_: Literal["edgefleet.event/1"] = Field(default="edgefleet.event/1", alias="schema")
    device_id: DeviceId
    seq: Count
    ts: Timestamp
    kind: EventKind
    model: ModelName
    release: ReleaseNumber
    rollout_id: Ident | None = None
    progress: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    reason: ErrorInfo | None = None


#: Item types of ``PackedCounts``: little-endian unsigned integers of 1, 2, 4 or 8 bytes.
PACKED_ITEM_BYTES: dict[str, int] = {"u1": 1, "u2": 2, "u4": 4, "u8": 8}
_STRUCT_CODES = {"u1": "B", "u2": "H", "u4": "I", "u8": "Q"}


def packed_counts_bytes(shape: tuple[int, int], dtype: str, data: str) -> bytes:
    """The counts of a packed histogram as bytes, checked: ``data`` is strict base64
    (RFC 4648 alphabet and padding, nothing else), holds exactly ``shape`` items of
    ``dtype``, and no count exceeds ``2**53``. Raises ``ValueError`` saying which rule
    failed. The one definition both the model below and the cloud's fast ingest path
    use, so they accept exactly the same payloads."""
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as e:
        raise ValueError(f"data is not base64: {e}") from None
    f, b = shape
    want = f * b * PACKED_ITEM_BYTES[dtype]
    if len(raw) != want:
        raise ValueError(f"data holds {len(raw)} bytes; {f} x {b} counts of {dtype} need {want}")
    if dtype == "u8" and max(struct.unpack(f"<{f * b}Q", raw)) > MAX_COUNT:
        raise ValueError(f"a count exceeds {MAX_COUNT}")
    return raw


class PackedCounts(BaseModel):
    """A ``[feature][bin]`` count matrix as base64 of little-endian unsigned integers,
    row-major: what a device sends instead of nested JSON lists. 640 counts are then
    one string the receiver turns into numbers with one C call, where a JSON list of
    lists costs a parser about 11 ns per count and 65 list objects (ingest CPU, measured
    in ``bench/ingest.py``), and the message is a third smaller. The sender picks the
    narrowest ``dtype`` its largest count fits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    shape: tuple[
        Annotated[int, Field(ge=1, le=MAX_FEATURES)], Annotated[int, Field(ge=1, le=MAX_BINS)]
    ]
    dtype: Literal["u1", "u2", "u4", "u8"]
    data: str
    _raw: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _counts(self) -> PackedCounts:
        self._raw = packed_counts_bytes(self.shape, self.dtype, self.data)
        return self

    @staticmethod
    def narrowest(top: int) -> Literal["u1", "u2", "u4", "u8"]:
        """The narrowest ``dtype`` that holds counts up to ``top``."""
        for dtype in ("u1", "u2", "u4"):
            if top < 1 << (8 * PACKED_ITEM_BYTES[dtype]):
                return dtype
        return "u8"

    @classmethod
    def from_raw(
        cls, shape: tuple[int, int], dtype: Literal["u1", "u2", "u4", "u8"], raw: bytes
    ) -> PackedCounts:
        """``raw``: ``shape`` counts of ``dtype``, little-endian, row-major (checked)."""
        return cls(shape=shape, dtype=dtype, data=base64.b64encode(raw).decode())

    @classmethod
    def of(cls, rows: list[list[int]]) -> PackedCounts:
        """Pack a rectangular, non-empty matrix of counts in ``0 .. 2**53``."""
        flat = [c for row in rows for c in row]
        dtype = cls.narrowest(max(flat))
        raw = struct.pack(f"<{len(flat)}{_STRUCT_CODES[dtype]}", *flat)
        return cls.from_raw((len(rows), len(rows[0])), dtype, raw)

    @property
    def raw(self) -> bytes:
        """The counts, ``shape`` items of ``dtype``, row-major."""
        return self._raw

    def rows(self) -> list[list[int]]:
        f, b = self.shape
        flat = struct.unpack(f"<{f * b}{_STRUCT_CODES[self.dtype]}", self._raw)
        return [list(flat[i * b : (i + 1) * b]) for i in range(f)]


class LatencyStats(BaseModel):
    """Inference latency percentiles over a telemetry window, in milliseconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    p50_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    p95_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    p99_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    max_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Telemetry(_Message):
    """Statistics of one window of inferences. Never raw inputs."""

    SCHEMA: ClassVar[str] = "edgefleet.telemetry/1"
    CHANNEL: ClassVar[Channel] = Channel.TELEMETRY
    schema_: Literal["edgefleet.telemetry/1"] = Field(
        default="edgefleet.telemetry/1", alias="schema"
    )
    device_id: DeviceId
    seq: Count
    window_start: Timestamp
    window_end: Timestamp
    model: ModelName | None = None
    release: ReleaseNumber | None = None
    inferences: Count
    errors: Count
    latency: LatencyStats | None = None
    cpu_percent: Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)] | None = None
    rss_bytes: Count | None = None
    #: Per-feature counts on the release's drift bin edges: ``[feature][bin]``.
    input_hist: (
        Annotated[
            list[Annotated[list[Count], Field(max_length=MAX_BINS)]], Field(max_length=MAX_FEATURES)
        ]
        | None
    ) = None
    #: The same counts packed (``PackedCounts``): what current agents send. A message
    #: carries at most one of the two forms.
    input_hist_packed: PackedCounts | None = None
    #: Counts of predicted classes (prediction drift needs no labels).
    output_hist: Annotated[list[Count], Field(max_length=MAX_FEATURES)] | None = None

    @field_validator("input_hist")
    @classmethod
    def _rectangular(cls, v: list[list[int]] | None) -> list[list[int]] | None:
        if v is not None and len({len(row) for row in v}) > 1:
            raise ValueError("every feature must have the same number of bins")
        return v

    @field_validator("window_end")
    @classmethod
    def _ordered(cls, v: float, info: Any) -> float:
        start = info.data.get("window_start")
        if start is not None and v < start:
            raise ValueError("window_end is before window_start")
        return v

    @model_validator(mode="after")
    def _one_input_form(self) -> Telemetry:
        if self.input_hist is not None and self.input_hist_packed is not None:
            raise ValueError("input_hist and input_hist_packed are two forms of one histogram")
        return self

    def input_rows(self) -> list[list[int]] | None:
        """The input histogram as ``[feature][bin]`` lists, whichever form it came in."""
        if self.input_hist_packed is not None:
            return self.input_hist_packed.rows()
        return self.input_hist


class Status(_Message):
    """Online/offline presence; the offline form is the MQTT last will."""

    SCHEMA: ClassVar[str] = "edgefleet.status/1"
    CHANNEL: ClassVar[Channel] = Channel.STATUS
    schema_: Literal["edgefleet.status/1"] = Field(default="edgefleet.status/1", alias="schema")
    device_id: DeviceId
    online: bool
    agent_version: Annotated[str, Field(max_length=32)] | None = None
    ts: Timestamp | None = None


Message = Union[Desired, Reported, Event, Telemetry, Status]
M = TypeVar("M", Desired, Reported, Event, Telemetry, Status)

_BY_CHANNEL: dict[Channel, type[_Message]] = {
    cls.CHANNEL: cls for cls in (Desired, Reported, Event, Telemetry, Status)
}


def encode(message: _Message) -> bytes:
    """Serialize a message to its wire form (compact JSON, ``schema`` included)."""
    return message.model_dump_json(by_alias=True, exclude_none=True).encode()


def _reject_constant(value: str) -> float:
    raise ValueError(f"{value} is not valid JSON")


def decode(expected: type[M], payload: bytes) -> M:
    """Parse and validate ``payload`` as an ``expected`` message.

    Raises ``MessageError`` naming the first problem (size, JSON syntax, schema,
    field) so the receiver can log it and drop the message.
    """
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageError(
            f"{expected.__name__} message of {len(payload)} bytes exceeds the "
            f"{MAX_MESSAGE_BYTES}-byte limit"
        )
    try:
        # NaN/Infinity are not JSON; Python's parser accepts them unless told not to.
        data = json.loads(payload, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"{expected.__name__} message is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MessageError(f"{expected.__name__} message must be a JSON object")
    schema = data.get("schema")
    if schema != expected.SCHEMA:
        raise MessageError(
            f"{expected.__name__} message has schema {schema!r}; this side speaks "
            f"{expected.SCHEMA!r}"
        )
    try:
        return expected.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<message>"
        raise MessageError(
            f"{expected.__name__} message field {where!r}: {first['msg']}"
            + (f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else "")
        ) from e


def decode_device_message(topic: str, payload: bytes) -> Message:
    """Decode a message received on a device topic, checking that the topic and
    the payload name the same device (a device must not speak for another)."""
    try:
        device_id, channel = parse_topic(topic)
    except ValueError as e:
        raise MessageError(str(e)) from e
    cls = _BY_CHANNEL[channel]
    msg: Message = decode(cls, payload)  # type: ignore[type-var,assignment]
    if msg.device_id != device_id:
        raise MessageError(
            f"message on the topic of device {device_id!r} claims to be from {msg.device_id!r}"
        )
    return msg
