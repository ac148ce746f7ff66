"""Published releases (read from the signed TUF targets metadata)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from cloud.api.auth import Viewer
from cloud.api.deps import Ctx
from cloud.releases import UnknownReleaseError

__all__ = ["router"]

router = APIRouter(prefix="/api/v1/releases", tags=["releases"])


@router.get("")
def list_releases(ctx: Ctx, _who: Viewer, model: str | None = None) -> list[dict[str, Any]]:
    return [m.model_dump(mode="json", by_alias=True) for m in ctx.releases.releases(model)]


@router.get("/{model}/{release}")
def get_release(ctx: Ctx, _who: Viewer, model: str, release: int) -> dict[str, Any]:
    try:
        return ctx.releases.get(model, release).model_dump(mode="json", by_alias=True)
    except UnknownReleaseError as e:
        raise HTTPException(404, str(e)) from e
