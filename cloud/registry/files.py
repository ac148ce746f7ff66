"""Checks on uploaded model and dataset files, and turning stored blobs back into files.

Accepted model files (``SOURCE_SUFFIXES``):

* ``.keras``   a Keras 3 model archive; loaded later with ``safe_mode`` (no
  arbitrary Python); its input shape is read from ``config.json`` here.
* ``.zip``     a TensorFlow SavedModel directory, zipped (HTTP uploads one
  file, and a SavedModel is a directory); ``saved_model.pb`` must sit at the
  archive root or inside one top-level directory.
* ``.tflite``  an already converted model ("bring your own model"): LiteRT
  must load it now, so a custom op the device runtime lacks is refused at once.

Archives are opened defensively: member count, unpacked size and paths are
bounded (no absolute paths, no ``..``, no links) before anything is
extracted, and datasets must be ``.npz`` files readable without pickle.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cloud.pipeline.sources import MAX_DATASET_FILE_BYTES, MAX_MODEL_FILE_BYTES, Dataset
from shared.errors import ConfigError, PipelineError

__all__ = [
    "MAX_ARCHIVE_MEMBERS",
    "MAX_UNPACKED_BYTES",
    "SOURCE_SUFFIXES",
    "SourceFacts",
    "check_dataset",
    "check_samples",
    "inspect_source",
    "materialize_source",
    "source_kind",
]

log = logging.getLogger(__name__)

#: Upload suffix -> source kind stored in the registry.
SOURCE_SUFFIXES = {".keras": "keras", ".zip": "saved_model_zip", ".tflite": "tflite"}
#: Bounds on archives (zip bombs): members and total unpacked bytes.
MAX_ARCHIVE_MEMBERS = 10_000
MAX_UNPACKED_BYTES = 2 * MAX_MODEL_FILE_BYTES
MAX_UNPACKED_DATASET_BYTES = MAX_DATASET_FILE_BYTES
_SAVED_MODEL_PB = "saved_model.pb"


@dataclass(frozen=True)
class SourceFacts:
    """What an upload check learned: the single input's sample shape and dtype, if known."""

    kind: str
    input_shape: tuple[int, ...] | None = None
    input_dtype: str | None = None


