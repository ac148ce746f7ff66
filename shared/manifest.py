"""The release manifest: what a release is, carried inside signed TUF metadata.

A release is a set of TUF targets under ``<model>/<release>/``:

* ``model.tflite``  the model; its TUF ``custom`` field holds this manifest
* ``selftest.npz``  signed self-test vectors (inputs + expected outputs)
* ``baseline.npz``  the drift baseline (bin edges + reference counts)

Because the manifest sits in the targets metadata, TUF signs it together with
the hashes of every file it names: nothing on the device trusts an unsigned
field. Parsing is pure: it takes the ``custom`` value and returns a validated
``ReleaseManifest`` or raises ``ManifestError``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import IncompatibleReleaseError, ManifestError
from shared.messages import MODEL_NAME_PATTERN

__all__ = [
    "BASELINE_FILE",
    "MANIFEST_SCHEMA",
    "MODEL_FILE",
    "QUANTIZATION_MODES",
    "SELFTEST_FILE",
    "DeltaBase",
    "DriftSpec",
    "ReleaseManifest",
    "RuntimeNeeds",
    "SelfTestSpec",
    "TensorSpec",
    "check_compatible",
    "parse_version",
    "runtime_allowed",
    "target_path",
]

MANIFEST_SCHEMA = "edgefleet.manifest/1"
MODEL_FILE = "model.tflite"
SELFTEST_FILE = "selftest.npz"
BASELINE_FILE = "baseline.npz"

QUANTIZATION_MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
DType = Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"]

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def target_path(model: str, release: int, filename: str) -> str:
    """The TUF target path of ``filename`` in release ``release`` of ``model``."""
    if not re.match(MODEL_NAME_PATTERN, model):
        raise ValueError(f"invalid model name {model!r}")
    if release < 1:
        raise ValueError(f"release numbers start at 1, got {release}")
    return f"{model}/{release}/{filename}"


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.3..."`` -> ``(1, 2, 3)``; ``ValueError`` if it does not start that way."""
    m = _VERSION.match(text)
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """Shape, type and quantization of a model input or output tensor."""

    name: Annotated[str, Field(max_length=256)]
    shape: Annotated[
        list[Annotated[int, Field(ge=1, le=1 << 20)]], Field(min_length=1, max_length=8)
    ]
    dtype: DType
    #: Affine quantization ``real = scale * (q - zero_point)``; absent for float tensors.
    scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    zero_point: int | None = None


class SelfTestSpec(_Strict):
    """How the device checks a new model before swapping it in."""

    target: str
    count: Annotated[int, Field(ge=1, le=10_000)]
    #: Element-wise tolerance on dequantized outputs: ``|a - e| <= atol + rtol * |e|``.
    atol: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    rtol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    #: Fraction of vectors whose arg-max must match (classification models).
    min_top1_agreement: Annotated[float, Field(ge=0, le=1)] = 1.0


class DriftSpec(_Strict):
    """Where the drift baseline is and how features are computed from inputs."""

    target: str
    features: Literal["flatten", "channel_mean"]
    n_features: Annotated[int, Field(ge=1, le=1024)]
    bins: Annotated[int, Field(ge=2, le=64)]
    #: Number of output classes for the prediction histogram (0: not a classifier).
    n_classes: Annotated[int, Field(ge=0, le=1024)] = 0


class RuntimeNeeds(_Strict):
    """What a device must have to run the release."""

    min_agent_version: str = "0.1.0"
    #: Builtin ops the model uses; the device refuses a model with ops its runtime lacks.
    ops: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=512)] = []
    #: If non-empty, a device needs at least one of these hardware tags.
    hardware_tags: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)] = []
    #: If non-empty, the device runtime must be one of these (``ai-edge-litert``,
    #: ``tflite-runtime``, ``tensorflow``), optionally with a minimum version:
    #: ``ai-edge-litert>=2.0``.
    runtimes: Annotated[
        list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}(>=\d+(\.\d+){0,2})?$")]],
        Field(max_length=8),
    ] = []


class DeltaBase(_Strict):
    """A binary delta from an earlier release's model to this one."""

    from_release: Annotated[int, Field(ge=1)]
    target: str
    encoding: Literal["bsdiff4+zstd"] = "bsdiff4+zstd"


