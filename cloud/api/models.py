"""The model registry over HTTP: upload models, build candidates in the background, release.

* ``POST /api/v1/models`` (operator): multipart ``name``, ``file`` (``.keras``,
  SavedModel ``.zip`` or ``.tflite``), optional ``description`` -> 201, the source.
* ``POST /api/v1/models/{name}/candidates`` (operator): multipart
  ``calibration`` and ``eval_set`` (``.npz`` with ``x``, optional ``y``),
  ``mode``, ``fallback``, gate thresholds (``max_accuracy_drop``,
  ``min_top1_agreement``, ``max_abs_error``, ``max_latency_ratio``,
  ``min_accuracy``), ``seed``, ``labels`` (repeated), ``source_id`` -> 202
  with a job id; the build runs on a background thread.
* ``GET /api/v1/jobs/{id}`` and ``GET /api/v1/models/{name}/candidates/{id}``:
  status (queued, running, ready, failed, released), progress, step, and the
  reason of a failure.
* ``POST /api/v1/models/{name}/candidates/{id}/release`` (operator) -> 201:
  signed into the TUF repository and recorded.
* ``GET /api/v1/models``, ``/models/{name}``, ``/models/{name}/candidates``,
  ``/models/{name}/releases`` (viewer).

Uploads are bounded: a request must state its ``Content-Length`` and is
refused (413) before its body is read when it is too large. Bad input is a
4xx naming the cause; nothing is stored or published for it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from cloud.api.auth import Operator, Viewer
from cloud.api.deps import CloudContext, _ctx
from cloud.pipeline.gate import GateConfig
from cloud.registry import (
    CandidatePublic,
    ConflictError,
    ModelDetail,
    ModelSummary,
    QuantizeOptions,
    QueueFullError,
    Registry,
    ReleasePublic,
    SourcePublic,
    UnknownEntryError,
)
from cloud.registry.blobs import BlobTooLargeError
from cloud.registry.jobs import BuildQueue
from cloud.registry.service import blob_root_of
from shared.errors import (
    ConfigError,
    EdgefleetError,
    PipelineError,
    ReleaseError,
    StorageError,
)

__all__ = ["MAX_DATASET_UPLOAD_BYTES", "MAX_MODEL_UPLOAD_BYTES", "CandidateIn", "router"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["models"])

#: Largest model file accepted over HTTP.
MAX_MODEL_UPLOAD_BYTES = 512 * 1024 * 1024
#: Largest ``.npz`` (calibration or evaluation set) accepted over HTTP.
MAX_DATASET_UPLOAD_BYTES = 1024 * 1024 * 1024
#: Room for the multipart framing and the small form fields around the files.
_FORM_OVERHEAD = 1024 * 1024
_COPY_CHUNK = 1 << 20
_state_lock = threading.Lock()


class Registered:
    """The registry and build queue of one app, created on first use."""

    def __init__(self, registry: Registry, builds: BuildQueue) -> None:
        self.registry, self.builds = registry, builds


def _registered(request: Request, ctx: Annotated[CloudContext, Depends(_ctx)]) -> Registered:
    state = request.app.state
    with _state_lock:
        found: Registered | None = getattr(state, "model_registry", None)
        if found is None:
            registry = Registry(ctx.db, ctx.repo, blob_root_of(ctx.settings))
            registry.recover_interrupted()
            found = Registered(registry, BuildQueue(registry))
            state.model_registry = found
    return found


Reg = Annotated[Registered, Depends(_registered)]
#: Database ids fit a signed 64-bit column; larger path values are a 422, not a 500.
DbId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


class CandidateIn(BaseModel):
    """The form fields of a build request (files aside)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["float32", "dynamic", "float16", "int8", "int16x8"] = "int8"
    fallback: bool = True
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    max_accuracy_drop: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.01
    min_top1_agreement: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.98
    max_abs_error: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    max_latency_ratio: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    min_accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    max_calibration_samples: Annotated[int, Field(ge=1, le=100_000)] = 500
    labels: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=1024)] | None = (
        None
    )
    source_id: Annotated[int, Field(ge=1)] | None = None

    def options(self) -> QuantizeOptions:
        return QuantizeOptions(
            mode=self.mode,
            gate=GateConfig(
                max_accuracy_drop=self.max_accuracy_drop,
                min_top1_agreement=self.min_top1_agreement,
                max_abs_error=self.max_abs_error,
                max_latency_ratio=self.max_latency_ratio,
                min_accuracy=self.min_accuracy,
            ),
            fallback=self.fallback,
            seed=self.seed,
            labels=None if self.labels is None else tuple(self.labels),
            max_calibration_samples=self.max_calibration_samples,
        )


