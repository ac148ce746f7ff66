"""MQTT topic names of the edgefleet protocol (see DESIGN.md, "MQTT protocol").

Every topic lives under ``edgefleet/v1/devices/<device id>/<channel>``. Device
ids double as MQTT usernames and certificate CNs, so they are restricted to a
character set that cannot smuggle MQTT wildcards or path separators. Release
blobs fanned out to the whole fleet live apart, under
``edgefleet/v1/blobs/<sha256>/...``.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "BLOBS",
    "BLOB_META",
    "DEVICE_ID_PATTERN",
    "SHA256_PATTERN",
    "REPO_REQUEST",
    "REPO_RESPONSE",
    "ROOT",
    "Channel",
    "acl_blob_topics",
    "acl_device_topics",
    "acl_ingest_topics",
    "blob_chunk_topic",
    "blob_filter",
    "blob_meta_topic",
    "device_topic",
    "parse_blob_topic",
    "parse_repo_request_topic",
    "parse_topic",
    "repo_request_subscription",
    "repo_request_topic",
    "repo_response_topic",
    "subscription",
    "validate_device_id",
]

ROOT = "edgefleet/v1"

#: Letters, digits, dot, dash, underscore; 1..64 chars; starts alphanumeric.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Channel(enum.StrEnum):
    """The per-device channels and who writes them."""

    DESIRED = "desired"  # cloud -> device, retained
    REPORTED = "reported"  # device -> cloud, retained
    EVENTS = "events"  # device -> cloud
    TELEMETRY = "telemetry"  # device -> cloud
    STATUS = "status"  # device / broker will, retained


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged, or raise ``ValueError`` saying why it is unusable."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.match(device_id):
        raise ValueError(
            f"invalid device id {device_id!r}: use 1-64 characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return device_id


def device_topic(device_id: str, channel: Channel) -> str:
    """The topic of ``channel`` for ``device_id``."""
    return f"{ROOT}/devices/{validate_device_id(device_id)}/{channel.value}"


def subscription(channel: Channel, *, share_group: str | None = None) -> str:
    """A wildcard subscription to ``channel`` of every device.

    With ``share_group`` it becomes an MQTT 5 shared subscription, so several
    ingest workers split the stream instead of each receiving all of it.
    """
    topic = f"{ROOT}/devices/+/{channel.value}"
    if share_group is not None:
        if not share_group or any(c in share_group for c in "/+#"):
            raise ValueError(f"invalid share group {share_group!r}")
        topic = f"$share/{share_group}/{topic}"
    return topic


def parse_topic(topic: str) -> tuple[str, Channel]:
    """Split a device topic into ``(device_id, channel)``; ``ValueError`` if it is not one."""
    prefix = f"{ROOT}/devices/"
    if not topic.startswith(prefix):
        raise ValueError(f"topic {topic!r} is not under {prefix}")
    rest = topic[len(prefix) :].split("/")
    if len(rest) != 2:
        raise ValueError(f"topic {topic!r} is not {prefix}<device>/<channel>")
    device_id, channel_name = rest
    validate_device_id(device_id)
    try:
        channel = Channel(channel_name)
    except ValueError:
        raise ValueError(f"topic {topic!r} names unknown channel {channel_name!r}") from None
    return device_id, channel


# -- TUF repository over MQTT (request/response; see device/mqtt_fetcher.py) --------------

#: A device asks for a chunk of a repository file here (device -> cloud) ...
REPO_REQUEST = "repo/req"
#: ... and gets it back here (cloud -> device), matched by MQTT 5 correlation data.
REPO_RESPONSE = "repo/resp"


def repo_request_topic(device_id: str) -> str:
    """Where ``device_id`` publishes its repository file requests."""
    return f"{ROOT}/devices/{validate_device_id(device_id)}/{REPO_REQUEST}"


def repo_response_topic(device_id: str) -> str:
    """Where the cloud answers ``device_id``'s repository requests."""
    return f"{ROOT}/devices/{validate_device_id(device_id)}/{REPO_RESPONSE}"


def repo_request_subscription(*, share_group: str | None = None) -> str:
    """Every device's request topic; shared when several cloud workers serve the repository."""
    topic = f"{ROOT}/devices/+/{REPO_REQUEST}"
    if share_group is not None:
        if not share_group or any(c in share_group for c in "/+#"):
            raise ValueError(f"invalid share group {share_group!r}")
        topic = f"$share/{share_group}/{topic}"
    return topic


