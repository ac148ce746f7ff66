"""The operator API's rate limit: who a client is, which paths count, and the 429.

Every request to ``/api/v1/*`` takes a token from its client's bucket
(``cloud.ratelimit``): the bucket of its API token when it sends one, else that
of its source address (an IPv6 client by its /64, which one host usually has
whole). What devices use is never limited here: the TUF repository
(``/tuf/...``), enrollment (``POST /api/v1/enroll``, authorized by one-time
bootstrap tokens, and a factory may enroll many devices from one address),
and ``/healthz`` and ``/metrics`` (monitoring), which are outside
``/api/v1`` anyway.

Keying by token without asking the database keeps the limit in front of every
query, but anyone can make up tokens; so when a presented token turns out
unknown, revoked or expired, the auth dependency also charges the source
address (``charge_failed_auth``), and made-up tokens are limited like no token.

The source address is the connection's, as uvicorn reports it: behind a
reverse proxy uvicorn takes it from ``X-Forwarded-For`` when the proxy's address
is in ``FORWARDED_ALLOW_IPS`` (default 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Mapping
from typing import Any

from fastapi import HTTPException, Request
from starlette.responses import JSONResponse

from cloud.auth import TOKEN_PREFIX
from cloud.ratelimit import TokenBucketLimiter

__all__ = [
    "EXEMPT_PATHS",
    "LIMITED_PREFIX",
    "RateLimitMiddleware",
    "address_key",
    "charge_failed_auth",
    "client_key",
    "is_limited",
]

#: Paths under this prefix are limited ...
LIMITED_PREFIX = "/api/v1/"
#: ... except these, which devices call (see the module docstring).
EXEMPT_PATHS = frozenset({"/api/v1/enroll"})
#: Longest bearer secret that gets a bucket of its own (the auth layer refuses
#: longer ones anyway); anything else counts against the source address.
_MAX_SECRET = 128


def is_limited(path: str) -> bool:
    """Whether a request for ``path`` (as routed: decoded) counts against the limit."""
    return path.startswith(LIMITED_PREFIX) and path not in EXEMPT_PATHS


def _bearer(scope: Mapping[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, secret = value.decode("latin-1").partition(" ")
            secret = secret.strip()
            if scheme.lower() == "bearer" and secret.startswith(TOKEN_PREFIX):
                return secret if len(secret) <= _MAX_SECRET else None
            return None  # only the first header counts, as for authentication
    return None


def address_key(scope: Mapping[str, Any]) -> str:
    """The bucket of the request's source address (IPv6: its /64)."""
    client = scope.get("client")
    host = str(client[0]) if client else "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"addr:{host[:64]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network((ip, 64), strict=False)}"
    return f"addr:{ip}"


def client_key(scope: Mapping[str, Any]) -> str:
    """The bucket a request is charged to: its API token's, else its address's."""
    secret = _bearer(scope)
    if secret is None:
        return address_key(scope)
    # Hashed, so no secret is kept in memory; the same digest the database holds.
    return "token:" + hashlib.sha256(secret.encode()).hexdigest()


def _refusal(limiter: TokenBucketLimiter, key: str, wait: float) -> tuple[str, dict[str, str]]:
    who = "API token" if key.startswith("token:") else "client address"
    detail = (
        f"rate limit exceeded: {limiter.rate:g} requests/s with bursts of {limiter.burst} "
        f"per {who}; retry in {wait:.1f} s"
    )
    # Retry-After takes whole seconds; rounding down would invite an early retry.
    return detail, {"Retry-After": str(max(1, math.ceil(wait)))}


def charge_failed_auth(request: Request, limiter: TokenBucketLimiter | None) -> None:
    """Charge the source address for a presented token that did not authenticate;
    raise 429 once that address is out of tokens."""
    if limiter is None or not is_limited(request.scope.get("path", "")):
        return
    if not client_key(request.scope).startswith("token:"):
        return  # already charged to the address by the middleware
    key = address_key(request.scope)
    wait = limiter.acquire(key, time.monotonic())
    if wait > 0:
        detail, headers = _refusal(limiter, key, wait)
        raise HTTPException(429, detail, headers=headers)


class RateLimitMiddleware:
    """ASGI middleware answering 429 (with ``Retry-After``) to a client over its limit."""

    def __init__(self, app: Any, limiter: TokenBucketLimiter | None) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limiter = self.limiter
        if limiter is None or scope.get("type") != "http" or not is_limited(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = client_key(scope)
        wait = limiter.acquire(key, time.monotonic())
        if wait > 0:
            detail, headers = _refusal(limiter, key, wait)
            await JSONResponse({"detail": detail}, status_code=429, headers=headers)(
                scope, receive, send
            )
            return
        await self.app(scope, receive, send)
