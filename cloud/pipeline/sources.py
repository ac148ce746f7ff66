"""Inputs to the pipeline: the model to release and the data to calibrate and judge it.

A model may be a Keras model object, a ``.keras`` file, a TensorFlow
SavedModel directory, or an existing ``.tflite`` file ("bring your own
model": it is released as it is, its quantization read from its tensors).
Calibration data comes from an ``.npz`` file (key ``x``, optional ``y``), an
array, or a callable returning one; evaluation data likewise, with or without
labels. Everything here is bounded and hashed so a release records exactly
what it was built from.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias, Union

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, PipelineError

__all__ = [
    "MAX_DATASET_FILE_BYTES",
    "MAX_MODEL_FILE_BYTES",
    "MAX_SAMPLES",
    "DataSource",
    "Dataset",
    "LoadedModel",
    "ModelSource",
    "arrays_sha256",
    "load_dataset",
    "load_model",
]

log = logging.getLogger(__name__)

#: Largest model file accepted; well above MobileNet-class edge models.
MAX_MODEL_FILE_BYTES = 512 * 1024 * 1024
#: Largest ``.npz`` dataset file accepted.
MAX_DATASET_FILE_BYTES = 2 * 1024 * 1024 * 1024
#: Most samples accepted in one dataset (calibration and evaluation are sampled further down).
MAX_SAMPLES = 1_000_000

ModelKind = Literal["keras", "saved_model", "tflite"]
#: What ``load_model`` accepts: a Keras model object, a path (``str`` or
#: ``os.PathLike``) or a ``LoadedModel``. Spelled ``Any`` because Keras is
#: not imported here and ships no type information.
ModelSource: TypeAlias = Any
#: What ``load_dataset`` accepts.
DataSource = Union[
    "Dataset",
    npt.NDArray[Any],
    tuple[Any, Any],
    str,
    os.PathLike[str],
    Callable[[], Any],
]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for conversion (Keras / SavedModel) or already converted (TFLite)."""

    kind: ModelKind
    #: sha256 of the source: file bytes, SavedModel files, or Keras architecture + weights.
    sha256: str
    description: str
    keras_model: Any = None
    saved_model_dir: Path | None = None
    tflite_bytes: bytes | None = None


