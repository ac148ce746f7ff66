"""The agent's config file (``<data dir>/agent.toml``) and provisioning.

Provisioning writes the config and installs the trust anchor (TUF root
metadata) into the data dir; everything else the agent learns from signed
metadata.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

from device.agent import AgentConfig
from device.fsutil import atomic_write_bytes
from device.mqtt_session import TlsSettings
from shared.errors import ConfigError
from shared.topics import validate_device_id

__all__ = ["CONFIG_NAME", "load_config", "provision"]

CONFIG_NAME = "agent.toml"
_KEYS = {
    "device_id": str, "broker_host": str, "broker_port": int, "repo_url": str,
    "inference_threads": int, "inference_interval": float, "telemetry_interval": float,
    "interpreter_threads": int, "hardware_tags": list, "tls_ca": str, "tls_cert": str,
    "tls_key": str,
}


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


def provision(data_dir: Path, *, device_id: str, root_file: Path, broker_host: str,
              broker_port: int, repo_url: str, **extra: Any) -> Path:
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
    values = {"device_id": device_id, "broker_host": broker_host, "broker_port": broker_port,
              "repo_url": repo_url, **extra}
    unknown = set(values) - set(_KEYS)
    if unknown:
        raise ConfigError(f"unknown agent settings: {sorted(unknown)}")
    text = "# edgefleet device agent\n" + "".join(
        f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)
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
        want = _KEYS.get(key)
        if want is None:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        if want is float and isinstance(value, int):
            continue
        if not isinstance(value, want):
            raise ConfigError(f"{path}: {key} must be {want.__name__}, got {value!r}")
    for key in ("device_id", "broker_host", "broker_port", "repo_url"):
        if key not in raw:
            raise ConfigError(f"{path}: missing required setting {key!r}")
    tls = None
    if "tls_ca" in raw:
        tls = TlsSettings(ca_file=Path(raw.pop("tls_ca")), cert_file=Path(raw.pop("tls_cert")),
                          key_file=Path(raw.pop("tls_key")))
    if not (data_dir / "trust" / "root.json").exists():
        raise ConfigError(f"no trust anchor at {data_dir}/trust/root.json: provision the device")
    return AgentConfig(data_dir=data_dir, tls=tls, **raw)


def copy_root(src: Path, data_dir: Path) -> None:
    shutil.copyfile(src, Path(data_dir) / "trust" / "root.json")
