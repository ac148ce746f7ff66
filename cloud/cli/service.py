"""``serve``, ``init``, ``root``: run the service and manage its repository."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import timedelta
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


def _lifetime(text: str) -> timedelta | None:
    from cloud.auth import parse_lifetime
    from shared.errors import ConfigError

    try:
        return parse_lifetime(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_token(args: argparse.Namespace) -> int:
    from cloud.auth import create_token, format_time, list_tokens, revoke_token
    from cloud.db import Database

    settings = settings_from(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.db_url)
    db.create_all()
    try:
        if args.action == "create":
            now = time.time()
            secret = create_token(db, args.name, args.role, lifetime=args.expires_in, now=now)
            # The secret goes to stdout alone so scripts can capture it.
            print(secret)
            if args.expires_in is None:
                print(
                    f"token {args.name!r} ({args.role}) never expires: revoke it when done",
                    file=sys.stderr,
                )
            else:
                when = format_time(now + args.expires_in.total_seconds())
                print(f"token {args.name!r} ({args.role}) expires {when}", file=sys.stderr)
        elif args.action == "revoke":
            print(f"revoked {revoke_token(db, args.name)} token(s) named {args.name!r}")
        else:
            now = time.time()
            for t in list_tokens(db):
                if t.expires_at is None:
                    expiry = "never expires"
                else:
                    verb = "expired" if t.expired(now) else "expires"
                    expiry = f"{verb} {format_time(t.expires_at)}"
                print(f"{t.name:<24} {t.role:<9} {t.state(now):<8} {expiry}")
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
    s.add_argument(
        "--expires-in",
        type=_lifetime,
        default="90d",  # argparse converts it like a given value: auth.DEFAULT_TOKEN_LIFETIME
        metavar="LIFETIME",
        help="create: lifetime of the token, e.g. 90d, 12h, 2w, or `never` (default 90d)",
    )
    s.set_defaults(func=cmd_token)

    s = local_args(sub.add_parser("root", help="export root metadata (device trust anchor)"))
    s.add_argument("--out", default="-")
    s.set_defaults(func=cmd_root)
