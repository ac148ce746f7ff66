"""The agent's config file (``<data dir>/agent.toml``) and provisioning.

Provisioning writes the config and installs the trust anchor (TUF root
metadata) into the data dir; everything else the agent learns from signed
metadata.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device.agent import BLOB_SOURCES, AgentConfig
from device.fsutil import atomic_write_bytes
from device.mqtt_session import TlsSettings
from shared.errors import ConfigError
from shared.topics import validate_device_id

__all__ = [
    "CONFIG_NAME",
    "create_csr",
    "enroll_with_token",
    "identity_files",
    "install_certificate",
    "load_config",
    "provision",
]

CONFIG_NAME = "agent.toml"
_KEYS: dict[str, type[Any]] = {
    "device_id": str,
    "broker_host": str,
    "broker_port": int,
    "repo_url": str,
    "inference_threads": int,
    "inference_interval": float,
    "telemetry_interval": float,
    "interpreter_threads": int,
    "hardware_tags": list,
    "tls_ca": str,
    "tls_cert": str,
    "tls_key": str,
    # update / probation policy (see device.agent.AgentConfig)
    "probation_s": float,
    "probation_min_inferences": int,
    "probation_max_s": float,
    "probation_max_error_rate": float,
    "probation_max_latency_ratio": float,
    "max_update_crashes": int,
    "use_deltas": bool,
    # where release files come from: "auto", "mqtt" (the broker's blobs) or "http"
    "blob_source": str,
    # drift histograms as packed counts (false only for clouds older than the format)
    "packed_histograms": bool,
}


#: Inclusive bounds of numeric settings; NaN and infinity are refused too.
_RANGES: dict[str, tuple[float, float]] = {
    "broker_port": (1, 65535),
    "inference_threads": (1, 64),
    "interpreter_threads": (1, 64),
    "inference_interval": (0.0, 3600.0),
    "telemetry_interval": (0.05, 86400.0),
    "probation_s": (0.0, 86400.0),
    "probation_min_inferences": (0, 10_000_000),
    "probation_max_s": (0.0, 7 * 86400.0),
    "probation_max_error_rate": (0.0, 1.0),
    "probation_max_latency_ratio": (1.0, 1e6),
    "max_update_crashes": (1, 1000),
}
#: Settings that take one of a few words.
_CHOICES: dict[str, tuple[str, ...]] = {"blob_source": BLOB_SOURCES}


def _check_value(path: Path, key: str, value: Any) -> None:
    want = _KEYS.get(key)
    if want is None:
        raise ConfigError(f"{path}: unknown setting {key!r}")
    # bool is an int in Python; `broker_port = true` is still a mistake.
    if isinstance(value, bool) and want is not bool:
        raise ConfigError(f"{path}: {key} must be {want.__name__}, got {value!r}")
    if not (isinstance(value, want) or (want is float and isinstance(value, int))):
        raise ConfigError(f"{path}: {key} must be {want.__name__}, got {value!r}")
    bounds = _RANGES.get(key)
    if bounds is not None and not (
        math.isfinite(float(value)) and bounds[0] <= float(value) <= bounds[1]
    ):
        raise ConfigError(f"{path}: {key} = {value!r} is outside {bounds[0]:g}..{bounds[1]:g}")
    choices = _CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{path}: {key} = {value!r} is not one of {', '.join(repr(c) for c in choices)}"
        )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def provision(
    data_dir: Path,
    *,
    device_id: str,
    root_file: Path,
    broker_host: str,
    broker_port: int,
    repo_url: str,
    **extra: Any,
) -> Path:
    """Create a device data dir: config file plus trust anchor. Returns the config path."""
    try:
        validate_device_id(device_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    data_dir = Path(data_dir)
    (data_dir / "trust").mkdir(parents=True, exist_ok=True)
    try:
        root = Path(root_file).read_bytes()
        json.loads(root)
    except (OSError, ValueError) as e:
        raise ConfigError(f"root metadata {root_file} is unreadable: {e}") from e
    atomic_write_bytes(data_dir / "trust" / "root.json", root)
    values = {
        "device_id": device_id,
        "broker_host": broker_host,
        "broker_port": broker_port,
        "repo_url": repo_url,
        **extra,
    }
    unknown = set(values) - set(_KEYS)
    if unknown:
        raise ConfigError(f"unknown agent settings: {sorted(unknown)}")
    text = "# edgefleet device agent\n" + "".join(
        f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None
    )
    cfg_path = data_dir / CONFIG_NAME
    atomic_write_bytes(cfg_path, text.encode())
    return cfg_path


def load_config(data_dir: Path, **overrides: Any) -> AgentConfig:
    """Read ``agent.toml``; refuse unknown keys and wrong types with the key's name."""
    data_dir = Path(data_dir)
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"no agent config at {path}: run `edgefleet-device provision`") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e
    raw.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in raw.items():
        _check_value(path, key, value)
    for key in ("device_id", "broker_host", "broker_port", "repo_url"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required setting {key!r}")
    try:
        validate_device_id(raw["device_id"])
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e
    if raw.get("probation_max_s", 120.0) < raw.get("probation_s", 10.0):
        raise ConfigError(f"{path}: probation_max_s must not be shorter than probation_s")
    tls_keys = {"tls_ca", "tls_cert", "tls_key"} & set(raw)
    if tls_keys and len(tls_keys) != 3:
        raise ConfigError(
            f"{path}: mutual TLS needs all of tls_ca, tls_cert and tls_key "
            f"(found only {sorted(tls_keys)})"
        )
    tls = None
    if "tls_ca" in raw:
        tls = TlsSettings(
            ca_file=Path(raw.pop("tls_ca")),
            cert_file=Path(raw.pop("tls_cert")),
            key_file=Path(raw.pop("tls_key")),
        )
    if not (data_dir / "trust" / "root.json").exists():
        raise ConfigError(f"no trust anchor at {data_dir}/trust/root.json: provision the device")
    return AgentConfig(data_dir=data_dir, tls=tls, **raw)


def copy_root(src: Path, data_dir: Path) -> None:
    shutil.copyfile(src, Path(data_dir) / "trust" / "root.json")


# -- device identity (mutual TLS) ------------------------------------------------------
#
# The device makes its own key pair; the key never leaves ``<data dir>/identity``.
# Enrollment sends only a CSR: to an operator (offline: ``edgefleet-device enroll
# --csr-out``, then ``--cert``/``--ca`` to install what the CA returns) or to the
# cloud with a one-time bootstrap token (``--cloud URL --token T``).

IDENTITY_DIR = "identity"
DEVICE_KEY = "device.key"
DEVICE_CERT = "device.pem"
DEVICE_CSR = "device.csr"
CA_CERT = "ca.pem"
#: Bounds on what an enrollment endpoint may send back.
MAX_ENROLL_RESPONSE_BYTES = 64 * 1024
ENROLL_TIMEOUT_S = 30.0


def identity_files(data_dir: Path) -> TlsSettings:
    """Where a device keeps its CA certificate, certificate and private key."""
    base = Path(data_dir) / IDENTITY_DIR
    return TlsSettings(
        ca_file=base / CA_CERT, cert_file=base / DEVICE_CERT, key_file=base / DEVICE_KEY
    )


def _configured_device_id(data_dir: Path) -> str:
    path = Path(data_dir) / CONFIG_NAME
    try:
        device_id = tomllib.loads(path.read_text()).get("device_id")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path} ({e}): provision the device before enrolling") from e
    if not isinstance(device_id, str):
        raise ConfigError(f"{path} has no device_id: provision the device before enrolling")
    return device_id


