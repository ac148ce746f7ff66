"""Device identity: the cloud CA, CSR and bootstrap-token enrollment, revocation, and
the security CLI (``ca``, ``device``, ``root sign``, ``key rotate``)."""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from cloud.cli import main as cloud_main
from cloud.enrollment import BootstrapTokens
from cloud.pki import CertificateAuthority, EnrollmentError, PkiError
from cloud.tuf_repo import ReleaseRepository
from device.config import (
    create_csr,
    enroll_with_token,
    identity_files,
    install_certificate,
    load_config,
    provision,
)
from device.tuf_client import ReleaseClient, ReleaseNotFoundError
from shared.errors import ConfigError, VerificationError
from tests.attacks.secure_env import make_csr

pytestmark = pytest.mark.integration


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "pki")


@pytest.fixture
def device_dir(tmp_path: Path) -> Path:
    root = tmp_path / "root.json"
    root.write_text("{}")
    provision(
        tmp_path / "dev",
        device_id="dev-1",
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=8883,
        repo_url="http://127.0.0.1/tuf/",
    )
    return tmp_path / "dev"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_keys_are_private_and_the_ca_is_never_replaced(ca: CertificateAuthority) -> None:
    ca.issue_server_cert()
    ident = ca.issue_service_identity()
    for key in (ca.ca_key_path, ca.server_key_path, ident.key_file):
        assert _mode(key) == 0o600, key
    assert x509.load_pem_x509_crl(ca.crl_path.read_bytes()).is_signature_valid(
        x509.load_pem_x509_certificate(ca.ca_cert_pem()).public_key()  # type: ignore[arg-type]
    )
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.init(ca.dir)


def test_device_enrolls_with_a_csr_and_its_key_stays_on_the_device(
    ca: CertificateAuthority, device_dir: Path, tmp_path: Path
) -> None:
    csr = create_csr(device_dir)
    files = identity_files(device_dir)
    assert _mode(files.key_file) == 0o600
    assert b"PRIVATE" not in csr
    # The operator signs the CSR with the CLI; only the CSR and the certificate travel.
    (tmp_path / "dev-1.csr").write_bytes(csr)
    assert (
        cloud_main(
            [
                "device",
                "enroll",
                "--data-dir",
                str(tmp_path),
                "--csr",
                str(tmp_path / "dev-1.csr"),
                "--device-id",
                "dev-2",
            ]
        )
        == 2
    )
    assert (
        cloud_main(
            [
                "device",
                "enroll",
                "--data-dir",
                str(tmp_path),
                "--csr",
                str(tmp_path / "dev-1.csr"),
                "--device-id",
                "dev-1",
                "--out",
                str(tmp_path / "dev-1.pem"),
            ]
        )
        == 0
    )
    install_certificate(device_dir, (tmp_path / "dev-1.pem").read_bytes(), ca.ca_cert_pem())
    cfg = load_config(device_dir)
    assert cfg.tls is not None and cfg.tls.cert_file == files.cert_file
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"


