"""Registry building blocks without TensorFlow or a database: the blob store,
archive checks on uploads, build options and the CLI progress bar."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cloud.cli.models import ProgressBar
from cloud.pipeline.gate import GateConfig
from cloud.registry import QuantizeOptions
from cloud.registry.blobs import BlobStore, BlobTooLargeError
from cloud.registry.files import (
    SourceFacts,
    check_dataset,
    check_samples,
    inspect_source,
    materialize_source,
    source_kind,
)
from shared.errors import ConfigError, PipelineError, StorageError


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name in links:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return path


def test_blob_roundtrip_is_content_addressed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    sha = store.put_bytes(b"model bytes")
    assert store.put_bytes(b"model bytes") == sha
    assert store.read(sha) == b"model bytes"
    assert store.path(sha).parent.name == sha[:2]
    assert [p.name for p in store.path(sha).parent.iterdir()] == [sha]  # no temp files left


def test_corrupt_blob_refused_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    sha = store.put_bytes(b"x" * 100)
    store.path(sha).write_bytes(b"y" * 100)
    with pytest.raises(StorageError, match="corrupt"):
        store.read(sha)
    with pytest.raises(StorageError, match="missing"):
        store.read("0" * 64)


def test_oversized_stream_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(BlobTooLargeError, match="limit of 10 bytes"):
        store.put_stream(io.BytesIO(b"z" * 11), max_bytes=10)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == []
    sha, size = store.put_stream(io.BytesIO(b"z" * 10), max_bytes=10)
    assert size == 10 and store.read(sha) == b"z" * 10


def test_blob_path_refuses_non_digests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sha256"):
        BlobStore(tmp_path).path("../../etc/passwd")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("m.keras", "keras"), ("M.TFLITE", "tflite"), ("sm.zip", "saved_model_zip")],
)
def test_source_kinds(name: str, kind: str) -> None:
    assert source_kind(name) == kind


def test_unsupported_source_suffix_named() -> None:
    with pytest.raises(ConfigError, match=r"unsupported model file 'model.h5'"):
        source_kind("model.h5")


def test_keras_input_shape_read_from_config(tmp_path: Path) -> None:
    config = {
        "class_name": "Sequential",
        "config": {
            "layers": [{"class_name": "InputLayer", "config": {"batch_shape": [None, 8, 8, 1]}}]
        },
        "build_config": {"input_shape": [None, 8, 8, 1]},
    }
    path = _zip(tmp_path / "m.keras", {"config.json": json.dumps(config).encode()})
    facts = inspect_source(path, "keras", tmp_path)
    assert facts.input_shape == (8, 8, 1)


def test_keras_with_two_inputs_refused(tmp_path: Path) -> None:
    layer = {"class_name": "InputLayer", "config": {"batch_shape": [None, 3]}}
    config = {"class_name": "Functional", "config": {"layers": [layer, layer]}}
    path = _zip(tmp_path / "m.keras", {"config.json": json.dumps(config).encode()})
    with pytest.raises(ConfigError, match="2 inputs"):
        inspect_source(path, "keras", tmp_path)


def test_not_a_keras_archive(tmp_path: Path) -> None:
    (tmp_path / "m.keras").write_bytes(b"not a zip at all")
    with pytest.raises(ConfigError, match="not a readable zip"):
        inspect_source(tmp_path / "m.keras", "keras", tmp_path)
    path = _zip(tmp_path / "n.keras", {"weights.h5": b""})
    with pytest.raises(ConfigError, match=r"no config\.json"):
        inspect_source(path, "keras", tmp_path)


@pytest.mark.parametrize(
    ("members", "links", "needle"),
    [
        ({"../evil/saved_model.pb": b""}, (), "unsafe path"),
        ({"/abs/saved_model.pb": b""}, (), "unsafe path"),
        ({"saved_model.pb": b""}, ("variables/link",), "symbolic link"),
        ({"a/saved_model.pb": b"", "b/saved_model.pb": b""}, (), "holds 2 SavedModels"),
        ({"variables/x": b""}, (), "holds 0 SavedModels"),
    ],
)
def test_saved_model_zip_refused(
    tmp_path: Path, members: dict[str, bytes], links: tuple[str, ...], needle: str
) -> None:
    path = _zip(tmp_path / "sm.zip", members, links)
    with pytest.raises(ConfigError, match=needle):
        materialize_source(path, "saved_model_zip", tmp_path / "work")
    assert not (tmp_path / "evil").exists()


def test_saved_model_zip_extracted_from_one_folder(tmp_path: Path) -> None:
    path = _zip(tmp_path / "sm.zip", {"export/saved_model.pb": b"pb", "export/variables/v": b"v"})
    root = materialize_source(path, "saved_model_zip", tmp_path / "work")
    assert (root / "saved_model.pb").read_bytes() == b"pb"
    assert root.is_relative_to(tmp_path / "work")


def test_dataset_checks(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 8, 8, 1), np.float32), y=np.arange(4))
    ds = check_dataset(tmp_path / "ok.npz", "calibration data")
    assert ds.x.shape == (4, 8, 8, 1) and ds.y is not None
    check_samples(ds, SourceFacts(kind="keras", input_shape=(8, 8, 1)), "calibration data")
    with pytest.raises(PipelineError, match=r"expects samples of shape \(8, 8, 3\)"):
        check_samples(ds, SourceFacts(kind="keras", input_shape=(8, 8, 3)), "calibration data")
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="has no array 'x'"):
        check_dataset(tmp_path / "nox.npz", "calibration data")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"not an \.npz file"):
        check_dataset(tmp_path / "bad.npz", "evaluation data")


def test_quantize_options_roundtrip_and_checks() -> None:
    opts = QuantizeOptions(mode="int16x8", gate=GateConfig(max_abs_error=0.5), labels=("a", "b"))
    assert QuantizeOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts
    with pytest.raises(ConfigError, match="unknown quantization mode 'int4'"):
        QuantizeOptions(mode="int4").check()


def test_progress_bar_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    bar("convert int8", 0.5)
    bar("convert int8", 0.5)  # same step: not repeated
    bar("done", 1.0)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[#####.....]  50%") and lines[0].endswith("convert int8")
    assert lines[1].startswith("[##########] 100%")