def _http(e: Exception) -> HTTPException:
    """Map a domain error to an HTTP error whose detail names the cause."""
    if isinstance(e, UnknownEntryError):
        return HTTPException(404, str(e))
    if isinstance(e, ConflictError):
        return HTTPException(409, str(e))
    if isinstance(e, QueueFullError):
        return HTTPException(429, str(e))
    if isinstance(e, BlobTooLargeError):
        return HTTPException(413, str(e))
    if isinstance(e, (PipelineError, ConfigError)):
        return HTTPException(422, str(e))
    if isinstance(e, ReleaseError):
        # e.g. the signed repository already holds other bytes under this release's paths
        return HTTPException(409, str(e))
    if isinstance(e, StorageError):
        log.error("registry storage failed: %s", e)
        return HTTPException(500, f"registry storage failed: {e}")
    raise e


def _check_length(request: Request, limit: int) -> int:
    """Refuse a body that is too large before reading it; return its length."""
    raw = request.headers.get("content-length")
    if raw is None:
        raise HTTPException(411, "send the upload with a Content-Length header")
    try:
        length = int(raw)
    except ValueError:
        raise HTTPException(400, f"bad Content-Length {raw!r}") from None
    if length > limit:
        raise HTTPException(413, f"request body of {length} bytes exceeds the limit of {limit}")
    return length


_MULTIPART = "multipart/form-data"
_URLENCODED = "application/x-www-form-urlencoded"


async def _form(request: Request, limit: int, *, files_optional: bool = False) -> FormData:
    length = _check_length(request, limit)
    if length == 0 and files_optional:
        return FormData()  # every field has a default
    ctype = request.headers.get("content-type", "")
    if not (ctype.startswith(_MULTIPART) or (files_optional and ctype.startswith(_URLENCODED))):
        allowed = _MULTIPART + (f" or {_URLENCODED}" if files_optional else "")
        raise HTTPException(415, f"send the request as {allowed}, not {ctype or 'no type'}")
    return await request.form(max_files=4, max_fields=1100)


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise HTTPException(422, f"form field {name!r} must be text, not a file")
    return value


def _file(form: FormData, name: str, *, required: bool) -> UploadFile | None:
    value = form.get(name)
    if value is None or (isinstance(value, UploadFile) and not value.filename):
        if required:
            raise HTTPException(422, f"form field {name!r} (a file) is required")
        return None
    if not isinstance(value, UploadFile):
        raise HTTPException(422, f"form field {name!r} must be a file upload")
    return value


