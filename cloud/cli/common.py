"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import httpx

from cloud.config import CloudSettings
from shared.errors import EdgefleetError

__all__ = ["api_call", "local_args", "remote_args", "settings_from"]


def settings_from(args: argparse.Namespace) -> CloudSettings:
    overrides: dict[str, Any] = {}
    for name in ("data_dir", "broker_host", "broker_port", "http_host", "http_port"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return CloudSettings(**overrides)


def local_args(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--data-dir", type=Path, help="keys, repository (default var/cloud)")
    return sp


def remote_args(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument(
        "--api",
        default=os.environ.get("EDGEFLEET_API", "http://127.0.0.1:8080"),
        help="cloud service URL (env EDGEFLEET_API)",
    )
    sp.add_argument(
        "--token",
        default=os.environ.get("EDGEFLEET_TOKEN"),
        help="API token (env EDGEFLEET_TOKEN; prefer the env: argv is visible)",
    )
    return sp


def api_call(args: argparse.Namespace, method: str, path: str, **kw: Any) -> Any:
    """Call the running service; raise ``EdgefleetError`` with the server's reason."""
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        r = httpx.request(method, args.api.rstrip("/") + path, timeout=30, headers=headers, **kw)
    except httpx.HTTPError as e:
        raise EdgefleetError(f"cloud API at {args.api} is unreachable: {e}") from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        raise EdgefleetError(f"{method} {path} failed ({r.status_code}): {detail}")
    return r.json()
