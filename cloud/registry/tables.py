"""Registry tables: models, their source files, candidates, lineage and releases.

One row per thing that happened, never rewritten after the fact except for
the status of a candidate while its job runs:

* ``RegistryModel``   a model name operators release under.
* ``Artifact``        a file kept in the content-addressed blob store (a model
  source, a dataset, a built ``.tflite``, self-test vectors, a drift baseline).
* ``ModelSource``     a source file added to a model (``.keras``, SavedModel
  ``.zip``, ``.tflite``): what ``model add`` records.
* ``Lineage``         where a build came from: source and dataset hashes,
  converter and runtime versions, parameters, metrics, gate decisions, who, when.
* ``Candidate``       one quantize run: its status while running, then its
  built files and lineage; released at most once.
* ``ReleaseRecord``   a release published into the signed TUF repository.

JSON columns use SQLAlchemy's generic ``JSON`` type (``json`` on PostgreSQL,
text on SQLite); times are UNIX seconds as floats, like ``cloud.auth``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from cloud.db import Base

__all__ = [
    "Artifact",
    "Candidate",
    "CandidateStatus",
    "Lineage",
    "ModelSource",
    "RegistryModel",
    "ReleaseRecord",
]

#: sha256 hex digests are 64 characters.
_SHA = 64


class CandidateStatus:
    """Life of a candidate: queued -> running -> ready | failed; ready -> released."""

    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"
    RELEASED = "released"
    ACTIVE = (QUEUED, RUNNING)


class RegistryModel(Base):
    __tablename__ = "registry_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    description: Mapped[str] = mapped_column(String(1024), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)

    sources: Mapped[list[ModelSource]] = relationship(
        back_populates="model", order_by="ModelSource.id"
    )


class Artifact(Base):
    __tablename__ = "registry_artifacts"

    sha256: Mapped[str] = mapped_column(String(_SHA), primary_key=True)
    #: ``keras``, ``saved_model_zip``, ``tflite``, ``dataset``, ``model``,
    #: ``selftest``, ``baseline``: what the bytes are, for people and listings.
    kind: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    #: The name it was uploaded under (informational; never used as a path).
    filename: Mapped[str] = mapped_column(String(255), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class ModelSource(Base):
    __tablename__ = "registry_model_sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id"), index=True)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("registry_artifacts.sha256"))
    #: ``keras``, ``saved_model_zip`` or ``tflite``.
    kind: Mapped[str] = mapped_column(String(32))
    #: Sample shape (batch excluded) and dtype of the single input, when known
    #: at upload; lets bad calibration data be refused before any job runs.
    input_shape: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    input_dtype: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)

    model: Mapped[RegistryModel] = relationship(back_populates="sources")
    artifact: Mapped[Artifact] = relationship()


class Lineage(Base):
    __tablename__ = "registry_lineage"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id"), index=True)
    source_sha256: Mapped[str] = mapped_column(String(_SHA))
    #: Hash of the arrays the pipeline used (calibration + evaluation).
    dataset_sha256: Mapped[str] = mapped_column(String(_SHA))
    calibration_sha256: Mapped[str | None] = mapped_column(String(_SHA), nullable=True)
    eval_sha256: Mapped[str | None] = mapped_column(String(_SHA), nullable=True)
    tensorflow_version: Mapped[str] = mapped_column(String(32))
    keras_version: Mapped[str] = mapped_column(String(32))
    litert_version: Mapped[str] = mapped_column(String(32))
    requested_mode: Mapped[str] = mapped_column(String(16))
    mode: Mapped[str] = mapped_column(String(16))
    #: Mode, gate thresholds, fallback, seed, sample bounds: everything needed to redo it.
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    #: The gate's decisions, in the order they were taken.
    decisions: Mapped[list[str]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Candidate(Base):
    __tablename__ = "registry_candidates"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id"), index=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("registry_model_sources.id"))
    status: Mapped[str] = mapped_column(String(16), index=True)
    #: Fraction done (0..1) and the step running, while the job runs.
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[str] = mapped_column(String(64), default="")
    #: Why the job failed, in words an operator can act on.
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: ``host:pid`` of the process running the job, to spot jobs orphaned by a restart.
    runner: Mapped[str] = mapped_column(String(128), default="")
    requested_mode: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    calibration_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("registry_artifacts.sha256"), nullable=True
    )
    eval_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("registry_artifacts.sha256"), nullable=True
    )
    # Set once the build succeeded.
    mode: Mapped[str | None] = mapped_column(String(16), nullable=True)
    model_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("registry_artifacts.sha256"), nullable=True
    )
    selftest_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("registry_artifacts.sha256"), nullable=True
    )
    baseline_sha256: Mapped[str | None] = mapped_column(
        ForeignKey("registry_artifacts.sha256"), nullable=True
    )
    #: ``ReleaseArtifacts`` fields other than the file bytes (specs, metrics, ops ...).
    build: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    lineage_id: Mapped[int | None] = mapped_column(ForeignKey("registry_lineage.id"), nullable=True)
    decisions: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    model: Mapped[RegistryModel] = relationship()
    lineage: Mapped[Lineage | None] = relationship()


class ReleaseRecord(Base):
    __tablename__ = "registry_releases"
    __table_args__ = (UniqueConstraint("model_id", "release", name="uq_registry_release"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("registry_models.id"), index=True)
    release: Mapped[int] = mapped_column(Integer)
    #: At most one release per candidate: a candidate is published once.
    candidate_id: Mapped[int | None] = mapped_column(
        ForeignKey("registry_candidates.id"), nullable=True, unique=True
    )
    lineage_id: Mapped[int] = mapped_column(ForeignKey("registry_lineage.id"))
    quantization: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(255))
    model_sha256: Mapped[str] = mapped_column(String(_SHA))
    size_bytes: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    published_by: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[float] = mapped_column(Float)

    model: Mapped[RegistryModel] = relationship()
    lineage: Mapped[Lineage] = relationship()
