"""Deliberately different releases for testing rollouts against a simulated fleet.

``publish_variant`` re-publishes an existing release's bytes as the next release
of the model with one thing changed: self-test vectors that cannot pass (every
device refuses it: a failing rollout), runtime needs that only some devices meet
(a rollout that must skip devices), or nothing (a healthy new release). It signs
with the cloud's online keys like any release; it is a test tool, not a way to
ship models.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cloud.releases import ReleaseService
from cloud.tuf_repo import ReleaseRepository
from shared.manifest import BASELINE_FILE, SELFTEST_FILE, ReleaseManifest, target_path

__all__ = ["publish_variant"]


def _broken_vectors(data: bytes) -> bytes:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        inputs, expected = z["inputs"], z["expected"]
    # Expect the opposite of what the model says: no tolerance can pass this.
    info = np.iinfo(expected.dtype) if expected.dtype.kind in "iu" else None
    if info is not None:
        wrong = (info.max + info.min) - expected.astype(np.int64)
        wrong = np.clip(wrong, info.min, info.max).astype(expected.dtype)
    else:
        wrong = (-(expected.astype(np.float64)) + 1e3).astype(expected.dtype)
    buf = io.BytesIO()
    np.savez(buf, inputs=inputs, expected=wrong)
    return buf.getvalue()


def publish_variant(
    cloud_dir: Path,
    model: str,
    base_release: int,
    *,
    break_selftest: bool = False,
    hardware_tags: list[str] | None = None,
    runtimes: list[str] | None = None,
    min_agent_version: str | None = None,
) -> int:
    """Publish ``base_release``'s model as the next release with the given change;
    return its number."""
    repo = ReleaseRepository.open(cloud_dir / "repository", cloud_dir / "keys")
    service = ReleaseService(repo)
    old = service.get(model, base_release)
    model_bytes = repo.read_target(old.model_target)
    selftest = repo.read_target(old.selftest.target)
    if break_selftest:
        selftest = _broken_vectors(selftest)
    baseline = repo.read_target(old.drift.target) if old.drift else None
    release = service.next_release_number(model)
    data = old.model_dump(mode="json", by_alias=True, exclude_none=True)
    data.update(release=release, deltas=[])
    data["selftest"]["target"] = target_path(model, release, SELFTEST_FILE)
    if old.drift is not None:
        data["drift"]["target"] = target_path(model, release, BASELINE_FILE)
    runtime = dict(data.get("runtime", {}))
    if hardware_tags is not None:
        runtime["hardware_tags"] = hardware_tags
    if runtimes is not None:
        runtime["runtimes"] = runtimes
    if min_agent_version is not None:
        runtime["min_agent_version"] = min_agent_version
    data["runtime"] = runtime
    data["source"] = {**old.source, "variant_of": str(base_release)}
    manifest = ReleaseManifest.model_validate(data)
    files = {manifest.model_target: model_bytes, manifest.selftest.target: selftest}
    if manifest.drift is not None and baseline is not None:
        files[manifest.drift.target] = baseline
    repo.publish(files, {manifest.model_target: manifest.to_custom()})
    return release
