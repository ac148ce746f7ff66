"""The cloud's certificate authority: device identity for mutual TLS with the broker.

A device proves who it is with a client certificate whose common name is its
device id, which the broker (``use_identity_as_username``) turns into its MQTT
username, which the ACL confines to ``edgefleet/v1/devices/<id>/...``. The
device makes its key pair itself and sends only a certificate signing request
(CSR): private device keys never leave devices. The CA signs a CSR handed to an
operator (``edgefleet-cloud device enroll --csr``) or one that comes with a
one-time bootstrap token (``cloud.enrollment``, ``POST /api/v1/enroll``).

Layout of ``pki_dir`` (default ``<cloud data dir>/pki``)::

    ca.key  ca.pem          the CA key (0600) and self-signed certificate
    crl.pem                 revoked serials, read by Mosquitto (``crlfile``)
    index.json              every certificate issued: serial, CN, kind, expiry, revocation
    bootstrap.json          one-time enrollment tokens, by SHA-256 (never the secret)
    server.key  server.pem  the broker's TLS server certificate
    services/<name>.key .pem   the cloud's own client identities (ingest, repository)
    .lock                   writers' flock

Only the cloud's own identities are named ``edgefleet-*``: the CA refuses to
issue a device certificate with such a name, so no device can enroll as the
cloud. Every write is atomic (temp file, fsync, rename); keys are 0600.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud._files import atomic_write as _atomic_write
from shared.errors import ConfigError
from shared.topics import validate_device_id

__all__ = [
    "DEFAULT_CRL_VALIDITY",
    "DEFAULT_DEVICE_VALIDITY",
    "MAX_CSR_BYTES",
    "SERVICE_PREFIX",
    "CertificateAuthority",
    "EnrollmentError",
    "IssuedCert",
    "PkiError",
    "ServiceIdentity",
    "is_service_name",
    "load_csr",
]

log = logging.getLogger(__name__)

SERVICE_PREFIX = "edgefleet-"
_SERVICE_NAME = re.compile(r"^edgefleet-[a-z0-9][a-z0-9-]{0,46}$")
#: A CSR is a few hundred bytes; anything far larger is refused before parsing.
MAX_CSR_BYTES = 16 * 1024
DEFAULT_CA_VALIDITY = timedelta(days=3650)
DEFAULT_DEVICE_VALIDITY = timedelta(days=730)
DEFAULT_SERVER_VALIDITY = timedelta(days=397)
#: OpenSSL refuses *every* client once the CRL's nextUpdate has passed, so the
#: CRL is long-lived (the broker reads it from local disk: nothing to replay) and
#: re-signed well before it ends (``refresh_crl``: at every broker sync, and
#: ``edgefleet-cloud ca crl`` from cron).
DEFAULT_CRL_VALIDITY = timedelta(days=365)
CRL_REFRESH_MARGIN = timedelta(days=90)
_MIN_RSA_BITS = 2048
_CURVES = (ec.SECP256R1, ec.SECP384R1)


class PkiError(ConfigError):
    """The CA is missing or corrupt, or a request to it is invalid."""

    code = "pki_invalid"


class EnrollmentError(PkiError):
    """A CSR or bootstrap token was refused (the reason is in the message)."""

    code = "enrollment_refused"


@dataclass(frozen=True)
class IssuedCert:
    """One entry of the CA's index."""

    serial: int
    common_name: str
    kind: str  # "device", "service" or "server"
    not_after: datetime
    revoked_at: datetime | None = None

    @property
    def live(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "serial": str(self.serial),
            "common_name": self.common_name,
            "kind": self.kind,
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> IssuedCert:
        revoked = raw.get("revoked_at")
        return cls(
            serial=int(raw["serial"]),
            common_name=str(raw["common_name"]),
            kind=str(raw["kind"]),
            not_after=datetime.fromisoformat(raw["not_after"]),
            revoked_at=datetime.fromisoformat(revoked) if revoked else None,
        )


@dataclass(frozen=True)
class ServiceIdentity:
    """Files of one of the cloud's own client identities (for ``tls_set``)."""

    name: str
    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def in_dir(cls, directory: Path, name: str, ca_file: Path) -> ServiceIdentity:
        """Identity ``name`` kept as ``<directory>/<name>.pem`` and ``<name>.key``: the
        layout of ``<pki dir>/services``, and of a copy on another host."""
        return cls(
            name=name,
            ca_file=ca_file,
            cert_file=directory / f"{name}.pem",
            key_file=directory / f"{name}.key",
        )

    def as_tls_dict(self) -> dict[str, str]:
        return {
            "ca_file": str(self.ca_file),
            "cert_file": str(self.cert_file),
            "key_file": str(self.key_file),
        }


def is_service_name(name: str) -> bool:
    """Whether ``name`` is in the namespace reserved for the cloud's own identities."""
    return name.startswith(SERVICE_PREFIX)


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    flags = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{f: allowed.get(f, False) for f in flags})


