"""``edgefleet-cloud model add|quantize|release|list|show`` on a local data dir, in-process
(the entry point is ``cloud.cli.main``; a subprocess would only add TensorFlow's import time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.cli import main
from cloud.pipeline.digits import load_digits_splits, train_digits_cnn
from cloud.tuf_repo import ReleaseRepository

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cli-inputs")
    splits = load_digits_splits(seed=0)
    train_digits_cnn(splits, epochs=4, seed=0).save(d / "digits.keras")
    np.savez(d / "calib.npz", x=splits.x_calib)
    np.savez(d / "eval.npz", x=splits.x_test, y=splits.y_test)
    np.savez(d / "wrong.npz", x=splits.x_calib.reshape(len(splits.x_calib), 64))
    return d


def _run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_model_commands_end_to_end(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", tmp_path / "cloud"]
    code, out, _ = _run(capsys, "model", "add", "digits", inputs / "digits.keras", *data)
    assert code == 0 and "added keras source 1 to digits" in out and "[8, 8, 1]" in out

    code, out, err = _run(
        capsys,
        "model",
        "quantize",
        "digits",
        "--calibration",
        inputs / "calib.npz",
        "--eval",
        inputs / "eval.npz",
        "--labels",
        ",".join("0123456789"),
        *data,
    )
    assert code == 0, err
    assert "candidate 1 of digits: ready (int8)" in out and "gate: int8: passed" in out
    bars = [line for line in err.splitlines() if line.startswith("[")]
    assert "convert int8" in err and bars[-1].startswith("[" + "#" * 28 + "] 100%")

    code, out, _ = _run(capsys, "model", "release", "digits", "1", *data)
    assert code == 0 and "published release 1 of digits" in out
    code, out, _ = _run(capsys, "model", "list", *data)
    assert code == 0 and out.splitlines()[1].split() == ["digits", "1", "1", "1"]
    code, out, _ = _run(capsys, "model", "show", "digits", "--json", *data)
    shown = json.loads(out)
    assert shown["releases"][0]["lineage"]["mode"] == "int8"
    assert shown["candidates"][0]["status"] == "released"
    repo = ReleaseRepository.open(tmp_path / "cloud" / "repository", tmp_path / "cloud" / "keys")
    assert "digits/1/model.tflite" in repo.list_targets()


def test_cli_errors_name_the_cause_and_publish_nothing(
    inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", tmp_path / "cloud"]
    code, _, err = _run(capsys, "model", "quantize", "digits", *data)
    assert code == 2 and "model 'digits' is not in the registry" in err
    assert _run(capsys, "model", "add", "digits", inputs / "digits.keras", *data)[0] == 0
    code, _, err = _run(
        capsys, "model", "quantize", "digits", "--calibration", inputs / "wrong.npz", *data
    )
    assert code == 2 and "expects samples of shape (8, 8, 1)" in err
    code, _, err = _run(
        capsys,
        "model",
        "quantize",
        "digits",
        "--calibration",
        inputs / "calib.npz",
        "--no-fallback",
        "--max-abs-error",
        "1e-6",
        "--release",
        *data,
    )
    assert code == 2 and "no quantization mode passed the gate (fallback was off)" in err
    code, out, _ = _run(capsys, "model", "show", "digits", *data)
    assert "failed" in out and "releases:\n" in out and out.endswith("releases:\n")
    repo = ReleaseRepository.open(tmp_path / "cloud" / "repository", tmp_path / "cloud" / "keys")
    assert repo.list_targets() == {}
