"""Prometheus metrics of the cloud: fleet, releases, rollouts, inference, drift, ingest,
the HTTP API, and the service level indicators of ``docs/SLO.md``.

Every app has its own ``CollectorRegistry`` (several apps may live in one test
process). Fleet-wide numbers are computed at scrape time from the live fleet
view and the telemetry tables (cached for ``CACHE_SECONDS``, so a scrape costs
a few bounded queries however often it comes). Label sets are bounded: per
release (and device group) and, for drift, only the ``top_k`` features that
moved most; never per device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from cloud.db import Database
from cloud.fleet import FleetView
from cloud.ingest import queries
from cloud.ingest.worker import LAG_BUCKETS, IngestStats

__all__ = [
    "ApiLatencyMiddleware",
    "CloudMetrics",
    "IngestCollector",
    "ingest_registry",
]

log = logging.getLogger(__name__)

CACHE_SECONDS = 5.0
#: Telemetry of the last this many seconds makes the inference rates and latencies.
RECENT_SECONDS = 300.0
#: Buckets for times from a deployment to devices running it (seconds).
UPDATE_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
API_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class IngestCollector(Collector):
    """Counters of the ingest workers running in this process."""

    def __init__(self, stats: Callable[[], Sequence[IngestStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        received = CounterMetricFamily(
            "edgefleet_ingest_received",
            "MQTT messages received by ingest workers",
            labels=["worker"],
        )
        stored = CounterMetricFamily(
            "edgefleet_ingest_stored", "Telemetry windows stored", labels=["worker"]
        )
        dup = CounterMetricFamily(
            "edgefleet_ingest_duplicates",
            "Redelivered telemetry windows skipped (idempotent writes)",
            labels=["worker"],
        )
        dropped = CounterMetricFamily(
            "edgefleet_ingest_dropped",
            "Messages dropped, by reason (invalid, unknown_device, histogram_shape, ...)",
            labels=["worker", "reason"],
        )
        up = GaugeMetricFamily(
            "edgefleet_ingest_connected", "1 if the worker has a broker session", labels=["worker"]
        )
        lag = HistogramMetricFamily(
            "edgefleet_ingest_lag_seconds",
            "From receipt of a telemetry message to its commit",
            labels=["worker"],
        )
        for st in self._stats():
            with st.lock:
                w = [st.worker]
                received.add_metric(w, st.received)
                stored.add_metric(w, st.stored)
                dup.add_metric(w, st.duplicates)
                for reason, n in sorted(st.dropped.items()):
                    dropped.add_metric([st.worker, reason], n)
                up.add_metric(w, 1.0 if st.connected else 0.0)
                cum, buckets = 0, []
                for bound, n in zip((*LAG_BUCKETS, float("inf")), st.lag_buckets, strict=True):
                    cum += n
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cum))
                lag.add_metric(w, buckets, st.lag_sum)
        yield from (received, stored, dup, dropped, up, lag)


def ingest_registry(stats: Callable[[], Sequence[IngestStats]]) -> CollectorRegistry:
    """A registry with only the ingest counters (``edgefleet-cloud ingest --metrics-port``)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(IngestCollector(stats))
    return reg


