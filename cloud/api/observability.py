"""Telemetry, drift, alerts, retraining, Prometheus ``/metrics`` and the web dashboard.

Every data route needs a viewer token; ``/metrics`` too (Prometheus sends it
with ``authorization: {credentials_file: ...}`` in its scrape config). The
dashboard page and its script are public static files that hold no data:
the page asks for a token once and keeps it in ``sessionStorage`` (gone when
the tab closes), sending it as a bearer token like any other client. They are
served with a strict Content-Security-Policy (no inline script, no other
origin), and the script writes untrusted text only through ``textContent``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cloud.api.auth import Viewer
from cloud.api.deps import Ctx
from cloud.ingest import queries
from cloud.ingest.services import Observability

__all__ = ["router"]

#: Release numbers are stored in 64-bit columns: larger values are a 422, never a 500.
ReleaseQuery = Annotated[int | None, Query(ge=1, le=2**63 - 1)]

router = APIRouter(tags=["observability"])

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
Minutes = Annotated[float, Query(gt=0, le=7 * 24 * 60)]


def _obs(request: Request) -> Observability:
    obs: Observability = request.app.state.observability
    return obs


# -- dashboard ---------------------------------------------------------------------
@router.get("/dashboard", include_in_schema=False)
def dashboard_redirect() -> RedirectResponse:
    return RedirectResponse("/dashboard/")


@router.get("/dashboard/", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(
        WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_SECURITY_HEADERS
    )


@router.get("/dashboard/{asset}", include_in_schema=False)
def dashboard_asset(asset: str) -> FileResponse:
    media = _ASSETS.get(asset)
    if media is None:
        raise HTTPException(404, "no such dashboard file")
    return FileResponse(WEB_DIR / asset, media_type=media, headers=_SECURITY_HEADERS)


# -- metrics -------------------------------------------------------------------------
@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, _who: Viewer) -> Response:
    return Response(generate_latest(_obs(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- telemetry -----------------------------------------------------------------------
@router.get("/api/v1/telemetry/summary")
def telemetry_summary(ctx: Ctx, _who: Viewer, minutes: Minutes = 5) -> list[dict[str, Any]]:
    """Per release over the last ``minutes``: devices, rates, errors, latency."""
    return queries.release_summary(ctx.db, time.time() - minutes * 60)


@router.get("/api/v1/telemetry/series")
def telemetry_series(
    ctx: Ctx,
    _who: Viewer,
    minutes: Minutes = 15,
    step: Annotated[float | None, Query(ge=1, le=86_400)] = None,
    model: str | None = None,
    release: ReleaseQuery = None,
) -> list[dict[str, Any]]:
    """Per release and time step: inferences, errors, latency percentiles."""
    step = step or max(minutes * 60 / 60, 1.0)  # about 60 points
    return queries.release_series(ctx.db, time.time() - minutes * 60, step, model, release)


@router.get("/api/v1/telemetry/devices/{device_id}")
def telemetry_device(
    ctx: Ctx,
    _who: Viewer,
    device_id: str,
    minutes: Minutes = 60,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> list[dict[str, Any]]:
    """The newest telemetry windows of one device."""
    return queries.device_windows(ctx.db, device_id, time.time() - minutes * 60, limit)


@router.get("/api/v1/telemetry/ingest")
def telemetry_ingest(request: Request, _who: Viewer) -> dict[str, Any]:
    """Counters of the ingest workers in this process."""
    obs = _obs(request)
    return {
        "workers": [s.snapshot() for s in obs.ingest_stats()],
        "share_group": obs.settings.ingest_store_group,
    }


# -- drift, alerts, retraining -------------------------------------------------------
@router.get("/api/v1/drift")
def drift(request: Request, ctx: Ctx, _who: Viewer, minutes: Minutes = 60) -> dict[str, Any]:
    """The rule in force and the newest evaluation of every release and group."""
    obs = _obs(request)
    rule = obs.rule
    return {
        "rule": {
            "statistic": "mean PSI over features",
            "threshold": rule.threshold,
            "k": rule.k,
            "m": rule.m,
            "min_samples": rule.min_samples,
            "prediction_threshold": rule.pred_threshold,
            "window_seconds": obs.settings.drift_window_seconds,
        },
        "latest": queries.drift_latest(ctx.db, time.time() - minutes * 60),
    }


@router.get("/api/v1/drift/series")
def drift_series(
    ctx: Ctx,
    _who: Viewer,
    minutes: Minutes = 60,
    model: str | None = None,
    release: ReleaseQuery = None,
    group: str | None = None,
) -> list[dict[str, Any]]:
    """Drift evaluations, oldest first."""
    return queries.drift_series(ctx.db, time.time() - minutes * 60, model, release, group)


@router.get("/api/v1/alerts")
def alerts(
    ctx: Ctx,
    _who: Viewer,
    state: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Drift alerts, newest first (``state=open`` or ``resolved`` to filter)."""
    if state not in (None, "open", "resolved"):
        raise HTTPException(422, "state is 'open' or 'resolved'")
    return queries.alerts(ctx.db, state, limit)


@router.get("/api/v1/retrain")
def retrain(request: Request, ctx: Ctx, _who: Viewer) -> dict[str, Any]:
    """The configured retraining job and its runs, newest first."""
    return {"job": _obs(request).settings.retrain_job, "runs": queries.retrain_runs(ctx.db)}