def _revoke_in(index: Sequence[IssuedCert], serials: set[int], now: datetime) -> list[IssuedCert]:
    return [dataclasses.replace(c, revoked_at=now) if c.serial in serials else c for c in index]


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def load_csr(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, str]:
    """Parse and check a CSR: PEM, self-signature, one common name, an accepted key.

    Returns the CSR and its common name; raises ``EnrollmentError`` saying what is wrong.
    """
    if not isinstance(csr_pem, bytes) or len(csr_pem) > MAX_CSR_BYTES:
        raise EnrollmentError(f"a CSR must be PEM bytes of at most {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        signature_ok = csr.is_signature_valid
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        public = csr.public_key()
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise EnrollmentError(f"not a readable PEM certificate signing request: {e}") from e
    if not signature_ok:
        raise EnrollmentError("the CSR's self-signature is invalid (it was altered or truncated)")
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise EnrollmentError(f"the CSR must carry exactly one common name, found {len(cns)}")
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, _CURVES):
            raise EnrollmentError(f"EC curve {public.curve.name} is not accepted; use P-256")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _MIN_RSA_BITS:
            raise EnrollmentError(f"RSA keys need at least {_MIN_RSA_BITS} bits")
    else:
        raise EnrollmentError(f"{type(public).__name__} keys are not accepted; use EC P-256")
    return csr, cns[0].value


