"""Drift monitor: compares what devices see with what a release was built on.

Devices count their inputs into the bins of the release's drift baseline and
send only the counts; ingest sums them per release, device group and time
window (``drift_partials``). For every closed window holding at least
``min_samples`` inputs the monitor computes, per feature, the population
stability index (PSI) and the Jensen-Shannon divergence against the baseline,
and the same for the predicted classes against a reference distribution.

Which number is compared with the threshold, and why. PSI of a single
feature has sampling noise of about ``(B-1) * (1/n + 1/N)`` (B bins, n window
samples, N baseline samples): the digits baseline holds only 200 images, so a
stationary window of 500 scores about 0.06 per feature, and the *largest* of
64 features exceeds 0.2 in a few percent of windows (``bench/drift.py``
measures it). Averaging over features removes that noise, while a shift of
the whole input distribution (sensor offset or gain, lighting, a new
population) moves every feature: the alert statistic is therefore the **mean
PSI over features** (default threshold 0.2). A 0.5 sigma shift of every
feature scores about 0.26 (0.24 at the 1st percentile) against a stationary
0.02-0.08, so one window already separates them and the k-of-m rule (default
2 of 3) only guards against a single odd window; ``bench/drift.py`` shows
detection within 2 windows and no false alarms over thousands of windows.
A change confined to one feature of many is diluted by the mean: the worst
features and their PSI are stored with each evaluation and exported
(top ``top_k``) so they can be seen and alerted on separately.

Prediction drift needs no labels: the predicted-class counts against the
release's reference distribution, which is ``output_counts`` in the
baseline file when the release has one (``cloud.retrain`` stores it), or
else learnt from the fleet itself in the release's first ``burn_in``
windows without input drift. (The 32 self-test vectors are too few: their
class histogram alone scores a PSI near 0.3 against the truth.)

An alert opens when ``k`` of the last ``m`` evaluated windows exceed, and
resolves when none of the last ``m`` do or the release stops reporting.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, exists, select

from cloud.db import Database
from cloud.ingest.store import decode_counts, encode_counts
from cloud.ingest.tables import DriftAlert, DriftEvaluation, DriftPartial, DriftReference
from cloud.releases import ReleaseService, UnknownReleaseError
from shared.drift import Baseline, js_divergence, psi, unpack_baseline
from shared.errors import ManifestError
from shared.manifest import ReleaseManifest

__all__ = [
    "AlertInfo",
    "DriftMonitor",
    "DriftRule",
    "WindowScore",
    "k_of_m",
    "load_release_reference",
    "read_release_target",
    "score_window",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
INPUT, PREDICTION = "input", "prediction"
#: Windows looked back at for unevaluated buckets.
_LOOKBACK_WINDOWS = 50


@dataclass(frozen=True)
class DriftRule:
    """Thresholds and the k-of-m rule (see the module docstring)."""

    threshold: float = 0.2
    k: int = 2
    m: int = 3
    min_samples: int = 500
    pred_threshold: float = 0.2
    burn_in: int = 3
    top_k: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.m:
            raise ValueError(f"need 1 <= k <= m, got k={self.k}, m={self.m}")


@dataclass(frozen=True)
class WindowScore:
    """Drift statistics of one window."""

    samples: int
    psi: FloatArray
    js: FloatArray
    predictions: int = 0
    pred_psi: float | None = None
    pred_js: float | None = None

    @property
    def psi_mean(self) -> float | None:
        return float(self.psi.mean()) if self.psi.size else None

    @property
    def psi_max(self) -> float | None:
        return float(self.psi.max()) if self.psi.size else None

    @property
    def js_mean(self) -> float | None:
        return float(self.js.mean()) if self.js.size else None

    def top_features(self, k: int) -> list[tuple[int, float]]:
        order = np.argsort(-self.psi, kind="stable")[:k]
        return [(int(i), round(float(self.psi[i]), 4)) for i in order]

    def input_exceeded(self, rule: DriftRule) -> bool | None:
        """Whether this window counts as drifted; ``None``: too few samples to say."""
        if self.samples < rule.min_samples or self.psi_mean is None:
            return None
        return self.psi_mean > rule.threshold

    def pred_exceeded(self, rule: DriftRule) -> bool | None:
        if self.pred_psi is None or self.predictions < rule.min_samples:
            return None
        return self.pred_psi > rule.pred_threshold


def score_window(
    baseline: Baseline | None,
    counts: npt.NDArray[np.int64] | None,
    *,
    reference_outputs: npt.NDArray[np.int64] | None = None,
    outputs: npt.NDArray[np.int64] | None = None,
) -> WindowScore:
    """Per-feature PSI and JS of ``counts`` ``(F, B)`` against ``baseline``, and of the
    predicted-class ``outputs`` against ``reference_outputs``. Pure."""
    empty = np.zeros(0, dtype=np.float64)
    samples, p, j = 0, empty, empty
    if baseline is not None and counts is not None and counts.shape == baseline.counts.shape:
        samples = int(counts[0].sum()) if len(counts) else 0
        if samples:
            p, j = psi(baseline.counts, counts), js_divergence(baseline.counts, counts)
    predictions, pp, pj = 0, None, None
    if outputs is not None:
        predictions = int(outputs.sum())
        if (
            reference_outputs is not None
            and reference_outputs.shape == outputs.shape
            and predictions
            and reference_outputs.sum()
        ):
            pp = float(psi(reference_outputs, outputs))
            pj = float(js_divergence(reference_outputs, outputs))
    return WindowScore(
        samples=samples, psi=p, js=j, predictions=predictions, pred_psi=pp, pred_js=pj
    )


def k_of_m(history: Sequence[bool], k: int, m: int) -> bool:
    """``history`` newest first: do at least ``k`` of the newest ``m`` exceed?"""
    return sum(1 for x in history[:m] if x) >= k


@dataclass(frozen=True)
class ReleaseReference:
    """What one release is compared against."""

    baseline: Baseline | None
    outputs: npt.NDArray[np.int64] | None


def read_release_target(service: ReleaseService, path: str) -> bytes:
    """A target's bytes from the repository on disk, checked against its signed hash."""
    info = service.repo.list_targets().get(path)
    if info is None:
        raise ManifestError(f"target {path!r} is not in the signed repository")
    sha = info.hashes["sha256"]
    parent, _, name = path.rpartition("/")
    data = (service.repo.targets_dir / parent / f"{sha}.{name}").read_bytes()
    if hashlib.sha256(data).hexdigest() != sha or len(data) != info.length:
        raise ManifestError(f"target {path!r} on disk does not match its signed hash")
    return data


