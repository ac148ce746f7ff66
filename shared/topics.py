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
    "ROOT",
    "Channel",
    "device_topic",
    "parse_topic",
    "subscription",
    "validate_device_id",
]

ROOT = "edgefleet/v1"

#: Letters, digits, dot, dash, underscore; 1..64 chars; starts alphanumeric.
DEVICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Channel(str, enum.Enum):
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
