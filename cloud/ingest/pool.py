"""A set of ingest workers run by one process, their broker settings, and the
release lookup they share.

On a mutual-TLS broker every worker connects with its own certificate, whose
CN is its client id ``<prefix>-<index>`` (the broker forces client id = CN, so
two workers sharing one identity would keep kicking each other off); the ACL
grants such ``edgefleet-ingest*`` identities read access to the streams ingest
stores and nothing else (``cloud.broker.INGEST_ROLE``).
"""

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
from shared.errors import ConfigError
from shared.manifest import DriftSpec

__all__ = [
    "IngestPool",
    "cached_release_lookup",
    "ingest_client_ids",
    "worker_configs",
    "worker_tls",
]

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


def ingest_client_ids(
    settings: CloudSettings, workers: int, *, first_index: int = 0, client_prefix: str | None = None
) -> list[str]:
    """The stable client ids (and, on a secure broker, certificate CNs) of ``workers``
    ingest workers: ``<prefix>-<first_index>`` onwards."""
    prefix = client_prefix or settings.ingest_client_prefix
    return [f"{prefix}-{first_index + i}" for i in range(workers)]


def worker_tls(settings: CloudSettings, client_id: str) -> dict[str, str] | None:
    """The TLS settings of ingest worker ``client_id`` (``IngestConfig.tls``): ``None``
    without ``broker_tls_ca``, else the cloud CA and the worker's own certificate and
    key from ``broker_tls_ingest_dir`` (default ``<data dir>/pki/services``).

    The edgefleet broker admits no client without a certificate, so a worker
    without its own would never get a session: ``ConfigError`` names the missing
    file instead."""
    if settings.broker_tls_ca is None:
        return None
    from cloud.pki import CertificateAuthority, ServiceIdentity

    directory = (
        settings.broker_tls_ingest_dir or CertificateAuthority(settings.pki_dir).services_dir
    )
    ident = ServiceIdentity.in_dir(directory, client_id, settings.broker_tls_ca)
    for path in (ident.cert_file, ident.key_file):
        if not path.is_file():
            raise ConfigError(
                f"ingest worker {client_id} has no client certificate for the TLS broker: "
                f"{path} is missing. Issue one identity per worker on the CA host with "
                "`edgefleet-cloud ca ingest --workers N`, regenerate the broker ACL "
                "(`edgefleet-cloud broker config`) and reload the broker; on another host "
                f"copy {client_id}.pem and {client_id}.key into EDGEFLEET_BROKER_TLS_INGEST_DIR"
            )
    return ident.as_tls_dict()


def worker_configs(
    settings: CloudSettings, workers: int, *, first_index: int = 0, client_prefix: str | None = None
) -> list[IngestConfig]:
    """One ``IngestConfig`` per worker, with stable client ids ``<prefix>-<index>``
    and, on a TLS broker, the worker's own identity (``worker_tls``)."""
    return [
        IngestConfig(
            host=settings.broker_host,
            port=settings.broker_port,
            share_group=settings.ingest_store_group,
            client_id=client_id,
            tls=worker_tls(settings, client_id),
            bucket_seconds=settings.drift_window_seconds,
        )
        for client_id in ingest_client_ids(
            settings, workers, first_index=first_index, client_prefix=client_prefix
        )
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
