"""A set of ingest workers run by one process, and the release lookup they share."""

from __future__ import annotations

import logging
import threading
import time

from cloud.config import CloudSettings
from cloud.db import Database
from cloud.ingest.worker import (
    IngestConfig,
    IngestStats,
    IngestWorker,
    ReleaseLookup,
    UnknownRelease,
)
from cloud.releases import ReleaseService, UnknownReleaseError
from shared.manifest import DriftSpec

__all__ = ["IngestPool", "cached_release_lookup", "worker_configs"]

log = logging.getLogger(__name__)

#: A release that is not published yet may be published any moment: ask again after this.
_MISS_TTL = 5.0


def cached_release_lookup(service: ReleaseService) -> ReleaseLookup:
    """``ReleaseLookup`` over the signed repository. Releases are immutable, so a hit is
    cached for good; a miss only briefly."""
    hits: dict[tuple[str, int], DriftSpec | None] = {}
    misses: dict[tuple[str, int], float] = {}
    lock = threading.Lock()

    def lookup(model: str, release: int) -> DriftSpec | None:
        key = (model, release)
        with lock:
            if key in hits:
                return hits[key]
            if misses.get(key, 0.0) > time.monotonic():
                raise UnknownRelease(f"{model} release {release}")
        try:
            spec = service.get(model, release).drift
        except UnknownReleaseError as e:
            with lock:
                if len(misses) > 10_000:
                    misses.clear()
                misses[key] = time.monotonic() + _MISS_TTL
            raise UnknownRelease(str(e)) from e
        with lock:
            hits[key] = spec
        return spec

    return lookup


def worker_configs(
    settings: CloudSettings, workers: int, *, first_index: int = 0, client_prefix: str | None = None
) -> list[IngestConfig]:
    """One ``IngestConfig`` per worker, with stable client ids ``<prefix>-<index>``."""
    prefix = client_prefix or settings.ingest_client_prefix
    return [
        IngestConfig(
            host=settings.broker_host,
            port=settings.broker_port,
            share_group=settings.ingest_store_group,
            client_id=f"{prefix}-{first_index + i}",
            bucket_seconds=settings.drift_window_seconds,
        )
        for i in range(workers)
    ]


class IngestPool:
    """Starts and stops a list of workers together."""

    def __init__(
        self, db: Database, configs: list[IngestConfig], *, releases: ReleaseLookup | None = None
    ) -> None:
        self.workers = [IngestWorker(db, c, releases=releases) for c in configs]

    def start(self, wait: float = 0.0) -> None:
        for w in self.workers:
            w.start()
        deadline = time.monotonic() + wait
        for w in self.workers:
            if wait and not w.subscribed.wait(max(deadline - time.monotonic(), 0.0)):
                log.warning("ingest worker %s is not subscribed yet", w.config.client_id)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    @property
    def stats(self) -> list[IngestStats]:
        return [w.stats for w in self.workers]
