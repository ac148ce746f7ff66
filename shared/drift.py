"""Drift statistics: features, baselines, histograms, PSI and Jensen-Shannon.

The cloud builds a baseline from calibration data (per-feature quantile bin
edges and the reference counts in those bins); devices count their live
inputs in the same bins and send only the counts; the cloud compares. Pure
functions on arrays: no I/O, no clock.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.errors import ManifestError
from shared.manifest import DriftSpec
from shared.messages import PackedCounts

__all__ = [
    "Baseline",
    "build_baseline",
    "extract_features",
    "histogram",
    "js_divergence",
    "pack_baseline",
    "pack_counts",
    "psi",
    "unpack_baseline",
]

FloatArray = npt.NDArray[np.float64]
CountArray = npt.NDArray[np.int64]


def extract_features(batch: npt.NDArray[np.generic], mode: str) -> FloatArray:
    """Reduce a batch of model inputs ``(N, ...)`` to drift features ``(N, F)``.

    ``flatten`` keeps every element (small inputs such as 8x8 digits);
    ``channel_mean`` averages each channel over space (images).
    """
    x = np.asarray(batch, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"expected a batch (N, ...), got shape {x.shape}")
    if mode == "flatten":
        return np.asarray(x.reshape(len(x), -1), dtype=np.float64)
    if mode == "channel_mean":
        return np.asarray(x.reshape(len(x), -1, x.shape[-1]).mean(axis=1), dtype=np.float64)
    raise ValueError(f"unknown feature mode {mode!r}")


@dataclass(frozen=True)
class Baseline:
    """Interior bin edges ``(F, B-1)`` and reference counts ``(F, B)``."""

    edges: FloatArray
    counts: CountArray

    @property
    def n_features(self) -> int:
        return int(self.counts.shape[0])

    @property
    def bins(self) -> int:
        return int(self.counts.shape[1])


def histogram(features: FloatArray, edges: FloatArray) -> CountArray:
    """Count each feature column into its bins; values on an edge go right."""
    if features.ndim != 2 or features.shape[1] != edges.shape[0]:
        raise ValueError(f"features {features.shape} do not match edges {edges.shape}")
    bins = edges.shape[1] + 1
    out = np.zeros((edges.shape[0], bins), dtype=np.int64)
    for f in range(edges.shape[0]):
        idx = np.searchsorted(edges[f], features[:, f], side="right")
        out[f] = np.bincount(idx, minlength=bins)
    return out


def pack_counts(counts: npt.NDArray[np.integer]) -> PackedCounts:
    """A ``(features, bins)`` matrix of counts as ``PackedCounts``, in the narrowest
    unsigned type its largest count fits (one byte per count for a window of up to
    255 samples)."""
    if counts.ndim != 2 or counts.size == 0 or int(counts.min()) < 0:
        raise ValueError("counts must be a non-empty, non-negative (features, bins) matrix")
    dtype = PackedCounts.narrowest(int(counts.max()))
    raw = np.ascontiguousarray(counts, dtype=f"<{dtype}").tobytes()
    return PackedCounts.from_raw((int(counts.shape[0]), int(counts.shape[1])), dtype, raw)


def build_baseline(features: FloatArray, bins: int) -> Baseline:
    """Quantile bin edges of the reference features, and their counts."""
    if bins < 2:
        raise ValueError("a drift histogram needs at least 2 bins")
    qs = np.linspace(0, 1, bins + 1)[1:-1]
    edges = np.quantile(features, qs, axis=0).T.astype(np.float64)
    return Baseline(edges=edges, counts=histogram(features, edges))


def _proportions(counts: npt.NDArray[np.generic], eps: float) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    totals = c.sum(axis=-1, keepdims=True)
    p = np.divide(c, totals, out=np.zeros_like(c), where=totals > 0)
    # Smoothing keeps empty bins finite; applied to both sides so equal
    # distributions still score exactly zero.
    p = p + eps
    return np.asarray(p / p.sum(axis=-1, keepdims=True), dtype=np.float64)


def psi(
    reference: npt.NDArray[np.generic], observed: npt.NDArray[np.generic], eps: float = 1e-4
) -> FloatArray:
    """Population stability index per feature (last axis = bins)."""
    p, q = _proportions(reference, eps), _proportions(observed, eps)
    return np.asarray(np.sum((q - p) * np.log(q / p), axis=-1), dtype=np.float64)


def js_divergence(
    reference: npt.NDArray[np.generic], observed: npt.NDArray[np.generic], eps: float = 1e-12
) -> FloatArray:
    """Jensen-Shannon divergence per feature, base 2 (0 = same, 1 = disjoint)."""
    p, q = _proportions(reference, eps), _proportions(observed, eps)
    m = (p + q) / 2

    def kl(a: FloatArray, b: FloatArray) -> FloatArray:
        return np.asarray(np.sum(a * np.log2(a / b), axis=-1), dtype=np.float64)

    return np.asarray((kl(p, m) + kl(q, m)) / 2, dtype=np.float64)


def pack_baseline(baseline: Baseline) -> bytes:
    """Serialize a baseline to ``.npz`` bytes."""
    buf = io.BytesIO()
    np.savez(buf, edges=baseline.edges, counts=baseline.counts)
    return buf.getvalue()


def unpack_baseline(data: bytes, spec: DriftSpec) -> Baseline:
    """Load verified ``baseline.npz`` bytes and check them against the manifest."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            edges = np.asarray(npz["edges"], dtype=np.float64)
            counts = np.asarray(npz["counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise ManifestError(f"drift baseline is unreadable: {e}") from e
    if counts.shape != (spec.n_features, spec.bins) or edges.shape != (
        spec.n_features,
        spec.bins - 1,
    ):
        raise ManifestError(
            f"drift baseline has edges {edges.shape} and counts {counts.shape}; the manifest "
            f"says {spec.n_features} features x {spec.bins} bins"
        )
    return Baseline(edges=edges, counts=counts)