@dataclass(frozen=True)
class Dataset:
    """Real-valued model inputs ``x`` (N, ...) and optional integer labels ``y`` (N,)."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise PipelineError(f"dataset has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sha256(self) -> str:
        return arrays_sha256([self.x] if self.y is None else [self.x, self.y])


def arrays_sha256(arrays: Iterable[npt.NDArray[Any]]) -> str:
    """A hash of arrays that covers dtype and shape, not only the raw bytes."""
    h = hashlib.sha256()
    for arr in arrays:
        a = np.ascontiguousarray(arr)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_size(path: Path, limit: int, what: str) -> None:
    size = path.stat().st_size
    if size > limit:
        raise ConfigError(f"{what} {path} is {size} bytes; the limit is {limit} bytes")


def _keras_sha256(model: Any) -> str:
    # Saved .keras archives embed timestamps, so hash what defines the model
    # instead: its architecture and its weights.
    h = hashlib.sha256(model.to_json().encode())
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _saved_model_sha256(directory: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    total = 0
    for p in files:
        total += p.stat().st_size
        if total > MAX_MODEL_FILE_BYTES:
            raise ConfigError(f"SavedModel {directory} exceeds {MAX_MODEL_FILE_BYTES} bytes")
        h.update(p.relative_to(directory).as_posix().encode() + b"\0")
        h.update(_file_sha256(p).encode())
    return h.hexdigest()


def _is_keras_model(obj: Any) -> bool:
    # Checked by duck typing so this module never imports Keras.
    return callable(getattr(obj, "export", None)) and callable(getattr(obj, "get_weights", None))


def load_model(source: ModelSource) -> LoadedModel:
    """Resolve ``source`` into a ``LoadedModel``; ``ConfigError`` if it is not a model."""
    if isinstance(source, LoadedModel):
        return source
    if _is_keras_model(source):
        name = getattr(source, "name", "model")
        return LoadedModel(
            kind="keras",
            sha256=_keras_sha256(source),
            description=f"Keras model {name!r}",
            keras_model=source,
        )
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"cannot load a model from a {type(source).__name__}; pass a Keras model, "
            "a .keras file, a SavedModel directory or a .tflite file"
        )
    path = Path(source)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ConfigError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return LoadedModel(
            kind="saved_model",
            sha256=_saved_model_sha256(path),
            description=f"SavedModel {path}",
            saved_model_dir=path,
        )
    if not path.is_file():
        raise ConfigError(f"model {path} does not exist")
    _check_size(path, MAX_MODEL_FILE_BYTES, "model file")
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        data = path.read_bytes()
        return LoadedModel(
            kind="tflite",
            sha256=hashlib.sha256(data).hexdigest(),
            description=f"TFLite model {path}",
            tflite_bytes=data,
        )
    if suffix == ".keras":
        import keras

        try:
            # safe_mode (the default) refuses to deserialize arbitrary Python lambdas.
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as e:
            raise ConfigError(f"cannot load Keras model {path}: {e}") from e
        return LoadedModel(
            kind="keras",
            sha256=_file_sha256(path),
            description=f"Keras model file {path}",
            keras_model=model,
        )
    raise ConfigError(
        f"unsupported model file {path}: expected .keras, .tflite or a SavedModel directory"
    )


def _as_inputs(x: Any, where: str) -> npt.NDArray[np.float32]:
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{where}: inputs are not an array: {e}") from e
    if arr.dtype.kind not in "biuf":
        raise PipelineError(f"{where}: inputs must be numeric, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise PipelineError(f"{where}: inputs must be a batch (N, ...), got shape {arr.shape}")
    if not 1 <= len(arr) <= MAX_SAMPLES:
        raise PipelineError(f"{where}: needs 1..{MAX_SAMPLES} samples, got {len(arr)}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise PipelineError(f"{where}: inputs contain NaN or infinite values")
    return out


def _as_labels(y: Any, n: int, where: str) -> npt.NDArray[np.int64]:
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] > 1:
        # One-hot or probability targets: the class is the arg-max.
        arr = arr.argmax(axis=1)
    arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else arr
    if arr.ndim != 1 or len(arr) != n:
        raise PipelineError(f"{where}: expected {n} labels, got shape {arr.shape}")
    integral = arr.dtype.kind in "biu" or (arr.dtype.kind == "f" and np.all(arr == np.round(arr)))
    if not integral:
        raise PipelineError(f"{where}: labels must be class indices, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _from_npz(path: Path, where: str) -> Dataset:
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist")
    _check_size(path, MAX_DATASET_FILE_BYTES, "dataset file")
    try:
        # allow_pickle=False: a dataset file must never execute code.
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise ConfigError(f"{where}: {path} has no array 'x' (found {npz.files})")
            x = _as_inputs(npz["x"], where)
            y = _as_labels(npz["y"], len(x), where) if "y" in npz.files else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read {path}: {e}") from e
    return Dataset(x=x, y=y)


def load_dataset(source: DataSource | None, *, what: str = "dataset") -> Dataset | None:
    """Turn any accepted data source into a ``Dataset`` (``None`` stays ``None``).

    Accepted: a ``Dataset``; an array of inputs; an ``(x, y)`` tuple (``y`` may be
    ``None``); a path to an ``.npz`` with ``x`` and optional ``y``; or a callable
    returning any of those. ``what`` names the data in error messages.
    """
    if source is None or isinstance(source, Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _from_npz(Path(source), what)
    if callable(source) and not isinstance(source, np.ndarray):
        try:
            produced = source()
        except Exception as e:
            raise PipelineError(f"{what}: the data callable failed: {e}") from e
        if callable(produced) or isinstance(produced, (str, os.PathLike)):
            raise PipelineError(f"{what}: the data callable must return arrays")
        return load_dataset(produced, what=what)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise PipelineError(f"{what}: expected an (x, y) pair, got {len(source)} items")
        x = _as_inputs(source[0], what)
        y = None if source[1] is None else _as_labels(source[1], len(x), what)
        return Dataset(x=x, y=y)
    return Dataset(x=_as_inputs(source, what))
