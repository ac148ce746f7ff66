"""Releases: turning pipeline artifacts into signed TUF targets, and listing them.

The signed targets metadata is the source of truth for what a release *is*
(its manifest travels in the target's ``custom`` field); this service numbers
releases, lays out their targets and reads them back. Given a database, it
also records every release it publishes in the model registry
(``cloud.registry``): the rows are inserted in a transaction held open around
the TUF publish, so a clash (the release number was just taken) stops the
publish, and a failed publish leaves no row behind.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from shared.errors import ManifestError, ReleaseError
from shared.manifest import MODEL_FILE, ReleaseManifest

if TYPE_CHECKING:
    from cloud.db import Database
    from cloud.pipeline.artifacts import ReleaseArtifacts
    from cloud.tuf_repo import ReleaseRepository

__all__ = ["ReleaseService", "UnknownReleaseError"]

log = logging.getLogger(__name__)


class UnknownReleaseError(ReleaseError):
    """The requested model/release is not in the signed repository."""

    code = "unknown_release"


class ReleaseService:
    """Publishes and looks up releases in one TUF repository (and registry, given ``db``)."""

    #: Numbering and publishing are one step per process; the repository's
    #: file lock and the registry's unique (model, release) cover other processes.
    _publish_lock = threading.Lock()

    def __init__(self, repo: ReleaseRepository, db: Database | None = None) -> None:
        self.repo = repo
        self.db = db

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

    def publish(
        self,
        model_name: str,
        artifacts: ReleaseArtifacts,
        now: datetime | None = None,
        *,
        published_by: str | None = None,
        candidate_id: int | None = None,
    ) -> ReleaseManifest:
        """Sign and publish ``artifacts`` as the next release of ``model_name``.

        With a database, the release (and its lineage, or the registry
        candidate ``candidate_id`` it came from) is recorded, attributed to
        ``published_by``.
        """
        from cloud.deltas import add_deltas
        from cloud.pipeline.artifacts import make_manifest

        now = now or datetime.now(UTC)
        with self._publish_lock:
            release = self.next_release_number(model_name)
            manifest = make_manifest(artifacts, model_name, release, created_at=now.timestamp())
            manifest, delta_files = add_deltas(self.repo, manifest, artifacts.model_bytes)
            files = {
                manifest.model_target: artifacts.model_bytes,
                manifest.selftest.target: artifacts.selftest_bytes,
                **delta_files,
            }
            if manifest.drift is not None and artifacts.baseline_bytes is not None:
                files[manifest.drift.target] = artifacts.baseline_bytes
            custom = {manifest.model_target: manifest.to_custom()}
            if self.db is None:
                self.repo.publish(files, custom, now=now)
            else:
                from cloud.registry.records import record_release

                with self.db.session() as s:
                    record_release(
                        s,
                        manifest,
                        artifacts,
                        published_by=published_by,
                        candidate_id=candidate_id,
                        published_at=now.timestamp(),
                    )
                    self.repo.publish(files, custom, now=now)
        log.info(
            "published release",
            extra={
                "model": model_name,
                "release": release,
                "quantization": manifest.quantization,
                "published_by": published_by,
            },
        )
        return manifest