def _save_upload(upload: UploadFile, dest: Path, limit: int, what: str) -> Path:
    """Copy an upload to ``dest``, refusing more than ``limit`` bytes and empty files."""
    size = 0
    upload.file.seek(0)
    with dest.open("wb") as out:
        while chunk := upload.file.read(_COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise BlobTooLargeError(f"{what} is larger than the limit of {limit} bytes")
            out.write(chunk)
    if size == 0:
        raise ConfigError(f"{what} is empty")
    return dest


@router.post("/models", status_code=201)
async def add_model(request: Request, _who: Operator, reg: Reg) -> SourcePublic:
    """Upload a model file as the newest source of a model (created on first upload)."""
    form = await _form(request, MAX_MODEL_UPLOAD_BYTES + _FORM_OVERHEAD)
    try:
        extra = set(form.keys()) - {"name", "file", "description"}
        if extra:
            raise HTTPException(422, f"unknown form fields {sorted(extra)}")
        name = _field(form, "name")
        if not name:
            raise HTTPException(422, "form field 'name' (the model name) is required")
        upload = _file(form, "file", required=True)
        assert upload is not None
        description = _field(form, "description")

        def add() -> SourcePublic:
            with tempfile.TemporaryDirectory(prefix="edgefleet-upload-") as tmp:
                path = _save_upload(
                    upload, Path(tmp) / "model", MAX_MODEL_UPLOAD_BYTES, "the model file"
                )
                return reg.registry.add_model(
                    name, path, who=_who.name, filename=upload.filename, description=description
                )

        return await run_in_threadpool(add)
    except EdgefleetError as e:
        raise _http(e) from e
    finally:
        await form.close()  # removes the spooled upload files


@router.get("/models")
def list_models(_who: Viewer, reg: Reg) -> list[ModelSummary]:
    return reg.registry.list_models()


@router.get("/models/{name}")
def show_model(name: str, _who: Viewer, reg: Reg) -> ModelDetail:
    try:
        return reg.registry.show(name)
    except EdgefleetError as e:
        raise _http(e) from e


def _parse_candidate(form: FormData) -> CandidateIn:
    fields: dict[str, Any] = {}
    for key in set(form.keys()) - {"calibration", "eval_set"}:
        values = form.getlist(key)
        if any(not isinstance(v, str) for v in values):
            raise HTTPException(422, f"form field {key!r} must be text, not a file")
        fields[key] = values if key == "labels" else values[-1]
    try:
        return CandidateIn.model_validate(fields)
    except ValidationError as e:
        reasons = [
            f"{'.'.join(str(p) for p in err['loc']) or 'form'}: {err['msg']}" for err in e.errors()
        ]
        raise HTTPException(422, "; ".join(reasons)) from e


def _submit(
    reg: Registered, name: str, body: CandidateIn, who: str, uploads: dict[str, UploadFile | None]
) -> CandidatePublic:
    registry = reg.registry
    registry.show(name)  # 404 before any dataset is stored
    shas: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-data-") as tmp:
        for key, what in (("calibration", "calibration data"), ("eval_set", "evaluation data")):
            upload = uploads[key]
            shas[key] = None
            if upload is not None:
                path = _save_upload(upload, Path(tmp) / key, MAX_DATASET_UPLOAD_BYTES, what)
                shas[key] = registry.add_dataset(
                    path, who=who, filename=upload.filename or f"{key}.npz", what=what
                )
    candidate = registry.submit(
        name,
        body.options(),
        who=who,
        calibration=shas["calibration"],
        eval_set=shas["eval_set"],
        source_id=body.source_id,
    )
    try:
        reg.builds.submit(candidate.id)
    except QueueFullError as e:
        registry.abandon(candidate.id, str(e))
        raise
    return candidate


@router.post("/models/{name}/candidates", status_code=202)
async def create_candidate(
    name: str, request: Request, response: Response, _who: Operator, reg: Reg
) -> dict[str, Any]:
    """Queue a build (quantize, evaluate, gate) of the model's newest source."""
    form = await _form(request, 2 * MAX_DATASET_UPLOAD_BYTES + _FORM_OVERHEAD, files_optional=True)
    try:
        body = _parse_candidate(form)
        uploads = {key: _file(form, key, required=False) for key in ("calibration", "eval_set")}
        candidate = await run_in_threadpool(_submit, reg, name, body, _who.name, uploads)
    except EdgefleetError as e:
        raise _http(e) from e
    finally:
        await form.close()
    location = f"/api/v1/jobs/{candidate.id}"
    response.headers["Location"] = location
    return {
        "job_id": candidate.id,
        "status": candidate.status,
        "location": location,
        "candidate": candidate.model_dump(mode="json"),
    }


@router.get("/models/{name}/candidates")
def list_candidates(name: str, _who: Viewer, reg: Reg) -> list[CandidatePublic]:
    try:
        return reg.registry.candidates(name)
    except EdgefleetError as e:
        raise _http(e) from e


@router.get("/models/{name}/candidates/{candidate_id}")
def get_candidate(name: str, candidate_id: DbId, _who: Viewer, reg: Reg) -> CandidatePublic:
    try:
        return reg.registry.candidate(candidate_id, model=name)
    except EdgefleetError as e:
        raise _http(e) from e


@router.get("/jobs/{job_id}")
def get_job(job_id: DbId, _who: Viewer, reg: Reg) -> dict[str, Any]:
    """A build job: its status, progress and (when failed) the reason."""
    try:
        c = reg.registry.candidate(job_id)
    except EdgefleetError as e:
        raise _http(e) from e
    return {
        "job_id": c.id,
        "status": c.status,
        "progress": c.progress,
        "step": c.step,
        "error": c.error,
        "model": c.model,
        "mode": c.mode,
        "candidate": f"/api/v1/models/{c.model}/candidates/{c.id}",
    }


@router.post("/models/{name}/candidates/{candidate_id}/release", status_code=201)
def release_candidate(name: str, candidate_id: DbId, _who: Operator, reg: Reg) -> ReleasePublic:
    """Sign a ready candidate into the TUF repository as the model's next release."""
    try:
        reg.registry.candidate(candidate_id, model=name)
        return reg.registry.release(candidate_id, who=_who.name)
    except EdgefleetError as e:
        raise _http(e) from e


@router.get("/models/{name}/releases")
def list_model_releases(name: str, _who: Viewer, reg: Reg) -> list[ReleasePublic]:
    try:
        return reg.registry.release_records(name)
    except EdgefleetError as e:
        raise _http(e) from e
