"""Public views of registry records: what the API returns and the CLI prints.

Plain pydantic models built from table rows inside a session, so callers
never hold a lazy-loading ORM object after its session closed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from cloud.registry.tables import (
    Candidate,
    Lineage,
    ModelSource,
    RegistryModel,
    ReleaseRecord,
)

__all__ = [
    "CandidatePublic",
    "LineagePublic",
    "ModelDetail",
    "ModelSummary",
    "ReleasePublic",
    "SourcePublic",
]


class _Public(BaseModel):
    model_config = ConfigDict(frozen=True)


class SourcePublic(_Public):
    id: int
    model: str
    kind: str
    sha256: str
    size_bytes: int
    filename: str
    input_shape: list[int] | None
    input_dtype: str | None
    created_by: str
    created_at: float

    @classmethod
    def of(cls, row: ModelSource) -> SourcePublic:
        return cls(
            id=row.id,
            model=row.model.name,
            kind=row.kind,
            sha256=row.artifact_sha256,
            size_bytes=row.artifact.size_bytes,
            filename=row.artifact.filename,
            input_shape=row.input_shape,
            input_dtype=row.input_dtype,
            created_by=row.created_by,
            created_at=row.created_at,
        )


class LineagePublic(_Public):
    id: int
    source_sha256: str
    dataset_sha256: str
    calibration_sha256: str | None
    eval_sha256: str | None
    tensorflow_version: str
    keras_version: str
    litert_version: str
    requested_mode: str
    mode: str
    parameters: dict[str, Any]
    metrics: dict[str, float]
    decisions: list[str]
    created_by: str
    created_at: float

    @classmethod
    def of(cls, row: Lineage) -> LineagePublic:
        return cls(
            id=row.id,
            source_sha256=row.source_sha256,
            dataset_sha256=row.dataset_sha256,
            calibration_sha256=row.calibration_sha256,
            eval_sha256=row.eval_sha256,
            tensorflow_version=row.tensorflow_version,
            keras_version=row.keras_version,
            litert_version=row.litert_version,
            requested_mode=row.requested_mode,
            mode=row.mode,
            parameters=dict(row.parameters),
            metrics=dict(row.metrics),
            decisions=list(row.decisions),
            created_by=row.created_by,
            created_at=row.created_at,
        )


class CandidatePublic(_Public):
    id: int
    model: str
    source_id: int
    status: str
    progress: float
    step: str
    error: str | None
    requested_mode: str
    mode: str | None
    parameters: dict[str, Any]
    decisions: list[str]
    metrics: dict[str, float]
    size_bytes: int | None
    model_sha256: str | None
    calibration_sha256: str | None
    eval_sha256: str | None
    #: The release number once published.
    release: int | None
    lineage: LineagePublic | None
    created_by: str
    created_at: float
    finished_at: float | None

    @classmethod
    def of(cls, row: Candidate, release: int | None) -> CandidatePublic:
        build = row.build or {}
        return cls(
            id=row.id,
            model=row.model.name,
            source_id=row.source_id,
            status=row.status,
            progress=row.progress,
            step=row.step,
            error=row.error,
            requested_mode=row.requested_mode,
            mode=row.mode,
            parameters=dict(row.parameters),
            decisions=list(row.decisions or []),
            metrics=dict(build.get("metrics", {})),
            size_bytes=build.get("size_bytes"),
            model_sha256=row.model_sha256,
            calibration_sha256=row.calibration_sha256,
            eval_sha256=row.eval_sha256,
            release=release,
            lineage=None if row.lineage is None else LineagePublic.of(row.lineage),
            created_by=row.created_by,
            created_at=row.created_at,
            finished_at=row.finished_at,
        )


class ReleasePublic(_Public):
    model: str
    release: int
    candidate_id: int | None
    quantization: str
    target: str
    model_sha256: str
    size_bytes: int
    metrics: dict[str, float]
    published_by: str
    published_at: float
    lineage: LineagePublic

    @classmethod
    def of(cls, row: ReleaseRecord) -> ReleasePublic:
        return cls(
            model=row.model.name,
            release=row.release,
            candidate_id=row.candidate_id,
            quantization=row.quantization,
            target=row.target,
            model_sha256=row.model_sha256,
            size_bytes=row.size_bytes,
            metrics=dict(row.metrics),
            published_by=row.published_by,
            published_at=row.published_at,
            lineage=LineagePublic.of(row.lineage),
        )


class ModelSummary(_Public):
    name: str
    description: str
    created_by: str
    created_at: float
    sources: int
    candidates: int
    latest_release: int | None

    @classmethod
    def of(cls, row: RegistryModel, candidates: int, latest_release: int | None) -> ModelSummary:
        return cls(
            name=row.name,
            description=row.description,
            created_by=row.created_by,
            created_at=row.created_at,
            sources=len(row.sources),
            candidates=candidates,
            latest_release=latest_release,
        )


class ModelDetail(_Public):
    model: ModelSummary
    sources: list[SourcePublic]
    candidates: list[CandidatePublic]
    releases: list[ReleasePublic]
