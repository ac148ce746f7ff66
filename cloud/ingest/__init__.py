"""Telemetry ingest: MQTT 5 shared-subscription workers that store telemetry windows,
device announcements and drift histograms in the registry database.

* ``worker``       one broker session and one thread: read, validate, commit, ack
* ``mqtt_reader``  the MQTT 5 subscriber it reads with (codec in ``_mqtt5``)
* ``validate``     what a batch keeps and why the rest is dropped
* ``fastpath``     telemetry decoding, equivalent to ``shared.messages``, faster
* ``histograms``   a batch's input histograms as numbers, cheaply
* ``pool``         N workers in one process, the cached release lookup
* ``store``        batched idempotent writes
* ``queries``      bounded reads for the API, dashboard and metrics
* ``tables``       the SQL tables of telemetry, drift and retraining
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
