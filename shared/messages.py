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

import enum
import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.errors import MessageError
from shared.topics import Channel, parse_topic

__all__ = [
    "MAX_BINS",
    "MAX_FEATURES",
    "MAX_MESSAGE_BYTES",
    "MODEL_NAME_PATTERN",
    "Desired",
    "ErrorInfo",
    "Event",
    "EventKind",
    "HardwareInfo",
    "LatencyStats",
    "Message",
    "Reported",
    "Status",
    "Telemetry",
    "UpdateState",
    "decode",
    "decode_device_message",
    "encode",
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
