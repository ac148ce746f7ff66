"""The model registry service: add models, build release candidates, release them.

No HTTP here: the API router and the CLI both call this. The flow is

1. ``add_model``: check a model file (``.keras``, SavedModel ``.zip``,
   ``.tflite``) and keep it in the blob store as a new source of a model.
2. ``submit`` + ``run`` (or ``quantize``, which does both): run the pipeline
   (convert, evaluate, gate, fall back) and ``build_artifacts`` on the latest
   source, and keep the result as a *candidate*, with its metrics, gate
   decisions and lineage. Nothing is published. A failure (does not convert,
   wrong calibration shape, unsupported op, gate) is recorded on the
   candidate with its reason and raised.
3. ``release``: publish a ready candidate through ``ReleaseService.publish``,
   which signs it into the TUF repository and records the release.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from cloud.config import CloudSettings
from cloud.db import Database
from cloud.pipeline.convert import CALIBRATED_MODES
from cloud.pipeline.gate import ProgressCallback
from cloud.pipeline.sources import MAX_DATASET_FILE_BYTES, MAX_MODEL_FILE_BYTES
from cloud.registry import files
from cloud.registry.blobs import BlobStore
from cloud.registry.errors import ConflictError, UnknownEntryError
from cloud.registry.options import QuantizeOptions
from cloud.registry.records import artifacts_from, clip_who, get_or_create_model
from cloud.registry.schemas import (
    CandidatePublic,
    ModelDetail,
    ModelSummary,
    ReleasePublic,
    SourcePublic,
)
from cloud.registry.tables import (
    Artifact,
    Candidate,
    CandidateStatus,
    ModelSource,
    RegistryModel,
    ReleaseRecord,
)
from cloud.releases import ReleaseService
from cloud.tuf_repo import ReleaseRepository
from shared.errors import ConfigError, PipelineError
from shared.messages import MODEL_NAME_PATTERN

__all__ = ["QuantizeOptions", "Registry"]

log = logging.getLogger(__name__)

_MAX_DESCRIPTION = 1024
#: Share of the progress bar the pipeline gets; building the artifacts takes the rest.
_PIPELINE_SHARE = 0.9


def _runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """Models, candidates and releases in one database, blob store and TUF repository."""

    def __init__(self, db: Database, repo: ReleaseRepository, blob_root: Path) -> None:
        self.db = db
        self.repo = repo
        self.blobs = BlobStore(blob_root)
        self.releases = ReleaseService(repo, db=db)

    @classmethod
    def from_settings(cls, settings: CloudSettings) -> Registry:
        """Open (or create) the data dir's database, repository and blob store."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.db_url)
        db.create_all()
        repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
        return cls(db, repo, blob_root_of(settings))

    # -- models ---------------------------------------------------------------

    def add_model(
        self,
        name: str,
        path: Path,
        *,
        who: str,
        filename: str | None = None,
        description: str | None = None,
    ) -> SourcePublic:
        """Check the model file at ``path`` and record it as the newest source of ``name``."""
        check_model_name(name)
        if description is not None and len(description) > _MAX_DESCRIPTION:
            raise ConfigError(f"a description has at most {_MAX_DESCRIPTION} characters")
        filename = Path(filename or Path(path).name).name[:255]
        kind = files.source_kind(filename)
        with tempfile.TemporaryDirectory(prefix="edgefleet-add-") as tmp:
            facts = files.inspect_source(Path(path), kind, Path(tmp))
        sha, size = self.blobs.put_file(Path(path), MAX_MODEL_FILE_BYTES)
        now = time.time()
        with self.db.session() as s:
            model = get_or_create_model(s, name, who, now, description)
            self.record_artifact(s, sha, kind, size, filename, who, now)
            source = ModelSource(
                model_id=model.id,
                artifact_sha256=sha,
                kind=kind,
                input_shape=None if facts.input_shape is None else list(facts.input_shape),
                input_dtype=facts.input_dtype,
                created_by=clip_who(who),
                created_at=now,
            )
            s.add(source)
            s.flush()
            log.info("model source added", extra={"model": name, "sha256": sha, "kind": kind})
            return SourcePublic.of(source)

    def add_dataset(self, path: Path, *, who: str, filename: str, what: str) -> str:
        """Check an ``.npz`` dataset and keep it in the blob store; return its sha256."""
        files.check_dataset(Path(path), what)
        sha, size = self.blobs.put_file(Path(path), MAX_DATASET_FILE_BYTES)
        with self.db.session() as s:
            self.record_artifact(
                s, sha, "dataset", size, Path(filename).name[:255], who, time.time()
            )
        return sha

    # -- candidates -----------------------------------------------------------

    def submit(
        self,
        name: str,
        options: QuantizeOptions,
        *,
        who: str,
        calibration: str | None = None,
        eval_set: str | None = None,
        source_id: int | None = None,
    ) -> CandidatePublic:
        """Check a build request and record it as a queued candidate (``run`` builds it).

        ``calibration`` and ``eval_set`` are sha256s returned by ``add_dataset``.
        """
        options.check()
        with self.db.session() as s:
            model = self._model(s, name)
            source = self._source(s, model, source_id)
            facts = files.SourceFacts(
                kind=source.kind,
                input_shape=None if source.input_shape is None else tuple(source.input_shape),
            )
            if calibration is None and options.mode in CALIBRATED_MODES and source.kind != "tflite":
                raise PipelineError(
                    f"mode {options.mode} needs calibration data (representative inputs); "
                    "none was given"
                )
            if calibration is None and eval_set is None:
                raise PipelineError(
                    "give calibration or evaluation data: every candidate is judged on data"
                )
            for sha, what in ((calibration, "calibration data"), (eval_set, "evaluation data")):
                if sha is not None:
                    files.check_samples(self._dataset(sha, what), facts, what)
            candidate = Candidate(
                model_id=model.id,
                source_id=source.id,
                status=CandidateStatus.QUEUED,
                runner=_runner_id(),
                requested_mode=options.mode,
                parameters=options.to_json(),
                calibration_sha256=calibration,
                eval_sha256=eval_set,
                decisions=[],
                created_by=clip_who(who),
                created_at=time.time(),
            )
            s.add(candidate)
            s.flush()
            return CandidatePublic.of(candidate, None)

    def run(self, candidate_id: int, progress: ProgressCallback | None = None) -> CandidatePublic:
        """Build a queued candidate. On failure the reason is recorded, then raised."""
        with self.db.session() as s:
            row = self._candidate(s, candidate_id)
            if row.status != CandidateStatus.QUEUED:
                raise ConflictError(f"candidate {candidate_id} is {row.status}, not queued")
            row.status, row.runner, row.step = CandidateStatus.RUNNING, _runner_id(), "starting"
        try:
            self._build(candidate_id, progress)
        except Exception as e:
            reason = (
                str(e)
                if isinstance(e, (PipelineError, ConfigError))
                else (f"internal error: {type(e).__name__}: {e}")
            )
            log.warning("candidate failed", extra={"candidate": candidate_id, "reason": reason})
            with self.db.session() as s:
                row = self._candidate(s, candidate_id)
                row.status, row.error, row.finished_at = CandidateStatus.FAILED, reason, time.time()
            raise
        return self.candidate(candidate_id)

    def abandon(self, candidate_id: int, reason: str) -> None:
        """Mark a queued candidate failed without running it (e.g. the queue was full)."""
        with self.db.session() as s:
            row = self._candidate(s, candidate_id)
            if row.status == CandidateStatus.QUEUED:
                row.status, row.error, row.finished_at = CandidateStatus.FAILED, reason, time.time()

    def quantize(
        self,
        name: str,
        options: QuantizeOptions,
        *,
        who: str,
        calibration: Path | None = None,
        eval_set: Path | None = None,
        source_id: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> CandidatePublic:
        """``add_dataset`` + ``submit`` + ``run`` in this thread, for local use."""
        calib = None
        if calibration is not None:
            calib = self.add_dataset(
                calibration, who=who, filename=Path(calibration).name, what="calibration data"
            )
        evals = None
        if eval_set is not None:
            evals = self.add_dataset(
                eval_set, who=who, filename=Path(eval_set).name, what="evaluation data"
            )
        queued = self.submit(
            name, options, who=who, calibration=calib, eval_set=evals, source_id=source_id
        )
        return self.run(queued.id, progress)

    def _build(self, candidate_id: int, progress: ProgressCallback | None) -> None:
        from cloud.registry.build import build_candidate

        with self.db.session() as s:
            row = self._candidate(s, candidate_id)
            source = s.get(ModelSource, row.source_id)
            assert source is not None
            job = (
                source.kind,
                source.artifact_sha256,
                row.calibration_sha256,
                row.eval_sha256,
                QuantizeOptions.from_json(row.parameters),
            )

        def report(step: str, fraction: float) -> None:
            with self.db.session() as s:
                r = self._candidate(s, candidate_id)
                r.step, r.progress = step[:64], round(min(1.0, max(r.progress, fraction)), 4)
            if progress is not None:
                progress(step, fraction)

        build_candidate(self, candidate_id, *job, report=report, share=_PIPELINE_SHARE)

    def release(self, candidate_id: int, *, who: str) -> ReleasePublic:
        """Publish a ready candidate as the next release of its model."""
        from cloud.pipeline.evaluate import inspect_model

        with self.db.session() as s:
            row = self._candidate(s, candidate_id)
            if row.status == CandidateStatus.RELEASED:
                number = s.scalar(
                    select(ReleaseRecord.release).where(ReleaseRecord.candidate_id == row.id)
                )
                raise ConflictError(f"candidate {candidate_id} is already release {number}")
            if row.status == CandidateStatus.FAILED:
                raise ConflictError(
                    f"candidate {candidate_id} failed and cannot be released: {row.error}"
                )
            if row.status != CandidateStatus.READY:
                raise ConflictError(f"candidate {candidate_id} is still {row.status}; wait for it")
            name = row.model.name
            artifacts = artifacts_from(row, self.blobs)
        # The runtime that judged the candidate may have changed since: check again.
        inspect_model(artifacts.model_bytes)
        manifest = self.releases.publish(
            name, artifacts, published_by=who, candidate_id=candidate_id
        )
        return self.release_record(name, manifest.release)

    # -- reading --------------------------------------------------------------

    def list_models(self) -> list[ModelSummary]:
        with self.db.session() as s:
            models = s.scalars(select(RegistryModel).order_by(RegistryModel.name)).all()
            return [self._summary(s, m) for m in models]

    def show(self, name: str) -> ModelDetail:
        with self.db.session() as s:
            model = self._model(s, name)
            return ModelDetail(
                model=self._summary(s, model),
                sources=[SourcePublic.of(src) for src in model.sources],
                candidates=self._candidates(s, model),
                releases=[ReleasePublic.of(r) for r in self._releases(s, model)],
            )

    def candidate(self, candidate_id: int, model: str | None = None) -> CandidatePublic:
        with self.db.session() as s:
            row = self._candidate(s, candidate_id)
            if model is not None and row.model.name != model:
                raise UnknownEntryError(f"model {model!r} has no candidate {candidate_id}")
            return CandidatePublic.of(row, self._release_number(s, row.id))

    def candidates(self, name: str) -> list[CandidatePublic]:
        with self.db.session() as s:
            return self._candidates(s, self._model(s, name))

    def release_records(self, name: str) -> list[ReleasePublic]:
        with self.db.session() as s:
            return [ReleasePublic.of(r) for r in self._releases(s, self._model(s, name))]

    def release_record(self, name: str, release: int) -> ReleasePublic:
        for r in self.release_records(name):
            if r.release == release:
                return r
        raise UnknownEntryError(f"release {release} of {name!r} is not in the registry")

    def recover_interrupted(self) -> int:
        """Mark jobs whose process on this host died as failed; return how many."""
        host = socket.gethostname()
        count = 0
        with self.db.session() as s:
            rows = s.scalars(
                select(Candidate).where(Candidate.status.in_(CandidateStatus.ACTIVE))
            ).all()
            for row in rows:
                runner_host, _, pid = row.runner.rpartition(":")
                if runner_host != host or not pid.isdigit() or _pid_alive(int(pid)):
                    continue
                row.status, row.finished_at = CandidateStatus.FAILED, time.time()
                row.error = (
                    f"interrupted: the process {row.runner} running this build stopped "
                    "before it finished; submit it again"
                )
                count += 1
        if count:
            log.warning("marked interrupted builds as failed", extra={"count": count})
        return count

    # -- helpers --------------------------------------------------------------

    def record_artifact(
        self, s: Any, sha: str, kind: str, size: int, filename: str, who: str, now: float
    ) -> Artifact:
        """The artifact row for blob ``sha``, added unless it exists (uploads deduplicate)."""
        row = s.get(Artifact, sha)
        if row is not None:
            return row  # type: ignore[no-any-return]
        row = Artifact(
            sha256=sha,
            kind=kind,
            size_bytes=size,
            filename=filename,
            created_by=clip_who(who),
            created_at=now,
        )
        try:
            # A savepoint: the same bytes uploaded twice at once must not fail either upload.
            with s.begin_nested():
                s.add(row)
        except IntegrityError:
            row = s.get(Artifact, sha)
        return row  # type: ignore[no-any-return]

    def _dataset(self, sha: str, what: str) -> Any:
        return files.check_dataset(self.blobs.path(sha), what)

    @staticmethod
    def _model(s: Any, name: str) -> RegistryModel:
        model = s.scalar(select(RegistryModel).where(RegistryModel.name == name))
        if model is None:
            raise UnknownEntryError(f"model {name!r} is not in the registry; add it first")
        return model  # type: ignore[no-any-return]

    @staticmethod
    def _source(s: Any, model: RegistryModel, source_id: int | None) -> ModelSource:
        if source_id is None:
            if not model.sources:
                raise ConflictError(f"model {model.name!r} has no source file; add one first")
            return model.sources[-1]
        for src in model.sources:
            if src.id == source_id:
                return src
        raise UnknownEntryError(f"model {model.name!r} has no source {source_id}")

    @staticmethod
    def _candidate(s: Any, candidate_id: int) -> Candidate:
        row = s.get(Candidate, candidate_id)
        if row is None:
            raise UnknownEntryError(f"candidate {candidate_id} does not exist")
        return row  # type: ignore[no-any-return]

    @staticmethod
    def _release_number(s: Any, candidate_id: int) -> int | None:
        return s.scalar(  # type: ignore[no-any-return]
            select(ReleaseRecord.release).where(ReleaseRecord.candidate_id == candidate_id)
        )

    def _candidates(self, s: Any, model: RegistryModel) -> list[CandidatePublic]:
        rows = s.scalars(
            select(Candidate).where(Candidate.model_id == model.id).order_by(Candidate.id)
        ).all()
        return [CandidatePublic.of(r, self._release_number(s, r.id)) for r in rows]

    @staticmethod
    def _releases(s: Any, model: RegistryModel) -> list[ReleaseRecord]:
        return list(
            s.scalars(
                select(ReleaseRecord)
                .where(ReleaseRecord.model_id == model.id)
                .order_by(ReleaseRecord.release)
            ).all()
        )

    @staticmethod
    def _summary(s: Any, model: RegistryModel) -> ModelSummary:
        count = s.scalar(select(func.count()).where(Candidate.model_id == model.id)) or 0
        latest = s.scalar(
            select(func.max(ReleaseRecord.release)).where(ReleaseRecord.model_id == model.id)
        )
        return ModelSummary.of(model, int(count), latest)


def blob_root_of(settings: CloudSettings) -> Path:
    """Where the registry keeps blobs in a data dir."""
    return settings.data_dir / "registry"


def check_model_name(name: str) -> None:
    if not re.match(MODEL_NAME_PATTERN, name or ""):
        raise ConfigError(
            f"invalid model name {name!r}: use 1-63 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
