"""Releases: turning pipeline artifacts into signed TUF targets, and listing them.

The signed targets metadata is the source of truth for what a release *is*
(its manifest travels in the target's ``custom`` field); this service numbers
releases, lays out their targets and reads them back.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from shared.errors import ManifestError, ReleaseError
from shared.manifest import MODEL_FILE, ReleaseManifest

if TYPE_CHECKING:
    from cloud.pipeline.artifacts import ReleaseArtifacts
    from cloud.tuf_repo import ReleaseRepository

__all__ = ["ReleaseService", "UnknownReleaseError"]

log = logging.getLogger(__name__)


class UnknownReleaseError(ReleaseError):
    """The requested model/release is not in the signed repository."""

    code = "unknown_release"


class ReleaseService:
    """Publishes and looks up releases in one TUF repository."""

    def __init__(self, repo: ReleaseRepository) -> None:
        self.repo = repo

    def releases(self, model: str | None = None) -> list[ReleaseManifest]:
        """Every published release (optionally of one model), oldest first."""
        out = []
        for path, target in self.repo.list_targets().items():
            if not path.endswith("/" + MODEL_FILE):
                continue
            try:
                manifest = ReleaseManifest.from_custom(target.custom, target=path)
            except ManifestError as e:
                log.error("skipping target %s: %s", path, e)
                continue
            if model is None or manifest.model == model:
                out.append(manifest)
        out.sort(key=lambda m: (m.model, m.release))
        return out

    def get(self, model: str, release: int) -> ReleaseManifest:
        for m in self.releases(model):
            if m.release == release:
                return m
        raise UnknownReleaseError(
            f"release {release} of model {model!r} is not in the signed repository "
            f"(published: {[m.release for m in self.releases(model)] or 'none'})"
        )

    def latest(self, model: str) -> ReleaseManifest | None:
        rel = self.releases(model)
        return rel[-1] if rel else None

    def next_release_number(self, model: str) -> int:
        latest = self.latest(model)
        return 1 if latest is None else latest.release + 1

    def publish(self, model_name: str, artifacts: ReleaseArtifacts,
                now: datetime | None = None) -> ReleaseManifest:
        """Sign and publish ``artifacts`` as the next release of ``model_name``."""
        from cloud.pipeline.artifacts import make_manifest

        now = now or datetime.now(timezone.utc)
        release = self.next_release_number(model_name)
        manifest = make_manifest(artifacts, model_name, release, created_at=now.timestamp())
        files = {manifest.model_target: artifacts.model_bytes,
                 manifest.selftest.target: artifacts.selftest_bytes}
        if manifest.drift is not None:
            files[manifest.drift.target] = artifacts.baseline_bytes
        self.repo.publish(files, {manifest.model_target: manifest.to_custom()}, now=now)
        log.info("published release", extra={"model": model_name, "release": release,
                                              "quantization": manifest.quantization})
        return manifest
