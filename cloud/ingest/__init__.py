"""Telemetry ingest: MQTT 5 shared-subscription workers that store telemetry windows,
device announcements and drift histograms in the registry database.

* ``worker``   one broker session + one writer thread (``IngestWorker``)
* ``pool``     N workers in one process, the cached release lookup
* ``store``    batched idempotent writes
* ``queries``  bounded reads for the API, dashboard and metrics
* ``tables``   the SQL tables of telemetry, drift and retraining
"""

from cloud.ingest.pool import IngestPool, cached_release_lookup, worker_configs
from cloud.ingest.worker import IngestConfig, IngestStats, IngestWorker, device_group

__all__ = [
    "IngestConfig",
    "IngestPool",
    "IngestStats",
    "IngestWorker",
    "cached_release_lookup",
    "device_group",
    "worker_configs",
]
