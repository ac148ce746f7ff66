"""Building one candidate: the pipeline run behind ``Registry.run``.

Reads the source and datasets back from the blob store, runs
``cloud.pipeline.gate.run_pipeline`` and ``build_artifacts``, stores the
built files as blobs and records the candidate as ready with its lineage.
Kept apart from the service because it is the only part that needs
TensorFlow (imported lazily by the pipeline).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.pipeline.artifacts import build_artifacts, toolchain_versions
from cloud.pipeline.gate import run_pipeline
from cloud.registry import files
from cloud.registry.records import build_json
from cloud.registry.tables import Candidate, CandidateStatus, Lineage

if TYPE_CHECKING:
    from cloud.registry.options import QuantizeOptions
    from cloud.registry.service import Registry

__all__ = ["build_candidate"]

log = logging.getLogger(__name__)

_MAX_VERSION = 32


def build_candidate(
    registry: Registry,
    candidate_id: int,
    kind: str,
    source_sha: str,
    calibration_sha: str | None,
    eval_sha: str | None,
    options: QuantizeOptions,
    *,
    report: Callable[[str, float], None],
    share: float,
) -> None:
    """Run the pipeline for a candidate and record it ready; raise on any failure."""
    started = time.perf_counter()
    report("load model and data", 0.0)
    blobs = registry.blobs
    calibration = None
    if calibration_sha is not None:
        calibration = files.check_dataset(blobs.path(calibration_sha), "calibration data")
    evals = None
    if eval_sha is not None:
        evals = files.check_dataset(blobs.path(eval_sha), "evaluation data")

    def pipeline_progress(step: str, fraction: float) -> None:
        if step != "done":  # the build goes on after the pipeline
            report(step, fraction * share)

    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        # Verify the stored source before trusting it with a build.
        blobs.read(source_sha)
        model_path = files.materialize_source(blobs.path(source_sha), kind, Path(tmp))
        result = run_pipeline(
            model_path,
            calibration,
            evals,
            mode=options.mode,
            gate=options.gate,
            fallback=options.fallback,
            seed=options.seed,
            progress=pipeline_progress,
            max_calibration_samples=options.max_calibration_samples,
        )
        report("build release artifacts", share)
        artifacts = build_artifacts(
            result,
            seed=options.seed,
            selftest_count=options.selftest_count,
            drift_bins=options.drift_bins,
            labels=options.labels,
        )
    model_sha = blobs.put_bytes(artifacts.model_bytes)
    selftest_sha = blobs.put_bytes(artifacts.selftest_bytes)
    baseline_sha = None
    if artifacts.baseline_bytes is not None:
        baseline_sha = blobs.put_bytes(artifacts.baseline_bytes)
    versions = toolchain_versions()
    now = time.time()
    with registry.db.session() as s:
        row = s.get(Candidate, candidate_id)
        assert row is not None
        for sha, what, data in (
            (model_sha, "model", artifacts.model_bytes),
            (selftest_sha, "selftest", artifacts.selftest_bytes),
            (baseline_sha, "baseline", artifacts.baseline_bytes),
        ):
            if sha is not None and data is not None:
                registry.record_artifact(s, sha, what, len(data), what, row.created_by, now)
        lineage = Lineage(
            model_id=row.model_id,
            source_sha256=source_sha,
            dataset_sha256=result.dataset_sha256,
            calibration_sha256=calibration_sha,
            eval_sha256=eval_sha,
            tensorflow_version=versions["tensorflow"][:_MAX_VERSION],
            keras_version=versions["keras"][:_MAX_VERSION],
            litert_version=versions["litert"][:_MAX_VERSION],
            requested_mode=options.mode,
            mode=result.mode,
            parameters={
                **options.to_json(),
                "source_kind": result.source.kind,
                "pipeline_source_sha256": result.source.sha256,
            },
            metrics=dict(artifacts.metrics),
            decisions=list(result.decisions),
            created_by=row.created_by,
            created_at=now,
        )
        s.add(lineage)
        s.flush()
        row.lineage_id = lineage.id
        row.mode = result.mode
        row.model_sha256, row.selftest_sha256, row.baseline_sha256 = (
            model_sha,
            selftest_sha,
            baseline_sha,
        )
        row.build = build_json(artifacts)
        row.decisions = list(result.decisions)
        row.status, row.progress, row.step = CandidateStatus.READY, 1.0, "done"
        row.finished_at = now
    report("done", 1.0)
    log.info(
        "candidate ready",
        extra={
            "candidate": candidate_id,
            "mode": result.mode,
            "bytes": len(artifacts.model_bytes),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
