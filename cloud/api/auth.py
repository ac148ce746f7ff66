"""Authentication for the operator API: ``Authorization: Bearer <token>``.

``Viewer``, ``Operator`` and ``Admin`` are dependency aliases: a route that
reads state takes ``Viewer``, a route that changes anything takes
``Operator`` (or ``Admin``). Missing, unknown, revoked or expired token: 401
with the reason; a valid token with too small a role: 403. A presented token
that is refused is also charged to the caller's address in the rate limit
(``cloud.api.ratelimit``), so made-up tokens buy no extra requests. The token
itself is never logged.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from cloud.api.deps import CloudContext, _ctx
from cloud.api.ratelimit import charge_failed_auth
from cloud.auth import Role, TokenRefused, authenticate

__all__ = ["Admin", "Operator", "Principal", "Viewer", "require"]

log = logging.getLogger(__name__)


class Principal:
    """Who is calling: the token's name and role."""

    def __init__(self, name: str, role: Role) -> None:
        self.name, self.role = name, role

    def __repr__(self) -> str:
        return f"Principal({self.name!r}, {self.role.value})"


def require(role: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits callers whose token has at least ``role``."""

    def dep(request: Request, ctx: Annotated[CloudContext, Depends(_ctx)]) -> Principal:
        if ctx.settings.unsafe_disable_auth:
            return Principal("unauthenticated", Role.ADMIN)
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise HTTPException(
                401,
                "missing API token: send `Authorization: Bearer <token>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            tok = authenticate(ctx.db, secret.strip())
        except TokenRefused as e:
            charge_failed_auth(request, ctx.rate_limiter)  # 429 once the address is out
            raise HTTPException(
                401, str(e), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            ) from None
        have = Role(tok.role)
        if not have.allows(role):
            raise HTTPException(
                403,
                f"token {tok.name!r} has role {have.value}; this call needs {role.value} or higher",
            )
        return Principal(tok.name, have)

    return dep


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
