"""What an ingest worker keeps of a batch of received messages, and why it drops
the rest.

Messages are validated as ``shared.messages`` does (``cloud.ingest.fastpath``);
telemetry must also come from a device that announced itself (status or
reported), name a published release, and carry histograms of that release's
shape with plausible counts. Anything else is counted under a reason, logged
and dropped, never stored. No I/O here but the known-device lookups and the
release lookup, both cached.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from cloud.db import Database
from cloud.ingest._mqtt5 import Publish
from cloud.ingest.fastpath import FastTelemetry, decode_telemetry
from cloud.ingest.histograms import PackedHistogram, unpack_histograms
from cloud.ingest.store import SeenUpdate, StoredWindow
from cloud.ingest.tables import DeviceSeen
from shared.errors import MessageError
from shared.manifest import DriftSpec
from shared.messages import Reported, Status, decode
from shared.topics import Channel, parse_topic

__all__ = [
    "DEFAULT_GROUP",
    "BatchValidator",
    "Prepared",
    "ReleaseLookup",
    "UnknownRelease",
    "device_group",
]

log = logging.getLogger(__name__)

DEFAULT_GROUP = "default"
#: A device joins a group with a hardware tag ``group:<name>`` (or ``group=<name>``).
_GROUP_TAG = re.compile(r"^group[:=]([A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
#: How long a "known device" answer is trusted before the table is asked again.
_KNOWN_TTL = 30.0
_UNKNOWN_TTL = 2.0
#: Bound of every cache keyed by something a device chooses (ids, topics, releases).
_MAX_CACHED = 100_000


class UnknownRelease(Exception):
    """The telemetry names a release the repository does not have."""


#: ``(model, release) -> DriftSpec | None``; raises ``UnknownRelease``.
ReleaseLookup = Callable[[str, int], DriftSpec | None]


def device_group(reported: Reported) -> str:
    """The device group a reported state puts its device in (``default`` if none)."""
    for tag in reported.hardware.tags:
        m = _GROUP_TAG.match(tag)
        if m:
            return m.group(1)
    return DEFAULT_GROUP


class KnownDevices:
    """Which device ids announced themselves, and their groups; cached over the table."""

    def __init__(self, db: Database) -> None:
        self._db = db
        #: device id -> (group or ``None`` if unknown, valid until)
        self.cache: dict[str, tuple[str | None, float]] = {}

    def remember(self, device_id: str, group: str | None, now: float) -> None:
        old = self.cache.get(device_id)
        if group is None and old is not None and old[0] is not None:
            group = old[0]
        self._set(device_id, group or DEFAULT_GROUP, now + _KNOWN_TTL)

    def prefetch(self, device_ids: set[str], now: float) -> None:
        """Look up every id of ``device_ids`` whose answer is missing or stale in one
        query per 500 ids, rather than one query each (a fleet's cache entries expire
        every ``_KNOWN_TTL`` seconds)."""
        stale = [d for d in device_ids if (hit := self.cache.get(d)) is None or hit[1] <= now]
        for i in range(0, len(stale), 500):
            chunk = stale[i : i + 500]
            with self._db.session() as s:
                rows = s.execute(
                    select(DeviceSeen.device_id, DeviceSeen.group).where(
                        DeviceSeen.device_id.in_(chunk)
                    )
                )
                found = {device_id: group for device_id, group in rows}
            for d in chunk:
                group = found.get(d)
                self._set(d, group, now + (_KNOWN_TTL if group is not None else _UNKNOWN_TTL))

    def group(self, device_id: str, now: float) -> str | None:
        hit = self.cache.get(device_id)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self._db.session() as s:
            group = s.scalar(select(DeviceSeen.group).where(DeviceSeen.device_id == device_id))
        self._set(device_id, group, now + (_KNOWN_TTL if group is not None else _UNKNOWN_TTL))
        return group

    def _set(self, device_id: str, group: str | None, until: float) -> None:
        if len(self.cache) >= _MAX_CACHED:
            self.cache.clear()  # bounded: spoofed ids must not grow memory
        self.cache[device_id] = (group, until)


@dataclass
class Prepared:
    """A validated batch: the windows to store, the devices seen, drops by reason."""

    windows: list[StoredWindow]
    seen: list[SeenUpdate]
    dropped: Counter[str]


class BatchValidator:
    """Validates one worker's batches, in order (an announcement makes its device
    known to the telemetry after it in the same batch)."""

    def __init__(self, db: Database, releases: ReleaseLookup | None = None) -> None:
        self.known = KnownDevices(db)
        self._releases = releases
        #: Releases are immutable: a found one is kept here, saving the shared lookup's lock.
        self._specs: dict[tuple[str, int], DriftSpec | None] = {}
        #: topic -> (device id, channel), or ``None`` for a topic that is not a device's.
        self._routes: dict[bytes, tuple[str, Channel] | None] = {}

    def prepare(self, items: list[Publish], times: list[float]) -> Prepared:
        """Validate ``items`` (received at ``times``)."""
        seen: list[SeenUpdate] = []
        dropped: Counter[str] = Counter()
        cands: list[tuple[FastTelemetry, float, str, PackedHistogram | None]] = []
        known, routes, known_cache = self.known, self._routes, self.known.cache
        prefetched = False
        for (topic, payload, _pid, _qos), at in zip(items, times, strict=True):
            if not payload:  # a cleared retained message
                continue
            route = routes.get(topic)
            if route is None:
                route = self._route(topic)
            if route is None:
                dropped["invalid"] += 1
                log.warning("dropped message on unexpected topic %r", topic[:200])
                continue
            device_id, channel = route
            if channel is Channel.TELEMETRY:
                try:
                    msg, packed = decode_telemetry(device_id, payload)
                except MessageError as e:
                    dropped["invalid"] += 1
                    log.warning("dropped invalid telemetry of %s: %s", device_id, e)
                    continue
                hit = known_cache.get(device_id)
                if hit is None or hit[1] <= at:
                    if not prefetched:  # one query for every device of the batch
                        known.prefetch(self._telemetry_devices(items), at)
                        prefetched = True
                    group = known.group(device_id, at)
                else:
                    group = hit[0]
                if group is None:
                    dropped["unknown_device"] += 1
                    log.warning("dropped telemetry of unknown device %s", device_id)
                    continue
                cands.append((msg, at, group, packed))
            elif channel in (Channel.STATUS, Channel.REPORTED):
                self._announce(device_id, channel, payload, at, seen, dropped)
        hists = unpack_histograms([c[3] for c in cands])
        windows: list[StoredWindow] = []
        for i, (msg, at, group, packed) in enumerate(cands):
            shape = packed[0] if packed is not None else None
            reason = self.check_telemetry(msg, shape, hists.consistent[i], hists.samples[i])
            if reason is not None:
                dropped[reason] += 1
                log.warning("dropped telemetry of %s seq %d: %s", msg.device_id, msg.seq, reason)
                continue
            windows.append(StoredWindow(msg, at, group, hists.arrays[i], hists.samples[i]))
        return Prepared(windows, seen, dropped)

    def _telemetry_devices(self, items: list[Publish]) -> set[str]:
        devices = set()
        for topic, *_ in items:
            route = self._routes.get(topic) or self._route(topic)
            if route is not None and route[1] is Channel.TELEMETRY:
                devices.add(route[0])
        return devices

    def _route(self, topic: bytes) -> tuple[str, Channel] | None:
        """``(device id, channel)`` of a topic, or ``None`` if it is not a device's."""
        if topic in self._routes:
            return self._routes[topic]
        route: tuple[str, Channel] | None
        try:
            route = parse_topic(topic.decode())
        except (UnicodeDecodeError, ValueError):
            route = None
        if len(self._routes) >= _MAX_CACHED:
            self._routes.clear()  # bounded: a flood of topics must not grow memory
        self._routes[topic] = route
        return route

    def _announce(
        self,
        device_id: str,
        channel: Channel,
        payload: bytes,
        at: float,
        seen: list[SeenUpdate],
        dropped: Counter[str],
    ) -> None:
        msg: Status | Reported
        try:
            if channel is Channel.STATUS:
                msg = decode(Status, payload)
            else:
                msg = decode(Reported, payload)
        except MessageError as e:
            dropped["invalid"] += 1
            log.warning("dropped invalid %s of %s: %s", channel.value, device_id, e)
            return
        if msg.device_id != device_id:
            dropped["invalid"] += 1
            log.warning("dropped %s on %s's topic claiming %s", channel.value, device_id, msg)
            return
        if isinstance(msg, Status):
            if msg.online:
                seen.append(SeenUpdate(device_id, at, None))
                self.known.remember(device_id, None, at)
            return
        group = device_group(msg)
        seen.append(SeenUpdate(device_id, at, group))
        self.known.remember(device_id, group, at)

    def check_telemetry(
        self,
        msg: FastTelemetry,
        shape: tuple[int, int] | None,
        consistent: bool,
        samples: int,
    ) -> str | None:
        """A reason to drop a schema-valid window, or ``None``. ``shape``, ``consistent``
        and ``samples`` describe its input histogram (``None``: it has none)."""
        hist, out = shape is not None, msg.output_hist
        # Every sampled input is counted once per feature, and only inferences are sampled.
        if hist and (not consistent or samples > msg.inferences):
            return "inconsistent_histogram"
        if out and sum(out) > msg.inferences:
            return "inconsistent_histogram"
        if (hist or out) and (msg.model is None or msg.release is None):
            return "histogram_without_release"
        if msg.model is None or msg.release is None or self._releases is None:
            return None
        key = (msg.model, msg.release)
        try:
            spec = self._specs[key]
        except KeyError:
            try:
                spec = self._releases(msg.model, msg.release)
            except UnknownRelease:
                return "unknown_release"
            if len(self._specs) >= _MAX_CACHED:
                self._specs.clear()
            self._specs[key] = spec
        if hist and (spec is None or shape != (spec.n_features, spec.bins)):
            return "histogram_shape"
        if out and (spec is None or len(out) != spec.n_classes):
            return "histogram_shape"
        return None
