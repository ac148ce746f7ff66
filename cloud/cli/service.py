"""``serve``, ``init``, ``root``: run the service and manage its repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cloud.cli.common import local_args, settings_from

__all__ = ["register"]


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cloud.app import create_app

    settings = settings_from(args)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level=args.log_level.lower(),
        access_log=False,
    )
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from cloud.tuf_repo import ReleaseRepository

    settings = settings_from(args)
    repo = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir)
    print(f"TUF repository ready in {settings.repo_dir}")
    print(f"device trust anchor (root metadata): {repo.root_path}")
    return 0


def cmd_root(args: argparse.Namespace) -> int:
    from cloud.tuf_repo import ReleaseRepository

    settings = settings_from(args)
    data = ReleaseRepository.open_or_init(settings.repo_dir, settings.keys_dir).root_bytes()
    if args.out == "-":
        sys.stdout.buffer.write(data)
    else:
        Path(args.out).write_bytes(data)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from cloud.auth import create_token, list_tokens, revoke_token
    from cloud.db import Database

    settings = settings_from(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    db.create_all()
    try:
        if args.action == "create":
            # The secret goes to stdout alone so scripts can capture it.
            print(create_token(db, args.name, args.role))
        elif args.action == "revoke":
            print(f"revoked {revoke_token(db, args.name)} token(s) named {args.name!r}")
        else:
            for t in list_tokens(db):
                state = "revoked" if t.revoked_at else "live"
                print(f"{t.name:<24} {t.role:<9} {state}")
    finally:
        db.dispose()
    return 0


def register(sub: Any) -> None:
    s = local_args(sub.add_parser("serve", help="run the HTTP API, TUF repository and ingest"))
    s.add_argument("--broker-host")
    s.add_argument("--broker-port", type=int)
    s.add_argument("--http-host")
    s.add_argument("--http-port", type=int)
    s.set_defaults(func=cmd_serve)

    local_args(sub.add_parser("init", help="create keys and the TUF repository")).set_defaults(
        func=cmd_init
    )

    s = local_args(sub.add_parser("token", help="create, list or revoke operator API tokens"))
    s.add_argument("action", choices=["create", "list", "revoke"])
    s.add_argument("--name", default="operator")
    s.add_argument("--role", default="operator", choices=["viewer", "operator", "admin"])
    s.set_defaults(func=cmd_token)

    s = local_args(sub.add_parser("root", help="export root metadata (device trust anchor)"))
    s.add_argument("--out", default="-")
    s.set_defaults(func=cmd_root)
