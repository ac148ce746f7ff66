"""The retrain loop: a drift alert starts a retraining job whose release goes to a
canary, then to the fleet.

``RetrainLoop`` listens to the drift monitor. For an input-drift alert of a
(model, release, group) it runs the configured job once (never twice for the
same release and group), records every step in ``retrain_runs``, and hands the
proposed release to the rollout engine (``cloud.rollouts``) as a two-wave
rollout of the devices on the drifted release: ``canary_devices`` of them
first, the rest only when every canary runs it (verified, self-tested, through
probation, not rolled back) and the health gates hold. A canary that refuses
it aborts the rollout, which points the canary back at the release it ran.

Jobs (``retrain_job`` setting):

* ``digits-shift``: the demo. The cloud never sees raw inputs, only binned
  counts, so it fits the drift: the brightness offset that best turns the
  release's calibration images into the histograms the devices report.
  Then ``edgefleet-cloud retrain digits --shift <offset>`` (a child process:
  TensorFlow stays out of the service) trains the digits CNN on the original
  plus the shifted images, calibrates and gates it on the shifted world, and
  publishes it with a baseline of that world, including the reference
  predicted-class counts for prediction drift.
* ``cmd:<command>``: any command; it gets ``EDGEFLEET_RETRAIN_MODEL``,
  ``..._RELEASE``, ``..._GROUP`` and ``..._ALERT`` in its environment and must
  publish a release and print ``{"release": N, ...}`` as its last stdout line.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from sqlalchemy import select

from cloud.db import Database
from cloud.drift_monitor import AlertInfo
from cloud.fleet import FleetView
from cloud.ingest.store import decode_counts
from cloud.ingest.tables import DeviceSeen, DriftPartial, RetrainRun
from shared.drift import extract_features, histogram, psi
from shared.errors import ConfigError, PipelineError

__all__ = [
    "CommandJob",
    "DigitsShiftJob",
    "RetrainJob",
    "RetrainLoop",
    "RetrainResult",
    "estimate_shift",
    "job_from_setting",
]

log = logging.getLogger(__name__)

#: Offsets tried when fitting a brightness shift (pixels live in [0, 1]).
SHIFT_GRID = np.round(np.arange(-0.5, 0.5001, 0.02), 4)
JOB_TIMEOUT = 900.0
CANARY_TIMEOUT = 300.0
FLEET_TIMEOUT = 600.0
_POLL = 1.0


@dataclass(frozen=True)
class RetrainRequest:
    """What a job is asked to do: replace ``release`` of ``model`` for ``group``."""

    run_id: int
    model: str
    release: int
    group: str
    alert: AlertInfo


@dataclass(frozen=True)
class RetrainResult:
    """The release a job published, and a line about it for people."""

    release: int
    summary: str


class RetrainJob(Protocol):
    """Builds and publishes a new release."""

    name: str

    def run(self, request: RetrainRequest) -> RetrainResult: ...

    def cancel(self) -> None: ...


def estimate_shift(
    calibration: npt.NDArray[np.floating[Any]],
    counts: npt.NDArray[np.int64],
    edges: npt.NDArray[np.float64],
    grid: npt.NDArray[np.float64] = SHIFT_GRID,
) -> float:
    """The brightness offset ``a`` for which ``clip(calibration + a, 0, 1)`` best matches
    the observed per-feature ``counts`` (least mean PSI over ``grid``)."""
    best, best_score = 0.0, float("inf")
    for a in grid:
        feats = extract_features(np.clip(calibration + a, 0.0, 1.0), "flatten")
        score = float(psi(histogram(feats, edges), counts).mean())
        if score < best_score:
            best, best_score = float(a), score
    return best


class _ChildJob:
    """Runs one child process at a time; ``cancel`` ends it."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
        with self._lock:
            self._proc = subprocess.Popen(  # noqa: S603 - configured by the operator
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **(env or {})},
            )
        try:
            out, err = self._proc.communicate(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.cancel()
            raise PipelineError(f"retraining job {argv[:4]} timed out") from None
        if self._proc.returncode != 0:
            raise PipelineError(
                f"retraining job failed ({self._proc.returncode}): {err.strip()[-2000:]}"
            )
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("release"), int):
            raise PipelineError(f"retraining job printed no release JSON: {out[-500:]!r}")
        return result

    def cancel(self) -> None:
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class DigitsShiftJob(_ChildJob):
    """The demo job: fit the brightness shift, retrain the digits CNN on it."""

    name = "digits-shift"

    def __init__(self, db: Database, data_dir: Path, *, epochs: int = 8) -> None:
        super().__init__()
        self.db, self.data_dir, self.epochs = db, data_dir, epochs
        self._releases: Any = None

    def observed_counts(self, request: RetrainRequest) -> npt.NDArray[np.int64] | None:
        """Input counts of the drifted release and group over their newest windows."""
        P = DriftPartial
        with self.db.session() as s:
            newest = s.scalars(
                select(P.bucket_start)
                .where(
                    P.model == request.model, P.release == request.release, P.group == request.group
                )
                .distinct()
                .order_by(P.bucket_start.desc())
                .limit(3)
            ).all()
            rows = s.scalars(
                select(P).where(
                    P.model == request.model,
                    P.release == request.release,
                    P.group == request.group,
                    P.bucket_start.in_(newest),
                )
            ).all()
            total: npt.NDArray[np.int64] | None = None
            for r in rows:
                if r.input_counts:
                    c = decode_counts(r.input_counts, (r.n_features, r.bins))
                    total = c if total is None or total.shape != c.shape else total + c
        return total

    def run(self, request: RetrainRequest) -> RetrainResult:
        from cloud.drift_monitor import read_release_target
        from cloud.pipeline.digits import load_digits_splits
        from cloud.releases import ReleaseService
        from cloud.tuf_repo import ReleaseRepository
        from shared.drift import unpack_baseline

        service = ReleaseService(
            ReleaseRepository.open(self.data_dir / "repository", self.data_dir / "keys")
        )
        manifest = service.get(request.model, request.release)
        counts = self.observed_counts(request)
        if manifest.drift is None or counts is None:
            raise PipelineError(
                f"{request.model} release {request.release} has no drift "
                "baseline or no drift data to fit"
            )
        baseline = unpack_baseline(
            read_release_target(service, manifest.drift.target), manifest.drift
        )
        calib = load_digits_splits(seed=0).x_calib
        shift = estimate_shift(calib, counts, baseline.edges)
        log.info(
            "fitted drift of %s release %s: brightness %+.2f", request.model, request.release, shift
        )
        result = self._run(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "retrain",
                "digits",
                "--data-dir",
                str(self.data_dir),
                "--model-name",
                request.model,
                "--shift",
                str(shift),
                "--epochs",
                str(self.epochs),
                "--variant",
                str(request.release + 1),
            ]
        )
        acc = result.get("metrics", {}).get("accuracy")
        return RetrainResult(
            int(result["release"]),
            f"trained on a fitted brightness shift of {shift:+.2f}"
            + (f"; accuracy {acc:.3f} on the shifted test set" if acc is not None else ""),
        )