def parse_repo_request_topic(topic: str) -> str:
    """The device id of a repository request topic; ``ValueError`` if it is not one."""
    prefix, suffix = f"{ROOT}/devices/", f"/{REPO_REQUEST}"
    if not (topic.startswith(prefix) and topic.endswith(suffix)):
        raise ValueError(f"topic {topic!r} is not {prefix}<device>{suffix}")
    return validate_device_id(topic[len(prefix) : -len(suffix)])


def acl_device_topics() -> list[tuple[str, str]]:
    """(access, topic suffix under ``devices/<id>/``) a device may use: the broker ACL.

    A device writes its reports and repository requests and reads its desired
    state and repository responses; it never writes ``desired``.
    """
    return [
        ("read", Channel.DESIRED.value),
        ("write", Channel.REPORTED.value),
        ("write", Channel.EVENTS.value),
        ("write", Channel.TELEMETRY.value),
        ("write", Channel.STATUS.value),
        ("write", REPO_REQUEST),
        ("read", REPO_RESPONSE),
    ]


def acl_ingest_topics() -> list[tuple[str, str]]:
    """(access, topic) a telemetry ingest worker has: read the streams it stores.

    Read only: an ingest identity can neither write a desired state nor a
    release blob. Mosquitto 2.0 checks read access on each message it delivers,
    against the message's own topic, so these grants also cover the shared
    subscriptions (``$share/<group>/...``) ingest workers use."""
    return [
        ("read", subscription(ch)) for ch in (Channel.TELEMETRY, Channel.STATUS, Channel.REPORTED)
    ]


# -- release blobs fanned out through the broker (see shared/blob_wire.py) ----------------

#: Retained, written only by the cloud, readable by every device:
#: ``blobs/<sha256>/meta`` and ``blobs/<sha256>/<chunk index>``.
BLOBS = "blobs"
BLOB_META = "meta"
#: A blob is named by the SHA-256 of its bytes (the TUF target's signed hash).
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
#: Chunk indices are canonical decimals (no sign, no leading zeros), at most 9 digits.
_INDEX = re.compile(r"^(0|[1-9][0-9]{0,8})$")


def _check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA256_PATTERN.match(sha256):
        raise ValueError(f"invalid blob name {sha256!r}: expected 64 lowercase hex digits")
    return sha256


def blob_meta_topic(sha256: str) -> str:
    """Where the description (size, chunking) of blob ``sha256`` is retained."""
    return f"{ROOT}/{BLOBS}/{_check_sha256(sha256)}/{BLOB_META}"


def blob_chunk_topic(sha256: str, index: int) -> str:
    """Where chunk ``index`` of blob ``sha256`` is retained."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 10**9:
        raise ValueError(f"invalid chunk index {index!r}")
    return f"{ROOT}/{BLOBS}/{_check_sha256(sha256)}/{index}"


def blob_filter() -> str:
    """Every blob topic (a subscription filter; also what the ACL lets devices read)."""
    return f"{ROOT}/{BLOBS}/#"


def parse_blob_topic(topic: str) -> tuple[str, int | None]:
    """``(sha256, chunk index)`` of a blob topic, index ``None`` for its meta;
    ``ValueError`` if ``topic`` is not one."""
    prefix = f"{ROOT}/{BLOBS}/"
    rest = topic[len(prefix) :].split("/") if topic.startswith(prefix) else []
    if len(rest) != 2:
        raise ValueError(f"topic {topic!r} is not {prefix}<sha256>/<meta|index>")
    sha256, leaf = rest
    _check_sha256(sha256)
    if leaf == BLOB_META:
        return sha256, None
    if not _INDEX.match(leaf):
        raise ValueError(f"topic {topic!r} names no chunk index")
    return sha256, int(leaf)


def acl_blob_topics() -> list[tuple[str, str]]:
    """(access, topic) on the blob topics every device has: read, never write.

    Blobs are not secret within the fleet (every device may install every
    release) and need no trust in whoever wrote them: TUF verifies the bytes."""
    return [("read", blob_filter())]
