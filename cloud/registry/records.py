"""Turning pipeline artifacts into registry rows and back.

``record_release`` is what ``cloud.releases.ReleaseService.publish`` calls,
inside the same transaction that it holds open around the TUF publish, so a
release is in the registry exactly when it is in the signed repository (the
insert runs first: a clash on the release number stops the publish).
``build_json`` / ``artifacts_from`` store a candidate's ``ReleaseArtifacts``
as JSON plus blobs and rebuild it, verified, at release time.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.pipeline.artifacts import ReleaseArtifacts
from cloud.registry.blobs import BlobStore
from cloud.registry.errors import ConflictError
from cloud.registry.tables import (
    Candidate,
    CandidateStatus,
    Lineage,
    RegistryModel,
    ReleaseRecord,
)
from shared.errors import StorageError
from shared.manifest import ReleaseManifest, TensorSpec

__all__ = [
    "artifacts_from",
    "build_json",
    "get_or_create_model",
    "record_release",
    "record_rerelease",
]

_MAX_WHO = 64
_MAX_VERSION = 32


def clip_who(who: str | None) -> str:
    return (who or "unknown")[:_MAX_WHO]


def get_or_create_model(
    s: Session, name: str, who: str, now: float, description: str | None = None
) -> RegistryModel:
    model = s.scalar(select(RegistryModel).where(RegistryModel.name == name))
    if model is None:
        model = RegistryModel(
            name=name, description=description or "", created_by=clip_who(who), created_at=now
        )
        s.add(model)
        s.flush()
    elif description:
        model.description = description
    return model


def build_json(artifacts: ReleaseArtifacts) -> dict[str, Any]:
    """Everything in ``artifacts`` except the file bytes, as JSON."""
    return {
        "selftest_spec": dict(artifacts.selftest_spec_kwargs),
        "drift_spec": None
        if artifacts.drift_spec_kwargs is None
        else dict(artifacts.drift_spec_kwargs),
        "input_spec": artifacts.input_spec.model_dump(mode="json"),
        "output_spec": artifacts.output_spec.model_dump(mode="json"),
        "quantization": artifacts.quantization,
        "metrics": dict(artifacts.metrics),
        "ops": list(artifacts.ops),
        "source": dict(artifacts.source),
        "decisions": list(artifacts.decisions),
        "labels": None if artifacts.labels is None else list(artifacts.labels),
        "size_bytes": len(artifacts.model_bytes),
    }


def artifacts_from(candidate: Candidate, blobs: BlobStore) -> ReleaseArtifacts:
    """Rebuild a ready candidate's ``ReleaseArtifacts``; blobs are re-hashed on read."""
    build = candidate.build
    if build is None or candidate.model_sha256 is None or candidate.selftest_sha256 is None:
        raise StorageError(f"candidate {candidate.id} has no stored build")
    baseline = None if candidate.baseline_sha256 is None else blobs.read(candidate.baseline_sha256)
    return ReleaseArtifacts(
        model_bytes=blobs.read(candidate.model_sha256),
        selftest_bytes=blobs.read(candidate.selftest_sha256),
        selftest_spec_kwargs=dict(build["selftest_spec"]),
        baseline_bytes=baseline,
        drift_spec_kwargs=None if build["drift_spec"] is None else dict(build["drift_spec"]),
        input_spec=TensorSpec.model_validate(build["input_spec"]),
        output_spec=TensorSpec.model_validate(build["output_spec"]),
        quantization=build["quantization"],
        metrics={k: float(v) for k, v in build["metrics"].items()},
        ops=list(build["ops"]),
        source=dict(build["source"]),
        decisions=list(build["decisions"]),
        labels=None if build["labels"] is None else list(build["labels"]),
    )