def _csr_with(key: Any, cn: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _tampered_csr() -> bytes:
    der = bytearray(
        x509.load_pem_x509_csr(make_csr("dev-1")[1]).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0xFF  # inside the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr", "device_id", "error"),
    [
        (lambda: make_csr("edgefleet-cloud")[1], None, "reserved for the cloud"),
        (lambda: make_csr("dev/../+")[1], None, "invalid device id"),
        (lambda: make_csr("dev-2")[1], "dev-1", "expected device 'dev-1'"),
        (lambda: _tampered_csr(), None, "self-signature is invalid"),
        (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", None, "not a readable"),
        (lambda: b"x" * 20_000, None, "at most"),
        (lambda: _csr_with(rsa.generate_private_key(65537, 1024), "dev-1"), None, "at least 2048"),
        (lambda: _csr_with(ec.generate_private_key(ec.SECP192R1()), "dev-1"), None, "curve"),
    ],
)
def test_bad_csrs_are_refused_with_the_reason(
    ca: CertificateAuthority,
    csr: Callable[[], bytes],
    device_id: str | None,
    error: str,
) -> None:
    with pytest.raises(EnrollmentError, match=error):
        ca.sign_device_csr(csr(), device_id=device_id)
    assert ca.issued() == []


def test_certificate_for_another_key_or_ca_is_not_installed(
    ca: CertificateAuthority, device_dir: Path, tmp_path: Path
) -> None:
    create_csr(device_dir)
    other_key_cert = ca.sign_device_csr(make_csr("dev-1")[1])
    with pytest.raises(ConfigError, match="does not match this device's key"):
        install_certificate(device_dir, other_key_cert, ca.ca_cert_pem())
    rogue = CertificateAuthority.init(tmp_path / "rogue")
    rogue_cert = rogue.sign_device_csr(create_csr(device_dir))
    with pytest.raises(ConfigError, match="not issued by the given CA"):
        install_certificate(device_dir, rogue_cert, ca.ca_cert_pem())
    with pytest.raises(ConfigError, match="is for"):
        install_certificate(device_dir, ca.sign_device_csr(make_csr("dev-2")[1]), ca.ca_cert_pem())
    assert load_config(device_dir).tls is None


def test_bootstrap_token_is_one_time_bound_and_expiring(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    now = datetime.now(UTC)
    token = BootstrapTokens(ca).create("dev-1", now=now)
    with pytest.raises(EnrollmentError, match="bootstrap token refused"):
        BootstrapTokens(ca).redeem(token, make_csr("dev-2")[1], now=now)  # another device
    cert = BootstrapTokens(ca).redeem(token, make_csr("dev-1")[1], now=now)
    assert b"BEGIN CERTIFICATE" in cert
    with pytest.raises(EnrollmentError, match="bootstrap token refused"):
        BootstrapTokens(ca).redeem(token, make_csr("dev-1")[1], now=now)  # used
    late = BootstrapTokens(ca).create("dev-3", ttl=timedelta(minutes=5), now=now)
    with pytest.raises(EnrollmentError, match="bootstrap token refused"):
        BootstrapTokens(ca).redeem(late, make_csr("dev-3")[1], now=now + timedelta(minutes=6))
    stored = (ca.dir / "bootstrap.json").read_text()
    assert token not in stored and late not in stored and _mode(ca.dir / "bootstrap.json") == 0o600
    assert all(token not in r.getMessage() and late not in r.getMessage() for r in caplog.records)
    assert "token already used" in caplog.text and "token expired" in caplog.text


def test_online_enrollment_through_the_api(cloud: Any, tmp_path: Path) -> None:
    data_dir = cloud.settings.data_dir
    root = tmp_path / "root.json"
    root.write_bytes((data_dir / "repository" / "metadata" / "root.json").read_bytes())
    provision(
        tmp_path / "dev",
        device_id="dev-1",
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=8883,
        repo_url=f"{cloud.url}/tuf/",
    )
    with pytest.raises(ConfigError, match="503"):  # no CA yet
        enroll_with_token(tmp_path / "dev", cloud.url, "efb_x")
    assert cloud_main(["ca", "init", "--data-dir", str(data_dir)]) == 0
    ca = CertificateAuthority.open(data_dir / "pki")
    token = BootstrapTokens(ca).create("dev-1")
    with pytest.raises(ConfigError, match="another CA certificate than the pinned one"):
        enroll_with_token(tmp_path / "dev", cloud.url, token, expected_ca=b"not the CA")
    # The refused attempt above burnt the token: enrollment answers need a fresh one.
    with pytest.raises(ConfigError, match=r"401.*bootstrap token refused"):
        enroll_with_token(tmp_path / "dev", cloud.url, token)
    token = BootstrapTokens(ca).create("dev-1")
    files = enroll_with_token(tmp_path / "dev", cloud.url, token, expected_ca=ca.ca_cert_pem())
    assert load_config(tmp_path / "dev").tls == files
    r = httpx.post(f"{cloud.url}/api/v1/enroll", json={"token": token, "csr": "x"})
    assert r.status_code == 422
    r = httpx.post(
        f"{cloud.url}/api/v1/enroll", json={"token": token, "csr": make_csr("dev-1")[1].decode()}
    )
    assert r.status_code == 401 and "certificate" not in r.json()


def test_reenrollment_and_revocation_go_to_the_crl(ca: CertificateAuthority) -> None:
    first = x509.load_pem_x509_certificate(ca.sign_device_csr(make_csr("dev-1")[1]))
    second = x509.load_pem_x509_certificate(ca.sign_device_csr(make_csr("dev-1")[1]))
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None
    assert ca.revoke("dev-1") == [second.serial_number]
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is not None
    with pytest.raises(PkiError, match="no live certificate"):
        ca.revoke("dev-1")


def test_reissued_service_identity_revokes_the_old_certificate(ca: CertificateAuthority) -> None:
    """``ca init`` run again, or a rotation after a leak: the old key must stop working."""
    ident = ca.issue_service_identity("edgefleet-cloud")
    first = x509.load_pem_x509_certificate(ident.cert_file.read_bytes())
    ca.issue_service_identity("edgefleet-repo")  # another identity is not touched
    repo = x509.load_pem_x509_certificate(
        ca.service_identity("edgefleet-repo").cert_file.read_bytes()
    )
    ca.issue_service_identity("edgefleet-cloud")
    second = x509.load_pem_x509_certificate(ident.cert_file.read_bytes())
    assert second.serial_number != first.serial_number
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(first.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None
    assert crl.get_revoked_certificate_by_serial_number(repo.serial_number) is None


def test_crl_is_resigned_before_it_expires(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    assert ca.refresh_crl(now=now) is False
    assert ca.refresh_crl(now=now + timedelta(days=300)) is True
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.next_update_utc is not None and crl.next_update_utc > now + timedelta(days=600)


class _DirFetcher(FetcherInterface):
    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.repo_dir / url.split("://repo/", 1)[1]
        if not path.is_file():
            raise tuf_errors.DownloadHTTPError(url, 404)
        return iter([path.read_bytes()])


def test_cli_key_rotation_and_offline_root_signing_followed_by_devices(tmp_path: Path) -> None:
    data = tmp_path / "cloud"
    assert cloud_main(["init", "--data-dir", str(data)]) == 0
    repo = ReleaseRepository.open(data / "repository", data / "keys")
    anchor = repo.root_bytes()  # what devices were provisioned with
    client = ReleaseClient(
        tmp_path / "dev", anchor, "tuf://repo/", fetcher=_DirFetcher(data / "repository")
    )
    with pytest.raises(ReleaseNotFoundError):
        client.get_manifest("digits", 1)
    old_targets = repo.root().roles["targets"].keyids
    assert cloud_main(["key", "rotate", "--data-dir", str(data), "--role", "targets"]) == 0
    assert repo.root().roles["targets"].keyids != old_targets
    keys = sorted((data / "keys" / "offline").glob("root-*.pem"))
    offline = tmp_path / "usb"
    offline.mkdir()
    for k in keys:  # root keys belong on offline media
        k.rename(offline / k.name)
        k.with_suffix("").with_suffix(".pub.json").unlink(missing_ok=True)
    moved = sorted(offline.glob("*.pem"))
    assert (
        cloud_main(["root", "--data-dir", str(data), "sign", "--root-key", str(moved[0])]) == 2
    ), "one key is below the threshold"
    assert (
        cloud_main(
            [
                "root",
                "--data-dir",
                str(data),
                "sign",
                "--root-key",
                str(moved[0]),
                "--root-key",
                str(moved[1]),
            ]
        )
        == 0
    )
    assert repo.root().version == 3
    with pytest.raises(ReleaseNotFoundError):  # the device walked to root v3 by itself
        client.get_manifest("digits", 1)
    trusted = json.loads((tmp_path / "dev" / "root.json").read_bytes())
    assert trusted["signed"]["version"] == 3
    # Metadata signed by the retired key is refused.
    (data / "repository" / "metadata" / "timestamp.json").write_text("{}")
    with pytest.raises(VerificationError):
        client.get_manifest("digits", 1)
