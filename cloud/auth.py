"""Operator API tokens with roles (viewer < operator < admin).

A token is shown once when created (``efk_`` + 256 random bits); only its
SHA-256 is stored, so a leaked database does not leak usable tokens. Tokens
are looked up by hash (constant-time in the secret: the secret itself is never
compared) and can be revoked.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time

from sqlalchemy import Float, String, select
from sqlalchemy.orm import Mapped, mapped_column

from cloud.db import Base, Database
from shared.errors import ConfigError

__all__ = ["ApiToken", "Role", "create_token", "list_tokens", "revoke_token", "verify_token"]

TOKEN_PREFIX = "efk_"  # noqa: S105 - a public prefix, not a secret


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "operator": 1, "admin": 2}[self.value]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: Database, name: str, role: Role | str) -> str:
    """Create a token and return its secret (the only time it is available)."""
    try:
        role = Role(role)
    except ValueError:
        raise ConfigError(f"unknown role {role!r}: use viewer, operator or admin") from None
    if not name or len(name) > 64:
        raise ConfigError("a token needs a name of 1-64 characters")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with db.session() as s:
        s.add(
            ApiToken(name=name, role=role.value, token_sha256=_hash(secret), created_at=time.time())
        )
    return secret


def verify_token(db: Database, secret: str) -> ApiToken | None:
    """The live token for ``secret``, or ``None``."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 128:
        return None
    with db.session() as s:
        tok = s.scalar(select(ApiToken).where(ApiToken.token_sha256 == _hash(secret)))
        if tok is None or tok.revoked_at is not None:
            return None
        return tok


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
