"""The agent's config file: a wrong value is refused with the key and the reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from device.config import CONFIG_NAME, load_config, provision
from shared.errors import ConfigError


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "root.json"
    root.write_text(json.dumps({"signed": {"_type": "root"}, "signatures": []}))
    d = tmp_path / "dev"
    provision(
        d,
        device_id="dev-1",
        root_file=root,
        broker_host="127.0.0.1",
        broker_port=1883,
        repo_url="http://127.0.0.1:8080/tuf/",
    )
    return d


def _append(d: Path, line: str) -> None:
    with (d / CONFIG_NAME).open("a") as f:
        f.write(line + "\n")


def test_provisioned_config_loads(data_dir: Path) -> None:
    cfg = load_config(data_dir)
    assert cfg.device_id == "dev-1" and cfg.broker_port == 1883 and cfg.tls is None


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("telemetry_interval = nan", "telemetry_interval = nan is outside"),
        ("inference_interval = inf", "inference_interval = inf is outside"),
        ("inference_threads = 0", "inference_threads = 0 is outside"),
        ("probation_max_error_rate = 1.5", "probation_max_error_rate = 1.5 is outside"),
        ("inference_threads = true", "inference_threads must be int"),
        ('inference_threads = "2"', "inference_threads must be int"),
        ("surprise = 1", "unknown setting 'surprise'"),
        ('tls_ca = "/ca.pem"', "needs all of tls_ca, tls_cert and tls_key"),
        ("probation_s = 60.0\nprobation_max_s = 30.0", "must not be shorter"),
    ],
)
def test_bad_setting_refused_naming_the_key(data_dir: Path, line: str, needle: str) -> None:
    _append(data_dir, line)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(data_dir)


def test_bad_port_and_device_id_refused(data_dir: Path) -> None:
    text = (data_dir / CONFIG_NAME).read_text()
    (data_dir / CONFIG_NAME).write_text(text.replace("broker_port = 1883", "broker_port = -1"))
    with pytest.raises(ConfigError, match=r"broker_port = -1 is outside 1\.\.65535"):
        load_config(data_dir)
    (data_dir / CONFIG_NAME).write_text(text.replace('"dev-1"', '"dev/+"'))
    with pytest.raises(ConfigError, match="invalid device id"):
        load_config(data_dir)
