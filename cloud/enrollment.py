"""One-time bootstrap tokens: how a device enrolls online without an operator at hand.

An operator makes a token for one device id (``edgefleet-cloud device issue``)
and hands it to whoever installs the device; the device sends it once with
its CSR (``POST /api/v1/enroll``) and gets its certificate. A token is bound
to its device id, expires (24 h by default) and is burnt on first use. Only
its SHA-256 is stored (``<pki dir>/bootstrap.json``, 0600), and no secret is
ever logged. Every refusal reads the same to the caller, so the endpoint
tells nobody whether a token or a device exists; the log says which check
failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from cloud.pki import (
    CertificateAuthority,
    EnrollmentError,
    PkiError,
    _atomic_write,
    _utc,
    load_csr,
)

__all__ = ["DEFAULT_TOKEN_TTL", "TOKEN_PREFIX", "BootstrapTokens", "TokenRefused"]

log = logging.getLogger(__name__)

TOKEN_PREFIX = "efb_"  # noqa: S105 - a prefix, not a secret
DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_OUTSTANDING = 100_000
MAX_TOKEN_LENGTH = 128
_FILE = "bootstrap.json"
_REFUSED = "bootstrap token refused: unknown, used, expired, or for another device"


class TokenRefused(EnrollmentError):
    """The bootstrap token is unknown, used, expired, or for another device."""

    code = "enrollment_token_refused"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class BootstrapTokens:
    """The bootstrap tokens of one CA (stored in its directory, under its lock)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.path = ca.dir / _FILE

    def create(
        self, device_id: str, *, ttl: timedelta = DEFAULT_TOKEN_TTL, now: datetime | None = None
    ) -> str:
        """A token with which ``device_id`` may enroll once before ``ttl`` ends; the
        secret is returned here and never again."""
        self.ca.check_device_id(device_id)
        if ttl <= timedelta(0):
            raise PkiError("a bootstrap token needs a positive lifetime")
        now = _utc(now)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.ca.locked():
            tokens = {
                h: t
                for h, t in self._read().items()
                if t.get("used_at") is None and datetime.fromisoformat(t["expires_at"]) > now
            }
            if len(tokens) >= MAX_OUTSTANDING:
                raise PkiError(
                    f"{len(tokens)} unused bootstrap tokens are outstanding; let some expire first"
                )
            tokens[_hash(secret)] = {
                "device_id": device_id,
                "expires_at": (now + ttl).isoformat(),
                "used_at": None,
            }
            self._write(tokens)
        log.info(
            "created bootstrap token",
            extra={"device_id": device_id, "expires_in_s": ttl.total_seconds()},
        )
        return secret

    def redeem(self, secret: str, csr_pem: bytes, *, now: datetime | None = None) -> bytes:
        """Sign ``csr_pem`` if ``secret`` is a live token for the CSR's device."""
        _, cn = load_csr(csr_pem)
        now = _utc(now)
        if (
            not isinstance(secret, str)
            or not secret.startswith(TOKEN_PREFIX)
            or len(secret) > MAX_TOKEN_LENGTH
        ):
            log.warning("enrollment refused: malformed token", extra={"device_id": cn[:64]})
            raise TokenRefused(_REFUSED)
        with self.ca.locked():
            tokens = self._read()
            entry = tokens.get(_hash(secret))
            why = None
            if entry is None:
                why = "unknown token"
            elif entry.get("used_at") is not None:
                why = "token already used"
            elif datetime.fromisoformat(entry["expires_at"]) <= now:
                why = "token expired"
            elif entry["device_id"] != cn:
                why = f"token is for another device than {cn[:64]!r}"
            if entry is None or why is not None:
                log.warning("enrollment refused: %s", why, extra={"device_id": cn[:64]})
                raise TokenRefused(_REFUSED)
            # Burn the token before issuing: a crash in between costs a new token,
            # never a second certificate.
            entry["used_at"] = now.isoformat()
            self._write(tokens)
        cert = self.ca.sign_device_csr(csr_pem, device_id=cn, now=now)
        log.info("device enrolled with a bootstrap token", extra={"device_id": cn})
        return cert

    def _read(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise PkiError(f"{self.path} is unreadable: {e}; restore it from backup") from e
        if not isinstance(raw, dict):
            raise PkiError(f"{self.path} is corrupt: expected a JSON object")
        return raw

    def _write(self, tokens: dict[str, Any]) -> None:
        _atomic_write(self.path, json.dumps(tokens, indent=1, sort_keys=True).encode(), mode=0o600)