def create_csr(data_dir: Path, *, new_key: bool = False) -> bytes:
    """Make (once, or again with ``new_key``) the device key and return a CSR for it.

    The CSR's common name is the provisioned device id; it is also written to
    ``identity/device.csr`` for offline signing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    device_id = _configured_device_id(data_dir)
    files = identity_files(data_dir)
    key: ec.EllipticCurvePrivateKey
    if new_key or not files.key_file.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        files.key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(files.key_file, pem)  # mkstemp: 0600
        os.chmod(files.key_file, 0o600)
    else:
        loaded = _load_key(files.key_file)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{files.key_file} is not an EC key; enroll with a new key")
        key = loaded
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    data = csr.public_bytes(serialization.Encoding.PEM)
    atomic_write_bytes(files.key_file.parent / DEVICE_CSR, data)
    return data


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"device key {path} is unreadable: {e}") from e


def install_certificate(data_dir: Path, cert_pem: bytes, ca_pem: bytes) -> TlsSettings:
    """Check and install the certificate the CA issued; point ``agent.toml`` at it.

    Refuses a certificate that is not for this device id, not for this device's
    key, not signed by ``ca_pem``, or outside its validity period."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    device_id = _configured_device_id(data_dir)
    files = identity_files(data_dir)
    if not files.key_file.exists():
        raise ConfigError(
            f"no device key at {files.key_file}: run `edgefleet-device enroll` "
            "to make one and a CSR first"
        )
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as e:
        raise ConfigError(f"the certificate or CA certificate is not PEM: {e}") from e
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [device_id]:
        raise ConfigError(f"the certificate is for {cns}, this device is {device_id!r}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != _load_key(files.key_file).public_key().public_bytes(
        *spki
    ):
        raise ConfigError(
            "the certificate does not match this device's key (was the CSR made "
            "on another device, or the key replaced since?)"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise ConfigError(f"the certificate was not issued by the given CA: {e!r}") from e
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(
            f"the certificate is valid from {cert.not_valid_before_utc} to "
            f"{cert.not_valid_after_utc}, not now"
        )
    atomic_write_bytes(files.ca_file, ca_pem)
    atomic_write_bytes(files.cert_file, cert_pem)
    _update_config(
        data_dir,
        tls_ca=str(files.ca_file),
        tls_cert=str(files.cert_file),
        tls_key=str(files.key_file),
    )
    return files


def enroll_with_token(
    data_dir: Path,
    cloud_url: str,
    token: str,
    *,
    expected_ca: bytes | None = None,
    timeout: float = ENROLL_TIMEOUT_S,
    new_key: bool = False,
) -> TlsSettings:
    """Enroll online: send a CSR and the one-time bootstrap token to the cloud
    (``new_key``: replace the device key first, after a key leak).

    ``expected_ca`` pins the CA certificate (recommended unless ``cloud_url`` is
    HTTPS): a response carrying another CA is refused."""
    import urllib.error
    import urllib.request

    if not cloud_url.startswith(("http://", "https://")):
        raise ConfigError(f"cloud URL {cloud_url!r} must start with http:// or https://")
    csr = create_csr(data_dir, new_key=new_key)
    body = json.dumps({"token": token, "csr": csr.decode()}).encode()
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        cloud_url.rstrip("/") + "/api/v1/enroll",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read(MAX_ENROLL_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        detail = e.read(4096).decode(errors="replace")
        raise ConfigError(f"the cloud refused enrollment ({e.code}): {detail}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"cannot reach the cloud at {cloud_url}: {e}") from e
    if len(raw) > MAX_ENROLL_RESPONSE_BYTES:
        raise ConfigError("the enrollment response is oversized")
    try:
        answer = json.loads(raw)
        cert, ca = answer["certificate"].encode(), answer["ca_certificate"].encode()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"the enrollment response is malformed: {e}") from e
    if expected_ca is not None and ca.strip() != expected_ca.strip():
        raise ConfigError(
            "the cloud answered with another CA certificate than the pinned one; "
            "refusing (is something between this device and the cloud?)"
        )
    return install_certificate(data_dir, cert, ca)


def _update_config(data_dir: Path, **values: Any) -> None:
    path = Path(data_dir) / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot update {path}: {e}") from e
    raw.update(values)
    text = "# edgefleet device agent\n" + "".join(
        f"{k} = {_toml_value(v)}\n" for k, v in raw.items() if v is not None
    )
    atomic_write_bytes(path, text.encode())
