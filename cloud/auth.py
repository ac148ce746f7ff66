"""Operator API tokens with roles (viewer < operator < admin) and a lifetime.

A token is shown once when created (``efk_`` + 256 random bits); only its
SHA-256 is stored, so a leaked database does not leak usable tokens. Tokens
are looked up by hash (constant-time in the secret: the secret itself is never
compared) and can be revoked.

Each token expires (``DEFAULT_TOKEN_LIFETIME``, 90 days, unless its creator
says otherwise); one that never expires must be asked for. Rows created before
tokens had a lifetime have no ``expires_at`` and keep working, listed as never
expiring: ``cloud.db`` adds the column to such a database in place.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Float, String, select
from sqlalchemy.orm import Mapped, mapped_column

from cloud.db import Base, Database
from shared.errors import ConfigError, EdgefleetError

__all__ = [
    "DEFAULT_TOKEN_LIFETIME",
    "MAX_TOKEN_LIFETIME",
    "ApiToken",
    "Role",
    "TokenRefused",
    "authenticate",
    "create_token",
    "format_time",
    "list_tokens",
    "parse_lifetime",
    "revoke_token",
    "verify_token",
]

TOKEN_PREFIX = "efk_"  # noqa: S105 - a public prefix, not a secret
#: Lifetime of a new token unless its creator names another (or ``never``).
DEFAULT_TOKEN_LIFETIME = timedelta(days=90)
#: The longest finite lifetime; beyond it, say ``never`` and mean it.
MAX_TOKEN_LIFETIME = timedelta(days=3650)
_UNKNOWN = "unknown or revoked API token"
_LIFETIME = re.compile(r"(\d{1,9})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TOO_LONG = int(MAX_TOKEN_LIFETIME.total_seconds()) + 1


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "operator": 1, "admin": 2}[self.value]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


class TokenRefused(EdgefleetError):
    """A presented API token does not authenticate; the message says why (never the secret)."""

    code = "api_token_refused"


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Unix time after which the token is refused; ``None``: never (asked for
    #: explicitly, or a token from before lifetimes existed).
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def state(self, now: float) -> str:
        """``revoked``, ``expired`` or ``live``."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expired(now) else "live"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def format_time(ts: float) -> str:
    """A Unix time as ISO 8601 UTC to the second (``2025-06-01T12:00:00Z``)."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # a row edited by hand: still no 500
        return f"{ts!r} (Unix time)"


def parse_lifetime(text: str) -> timedelta | None:
    """``90d``, ``12h``, ``30m``, ``2w``, ``3600s`` -> that lifetime; ``never`` -> ``None``."""
    text = text.strip().lower()
    if text == "never":
        return None
    m = _LIFETIME.fullmatch(text)
    if m is None:
        raise ConfigError(
            f"token lifetime {text[:40]!r} not understood: give a number and a unit "
            "(s, m, h, d, w), e.g. 90d, or `never`"
        )
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    # Compared before it becomes a timedelta, which overflows far below 10**9 weeks.
    return _check_lifetime(timedelta(seconds=min(seconds, _TOO_LONG)))


def _check_lifetime(lifetime: timedelta) -> timedelta:
    if lifetime <= timedelta(0):
        raise ConfigError("a token lifetime must be positive (or `never`)")
    if lifetime > MAX_TOKEN_LIFETIME:
        raise ConfigError(
            f"a token lifetime is at most {MAX_TOKEN_LIFETIME.days} days; "
            "for a token that never expires, say `never`"
        )
    return lifetime


def create_token(
    db: Database,
    name: str,
    role: Role | str,
    *,
    lifetime: timedelta | None = DEFAULT_TOKEN_LIFETIME,
    now: float | None = None,
) -> str:
    """Create a token that expires after ``lifetime`` (``None``: never) and return
    its secret (the only time it is available)."""
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r}: use viewer, operator or admin") from None
    if not name or len(name) > 64:
        raise ConfigError("a token needs a name of 1-64 characters")
    now = time.time() if now is None else now
    expires_at = None if lifetime is None else now + _check_lifetime(lifetime).total_seconds()
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        s.add(
            ApiToken(
                name=name,
                role=role.value,
                token_sha256=_hash(secret),
                created_at=now,
                expires_at=expires_at,
            )
        )
    return secret


def authenticate(db: Database, secret: str, *, now: float | None = None) -> ApiToken:
    """The live token for ``secret``; ``TokenRefused`` saying why there is none.

    Unknown and revoked read the same; an expired token says when it expired
    (only who holds the secret can learn that)."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        raise TokenRefused(_UNKNOWN)
    with db.session() as s:
        tok = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == _hash(secret)))
    if tok is None or tok.revoked_at is not None:
        raise TokenRefused(_UNKNOWN)
    expires_at = tok.expires_at
    if expires_at is not None and (time.time() if now is None else now) >= expires_at:
        raise TokenRefused(
            f"API token {tok.name!r} expired at {format_time(expires_at)}: "
            "an admin can create a new one (`edgefleet-cloud token create`)"
        )
    return tok


def verify_token(db: Database, secret: str, *, now: float | None = None) -> ApiToken | None:
    """The live token for ``secret``, or ``None`` (unknown, revoked or expired)."""
    try:
        return authenticate(db, secret, now=now)
    except TokenRefused:
        return None


def revoke_token(db: Database, name: str) -> int:
    """Revoke every live token called ``name``; returns how many."""
    with db.session() as s:
        toks = s.scalars(
            select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
        ).all()
        for t in toks:
            t.revoked_at = time.time()
        return len(toks)


def list_tokens(db: Database) -> list[ApiToken]:
    with db.session() as s:
        return list(s.scalars(select(ApiToken).order_by(ApiToken.id)).all())