class CertificateAuthority:
    """A file-backed CA. Construct with ``init``, ``open`` or ``open_or_init``.

    Every method re-reads its state from disk and writers serialize on a file
    lock, so the CLI and a running service can share one CA directory.
    """

    def __init__(self, pki_dir: Path) -> None:
        self.dir = Path(pki_dir)

    # -- paths ----------------------------------------------------------------
    @property
    def ca_key_path(self) -> Path:
        return self.dir / "ca.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "server.key"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "server.pem"

    @property
    def services_dir(self) -> Path:
        return self.dir / "services"

    @property
    def initialized(self) -> bool:
        return self.ca_cert_path.is_file() and self.ca_key_path.is_file()

    # -- construction ---------------------------------------------------------
    @classmethod
    def init(
        cls, pki_dir: Path, *, name: str = "edgefleet device CA", now: datetime | None = None
    ) -> CertificateAuthority:
        """Create the CA key, its certificate and an empty CRL. Refuses an existing CA."""
        ca = cls(pki_dir)
        with ca.locked():
            if ca.initialized:
                raise PkiError(
                    f"{ca.dir} already holds a CA; open it instead (a new CA would cut off "
                    "every enrolled device)"
                )
            ca._create(name, _utc(now))
        return ca

    @classmethod
    def open(cls, pki_dir: Path) -> CertificateAuthority:
        ca = cls(pki_dir)
        if not ca.initialized:
            raise PkiError(f"no CA in {ca.dir}: create one with `edgefleet-cloud ca init`")
        return ca

    @classmethod
    def open_or_init(cls, pki_dir: Path, *, now: datetime | None = None) -> CertificateAuthority:
        ca = cls(pki_dir)
        with ca.locked():
            if not ca.initialized:
                ca._create("edgefleet device CA", _utc(now))
        return ca

    def ca_cert_pem(self) -> bytes:
        return self.ca_cert_path.read_bytes()

    # -- issuing --------------------------------------------------------------
    def sign_device_csr(
        self,
        csr_pem: bytes,
        *,
        device_id: str | None = None,
        validity: timedelta = DEFAULT_DEVICE_VALIDITY,
        now: datetime | None = None,
    ) -> bytes:
        """Sign a device's CSR; return the certificate PEM.

        The certificate's CN is the CSR's CN, which must be a valid device id
        (and equal ``device_id`` when given); only the CSR's public key and CN
        are used, never its extensions. Earlier live certificates of the same
        device are revoked: only the newest key speaks for a device.
        """
        csr, cn = load_csr(csr_pem)
        if device_id is not None and cn != device_id:
            raise EnrollmentError(f"the CSR is for {cn!r}, expected device {device_id!r}")
        self.check_device_id(cn)
        now = _utc(now)
        with self.locked():
            pem = self._issue(cn, csr.public_key(), "device", now, validity)
        log.info("issued device certificate", extra={"device_id": cn})
        return pem

    def issue_server_cert(
        self,
        *,
        names: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        validity: timedelta = DEFAULT_SERVER_VALIDITY,
        now: datetime | None = None,
    ) -> tuple[Path, Path]:
        """(Re)issue the broker's server certificate for ``names`` and ``ips``.

        Returns (certificate path, key path)."""
        try:
            addresses = [ipaddress.ip_address(ip) for ip in ips]
        except ValueError as e:
            raise PkiError(f"invalid broker IP address: {e}") from e
        if not names and not addresses:
            raise PkiError("the broker certificate needs at least one DNS name or IP address")
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(a) for a in addresses]
        now = _utc(now)
        key = ec.generate_private_key(ec.SECP256R1())
        with self.locked():
            cert = self._issue(
                names[0] if names else str(addresses[0]),
                key.public_key(),
                "server",
                now,
                validity,
                sans=sans,
            )
            _atomic_write(self.server_key_path, _key_pem(key), mode=0o600)
            _atomic_write(self.server_cert_path, cert)
        return self.server_cert_path, self.server_key_path

    def issue_service_identity(
        self,
        name: str = "edgefleet-cloud",
        *,
        validity: timedelta = DEFAULT_SERVER_VALIDITY,
        now: datetime | None = None,
    ) -> ServiceIdentity:
        """(Re)issue a client certificate for one of the cloud's own broker connections."""
        if not _SERVICE_NAME.match(name):
            raise PkiError(
                f"invalid service name {name!r}: use 'edgefleet-' followed by "
                "lowercase letters, digits or '-'"
            )
        now = _utc(now)
        key = ec.generate_private_key(ec.SECP256R1())
        ident = self.service_identity(name)
        with self.locked():
            cert = self._issue(name, key.public_key(), "service", now, validity)
            _atomic_write(ident.key_file, _key_pem(key), mode=0o600)
            _atomic_write(ident.cert_file, cert)
        return ident

    def service_identity(self, name: str) -> ServiceIdentity:
        """The files of service identity ``name`` (issued or not)."""
        return ServiceIdentity.in_dir(self.services_dir, name, self.ca_cert_path)

    # -- revocation -----------------------------------------------------------
    def revoke(self, common_name: str, *, now: datetime | None = None) -> list[int]:
        """Revoke every live certificate of ``common_name``; rewrite the CRL.

        Returns the revoked serials. The broker enforces the new CRL once it
        re-reads it (``MosquittoProcess.revoke_reload``)."""
        now = _utc(now)
        with self.locked():
            index = self._index()
            hit = [c for c in index if c.common_name == common_name and c.live]
            if not hit:
                raise PkiError(f"no live certificate for {common_name!r}; nothing to revoke")
            serials = {c.serial for c in hit}
            index = _revoke_in(index, serials, now)
            self._write_index(index)
            self._write_crl(index, now)
        log.warning(
            "revoked certificates",
            extra={"common_name": common_name, "serials": [str(s) for s in serials]},
        )
        return sorted(serials)

    def refresh_crl(self, *, now: datetime | None = None, force: bool = False) -> bool:
        """Re-sign the CRL if it expires within ``CRL_REFRESH_MARGIN``; True if rewritten."""
        now = _utc(now)
        with self.locked():
            if not force:
                with suppress(OSError, ValueError):
                    crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
                    nxt = crl.next_update_utc
                    if nxt is not None and nxt - now > CRL_REFRESH_MARGIN:
                        return False
            self._write_crl(self._index(), now)
        return True

    def issued(self) -> list[IssuedCert]:
        """Every certificate this CA issued, oldest first."""
        return self._index()

    def is_revoked(self, serial: int) -> bool:
        return any(c.serial == serial and not c.live for c in self._index())

    # -- internals --------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def check_device_id(device_id: str) -> None:
        try:
            validate_device_id(device_id)
        except ValueError as e:
            raise EnrollmentError(str(e)) from e
        if is_service_name(device_id):
            raise EnrollmentError(
                f"device id {device_id!r} starts with {SERVICE_PREFIX!r}, which is reserved for "
                "the cloud's own identities"
            )

    def _create(self, name: str, now: datetime) -> None:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = _cn(name)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + DEFAULT_CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384())
        )
        _atomic_write(self.ca_key_path, _key_pem(key), mode=0o600)
        _atomic_write(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._write_index([])
        self._write_crl([], now)
        log.info("created certificate authority", extra={"dir": str(self.dir)})

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError) as e:
            raise PkiError(
                f"the CA in {self.dir} is unreadable: {e}; restore it from backup"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path} is not an EC key written by edgefleet")
        return cert, key

    def _issue(
        self,
        cn: str,
        public_key: Any,
        kind: str,
        now: datetime,
        validity: timedelta,
        *,
        sans: Sequence[x509.GeneralName] = (),
    ) -> bytes:
        ca_cert, ca_key = self._ca()
        not_after = min(now + validity, ca_cert.not_valid_after_utc)
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(_cn(cn))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(
                    digital_signature=True,
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    key_agreement=isinstance(public_key, ec.EllipticCurvePublicKey),
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        index = self._index()
        old: set[int] = set()
        if kind in ("device", "service"):
            # Only the newest key speaks for a device or a cloud identity: older live
            # certificates go, so re-issuing (``ca init`` again, a rotation after a
            # leak) also cuts off whoever holds the old key once the broker reloads.
            old = {c.serial for c in index if c.common_name == cn and c.live}
            index = _revoke_in(index, old, now)
        index.append(IssuedCert(cert.serial_number, cn, kind, not_after))
        self._write_index(index)
        if old:
            self._write_crl(index, now)
        return cert.public_bytes(serialization.Encoding.PEM)

    def _write_crl(self, index: Sequence[IssuedCert], now: datetime) -> None:
        ca_cert, ca_key = self._ca()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + DEFAULT_CRL_VALIDITY)
        )
        for c in index:
            # Expired certificates fail verification anyway; dropping them keeps the CRL short.
            if c.revoked_at is not None and c.not_after > now:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(c.serial)
                    .revocation_date(c.revoked_at)
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA384())
        _atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def _read_json(self, name: str, default: Any) -> Any:
        path = self.dir / name
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as e:
            raise PkiError(f"{path} is unreadable: {e}; restore it from backup") from e

    def _write_json(self, name: str, value: Any, mode: int = 0o644) -> None:
        _atomic_write(
            self.dir / name, json.dumps(value, indent=1, sort_keys=True).encode(), mode=mode
        )

    def _index(self) -> list[IssuedCert]:
        raw = self._read_json("index.json", [])
        try:
            return [IssuedCert.from_json(r) for r in raw]
        except (KeyError, TypeError, ValueError) as e:
            raise PkiError(f"{self.dir / 'index.json'} is corrupt: {e}") from e

    def _write_index(self, index: Sequence[IssuedCert]) -> None:
        self._write_json("index.json", [c.to_json() for c in index])