class ReleaseManifest(_Strict):
    """Everything a device needs to know about a release, signed by TUF."""

    schema_: Literal["edgefleet.manifest/1"] = Field(default="edgefleet.manifest/1", alias="schema")
    model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
    release: Annotated[int, Field(ge=1)]
    created_at: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    quantization: Literal["float32", "dynamic", "float16", "int8", "int16x8"]
    input: TensorSpec
    output: TensorSpec
    metrics: dict[Annotated[str, Field(max_length=64)], float] = {}
    runtime: RuntimeNeeds = RuntimeNeeds()
    selftest: SelfTestSpec
    drift: DriftSpec | None = None
    deltas: Annotated[list[DeltaBase], Field(max_length=16)] = []
    labels: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=1024)] | None = (
        None
    )
    #: Lineage summary (source model hash, dataset hash, converter version ...).
    source: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]] = {}

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _paths_inside_release(self) -> ReleaseManifest:
        prefix = f"{self.model}/{self.release}/"
        paths = [self.selftest.target] + ([self.drift.target] if self.drift else [])
        paths += [d.target for d in self.deltas]
        for p in paths:
            if not p.startswith(prefix) or ".." in p.split("/"):
                raise ValueError(f"target {p!r} lies outside the release directory {prefix!r}")
        for d in self.deltas:
            if d.from_release >= self.release:
                raise ValueError(f"delta base {d.from_release} is not older than {self.release}")
        return self

    @property
    def model_target(self) -> str:
        return target_path(self.model, self.release, MODEL_FILE)

    def to_custom(self) -> dict[str, Any]:
        """The JSON value stored in the TUF target's ``custom`` field.

        TUF signs canonical JSON, which has no floats: the repository writes
        floats as their exact ``repr`` strings when it signs, and ``from_custom``
        reads them back as floats (the manifest models are deliberately not
        ``strict`` so that numeric strings coerce).
        """
        return {"edgefleet": self.model_dump(mode="json", by_alias=True, exclude_none=True)}

    @classmethod
    def from_custom(cls, custom: Any, *, target: str) -> ReleaseManifest:
        """Parse the ``custom`` field of TUF target ``target``.

        Raises ``ManifestError`` if it is missing, malformed, or describes a
        different target than the one it is attached to.
        """
        if not isinstance(custom, dict) or "edgefleet" not in custom:
            raise ManifestError(f"target {target!r} carries no edgefleet release manifest")
        try:
            manifest = cls.model_validate(custom["edgefleet"])
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<manifest>"
            raise ManifestError(
                f"release manifest of {target!r} is invalid at {where!r}: {first['msg']}"
            ) from e
        if manifest.model_target != target:
            raise ManifestError(
                f"manifest for {manifest.model_target!r} is attached to target {target!r}"
            )
        return manifest


def check_compatible(
    manifest: ReleaseManifest,
    *,
    agent_version: str,
    runtime_ops: frozenset[str] | None,
    hardware_tags: frozenset[str],
    runtime: str | None = None,
) -> None:
    """Raise ``IncompatibleReleaseError`` if this device cannot run ``manifest``.

    ``runtime_ops`` is the set of builtin ops the device runtime has, or
    ``None`` if the runtime cannot tell (the interpreter load will then decide).
    """
    try:
        have = parse_version(agent_version)
        need = parse_version(manifest.runtime.min_agent_version)
    except ValueError as e:
        raise IncompatibleReleaseError(str(e)) from e
    if have < need:
        raise IncompatibleReleaseError(
            f"release {manifest.release} needs agent >= {manifest.runtime.min_agent_version}, "
            f"this device runs {agent_version}"
        )
    if runtime_ops is not None:
        missing = sorted(set(manifest.runtime.ops) - runtime_ops)
        if missing:
            raise IncompatibleReleaseError(
                f"release {manifest.release} uses ops this runtime lacks: {', '.join(missing)}"
            )
    if (
        manifest.runtime.runtimes
        and runtime is not None
        and not runtime_allowed(manifest.runtime.runtimes, runtime)
    ):
        raise IncompatibleReleaseError(
            f"release {manifest.release} runs on {manifest.runtime.runtimes}, "
            f"this device has {runtime!r}"
        )
    wanted = set(manifest.runtime.hardware_tags)
    if wanted and not wanted & hardware_tags:
        raise IncompatibleReleaseError(
            f"release {manifest.release} needs one of the hardware tags {sorted(wanted)}, "
            f"this device has {sorted(hardware_tags)}"
        )


def runtime_allowed(allowed: list[str], runtime: str) -> bool:
    """Whether a device runtime described as ``"<name> <version>"`` (what agents
    report, e.g. ``"ai-edge-litert 2.3.0"``) matches one of ``allowed``."""
    name, _, ver = runtime.strip().partition(" ")
    for rule in allowed:
        want, _, minimum = rule.partition(">=")
        if want != name.lower():
            continue
        if not minimum:
            return True
        try:
            have = parse_version((ver.strip() or "0") + ".0.0")
            need = parse_version(minimum + ".0.0")
        except ValueError:
            return False
        if have >= need:
            return True
    return False
