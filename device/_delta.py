"""Delta updates: rebuild a release's model from the running one plus a small patch.

A release may list ``deltas`` in its signed manifest: ``bsdiff4`` patches
from an earlier release's model, zstd-compressed, each a TUF target of its
own. If the device runs one of those base releases, ``apply_delta`` downloads
the patch through TUF (length and hashes checked like any target), patches the
running model's bytes and checks the *result* against the full model target's
signed length and hashes (``TargetFile.verify_length_and_hashes``). Only then
is the model written to the download directory under the name the release
client looks for, which reuses a file there that matches the signed hashes
instead of downloading it. Any failure (no delta for this base, no
``bsdiff4``/``zstandard`` installed, download or patch error, wrong result)
returns ``False`` and the full target is downloaded as usual: a delta can
save bandwidth, never install something unverified.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import struct
import tempfile
from pathlib import Path

from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from device import tuf_client
from device.fsutil import atomic_write_bytes
from shared.manifest import ReleaseManifest

__all__ = ["DELTA_ENCODING", "apply_delta", "delta_support"]

log = logging.getLogger(__name__)

DELTA_ENCODING = "bsdiff4+zstd"
_BSDIFF_MAGIC = b"BSDIFF40"
#: A patch may not decompress to more than this many times the model's size.
MAX_PATCH_EXPANSION = 4


def delta_support() -> str | None:
    """Why deltas cannot be used here, or ``None`` if they can."""
    for name in ("bsdiff4", "zstandard"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


def _offtin(buf: bytes) -> int:
    """bsdiff's sign-magnitude little-endian 64-bit integer."""
    v = int(struct.unpack("<Q", buf)[0])
    return -(v & ~(1 << 63)) if v & (1 << 63) else v


def patch_bytes(base: bytes, delta: bytes, expected_length: int) -> bytes:
    """Apply a ``bsdiff4+zstd`` delta; ``ValueError`` if it is malformed or oversized."""
    import bsdiff4  # type: ignore[import-untyped]
    import zstandard

    limit = MAX_PATCH_EXPANSION * max(expected_length, len(base)) + (1 << 20)
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(delta)) as reader:
        patch = reader.read(limit + 1)
    if len(patch) > limit:
        raise ValueError(f"the patch decompresses to more than {limit} bytes")
    if len(patch) < 32 or patch[:8] != _BSDIFF_MAGIC:
        raise ValueError("not a bsdiff4 patch")
    new_size = _offtin(patch[24:32])
    if new_size != expected_length:
        raise ValueError(
            f"the patch makes {new_size} bytes, the signed model has {expected_length}"
        )
    out: bytes = bsdiff4.patch(base, patch)
    return out


def apply_delta(
    *,
    manifest: ReleaseManifest,
    base_release: int,
    base_model: bytes,
    dest_dir: Path,
    metadata_dir: Path,
    root: bytes,
    repo_url: str,
    fetcher: FetcherInterface | None,
) -> bool:
    """Rebuild ``dest_dir/model.tflite`` from ``base_model`` and a signed delta; see module doc."""
    delta = next((d for d in manifest.deltas if d.from_release == base_release), None)
    if delta is None:
        return False
    why = delta_support()
    if why is not None or delta.encoding != DELTA_ENCODING:
        log.info("delta from release %d not used: %s", base_release, why or delta.encoding)
        return False
    base = repo_url if repo_url.endswith("/") else repo_url + "/"
    try:
        metadata_dir.mkdir(parents=True, exist_ok=True)
        updater = Updater(
            str(metadata_dir),
            base + tuf_client.METADATA_SUBDIR + "/",
            target_base_url=base + tuf_client.TARGETS_SUBDIR + "/",
            fetcher=fetcher,
            config=UpdaterConfig(
                root_max_length=tuf_client.MAX_ROOT_BYTES,
                timestamp_max_length=tuf_client.MAX_TIMESTAMP_BYTES,
                snapshot_max_length=tuf_client.MAX_SNAPSHOT_BYTES,
                targets_max_length=tuf_client.MAX_TARGETS_METADATA_BYTES,
                prefix_targets_with_hash=True,
            ),
            bootstrap=root,
        )
        updater.refresh()
        model_info = updater.get_targetinfo(manifest.model_target)
        delta_info = updater.get_targetinfo(delta.target)
        if model_info is None or delta_info is None:
            raise ValueError("the model or delta target is not signed")
        if delta_info.length >= model_info.length:
            raise ValueError("the delta is not smaller than the model")
        dest_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".delta-") as tmp:
            path = updater.download_target(delta_info, filepath=str(Path(tmp) / "delta"))
            patch = Path(path).read_bytes()
        model = patch_bytes(base_model, patch, model_info.length)
        model_info.verify_length_and_hashes(model)
        atomic_write_bytes(dest_dir / Path(manifest.model_target).name, model)
    except Exception as e:  # any failure: the full target follows
        log.warning(
            "delta update from release %d to %d failed (%s: %s); downloading the full model",
            base_release,
            manifest.release,
            type(e).__name__,
            e,
        )
        return False
    log.info(
        "model of release %d rebuilt from release %d with a %d-byte delta",
        manifest.release,
        base_release,
        len(patch),
    )
    return True
