"""Rollouts: start, watch, pause, resume, abort; recall and take down a release.

Bad requests change nothing: an unknown release is a 404, a selection with no
device that could take the release a 422, a selection overlapping a running
rollout or an action the rollout's state forbids a 409 — each with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.auth import Admin, Operator, Viewer
from cloud.api.deps import Ctx
from cloud.auth import Role
from cloud.releases import UnknownReleaseError
from cloud.rollouts.service import RolloutConflictError, RolloutNotFoundError, SelectionError
from cloud.rollouts.spec import DeviceStatus, RolloutSpec, RolloutState
from shared.errors import EdgefleetError, TransferError

__all__ = ["router"]

router = APIRouter(prefix="/api/v1", tags=["rollouts"])

Reason = Annotated[str, Field(max_length=500)]
ReleaseNo = Annotated[int, Path(ge=1, le=2**53)]


class ActionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Reason = ""


class ResumeIn(ActionIn):
    #: Start the next wave now, accepting the current one as it stands.
    advance: bool = False


class AbortIn(ActionIn):
    #: Point every device offered the release back at the model it ran before.
    rollback: bool = True


class RecallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    #: The release to go back to (default: the newest earlier one).
    to_release: Annotated[int, Field(ge=1)] | None = None
    #: Also delist the release's targets, so no device can fetch it again.
    take_down: bool = False


#: HTTP status of each refusal, first match wins; any other ``EdgefleetError`` is a 400.
_STATUS: tuple[tuple[type[EdgefleetError], int], ...] = (
    (UnknownReleaseError, 404),
    (RolloutNotFoundError, 404),
    (SelectionError, 422),
    (RolloutConflictError, 409),
    (TransferError, 503),
)


@contextmanager
def _refusals_as_http() -> Iterator[None]:
    """Raise what the services refuse as an HTTP error whose detail is their reason."""
    try:
        yield
    except EdgefleetError as e:
        status = next((code for kind, code in _STATUS if isinstance(e, kind)), 400)
        raise HTTPException(status, str(e)) from e


@router.post("/rollouts", status_code=201)
def start_rollout(ctx: Ctx, who: Operator, body: RolloutSpec) -> dict[str, Any]:
    if ctx.mqtt is None:
        raise HTTPException(503, "the cloud has no broker connection")
    with _refusals_as_http():
        return ctx.rollouts.start(body, who.name)


@router.get("/rollouts")
def list_rollouts(
    ctx: Ctx,
    _who: Viewer,
    state: RolloutState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    return ctx.rollouts.list(state=state.value if state else None, limit=limit)


@router.get("/rollouts/{rollout_id}")
def get_rollout(ctx: Ctx, _who: Viewer, rollout_id: str) -> dict[str, Any]:
    with _refusals_as_http():
        return ctx.rollouts.status(rollout_id)


@router.get("/rollouts/{rollout_id}/events")
def rollout_events(
    ctx: Ctx,
    _who: Viewer,
    rollout_id: str,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> list[dict[str, Any]]:
    with _refusals_as_http():
        return ctx.rollouts.events(rollout_id, after=after, limit=limit)


@router.get("/rollouts/{rollout_id}/devices")
def rollout_devices(
    ctx: Ctx, _who: Viewer, rollout_id: str, status: DeviceStatus | None = None
) -> list[dict[str, Any]]:
    with _refusals_as_http():
        return ctx.rollouts.devices(rollout_id, status.value if status else None)


@router.post("/rollouts/{rollout_id}/pause")
def pause_rollout(ctx: Ctx, who: Operator, rollout_id: str, body: ActionIn) -> dict[str, Any]:
    with _refusals_as_http():
        return ctx.rollouts.pause(rollout_id, who.name, body.reason)


@router.post("/rollouts/{rollout_id}/resume")
def resume_rollout(ctx: Ctx, who: Operator, rollout_id: str, body: ResumeIn) -> dict[str, Any]:
    with _refusals_as_http():
        return ctx.rollouts.resume(rollout_id, who.name, body.reason, advance=body.advance)


@router.post("/rollouts/{rollout_id}/abort")
def abort_rollout(ctx: Ctx, who: Operator, rollout_id: str, body: AbortIn) -> dict[str, Any]:
    with _refusals_as_http():
        return ctx.rollouts.abort(rollout_id, who.name, body.reason, rollback=body.rollback)


@router.post("/releases/{model}/{release}/recall")
def recall_release(
    ctx: Ctx, who: Operator, model: str, release: ReleaseNo, body: RecallIn
) -> dict[str, Any]:
    """Stop a bad release fleet-wide and roll back, in one call. ``take_down`` needs
    an admin token, as ``DELETE /releases/{model}/{release}`` does."""
    if body.take_down and who.role.rank < Role.ADMIN.rank:
        raise HTTPException(
            403,
            f"token {who.name!r} has role {who.role.value}; take_down needs admin: recall "
            "without it, and have an admin take the release down",
        )
    if ctx.mqtt is None:
        raise HTTPException(503, "the cloud has no broker connection")
    with _refusals_as_http():
        return ctx.rollouts.recall(
            model,
            release,
            who.name,
            body.reason,
            to_release=body.to_release,
            take_down=body.take_down,
        )


@router.delete("/releases/{model}/{release}")
def take_down_release(ctx: Ctx, _who: Admin, model: str, release: ReleaseNo) -> dict[str, Any]:
    """Delist a release's targets: no device can fetch it any more (running devices
    keep it until told otherwise: recall first)."""
    with _refusals_as_http():
        paths = ctx.releases.take_down(model, release)
    return {"model": model, "release": release, "taken_down": paths}
