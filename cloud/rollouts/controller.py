"""The thread that moves rollouts on: ``RolloutService.tick`` every ``interval``,
then the rollout gauges of ``/metrics`` (progress and devices per status of live
rollouts, decisions by kind, time to fleet-updated of completed rollouts)."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import TYPE_CHECKING

from cloud.rollouts.service import RolloutService

if TYPE_CHECKING:
    from cloud.metrics import CloudMetrics

__all__ = ["RolloutController"]

log = logging.getLogger(__name__)


class RolloutController:
    def __init__(
        self,
        service: RolloutService,
        interval: float = 1.0,
        metrics: CloudMetrics | None = None,
    ) -> None:
        self.service = service
        self.interval = interval
        self.metrics = metrics
        self._exported: set[tuple[str, str]] = set()
        self._exported_progress: set[tuple[str, str, str]] = set()
        self._finished: set[str] = set()
        self._decisions_seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RolloutController:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.service.tick()
                if self.metrics is not None:
                    self._export(self.metrics)
            except Exception:
                log.exception("rollout controller tick failed")

    def _export(self, m: CloudMetrics) -> None:
        devices: set[tuple[str, str]] = set()
        progress: set[tuple[str, str, str]] = set()
        for r in self.service.list(limit=200):
            rid = r["id"]
            if r["state"] in ("running", "paused"):
                key = (rid, r["model"], str(r["release"]))
                m.rollout_progress.labels(*key).set(r["progress"])
                progress.add(key)
                for status, n in r["counts"].items():
                    m.rollout_devices.labels(rid, status).set(n)
                    devices.add((rid, status))
            elif r["state"] == "completed" and rid not in self._finished:
                self._finished.add(rid)
                if r["finished_at"] is not None:
                    m.fleet_update_seconds.observe(max(0.0, r["finished_at"] - r["created_at"]))
        # A finished rollout leaves the gauges instead of freezing at its last value.
        for labels in self._exported - devices:
            with contextlib.suppress(KeyError):
                m.rollout_devices.remove(*labels)
        for key in self._exported_progress - progress:
            with contextlib.suppress(KeyError):
                m.rollout_progress.remove(*key)
        self._exported, self._exported_progress = devices, progress
        for kind, n in list(self.service.decisions.items()):
            seen = self._decisions_seen.get(kind, 0)
            if n > seen:
                m.rollout_decisions.labels(kind).inc(n - seen)
                self._decisions_seen[kind] = n

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
