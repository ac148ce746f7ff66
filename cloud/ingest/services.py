"""The observability services of one cloud process, started and stopped together.

``create_app`` builds an ``Observability`` (metrics first: the API latency
middleware needs them before the app starts), and its lifespan calls
``start`` once the broker connection exists and ``stop`` on shutdown:
ingest workers (``ingest_workers`` of them; 0 when ingest runs apart), the
drift monitor, and the retrain loop when a ``retrain_job`` is configured.

On a mutual-TLS broker each ingest worker connects with its own identity
(``cloud.ingest.pool.worker_tls``), never the service's: the service does not
start while one of them is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloud.config import CloudSettings
from cloud.db import Database
from cloud.drift_monitor import DriftMonitor, DriftRule
from cloud.fleet import FleetView
from cloud.ingest.pool import IngestPool, cached_release_lookup, worker_configs
from cloud.ingest.worker import IngestStats
from cloud.metrics import CloudMetrics
from cloud.releases import ReleaseService
from cloud.retrain import RetrainLoop, job_from_setting

if TYPE_CHECKING:
    from cloud.api.deps import CloudContext

__all__ = ["Observability"]

log = logging.getLogger(__name__)


@dataclass
class Observability:
    """Handles to the running observability services (``app.state.observability``)."""

    settings: CloudSettings
    db: Database
    fleet: FleetView
    releases: ReleaseService
    metrics: CloudMetrics
    ingest: IngestPool | None = None
    monitor: DriftMonitor | None = None
    retrain: RetrainLoop | None = None
    _ctx: CloudContext | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls, settings: CloudSettings, db: Database, fleet: FleetView, releases: ReleaseService
    ) -> Observability:
        obs: Observability
        metrics = CloudMetrics(
            fleet,
            db,
            broker_up=lambda: obs.broker_connected(),
            ingest_stats=lambda: obs.ingest_stats(),
        )
        obs = cls(settings=settings, db=db, fleet=fleet, releases=releases, metrics=metrics)
        return obs

    @property
    def rule(self) -> DriftRule:
        s = self.settings
        return DriftRule(
            threshold=s.drift_threshold,
            k=s.drift_k,
            m=s.drift_m,
            min_samples=s.drift_min_samples,
            pred_threshold=s.drift_threshold,
        )

    def ingest_stats(self) -> list[IngestStats]:
        return self.ingest.stats if self.ingest is not None else []

    def broker_connected(self) -> bool:
        ctx = self._ctx
        return bool(ctx is not None and ctx.mqtt is not None and ctx.mqtt.connected.is_set())

    def start(self, ctx: CloudContext, *, ingest: bool = True) -> None:
        """Start ingest (if ``ingest``), the drift monitor and the retrain loop.

        Raises ``ConfigError`` when an ingest worker's TLS identity is missing."""
        s = self.settings
        self._ctx = ctx
        if ingest and s.ingest_workers > 0:
            self.ingest = IngestPool(
                self.db,
                worker_configs(s, s.ingest_workers),
                releases=cached_release_lookup(self.releases),
            )
            self.ingest.start(wait=10)
        self.monitor = DriftMonitor(
            self.db, self.releases, window_seconds=s.drift_window_seconds, rule=self.rule
        )
        job = job_from_setting(s.retrain_job, self.db, s.data_dir)
        if job is not None:
            self.retrain = RetrainLoop(
                self.db,
                self.fleet,
                job,
                ctx.rollouts,
                canary_devices=s.retrain_canary_devices,
                metrics=self.metrics,
            )
            self.monitor.listeners.append(self.retrain.on_alert)
        self.monitor.start()

    def stop(self) -> None:
        if self.retrain is not None:
            self.retrain.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self.ingest is not None:
            self.ingest.stop()
