"""Wire format of release blobs fanned out through the broker (retained, chunked).

The cloud (``cloud/fanout.py``) publishes every target file of a release once,
as retained QoS 1 messages under ``edgefleet/v1/blobs/<sha256>/``
(``shared.topics``); the broker copies them to every device that subscribes,
whenever it subscribes:

* ``.../<index>`` for index ``0 .. chunks-1``: the raw bytes
  ``[index * chunk_bytes, min(size, (index + 1) * chunk_bytes))`` of the file,
  no header. Every chunk has exactly ``chunk_bytes`` bytes except the last.
* ``.../meta``: compact JSON ``{"schema", "sha256", "size", "chunk_bytes",
  "chunks"}``, published after the broker acknowledged every chunk, so a
  retained meta means its chunks are retained too.

Nothing here is trusted for integrity: the device checks the assembled file
against the TUF-signed length and hashes. The parser only keeps a hostile
broker from making a device allocate or write without bound: every number is
checked and failures raise ``MessageError`` naming the problem. Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from shared.errors import MessageError
from shared.topics import SHA256_PATTERN

__all__ = [
    "BLOB_SCHEMA",
    "DEFAULT_BLOB_CHUNK_BYTES",
    "MAX_BLOB_BYTES",
    "MAX_BLOB_CHUNK_BYTES",
    "MAX_META_BYTES",
    "MIN_BLOB_CHUNK_BYTES",
    "BlobMeta",
    "decode_meta",
    "encode_meta",
]

BLOB_SCHEMA = "edgefleet.blob/1"
#: 8 chunks for a 2 MB model: few messages, each far below the broker's limit.
DEFAULT_BLOB_CHUNK_BYTES = 256 * 1024
MIN_BLOB_CHUNK_BYTES = 1024
#: A chunk plus topic and MQTT header must fit the broker's ``max_packet_size``
#: (``cloud.broker.DEFAULT_MAX_PACKET``: 1 MiB + 64 KiB).
MAX_BLOB_CHUNK_BYTES = 1024 * 1024
#: Sanity bound only; a device accepts a blob only of exactly the signed length.
MAX_BLOB_BYTES = 1 << 40
MAX_META_BYTES = 1024


@dataclass(frozen=True)
class BlobMeta:
    """What the broker holds of one blob: its name, size and chunking."""

    sha256: str
    size: int
    chunk_bytes: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not SHA256_PATTERN.match(self.sha256):
            raise MessageError(f"blob meta names {self.sha256!r}, not a lowercase sha256")
        _int(self.size, "size", 0, MAX_BLOB_BYTES)
        _int(self.chunk_bytes, "chunk_bytes", MIN_BLOB_CHUNK_BYTES, MAX_BLOB_CHUNK_BYTES)

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_bytes)

    def chunk_range(self, index: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``index``; ``MessageError`` if there is none."""
        if not 0 <= index < self.chunks:
            raise MessageError(
                f"blob {self.sha256[:12]}… has {self.chunks} chunks, no chunk {index}"
            )
        offset = index * self.chunk_bytes
        return offset, min(self.chunk_bytes, self.size - offset)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MessageError(f"blob meta field {name!r} is {value!r}, expected an int {low}..{high}")
    return value


def encode_meta(meta: BlobMeta) -> bytes:
    return json.dumps(
        {
            "schema": BLOB_SCHEMA,
            "sha256": meta.sha256,
            "size": meta.size,
            "chunk_bytes": meta.chunk_bytes,
            "chunks": meta.chunks,
        },
        separators=(",", ":"),
    ).encode()


def decode_meta(payload: bytes, *, sha256: str | None = None) -> BlobMeta:
    """Parse a retained ``meta`` message; ``sha256`` is the blob its topic names."""
    if len(payload) > MAX_META_BYTES:
        raise MessageError(f"blob meta of {len(payload)} bytes exceeds {MAX_META_BYTES}")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise MessageError(f"blob meta is not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != BLOB_SCHEMA:
        raise MessageError(f"blob meta is not a {BLOB_SCHEMA} object")
    meta = BlobMeta(
        sha256=str(data.get("sha256")),  # its format is checked by BlobMeta
        size=_int(data.get("size"), "size", 0, MAX_BLOB_BYTES),
        chunk_bytes=_int(
            data.get("chunk_bytes"), "chunk_bytes", MIN_BLOB_CHUNK_BYTES, MAX_BLOB_CHUNK_BYTES
        ),
    )
    if data.get("chunks") != meta.chunks:
        raise MessageError(
            f"blob meta says {data.get('chunks')!r} chunks; {meta.size} bytes in chunks of "
            f"{meta.chunk_bytes} make {meta.chunks}"
        )
    if sha256 is not None and meta.sha256 != sha256:
        raise MessageError(
            f"blob meta for {meta.sha256[:12]}… arrived on the topic of {sha256[:12]}…"
        )
    return meta
