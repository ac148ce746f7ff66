"""Binary deltas between releases of a model, published as extra TUF targets.

When a release is published, ``add_deltas`` diffs its model against the
models of the previous ``DELTA_BASES`` releases of the same model (``bsdiff4``,
then zstd), keeps the deltas that are clearly smaller than the model, and
lists them in the manifest's ``deltas`` field: ``DeltaBase(from_release,
target)``. Each delta is a target of the release
(``<model>/<release>/model.from-<base>.bsdiff4.zst``), signed like the model,
so a device that runs a base release downloads the delta, patches its model
and checks the result against the *model* target's signed hashes, falling
back to the full model on any failure (``device._delta``).

Deltas are an optimisation: if ``bsdiff4`` or ``zstandard`` is missing, or a
base's bytes cannot be read back, the release is published without them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from shared.manifest import MODEL_FILE, DeltaBase, ReleaseManifest, target_path

if TYPE_CHECKING:
    from cloud.tuf_repo import ReleaseRepository

__all__ = ["DELTA_BASES", "MAX_DELTA_RATIO", "add_deltas", "delta_target", "make_delta"]

log = logging.getLogger(__name__)

#: Earlier releases a new release gets a delta from (devices lag a release or two).
DELTA_BASES = 2
#: A delta at least this fraction of the model's size is not worth a target.
MAX_DELTA_RATIO = 0.7
ZSTD_LEVEL = 19


def make_delta(old: bytes, new: bytes) -> bytes:
    """``zstd(bsdiff4(old -> new))``: what ``device._delta.patch_bytes`` undoes."""
    import bsdiff4
    import zstandard

    return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(bsdiff4.diff(old, new)))


def delta_target(model: str, release: int, base: int) -> str:
    return target_path(model, release, f"model.from-{base}.bsdiff4.zst")


def _published_model(repo: ReleaseRepository, model: str, release: int) -> bytes | None:
    info = repo.list_targets().get(target_path(model, release, MODEL_FILE))
    if info is None:
        return None
    sha = info.hashes.get("sha256", "")
    blob = repo.targets_dir / model / str(release) / f"{sha}.{MODEL_FILE}"
    try:
        data = blob.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def add_deltas(
    repo: ReleaseRepository,
    manifest: ReleaseManifest,
    model_bytes: bytes,
    *,
    bases: int = DELTA_BASES,
) -> tuple[ReleaseManifest, dict[str, bytes]]:
    """The manifest with ``deltas`` from earlier releases, and the delta files to publish."""
    try:
        import bsdiff4  # noqa: F401
        import zstandard  # noqa: F401
    except ImportError as e:
        log.info("no delta updates: %s is not installed", e.name)
        return manifest, {}
    files: dict[str, bytes] = {}
    entries: list[DeltaBase] = []
    for base in range(manifest.release - 1, max(0, manifest.release - 1 - bases), -1):
        old = _published_model(repo, manifest.model, base)
        if old is None:
            continue
        delta = make_delta(old, model_bytes)
        if len(delta) >= MAX_DELTA_RATIO * len(model_bytes):
            log.info(
                "delta from release %d skipped: %d bytes for a %d-byte model",
                base,
                len(delta),
                len(model_bytes),
            )
            continue
        path = delta_target(manifest.model, manifest.release, base)
        files[path] = delta
        entries.append(DeltaBase(from_release=base, target=path))
    if not entries:
        return manifest, {}
    data = manifest.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["deltas"] = [e.model_dump() for e in entries]
    log.info(
        "release %d of %s: deltas from %s",
        manifest.release,
        manifest.model,
        [e.from_release for e in entries],
    )
    return ReleaseManifest.model_validate(data), files