def load_release_reference(service: ReleaseService, manifest: ReleaseManifest) -> ReleaseReference:
    """The drift baseline of ``manifest`` and, if the file has one, its reference
    predicted-class counts (``output_counts``, an optional extra array)."""
    if manifest.drift is None:
        return ReleaseReference(None, None)
    data = read_release_target(service, manifest.drift.target)
    baseline = unpack_baseline(data, manifest.drift)
    outputs = None
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        if "output_counts" in npz.files:
            arr = np.asarray(npz["output_counts"], dtype=np.int64).reshape(-1)
            if len(arr) == manifest.drift.n_classes and arr.sum() > 0:
                outputs = arr
    return ReleaseReference(baseline, outputs)


@dataclass(frozen=True)
class AlertInfo:
    """A drift alert as the retrain loop and the API see it."""

    id: int
    kind: str
    model: str
    release: int
    group: str
    state: str
    opened_at: float
    resolved_at: float | None
    statistic: float
    threshold: float
    message: str

    @classmethod
    def of(cls, a: DriftAlert) -> AlertInfo:
        return cls(
            a.id,
            a.kind,
            a.model,
            a.release,
            a.group,
            a.state,
            a.opened_at,
            a.resolved_at,
            a.statistic,
            a.threshold,
            a.message,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DriftMonitor:
    """Evaluates closed windows, keeps the alerts, tells listeners about new ones."""

    def __init__(
        self,
        db: Database,
        releases: ReleaseService,
        *,
        window_seconds: float,
        rule: DriftRule | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.releases = releases
        self.window = window_seconds
        self.rule = rule or DriftRule()
        self.clock = clock
        self.grace = max(2.0, 0.1 * window_seconds)
        self.listeners: list[Callable[[AlertInfo], None]] = []
        self._refs: dict[tuple[str, int], ReleaseReference | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="drift-monitor")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        interval = min(max(self.window / 4, 0.5), 10.0)
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:
                log.exception("drift monitor pass failed")

    # -- one pass ----------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[AlertInfo]:
        """Evaluate every closed, unevaluated window; return alerts opened by this pass."""
        now = self.clock() if now is None else now
        closed = now - self.window - self.grace
        P, E = DriftPartial, DriftEvaluation
        done = exists().where(
            and_(
                E.model == P.model,
                E.release == P.release,
                E.group == P.group,
                E.bucket_start == P.bucket_start,
            )
        )
        with self.db.session() as s:
            pending = s.execute(
                select(P.model, P.release, P.group, P.bucket_start)
                .where(
                    P.bucket_start <= closed,
                    P.bucket_start >= now - _LOOKBACK_WINDOWS * self.window,
                    ~done,
                )
                .group_by(P.model, P.release, P.group, P.bucket_start)
                .order_by(P.bucket_start)
            ).all()
        opened: list[AlertInfo] = []
        keys = set()
        for model, release, group, bucket in pending:
            self._evaluate(model, release, group, bucket, now)
            keys.add((model, release, group))
        for key in sorted(keys):
            opened += self._update_alerts(*key, now)
        self._resolve_stale(now)
        for alert in opened:
            log.warning("drift alert: %s", alert.message)
            for listener in self.listeners:
                try:
                    listener(alert)
                except Exception:
                    log.exception("drift alert listener failed")
        return opened

    def _reference(self, model: str, release: int) -> ReleaseReference | None:
        key = (model, release)
        if key not in self._refs:
            try:
                ref: ReleaseReference | None = load_release_reference(
                    self.releases, self.releases.get(model, release)
                )
            except (UnknownReleaseError, ManifestError, OSError) as e:
                log.error("no drift reference for %s release %s: %s", model, release, e)
                ref = None
            self._refs[key] = ref
        return self._refs[key]

    def _evaluate(self, model: str, release: int, group: str, bucket: float, now: float) -> None:
        ref = self._reference(model, release)
        with self.db.session() as s:
            parts = s.scalars(
                select(DriftPartial).where(
                    DriftPartial.model == model,
                    DriftPartial.release == release,
                    DriftPartial.group == group,
                    DriftPartial.bucket_start == bucket,
                )
            ).all()
            counts, outputs = _sum_partials(parts)
            learnt = None
            if ref is not None and ref.outputs is None:
                learnt = s.scalar(
                    select(DriftReference).where(
                        DriftReference.model == model,
                        DriftReference.release == release,
                        DriftReference.group == group,
                    )
                )
            ref_out = ref.outputs if ref is not None else None
            if learnt is not None and learnt.windows >= self.rule.burn_in:
                ref_out = decode_counts(learnt.output_counts, (len(learnt.output_counts) // 8,))
            score = score_window(
                ref.baseline if ref else None, counts, reference_outputs=ref_out, outputs=outputs
            )
            input_ex = score.input_exceeded(self.rule)
            s.add(
                DriftEvaluation(
                    model=model,
                    release=release,
                    group=group,
                    bucket_start=bucket,
                    bucket_end=bucket + self.window,
                    evaluated_at=now,
                    samples=score.samples,
                    predictions=score.predictions,
                    psi_mean=score.psi_mean,
                    psi_max=score.psi_max,
                    js_mean=score.js_mean,
                    pred_psi=score.pred_psi,
                    pred_js=score.pred_js,
                    input_exceeded=input_ex,
                    pred_exceeded=score.pred_exceeded(self.rule),
                    top_features=json.dumps(score.top_features(self.rule.top_k)),
                )
            )
            if (
                ref is not None
                and ref.outputs is None
                and outputs is not None
                and input_ex is False
                and score.predictions >= self.rule.min_samples
            ):
                self._learn_reference(s, learnt, model, release, group, outputs, now)

    def _learn_reference(
        self,
        s: Any,
        learnt: DriftReference | None,
        model: str,
        release: int,
        group: str,
        outputs: npt.NDArray[np.int64],
        now: float,
    ) -> None:
        if learnt is None:
            s.add(
                DriftReference(
                    model=model,
                    release=release,
                    group=group,
                    created_at=now,
                    windows=1,
                    output_counts=encode_counts(outputs),
                )
            )
        elif learnt.windows < self.rule.burn_in:
            prev = decode_counts(learnt.output_counts, (len(learnt.output_counts) // 8,))
            if prev.shape == outputs.shape:
                learnt.output_counts = encode_counts(prev + outputs)
                learnt.windows += 1

    def _update_alerts(self, model: str, release: int, group: str, now: float) -> list[AlertInfo]:
        rule, opened = self.rule, []
        with self.db.session() as s:
            evals = s.scalars(
                select(DriftEvaluation)
                .where(
                    DriftEvaluation.model == model,
                    DriftEvaluation.release == release,
                    DriftEvaluation.group == group,
                )
                .order_by(DriftEvaluation.bucket_start.desc())
                .limit(4 * rule.m)
            ).all()
            for kind in (INPUT, PREDICTION):
                flags = [(e, e.input_exceeded if kind == INPUT else e.pred_exceeded) for e in evals]
                judged = [(e, f) for e, f in flags if f is not None][: rule.m]
                history = [bool(f) for _, f in judged]
                alert = s.scalar(
                    select(DriftAlert).where(
                        DriftAlert.kind == kind,
                        DriftAlert.model == model,
                        DriftAlert.release == release,
                        DriftAlert.group == group,
                        DriftAlert.state == "open",
                    )
                )
                if alert is None and k_of_m(history, rule.k, rule.m):
                    alert = self._open(kind, model, release, group, judged, now)
                    s.add(alert)
                    s.flush()
                    opened.append(AlertInfo.of(alert))
                elif alert is not None and len(history) >= rule.m and not any(history):
                    alert.state, alert.resolved_at = "resolved", now
                    log.info("drift alert %d resolved", alert.id)
        return opened

    def _open(
        self,
        kind: str,
        model: str,
        release: int,
        group: str,
        judged: Sequence[tuple[DriftEvaluation, bool | None]],
        now: float,
    ) -> DriftAlert:
        rule = self.rule
        latest = judged[0][0]
        n = sum(1 for _, f in judged if f)
        if kind == INPUT:
            stat, thr = latest.psi_mean or 0.0, rule.threshold
            top = ", ".join(f"#{f} {v:.2f}" for f, v in json.loads(latest.top_features)[:3])
            what = f"mean PSI {stat:.3f} > {thr:g}; worst features {top}"
        else:
            stat, thr = latest.pred_psi or 0.0, rule.pred_threshold
            what = f"prediction PSI {stat:.3f} > {thr:g}"
        message = (
            f"{kind} drift on {model} release {release} group {group}: {what} "
            f"in {n} of the last {len(judged)} windows"
        )
        return DriftAlert(
            kind=kind,
            model=model,
            release=release,
            group=group,
            state="open",
            opened_at=now,
            statistic=stat,
            threshold=thr,
            message=message,
        )

    def _resolve_stale(self, now: float) -> None:
        """Close alerts of releases that stopped reporting (the fleet moved on)."""
        quiet = now - self.window * (2 * self.rule.m + 2)
        with self.db.session() as s:
            for alert in s.scalars(select(DriftAlert).where(DriftAlert.state == "open")).all():
                recent = s.scalar(
                    select(DriftEvaluation.id)
                    .where(
                        DriftEvaluation.model == alert.model,
                        DriftEvaluation.release == alert.release,
                        DriftEvaluation.group == alert.group,
                        DriftEvaluation.bucket_start >= quiet,
                    )
                    .limit(1)
                )
                if recent is None and alert.opened_at < quiet:
                    alert.state, alert.resolved_at = "resolved", now
                    alert.message += " (resolved: no data from this release any more)"


def _sum_partials(
    parts: Sequence[DriftPartial],
) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64] | None]:
    counts: npt.NDArray[np.int64] | None = None
    outputs: npt.NDArray[np.int64] | None = None
    for p in parts:
        if p.input_counts:
            c = decode_counts(p.input_counts, (p.n_features, p.bins))
            counts = c if counts is None else (counts + c if counts.shape == c.shape else counts)
        if p.output_counts:
            o = decode_counts(p.output_counts, (len(p.output_counts) // 8,))
            outputs = (
                o if outputs is None else (outputs + o if outputs.shape == o.shape else outputs)
            )
    return counts, outputs