def source_kind(filename: str) -> str:
    """The source kind for an upload called ``filename``; ``ConfigError`` if unsupported."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in SOURCE_SUFFIXES:
        raise ConfigError(
            f"unsupported model file {filename!r}: upload a .keras file, a SavedModel "
            "directory zipped into a .zip, or a .tflite file"
        )
    return SOURCE_SUFFIXES[suffix]


def _checked_members(archive: zipfile.ZipFile, limit: int, what: str) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise ConfigError(f"{what} has {len(members)} members; the limit is {MAX_ARCHIVE_MEMBERS}")
    total = 0
    for info in members:
        path = PurePosixPath(info.filename)
        if path.is_absolute() or ".." in path.parts or "\\" in info.filename:
            raise ConfigError(f"{what} contains an unsafe path {info.filename!r}")
        mode = info.external_attr >> 16
        if mode and stat.S_ISLNK(mode):
            raise ConfigError(f"{what} contains a symbolic link {info.filename!r}")
        total += info.file_size
        if total > limit:
            raise ConfigError(f"{what} unpacks to more than {limit} bytes")
    return members


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"{what} is not a readable zip archive: {e}") from e


def _shape_from(value: Any) -> tuple[int, ...] | None:
    """``[null, 8, 8, 1]`` -> ``(8, 8, 1)``; ``None`` when not one fully known shape."""
    if not isinstance(value, list) or len(value) < 2:
        return None
    dims = value[1:]
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        return None
    return tuple(dims)


def _keras_facts(path: Path) -> SourceFacts:
    what = "the .keras file"
    with _open_zip(path, what) as archive:
        names = {m.filename for m in _checked_members(archive, MAX_UNPACKED_BYTES, what)}
        if "config.json" not in names:
            raise ConfigError(f"{what} is not a Keras 3 model archive (no config.json inside)")
        try:
            config = json.loads(archive.read("config.json"))
        except (ValueError, zipfile.BadZipFile) as e:
            raise ConfigError(f"{what} has an unreadable config.json: {e}") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{what} has a config.json that is not an object")
    shape = _shape_from((config.get("build_config") or {}).get("input_shape"))
    layers = (config.get("config") or {}).get("layers") or []
    inputs = [la for la in layers if isinstance(la, dict) and la.get("class_name") == "InputLayer"]
    if len(inputs) > 1:
        raise ConfigError(
            f"{what} has {len(inputs)} inputs; edgefleet releases models with exactly one input"
        )
    if shape is None and len(inputs) == 1:
        shape = _shape_from((inputs[0].get("config") or {}).get("batch_shape"))
    return SourceFacts(kind="keras", input_shape=shape, input_dtype="float32" if shape else None)


def _saved_model_root(members: list[zipfile.ZipInfo]) -> PurePosixPath:
    roots = [
        PurePosixPath(m.filename).parent
        for m in members
        if PurePosixPath(m.filename).name == _SAVED_MODEL_PB
    ]
    roots = [r for r in roots if len(r.parts) <= 1]
    if len(roots) != 1:
        raise ConfigError(
            f"the .zip holds {len(roots)} SavedModels; zip one SavedModel directory "
            f"({_SAVED_MODEL_PB} at the archive root or in one top-level folder)"
        )
    return roots[0]


def _extract_saved_model(path: Path, dest: Path) -> Path:
    what = "the SavedModel .zip"
    with _open_zip(path, what) as archive:
        members = _checked_members(archive, MAX_UNPACKED_BYTES, what)
        root = _saved_model_root(members)
        dest.mkdir(parents=True, exist_ok=True)
        for info in members:
            # Every path was checked above; write regular files only.
            target = dest / PurePosixPath(info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
    return dest / root


def inspect_source(path: Path, kind: str, workdir: Path) -> SourceFacts:
    """Check an uploaded model file before it is recorded; learn its input when cheap.

    Raises ``ConfigError`` for a file that is not what its name says and
    ``PipelineError`` for a ``.tflite`` the device runtime cannot load.
    """
    if kind == "keras":
        return _keras_facts(path)
    if kind == "tflite":
        from cloud.pipeline.evaluate import inspect_model

        data = path.read_bytes()
        info = inspect_model(data)
        return SourceFacts(
            kind=kind,
            input_shape=tuple(info.input_spec.shape[1:]),
            input_dtype=info.input_spec.dtype,
        )
    if kind == "saved_model_zip":
        from cloud.pipeline.convert import read_input_signature

        saved_model = _extract_saved_model(path, workdir / "saved_model")
        signature = read_input_signature(saved_model)
        dims = signature.shape[1:]
        shape = tuple(dims) if dims and all(d > 0 for d in dims) else None
        dtype = "float32" if signature.dtype == "float" else signature.dtype
        return SourceFacts(kind=kind, input_shape=shape, input_dtype=dtype)
    raise ConfigError(f"unknown source kind {kind!r}")


def materialize_source(blob: Path, kind: str, workdir: Path) -> Path:
    """A path ``cloud.pipeline.sources.load_model`` accepts for a stored source blob."""
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "saved_model_zip":
        return _extract_saved_model(blob, workdir / "saved_model")
    suffix = {"keras": ".keras", "tflite": ".tflite"}.get(kind)
    if suffix is None:
        raise ConfigError(f"unknown source kind {kind!r}")
    # load_model tells formats apart by suffix; blobs have none.
    target = workdir / f"model{suffix}"
    shutil.copyfile(blob, target)
    return target


def check_dataset(path: Path, what: str) -> Dataset:
    """Load an ``.npz`` dataset (``x``, optional ``y``) after bounding its unpacked size."""
    from cloud.pipeline.sources import load_dataset

    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{what} is not an .npz file (np.savez output with an array 'x')")
    with _open_zip(path, what) as archive:
        _checked_members(archive, MAX_UNPACKED_DATASET_BYTES, what)
    dataset = load_dataset(path, what=what)
    assert dataset is not None
    return dataset


def check_samples(dataset: Dataset, facts: SourceFacts, what: str) -> None:
    """Refuse data whose samples do not fit the model input (when its shape is known)."""
    if facts.input_shape is None:
        return
    got = tuple(dataset.x.shape[1:])
    if got != facts.input_shape:
        raise PipelineError(
            f"{what} has shape {tuple(dataset.x.shape)} (samples of shape {got}); the model "
            f"expects samples of shape {facts.input_shape} (batch first)"
        )
