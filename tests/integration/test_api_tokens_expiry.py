"""Operator API tokens expire: a stale or stolen token stops working on its own.

Against the real service (uvicorn, SQLite, broker session): an expired token
gets 401 naming when it expired, a live one works, one asked to never expire
works. A database made before tokens had a lifetime (no ``expires_at`` column)
is upgraded in place by ``Database.create_all``, on SQLite and PostgreSQL, and
its tokens keep working, over HTTP too.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, inspect

from cloud.auth import (
    DEFAULT_TOKEN_LIFETIME,
    ApiToken,
    TokenRefused,
    authenticate,
    create_token,
    format_time,
    list_tokens,
    parse_lifetime,
    revoke_token,
    verify_token,
)
from cloud.cli import main as cli
from cloud.db import Database
from shared.errors import ConfigError
from tests.pg import pg_database

pytestmark = pytest.mark.integration

OLD_SECRET = "efk_" + "o" * 43  # a token made by a version without lifetimes


def _get(cloud: Any, token: str, path: str = "/api/v1/devices") -> httpx.Response:
    return httpx.get(f"{cloud.url}{path}", headers={"Authorization": f"Bearer {token}"})


def _old_schema(url: str) -> None:
    """The ``api_tokens`` table as the version before lifetimes created it, with one token."""
    old = MetaData()
    table = Table(
        "api_tokens",
        old,
        Column("id", Integer, primary_key=True),
        Column("name", String(64)),
        Column("role", String(16)),
        Column("token_sha256", String(64), unique=True, index=True),
        Column("created_at", Float),
        Column("revoked_at", Float, nullable=True),
    )
    db = Database(url)
    try:
        old.create_all(db.engine)
        with db.engine.begin() as conn:
            conn.execute(
                table.insert().values(
                    name="old-admin",
                    role="admin",
                    token_sha256=hashlib.sha256(OLD_SECRET.encode()).hexdigest(),
                    created_at=time.time() - 400 * 86400,
                )
            )
        assert "expires_at" not in {c["name"] for c in inspect(db.engine).get_columns("api_tokens")}
    finally:
        db.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        _old_schema(url)
        yield url
    else:
        urls = pg_database()
        url = next(urls)
        _old_schema(url)
        yield url
        for _ in urls:  # drops the database
            pass


# -- over HTTP ---------------------------------------------------------------------
def test_expired_token_refused_with_401_saying_when(cloud: Any) -> None:
    db = Database(cloud.settings.db_url)
    issued = time.time() - 7200
    expired = create_token(db, "ci-old", "operator", lifetime=timedelta(hours=1), now=issued)
    db.dispose()
    r = _get(cloud, expired)
    assert r.status_code == 401
    assert r.json()["detail"].startswith(
        f"API token 'ci-old' expired at {format_time(issued + 3600)}"
    )
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # A mutating route too: refused before it acts, and never a 500.
    body = {"model": "digits", "release": 1, "devices": ["dev-1"]}
    r = httpx.post(
        f"{cloud.url}/api/v1/deployments",
        json=body,
        headers={"Authorization": f"Bearer {expired}"},
    )
    assert r.status_code == 401 and "expired at" in r.json()["detail"]
    # Unknown and revoked tokens still read the same, and say nothing about expiry.
    r = _get(cloud, "efk_" + "x" * 43)
    assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API token"


def test_token_works_until_it_expires_then_gets_401(cloud: Any) -> None:
    db = Database(cloud.settings.db_url)
    short = create_token(db, "short", "viewer", lifetime=timedelta(seconds=2))
    (tok,) = [t for t in list_tokens(db) if t.name == "short"]
    db.dispose()
    assert tok.expires_at is not None
    assert _get(cloud, short).status_code == 200
    time.sleep(max(0.0, tok.expires_at - time.time()) + 0.2)
    r = _get(cloud, short)
    assert r.status_code == 401
    assert f"expired at {format_time(tok.expires_at)}" in r.json()["detail"]


def test_unexpired_and_never_expiring_tokens_work(cloud: Any) -> None:
    db = Database(cloud.settings.db_url)
    day = create_token(db, "day", "viewer", lifetime=timedelta(days=1))
    forever = create_token(db, "forever", "operator", lifetime=None)
    fixture_tokens = [t for t in list_tokens(db) if t.name.startswith("test-")]
    db.dispose()
    assert _get(cloud, day).status_code == 200
    assert _get(cloud, forever).status_code == 200
    # Tokens made without a lifetime get the default one.
    for t in fixture_tokens:
        assert t.expires_at is not None
        assert t.expires_at - t.created_at == pytest.approx(DEFAULT_TOKEN_LIFETIME.total_seconds())


def test_revoking_an_expiring_token_still_works(cloud: Any) -> None:
    db = Database(cloud.settings.db_url)
    tok = create_token(db, "leaked", "operator", lifetime=timedelta(days=30))
    assert _get(cloud, tok).status_code == 200
    assert revoke_token(db, "leaked") == 1
    db.dispose()
    r = _get(cloud, tok)
    assert r.status_code == 401 and r.json()["detail"] == "unknown or revoked API token"


def test_old_database_served_keeps_its_tokens(
    cloud_with: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "old-cloud"
    data_dir.mkdir()
    _old_schema(f"sqlite:///{data_dir / 'edgefleet.db'}")
    running = cloud_with(data_dir=data_dir)
    r = _get(running, OLD_SECRET)
    assert r.status_code == 200, r.text
    assert cli(["token", "list", "--data-dir", str(data_dir)]) == 0
    rows = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()}
    assert rows["old-admin"] == ["admin", "live", "never", "expires"]
    assert rows["test-viewer"][:3] == ["viewer", "live", "expires"]


# -- the schema upgrade ------------------------------------------------------------
def test_old_schema_database_upgraded_in_place(old_db_url: str) -> None:
    db = Database(old_db_url)
    try:
        db.create_all()
        db.create_all()  # idempotent
        cols = {c["name"]: c for c in inspect(db.engine).get_columns("api_tokens")}
        assert "expires_at" in cols and cols["expires_at"]["nullable"]
        old = authenticate(db, OLD_SECRET)
        assert (old.name, old.role, old.expires_at) == ("old-admin", "admin", None)
        # New tokens in the upgraded table expire; revoking works on both kinds.
        new = create_token(db, "new", "viewer", lifetime=timedelta(days=7))
        assert verify_token(db, new) is not None
        (row,) = [t for t in list_tokens(db) if t.name == "new"]
        assert row.expires_at is not None
        assert row.expires_at - row.created_at == pytest.approx(7 * 86400)
        assert revoke_token(db, "old-admin") == 1
        assert verify_token(db, OLD_SECRET) is None
    finally:
        db.dispose()


def test_upgrade_tolerates_another_process_adding_the_column_first(
    old_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(old_db_url)
    try:
        db.create_all()
        # As if the check ran just before another process's ALTER TABLE: ours then fails.
        real = Database._has_column
        calls: list[str] = []

        def racing(self: Database, table: str, column: str) -> bool:
            calls.append(column)
            return False if len(calls) == 1 else real(self, table, column)

        monkeypatch.setattr(Database, "_has_column", racing)
        db.create_all()  # the failed ALTER is looked at again, not raised
        assert calls == ["expires_at", "expires_at"]
        assert verify_token(db, OLD_SECRET) is not None
    finally:
        db.dispose()


# -- creating tokens: lifetimes ----------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 12 * 3600), ("30m", 1800), ("2w", 14 * 86400), ("45s", 45)],
)
def test_lifetimes_parse(text: str, seconds: int) -> None:
    assert parse_lifetime(text) == timedelta(seconds=seconds)
    assert parse_lifetime(f" {text.upper()} ") == timedelta(seconds=seconds)


def test_never_only_when_asked_and_bad_lifetimes_refused() -> None:
    assert parse_lifetime("never") is None
    for bad in ("", "90", "0d", "1y", "-1d", "1.5d", "d", "forever", "3651d", "999999999w"):
        with pytest.raises(ConfigError):
            parse_lifetime(bad)


def test_expiry_is_checked_against_now(db: Database) -> None:
    secret = create_token(db, "t", "viewer", lifetime=timedelta(hours=1), now=1000.0)
    assert authenticate(db, secret, now=1000.0 + 3599).name == "t"
    with pytest.raises(TokenRefused, match=r"expired at 1970-01-01T01:16:40Z"):
        authenticate(db, secret, now=1000.0 + 3600)
    with pytest.raises(ConfigError):
        create_token(db, "t", "viewer", lifetime=timedelta(0))


def test_cli_creates_tokens_with_a_lifetime_and_lists_their_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path)]
    before = time.time()
    assert cli(["token", "create", "--name", "ci", "--expires-in", "2h", *data]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert secret.startswith("efk_") and "\n" not in secret  # stdout: the secret alone
    assert "expires 20" in out.err
    assert cli(["token", "create", "--name", "dflt", *data]) == 0
    assert cli(["token", "create", "--name", "robot", "--expires-in", "never", *data]) == 0
    assert "never expires" in capsys.readouterr().err
    db = Database(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    try:
        rows: dict[str, ApiToken] = {t.name: t for t in list_tokens(db)}
        assert verify_token(db, secret) is not None
    finally:
        db.dispose()
    ci_expiry = rows["ci"].expires_at
    assert ci_expiry is not None and before + 7200 <= ci_expiry <= time.time() + 7200
    dflt_expiry = rows["dflt"].expires_at
    assert dflt_expiry is not None
    assert dflt_expiry - rows["dflt"].created_at == pytest.approx(90 * 86400)
    assert rows["robot"].expires_at is None
    assert cli(["token", "list", *data]) == 0
    listing = {ln.split()[0]: ln.split()[1:] for ln in capsys.readouterr().out.splitlines()}
    assert listing["ci"] == ["operator", "live", "expires", format_time(ci_expiry)]
    assert listing["robot"] == ["operator", "live", "never", "expires"]
    with pytest.raises(SystemExit) as exc:
        cli(["token", "create", "--name", "x", "--expires-in", "5y", *data])
    assert exc.value.code == 2 and "not understood" in capsys.readouterr().err


def test_cli_lists_expired_tokens_as_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "cloud"
    data_dir.mkdir()
    db = Database(f"sqlite:///{data_dir / 'edgefleet.db'}")
    db.create_all()
    create_token(db, "stale", "viewer", lifetime=timedelta(days=1), now=time.time() - 2 * 86400)
    db.dispose()
    assert cli(["token", "list", "--data-dir", str(data_dir)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[:4] == ["stale", "viewer", "expired", "expired"]