class _FleetCollector(Collector):
    """Fleet, release, inference, drift and freshness gauges, computed at scrape time."""

    def __init__(
        self,
        fleet: FleetView,
        db: Database,
        broker_up: Callable[[], bool],
        clock: Callable[[], float],
    ) -> None:
        self.fleet, self.db, self.broker_up, self.clock = fleet, db, broker_up, clock
        self._lock = threading.Lock()
        self._cached_at = -1e18
        self._summary: list[dict[str, Any]] = []
        self._drift: list[dict[str, Any]] = []
        self._alerts: list[dict[str, Any]] = []

    def _refresh(self, now: float) -> None:
        with self._lock:
            if now - self._cached_at < CACHE_SECONDS:
                return
            try:
                self._summary = queries.release_summary(self.db, now - RECENT_SECONDS)
                self._drift = queries.drift_latest(self.db, now - 3600)
                self._alerts = queries.alerts(self.db, "open", limit=1000)
            except Exception:
                log.exception("metrics queries failed; serving the previous values")
            self._cached_at = now

    def collect(self) -> Iterator[Any]:
        now = self.clock()
        self._refresh(now)
        online, known = self.fleet.online_count()
        yield GaugeMetricFamily(
            "edgefleet_devices_online", "Devices with a live session", value=online
        )
        yield GaugeMetricFamily(
            "edgefleet_devices_known", "Devices the cloud has heard from", value=known
        )
        per = GaugeMetricFamily(
            "edgefleet_release_devices", "Devices running each release", labels=["model", "release"]
        )
        for (model, release), n in sorted(self.fleet.release_counts().items()):
            per.add_metric([model, str(release)], n)
        yield per
        yield GaugeMetricFamily(
            "edgefleet_broker_connected",
            "1 if the cloud has its broker session (SLI: broker availability)",
            value=1.0 if self.broker_up() else 0.0,
        )
        ages = self.fleet.telemetry_ages(now)
        age = GaugeMetricFamily(
            "edgefleet_telemetry_age_seconds",
            "Age of the newest telemetry of online devices (SLI: telemetry freshness)",
            labels=["stat"],
        )
        if ages:
            ages.sort()
            age.add_metric(["max"], ages[-1])
            age.add_metric(["median"], ages[len(ages) // 2])
        yield age
        yield from self._inference()
        yield from self._drift_metrics()

    def _inference(self) -> Iterable[Any]:
        labels = ["model", "release"]
        rate = GaugeMetricFamily(
            "edgefleet_inference_rate",
            f"Inferences per second per release (last {RECENT_SECONDS:.0f} s)",
            labels=labels,
        )
        err = GaugeMetricFamily(
            "edgefleet_inference_error_ratio",
            f"Failed / all inferences per release (last {RECENT_SECONDS:.0f} s)",
            labels=labels,
        )
        lat = GaugeMetricFamily(
            "edgefleet_inference_latency_ms",
            "Inference latency percentiles per release (inference-weighted device windows)",
            labels=[*labels, "quantile"],
        )
        total = GaugeMetricFamily(
            "edgefleet_inferences_recent",
            "Inferences per release in the recent window",
            labels=labels,
        )
        for r in self._summary:
            if r["model"] is None:
                continue
            lv = [r["model"], str(r["release"])]
            rate.add_metric(lv, r["inference_rate"])
            err.add_metric(lv, r["error_ratio"])
            total.add_metric(lv, r["inferences"])
            for q, key in (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")):
                if r[key] is not None:
                    lat.add_metric([*lv, q], r[key])
        return (rate, err, lat, total)

    def _drift_metrics(self) -> Iterable[Any]:
        labels = ["model", "release", "group"]
        psi = GaugeMetricFamily(
            "edgefleet_drift_psi",
            "Input drift PSI of the newest window (stat=mean is the alert statistic)",
            labels=[*labels, "stat"],
        )
        js = GaugeMetricFamily(
            "edgefleet_drift_js",
            "Mean Jensen-Shannon divergence of the inputs, newest window",
            labels=labels,
        )
        feat = GaugeMetricFamily(
            "edgefleet_drift_feature_psi",
            "PSI of the features that moved most (top k), newest window",
            labels=[*labels, "rank", "feature"],
        )
        pred = GaugeMetricFamily(
            "edgefleet_prediction_drift_psi",
            "PSI of predicted classes against the release's reference",
            labels=labels,
        )
        for d in self._drift:
            lv = [d["model"], str(d["release"]), d["group"]]
            if d["psi_mean"] is not None:
                psi.add_metric([*lv, "mean"], d["psi_mean"])
                psi.add_metric([*lv, "max"], d["psi_max"])
            if d["js_mean"] is not None:
                js.add_metric(lv, d["js_mean"])
            for rank, (feature, value) in enumerate(d["top_features"], start=1):
                feat.add_metric([*lv, str(rank), str(feature)], value)
            if d["pred_psi"] is not None:
                pred.add_metric(lv, d["pred_psi"])
        alerts = GaugeMetricFamily(
            "edgefleet_drift_alerts_open", "Open drift alerts", labels=["kind"]
        )
        for kind in ("input", "prediction"):
            alerts.add_metric([kind], sum(1 for a in self._alerts if a["kind"] == kind))
        return (psi, js, feat, pred, alerts)


class CloudMetrics:
    """The metrics of one cloud app; instruments other modules update directly."""

    def __init__(
        self,
        fleet: FleetView,
        db: Database,
        *,
        broker_up: Callable[[], bool] = lambda: False,
        ingest_stats: Callable[[], Sequence[IngestStats]] = list,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.http_latency = Histogram(
            "edgefleet_http_request_duration_seconds",
            "API latency by route (SLI: API latency)",
            ["method", "route", "status"],
            buckets=API_BUCKETS,
            registry=reg,
        )
        self.update_outcomes = Counter(
            "edgefleet_update_outcomes",
            "Device update lifecycle events by kind; committed vs "
            "rolled_back + failed is the SLI of update success",
            ["kind"],
            registry=reg,
        )
        self.device_update_seconds = Histogram(
            "edgefleet_device_update_seconds",
            "From a desired state being issued to the device running it",
            buckets=UPDATE_BUCKETS,
            registry=reg,
        )
        self.fleet_update_seconds = Histogram(
            "edgefleet_fleet_update_seconds",
            "From a deployment to every targeted device running it (SLI: time to fleet-updated)",
            buckets=UPDATE_BUCKETS,
            registry=reg,
        )
        # Set by the rollout controller (cloud.rollouts.controller) and the retrain loop.
        self.rollout_progress = Gauge(
            "edgefleet_rollout_progress_ratio",
            "Share of a rollout's devices on its release",
            ["rollout_id", "model", "release"],
            registry=reg,
        )
        self.rollout_devices = Gauge(
            "edgefleet_rollout_devices",
            "Devices of a rollout by state",
            ["rollout_id", "state"],
            registry=reg,
        )
        self.rollout_decisions = Counter(
            "edgefleet_rollout_decisions",
            "Rollout decisions by kind (wave_started, gate_failed, aborted ...)",
            ["kind"],
            registry=reg,
        )
        self.retrain_runs = Counter(
            "edgefleet_retrain_runs", "Retraining runs by outcome", ["outcome"], registry=reg
        )
        reg.register(_FleetCollector(fleet, db, broker_up, clock))
        reg.register(IngestCollector(ingest_stats))
        fleet.on_event = self._on_event
        fleet.on_update_reached = self.device_update_seconds.observe

    def _on_event(self, kind: str) -> None:
        if kind in ("committed", "rolled_back", "failed"):
            self.update_outcomes.labels(kind).inc()


def _route_of(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or getattr(route, "path_format", None)
    if path:
        return str(path)
    raw = str(scope.get("path", ""))
    # Static mounts: one label per mount, never per file.
    for prefix in ("/tuf/", "/dashboard/"):
        if raw.startswith(prefix):
            return prefix + "*"
    return "unmatched"


class ApiLatencyMiddleware:
    """ASGI middleware observing each HTTP request into ``CloudMetrics.http_latency``.

    The route label is the route's template (``/api/v1/devices/{device_id}``), so
    label cardinality is bounded by the number of routes."""

    def __init__(self, app: Any, metrics: CloudMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_latency.labels(
                scope.get("method", "?"), _route_of(scope), str(status[0])
            ).observe(time.perf_counter() - started)
