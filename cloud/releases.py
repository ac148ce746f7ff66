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
from shared.manifest import BASELINE_FILE, MODEL_FILE, SELFTEST_FILE, ReleaseManifest, target_path

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
        """One more than any release of ``model`` ever published, listed or taken
        down: a number is never handed out twice (devices only move up, and a
        taken-down release's files stay on disk under its number)."""
        latest = self.latest(model)
        highest = 0 if latest is None else latest.release
        directory = self.repo.targets_dir / model
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.is_dir() and entry.name.isdigit():
                    highest = max(highest, int(entry.name))
        return highest + 1

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

    def rerelease(
        self,
        model: str,
        from_release: int,
        *,
        reason: str,
        published_by: str | None = None,
        now: datetime | None = None,
    ) -> ReleaseManifest:
        """Publish the bytes of ``from_release`` again as the next release of ``model``.

        A fleet rollback: devices only move to higher release numbers (TUF and the
        agent refuse a downgrade), so going back to a known-good model means
        re-releasing it. The new manifest is the old one (self-test vectors, drift
        baseline, runtime needs) under the new number, with ``source`` saying what it
        re-releases and why; the registry row shares the old release's lineage.
        """
        from cloud.deltas import add_deltas

        now = now or datetime.now(UTC)
        old = self.get(model, from_release)
        model_bytes = self.repo.read_target(old.model_target)
        selftest_bytes = self.repo.read_target(old.selftest.target)
        baseline_bytes = self.repo.read_target(old.drift.target) if old.drift else None
        with self._publish_lock:
            release = self.next_release_number(model)
            data = old.model_dump(mode="json", by_alias=True, exclude_none=True)
            data.update(release=release, created_at=now.timestamp(), deltas=[])
            data["selftest"]["target"] = target_path(model, release, SELFTEST_FILE)
            if old.drift is not None:
                data["drift"]["target"] = target_path(model, release, BASELINE_FILE)
            data["source"] = {
                **old.source,
                "rerelease_of": str(from_release),
                "rerelease_reason": reason[:256],
            }
            try:
                manifest = ReleaseManifest.model_validate(data)
            except ValueError as e:
                raise ManifestError(f"cannot re-release {model} {from_release}: {e}") from e
            manifest, delta_files = add_deltas(self.repo, manifest, model_bytes)
            files = {
                manifest.model_target: model_bytes,
                manifest.selftest.target: selftest_bytes,
                **delta_files,
            }
            if manifest.drift is not None and baseline_bytes is not None:
                files[manifest.drift.target] = baseline_bytes
            custom = {manifest.model_target: manifest.to_custom()}
            if self.db is None:
                self.repo.publish(files, custom, now=now)
            else:
                from cloud.registry.records import record_rerelease

                with self.db.session() as s:
                    record_rerelease(
                        s,
                        manifest,
                        from_release,
                        model_bytes,
                        published_by=published_by,
                        published_at=now.timestamp(),
                    )
                    self.repo.publish(files, custom, now=now)
        log.warning(
            "re-released %s release %d as release %d: %s", model, from_release, release, reason
        )
        return manifest

    def take_down(self, model: str, release: int) -> list[str]:
        """Delist every target of a release: no device can newly fetch it. Devices
        that already run it keep running it until told otherwise (recall first)."""
        self.get(model, release)
        prefix = f"{model}/{release}/"
        paths = sorted(p for p in self.repo.list_targets() if p.startswith(prefix))
        self.repo.remove(paths)
        log.warning("took down %s release %d (%d targets)", model, release, len(paths))
        return paths
