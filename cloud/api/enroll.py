"""Device enrollment with a one-time bootstrap token: CSR in, certificate out.

The one route a caller without an API token may use to change state, so it is
narrow: the bootstrap token (made by an operator with ``edgefleet-cloud device
token``, bound to one device id, short-lived, burnt on use) is the
authorization, the body is bounded, and every refusal reads the same, with no
hint whether a token or a device exists. The token is never logged.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.deps import Ctx
from cloud.enrollment import BootstrapTokens, TokenRefused
from cloud.pki import MAX_CSR_BYTES, CertificateAuthority, EnrollmentError, PkiError

__all__ = ["EnrollIn", "router"]

router = APIRouter(prefix="/api/v1", tags=["enrollment"])


class EnrollIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: Annotated[str, Field(min_length=1, max_length=128)]
    csr: Annotated[str, Field(min_length=1, max_length=MAX_CSR_BYTES)]


@router.post("/enroll")
def enroll(ctx: Ctx, body: EnrollIn) -> dict[str, Any]:
    pki_dir = ctx.settings.data_dir / "pki"
    try:
        ca = CertificateAuthority.open(pki_dir)
    except PkiError as e:
        raise HTTPException(
            503,
            "this cloud has no certificate authority; an operator runs `edgefleet-cloud ca init`",
        ) from e
    try:
        cert = BootstrapTokens(ca).redeem(body.token, body.csr.encode())
    except TokenRefused as e:
        # Which token check failed is not told (the log has it).
        raise HTTPException(401, str(e)) from None
    except EnrollmentError as e:
        raise HTTPException(422, str(e)) from None
    return {"certificate": cert.decode(), "ca_certificate": ca.ca_cert_pem().decode()}