class CommandJob(_ChildJob):
    """An operator's own retraining command (see the module docstring)."""

    name = "command"

    def __init__(self, argv: list[str]) -> None:
        super().__init__()
        if not argv:
            raise ConfigError("retrain_job 'cmd:' needs a command")
        self.argv = argv

    def run(self, request: RetrainRequest) -> RetrainResult:
        env = {
            "EDGEFLEET_RETRAIN_MODEL": request.model,
            "EDGEFLEET_RETRAIN_RELEASE": str(request.release),
            "EDGEFLEET_RETRAIN_GROUP": request.group,
            "EDGEFLEET_RETRAIN_ALERT": json.dumps(request.alert.to_json()),
        }
        out = self._run(self.argv, env)
        return RetrainResult(int(out["release"]), str(out.get("summary", "")))


def job_from_setting(value: str | None, db: Database, data_dir: Path) -> RetrainJob | None:
    """The job named by the ``retrain_job`` setting (``None``: retraining is off)."""
    if not value:
        return None
    if value == "digits-shift":
        return DigitsShiftJob(db, data_dir)
    if value.startswith("cmd:"):
        return CommandJob(shlex.split(value[4:]))
    raise ConfigError(f"unknown retrain_job {value!r}: use 'digits-shift' or 'cmd:<command>'")


class Rollouts(Protocol):
    """What the loop needs of ``cloud.rollouts.service.RolloutService``."""

    def start(self, spec: Any, created_by: str) -> dict[str, Any]: ...

    def status(self, rollout_id: str) -> dict[str, Any]: ...