def lineage_from_artifacts(
    model: RegistryModel, artifacts: ReleaseArtifacts, who: str, now: float
) -> Lineage:
    """Lineage for a release built outside the registry (e.g. ``release digits``)."""
    src = artifacts.source
    return Lineage(
        model_id=model.id,
        source_sha256=src.get("source_sha256", "")[:64],
        dataset_sha256=src.get("dataset_sha256", "")[:64],
        calibration_sha256=None,
        eval_sha256=None,
        tensorflow_version=src.get("tensorflow", "unknown")[:_MAX_VERSION],
        keras_version=src.get("keras", "unknown")[:_MAX_VERSION],
        litert_version=src.get("litert", "unknown")[:_MAX_VERSION],
        requested_mode=src.get("requested_mode", artifacts.quantization)[:16],
        mode=artifacts.quantization,
        parameters={k: v for k, v in src.items() if k in ("seed", "source", "source_kind")},
        metrics=dict(artifacts.metrics),
        decisions=list(artifacts.decisions),
        created_by=clip_who(who),
        created_at=now,
    )


def record_release(
    s: Session,
    manifest: ReleaseManifest,
    artifacts: ReleaseArtifacts,
    *,
    published_by: str | None,
    candidate_id: int | None = None,
    published_at: float | None = None,
) -> ReleaseRecord:
    """Add the rows for a release about to be published; flushes so clashes raise now."""
    import hashlib

    now = time.time() if published_at is None else published_at
    who = clip_who(published_by)
    model = get_or_create_model(s, manifest.model, who, now)
    lineage: Lineage | None = None
    if candidate_id is not None:
        candidate = s.get(Candidate, candidate_id, with_for_update=True)
        if candidate is None or candidate.model_id != model.id:
            raise ConflictError(f"candidate {candidate_id} is not a candidate of {manifest.model}")
        if candidate.status != CandidateStatus.READY:
            raise ConflictError(
                f"candidate {candidate_id} is {candidate.status}; only a ready candidate "
                "can be released"
            )
        candidate.status = CandidateStatus.RELEASED
        lineage = candidate.lineage
    if lineage is None:
        lineage = lineage_from_artifacts(model, artifacts, who, now)
        s.add(lineage)
        s.flush()
    record = ReleaseRecord(
        model_id=model.id,
        release=manifest.release,
        candidate_id=candidate_id,
        lineage_id=lineage.id,
        quantization=manifest.quantization,
        target=manifest.model_target,
        model_sha256=hashlib.sha256(artifacts.model_bytes).hexdigest(),
        size_bytes=len(artifacts.model_bytes),
        metrics=dict(manifest.metrics),
        published_by=who,
        published_at=now,
    )
    return _add_release(s, record, manifest)


def _add_release(s: Session, record: ReleaseRecord, manifest: ReleaseManifest) -> ReleaseRecord:
    s.add(record)
    try:
        s.flush()
    except IntegrityError as e:
        raise ConflictError(
            f"release {manifest.release} of {manifest.model} is already in the registry "
            "(published at the same time by someone else, or delisted from TUF); "
            "nothing was published, try again"
        ) from e
    return record


def record_rerelease(
    s: Session,
    manifest: ReleaseManifest,
    from_release: int,
    model_bytes: bytes,
    *,
    published_by: str | None,
    published_at: float,
) -> ReleaseRecord | None:
    """Add the row of a re-release (a fleet rollback): it shares the lineage of the
    release whose bytes it carries. ``None`` if that release is not in the registry
    (published before the registry existed): there is no lineage to point at."""
    import hashlib

    who = clip_who(published_by)
    model = get_or_create_model(s, manifest.model, who, published_at)
    old = s.scalar(
        select(ReleaseRecord).where(
            ReleaseRecord.model_id == model.id, ReleaseRecord.release == from_release
        )
    )
    if old is None:
        return None
    record = ReleaseRecord(
        model_id=model.id,
        release=manifest.release,
        lineage_id=old.lineage_id,
        quantization=manifest.quantization,
        target=manifest.model_target,
        model_sha256=hashlib.sha256(model_bytes).hexdigest(),
        size_bytes=len(model_bytes),
        metrics={**dict(manifest.metrics)},
        published_by=who,
        published_at=published_at,
    )
    return _add_release(s, record, manifest)
