"""Wire format of the TUF repository over MQTT 5 (request/response, chunked).

A device that only speaks MQTT fetches repository files (TUF metadata and
targets) one chunk at a time: it publishes a ``RepoRequest`` on its
``.../repo/req`` topic with the MQTT 5 *response topic* ``.../repo/resp`` and a
fresh *correlation data*; the cloud answers there with a ``RepoResponse``
carrying the same correlation data. Requests name an offset, so a download cut
by a lost link resumes where it stopped.

Nothing here is trusted for integrity: TUF verifies every byte afterwards.
The parsers only keep a hostile peer from making the other side allocate,
loop or read outside the repository: every size is bounded, every field
checked, and failures raise ``MessageError`` naming the problem. Pure: no I/O.

Request payload: compact JSON ``{"schema", "path", "offset", "length"}``.
Response payload: ``b"EFR1"``, a 2-byte big-endian header length, a JSON
header ``{"status", "offset", "total"[, "message"]}``, then the chunk bytes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import MessageError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_CORRELATION_BYTES",
    "MAX_FILE_BYTES",
    "MAX_REPO_PATH",
    "REQUEST_SCHEMA",
    "RepoRequest",
    "RepoResponse",
    "Status",
    "check_repo_path",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]

REQUEST_SCHEMA = "edgefleet.repo_get/1"
RESPONSE_MAGIC = b"EFR1"
#: Chunks are bounded so one response always fits the broker's ``max_packet_size``.
MAX_CHUNK_BYTES = 256 * 1024
DEFAULT_CHUNK_BYTES = 64 * 1024
#: No repository file an edgefleet device accepts is larger (see device/tuf_client.py).
MAX_FILE_BYTES = 1 << 40
MAX_REPO_PATH = 512
MAX_REQUEST_BYTES = 2048
MAX_HEADER_BYTES = 1024
MAX_MESSAGE_TEXT = 300
MAX_CORRELATION_BYTES = 64

Status = Literal["ok", "not_found", "bad_request", "busy", "error"]
_STATUSES: tuple[str, ...] = ("ok", "not_found", "bad_request", "busy", "error")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TOP = ("metadata", "targets")


def check_repo_path(path: object) -> str:
    """Return ``path`` if it names a file under ``metadata/`` or ``targets/`` with
    plain segments (no ``..``, no leading dot or slash, no backslash); else raise."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_REPO_PATH:
        raise MessageError(f"repository path must be a string of 1..{MAX_REPO_PATH} characters")
    segments = path.split("/")
    if len(segments) < 2 or segments[0] not in _TOP:
        raise MessageError(f"repository path {path[:80]!r} is not under metadata/ or targets/")
    if not all(_SEGMENT.match(s) for s in segments[1:]):
        raise MessageError(
            f"repository path {path[:80]!r} has a segment that is not letters, digits, '.', "
            "'_' or '-' starting with a letter or digit"
        )
    return path


def _int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int in Python; JSON true must not pass as 1.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MessageError(f"{name} must be an integer in {low}..{high}, got {value!r:.40}")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MessageError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise MessageError(f"{what} must be a JSON object")
    return data


def _reject_constant(value: str) -> float:
    raise ValueError(f"{value} is not valid JSON")


@dataclass(frozen=True)
class RepoRequest:
    """Ask for ``length`` bytes of repository file ``path`` from ``offset``."""

    path: str
    offset: int = 0
    length: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        check_repo_path(self.path)
        _int(self.offset, "offset", 0, MAX_FILE_BYTES)
        _int(self.length, "length", 1, MAX_CHUNK_BYTES)


@dataclass(frozen=True)
class RepoResponse:
    """One chunk (``status == "ok"``) or a refusal with a reason."""

    status: Status
    offset: int = 0
    total: int = 0
    data: bytes = b""
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise MessageError(f"unknown response status {self.status!r:.40}")
        _int(self.offset, "offset", 0, MAX_FILE_BYTES)
        _int(self.total, "total", 0, MAX_FILE_BYTES)
        if not isinstance(self.data, bytes) or len(self.data) > MAX_CHUNK_BYTES:
            raise MessageError(f"a chunk carries at most {MAX_CHUNK_BYTES} bytes")
        if not isinstance(self.message, str) or len(self.message) > MAX_MESSAGE_TEXT:
            raise MessageError(f"a response message has at most {MAX_MESSAGE_TEXT} characters")
        if self.status == "ok":
            if self.offset > self.total or self.offset + len(self.data) > self.total:
                raise MessageError(
                    f"chunk [{self.offset}, {self.offset + len(self.data)}) lies outside a file "
                    f"of {self.total} bytes"
                )
        elif self.data:
            raise MessageError(f"a {self.status!r} response carries no data")


def encode_request(req: RepoRequest) -> bytes:
    return json.dumps(
        {"schema": REQUEST_SCHEMA, "path": req.path, "offset": req.offset, "length": req.length},
        separators=(",", ":"),
    ).encode()


def decode_request(payload: bytes) -> RepoRequest:
    """Parse a device's request; ``MessageError`` says what is wrong."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise MessageError(
            f"repository request of {len(payload)} bytes exceeds {MAX_REQUEST_BYTES}"
        )
    data = _json_object(payload, "repository request")
    if data.get("schema") != REQUEST_SCHEMA:
        raise MessageError(
            f"repository request has schema {data.get('schema')!r:.60}; this "
            f"side speaks {REQUEST_SCHEMA!r}"
        )
    extra = set(data) - {"schema", "path", "offset", "length"}
    if extra:
        raise MessageError(f"repository request has unknown fields {sorted(extra)[:5]}")
    return RepoRequest(
        path=check_repo_path(data.get("path")),
        offset=_int(data.get("offset", 0), "offset", 0, MAX_FILE_BYTES),
        length=_int(data.get("length", DEFAULT_CHUNK_BYTES), "length", 1, MAX_CHUNK_BYTES),
    )


def encode_response(resp: RepoResponse) -> bytes:
    header: dict[str, Any] = {"status": resp.status, "offset": resp.offset, "total": resp.total}
    if resp.message:
        header["message"] = resp.message
    raw = json.dumps(header, separators=(",", ":")).encode()
    return RESPONSE_MAGIC + struct.pack(">H", len(raw)) + raw + resp.data


def decode_response(payload: bytes) -> RepoResponse:
    """Parse the cloud's response; ``MessageError`` says what is wrong."""
    if len(payload) > len(RESPONSE_MAGIC) + 2 + MAX_HEADER_BYTES + MAX_CHUNK_BYTES:
        raise MessageError(f"repository response of {len(payload)} bytes is oversized")
    if payload[:4] != RESPONSE_MAGIC or len(payload) < 6:
        raise MessageError("repository response does not start with the EFR1 frame header")
    (size,) = struct.unpack(">H", payload[4:6])
    if size > MAX_HEADER_BYTES or 6 + size > len(payload):
        raise MessageError(f"repository response header length {size} is out of bounds")
    header = _json_object(payload[6 : 6 + size], "repository response header")
    extra = set(header) - {"status", "offset", "total", "message"}
    if extra:
        raise MessageError(f"repository response header has unknown fields {sorted(extra)[:5]}")
    status = header.get("status")
    if status not in _STATUSES:
        raise MessageError(f"unknown response status {status!r:.40}")
    return RepoResponse(
        status=status,
        offset=_int(header.get("offset", 0), "offset", 0, MAX_FILE_BYTES),
        total=_int(header.get("total", 0), "total", 0, MAX_FILE_BYTES),
        data=bytes(payload[6 + size :]),
        message=header.get("message", ""),
    )