class RetrainLoop:
    """Runs a job per drift alert and rolls its release out: canary, then fleet."""

    def __init__(
        self,
        db: Database,
        fleet: FleetView,
        job: RetrainJob,
        rollouts: Rollouts,
        *,
        canary_devices: int = 1,
        metrics: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db, self.fleet, self.job, self.rollouts = db, fleet, job, rollouts
        self.canary_devices = canary_devices
        self.metrics = metrics
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy: set[tuple[str, str]] = set()

    def on_alert(self, alert: AlertInfo) -> None:
        """Drift monitor listener: start a run unless one ran for this release and group."""
        if alert.kind != "input" or self._stop.is_set():
            return
        key = (alert.model, alert.group)
        with self._lock:
            if key in self._busy:
                return
            with self.db.session() as s:
                done = s.scalar(
                    select(RetrainRun.id).where(
                        RetrainRun.model == alert.model,
                        RetrainRun.from_release == alert.release,
                        RetrainRun.group == alert.group,
                    )
                )
                if done is not None:
                    return
                now = self.clock()
                run = RetrainRun(
                    alert_id=alert.id,
                    model=alert.model,
                    from_release=alert.release,
                    group=alert.group,
                    job=self.job.name,
                    state="training",
                    started_at=now,
                    updated_at=now,
                    detail=f"started by alert {alert.id}",
                )
                s.add(run)
                s.flush()
                run_id = run.id
            self._busy.add(key)
        request = RetrainRequest(run_id, alert.model, alert.release, alert.group, alert)
        t = threading.Thread(
            target=self._run, args=(request,), daemon=True, name=f"retrain-{run_id}"
        )
        self._threads.append(t)
        t.start()

    def stop(self) -> None:
        self._stop.set()
        self.job.cancel()
        for t in self._threads:
            t.join(15)

    def _update(self, run_id: int, **fields: Any) -> None:
        with self.db.session() as s:
            run = s.get(RetrainRun, run_id)
            if run is not None:
                for k, v in fields.items():
                    setattr(run, k, v)
                run.updated_at = self.clock()
        log.info("retrain run %d: %s", run_id, fields)

    def _run(self, req: RetrainRequest) -> None:
        try:
            result = self.job.run(req)
            new = result.release
            self._update(
                req.run_id,
                state="published",
                new_release=new,
                detail=f"release {new} published: {result.summary}",
            )
            targets = self._devices_on(req.model, req.release, req.group)
            if not targets:
                raise PipelineError(
                    f"no device of group {req.group!r} runs release {req.release} any more"
                )
            rid = self._start_rollout(req, new, targets)
            self._follow(req, rid, new, len(targets))
            if self.metrics is not None:
                self.metrics.retrain_runs.labels("done").inc()
            self._update(
                req.run_id,
                state="done",
                detail=f"rollout {rid}: {len(targets)} devices run release {new}",
            )
        except Exception as e:
            log.exception("retrain run %d failed", req.run_id)
            if self.metrics is not None:
                self.metrics.retrain_runs.labels("failed").inc()
            self._update(req.run_id, state="failed", detail=str(e)[:2000])
        finally:
            with self._lock:
                self._busy.discard((req.model, req.group))

    def _devices_on(self, model: str, release: int, group: str) -> list[str]:
        with self.db.session() as s:
            in_group = set(
                s.scalars(select(DeviceSeen.device_id).where(DeviceSeen.group == group)).all()
            )
        return [
            d["device_id"]
            for d in self.fleet.devices()
            if d["model"] == model and d["release"] == release and d["device_id"] in in_group
        ]

    def _start_rollout(self, req: RetrainRequest, release: int, targets: list[str]) -> str:
        from cloud.rollouts.spec import RolloutSpec, Target

        canary_pct = 100.0 * min(self.canary_devices, len(targets)) / len(targets)
        spec = RolloutSpec(
            model=req.model,
            release=release,
            target=Target(devices=targets),
            waves=[canary_pct, 100.0] if canary_pct < 100 else [100.0],
            success_threshold=1.0,
            failure_threshold=0.0,
            wave_timeout_s=FLEET_TIMEOUT,
            on_timeout="abort",
            reason=f"retrain run {req.run_id} after drift alert {req.alert.id} (group {req.group})",
        )
        st = self.rollouts.start(spec, f"retrain-{req.run_id}")
        canary = self._wave_devices(st, 1)
        self._update(
            req.run_id,
            state="canary",
            canary=json.dumps(canary),
            detail=f"rollout {st['id']}: canary {', '.join(canary)}",
        )
        return str(st["id"])

    @staticmethod
    def _wave_devices(status: dict[str, Any], wave: int) -> list[str]:
        for e in status.get("events", []):
            if e["kind"] == "wave_started" and e["wave"] == wave:
                return list(e["detail"].get("devices", []))
        return []

    def _follow(self, req: RetrainRequest, rid: str, release: int, total: int) -> None:
        """Wait for the rollout to end; mirror its progress in the run."""
        started = self.clock()
        in_fleet = False
        while True:
            if self._stop.wait(_POLL):
                raise PipelineError("the service is stopping")
            st = self.rollouts.status(rid)
            if st["state"] == "completed":
                return
            if st["state"] in ("aborted", "paused"):
                raise PipelineError(f"rollout {rid} {st['state']}: {st['reason']}")
            if st["wave"] > 1 and not in_fleet:
                in_fleet = True
                self._update(
                    req.run_id,
                    state="fleet",
                    detail=f"rollout {rid}: canary healthy; release {release} to the other "
                    f"{total - st['wave_detail'][0]['devices']} devices",
                )
            if self.clock() - started > CANARY_TIMEOUT + FLEET_TIMEOUT:
                raise PipelineError(f"rollout {rid} did not finish in time: {st['reason']}")
