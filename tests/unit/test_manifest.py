"""The release manifest, self-test comparison and drift statistics (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from shared.drift import (
    build_baseline,
    extract_features,
    histogram,
    js_divergence,
    pack_baseline,
    psi,
    unpack_baseline,
)
from shared.errors import IncompatibleReleaseError, ManifestError, SelfTestError
from shared.manifest import DriftSpec, ReleaseManifest, check_compatible
from shared.selftest import check_outputs, pack_vectors, unpack_vectors


def manifest(**kw: object) -> ReleaseManifest:
    base: dict[str, object] = {
        "model": "digits",
        "release": 3,
        "created_at": 1.0,
        "quantization": "int8",
        "input": {
            "name": "x",
            "shape": [1, 8, 8, 1],
            "dtype": "int8",
            "scale": 0.004,
            "zero_point": -128,
        },
        "output": {
            "name": "y",
            "shape": [1, 10],
            "dtype": "int8",
            "scale": 1 / 256,
            "zero_point": -128,
        },
        "selftest": {"target": "digits/3/selftest.npz", "count": 4, "atol": 2 / 256},
        "drift": {
            "target": "digits/3/baseline.npz",
            "features": "flatten",
            "n_features": 64,
            "bins": 10,
            "n_classes": 10,
        },
        "runtime": {"min_agent_version": "0.1.0", "ops": ["CONV_2D"]},
    }
    base.update(kw)
    return ReleaseManifest.model_validate(base)


def test_manifest_round_trips_through_tuf_custom() -> None:
    m = manifest()
    assert ReleaseManifest.from_custom(m.to_custom(), target="digits/3/model.tflite") == m


def test_manifest_attached_to_wrong_target_rejected() -> None:
    with pytest.raises(ManifestError, match="attached to target"):
        ReleaseManifest.from_custom(manifest().to_custom(), target="digits/4/model.tflite")


def test_manifest_missing_or_invalid_rejected() -> None:
    with pytest.raises(ManifestError, match="no edgefleet release manifest"):
        ReleaseManifest.from_custom({}, target="digits/3/model.tflite")
    bad = manifest().to_custom()
    bad["edgefleet"]["quantization"] = "int4"
    with pytest.raises(ManifestError, match="quantization"):
        ReleaseManifest.from_custom(bad, target="digits/3/model.tflite")


def test_manifest_targets_must_stay_inside_release() -> None:
    with pytest.raises(ValueError, match="outside the release"):
        manifest(selftest={"target": "digits/2/selftest.npz", "count": 1, "atol": 0.1})


def test_compatibility_checks_agent_ops_and_hardware() -> None:
    m = manifest(
        runtime={
            "min_agent_version": "0.2.0",
            "ops": ["CONV_2D", "MY_OP"],
            "hardware_tags": ["camera"],
        }
    )
    with pytest.raises(IncompatibleReleaseError, match=r"needs agent >= 0\.2\.0"):
        check_compatible(m, agent_version="0.1.9", runtime_ops=None, hardware_tags=frozenset())
    with pytest.raises(IncompatibleReleaseError, match="MY_OP"):
        check_compatible(
            m,
            agent_version="0.2.0",
            runtime_ops=frozenset({"CONV_2D"}),
            hardware_tags=frozenset({"camera"}),
        )
    with pytest.raises(IncompatibleReleaseError, match="hardware tags"):
        check_compatible(
            m, agent_version="0.2.0", runtime_ops=None, hardware_tags=frozenset({"mic"})
        )
    check_compatible(
        m, agent_version="0.2.0", runtime_ops=None, hardware_tags=frozenset({"camera"})
    )


def _vectors(m: ReleaseManifest) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 127, size=(4, 8, 8, 1), dtype=np.int8)
    y = rng.integers(-128, 127, size=(4, 10), dtype=np.int8)
    return x, y


def test_selftest_passes_on_identical_outputs_and_fails_beyond_tolerance() -> None:
    m = manifest()
    x, y = _vectors(m)
    _xs, ys = unpack_vectors(pack_vectors(x, y), m)
    assert check_outputs(ys, ys, m).passed
    off = ys.astype(np.int16)
    off[0, 0] += 5  # 5 quantization steps: beyond atol of 2 steps
    with pytest.raises(SelfTestError, match="out of tolerance"):
        check_outputs(np.clip(off, -128, 127).astype(np.int8), ys, m)


def test_selftest_vectors_of_wrong_shape_rejected() -> None:
    m = manifest()
    x, y = _vectors(m)
    with pytest.raises(ManifestError, match="self-test inputs"):
        unpack_vectors(pack_vectors(x[:, :4], y), m)
    with pytest.raises(ManifestError, match="unreadable"):
        unpack_vectors(b"not an npz", m)


def test_psi_zero_on_same_distribution_and_large_on_shift() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(5000, 3))
    base = build_baseline(ref, bins=10)
    same = histogram(rng.normal(size=(2000, 3)), base.edges)
    shifted = histogram(rng.normal(loc=1.0, size=(2000, 3)), base.edges)
    assert np.all(psi(base.counts, base.counts) < 1e-9)
    assert np.all(psi(base.counts, same) < 0.05)
    assert np.all(psi(base.counts, shifted) > 0.2)
    js = js_divergence(base.counts, shifted)
    assert np.all((js > 0.02) & (js <= 1.0))


def test_baseline_round_trip_and_shape_check() -> None:
    feats = extract_features(np.random.default_rng(2).random((100, 8, 8, 1)), "flatten")
    base = build_baseline(feats, bins=10)
    spec = DriftSpec(target="digits/3/baseline.npz", features="flatten", n_features=64, bins=10)
    back = unpack_baseline(pack_baseline(base), spec)
    assert np.array_equal(back.counts, base.counts)
    with pytest.raises(ManifestError, match="manifest says"):
        unpack_baseline(pack_baseline(base), spec.model_copy(update={"bins": 8}))
