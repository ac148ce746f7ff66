"""MQTT topic names of the edgefleet protocol (see DESIGN.md, "MQTT protocol").

Every topic lives under ``edgefleet/v1/devices/<device id>/<channel>``. Device
ids double as MQTT usernames and certificate CNs, so they are restricted to a
character set that cannot smuggle MQTT wildcards or path separators.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "DEVICE_ID_PATTERN",
    "REPO_REQUEST",
    "REPO_RESPONSE",
    "ROOT",
    "Channel",
    "acl_device_topics",
    "device_topic",
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
