"""Fetch a release and verify every byte of it against TUF-signed metadata.

The device trusts one file: the repository's ``root.json``, provisioned into its
data dir (the trust anchor; every newer root is verified against it).
``ReleaseClient`` runs ``tuf.ngclient.Updater`` (a fresh one per operation:
ngclient refreshes once per instance) over a swappable transport, HTTP by
default, and maps what TUF reports onto the edgefleet error tree:

* the repository sent something bad (signature, expiry, rollback, hash, length)
  -> ``VerificationError``: never load it, keep the running model;
* moving the bytes failed -> ``TransferError``: retry later;
* the signed release manifest is wrong -> ``ManifestError``;
* no such release is signed -> ``ReleaseNotFoundError``.

A release's files are downloaded under temporary names in ``dest_dir``,
verified, fsynced, and only then renamed to their final names, all of them or
none: nothing unverified ever sits at a path the agent would load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from device import __version__
from shared.errors import (
    ConfigError,
    IncompatibleReleaseError,
    ManifestError,
    ReleaseError,
    StorageError,
    TransferError,
    VerificationError,
)
from shared.manifest import MODEL_FILE, ReleaseManifest, target_path

if TYPE_CHECKING:
    # Where it is defined: mypy --strict sees no explicit re-export in tuf.api.metadata.
    from tuf.api._payload import TargetFile

    from device.blob_fetcher import BlobFetcher
    from shared.blob_wire import BlobMeta

__all__ = [
    "HTTP_TIMEOUT_S",
    "MAX_TARGET_BYTES",
    "MAX_TARGETS_METADATA_BYTES",
    "METADATA_SUBDIR",
    "TARGETS_SUBDIR",
    "ProgressCallback",
    "ReleaseClient",
    "ReleaseNotFoundError",
    "VerifiedRelease",
]

logger = logging.getLogger(__name__)

#: Where the repository keeps metadata and targets under its base URL (the
#: layout of the cloud's repository directory).
METADATA_SUBDIR = "metadata"
TARGETS_SUBDIR = "targets"

# Bounds on untrusted downloads. Snapshot and targets files are further bounded by
# the lengths the (already verified) timestamp and snapshot give for them.
MAX_ROOT_BYTES = 512 * 1024
MAX_TIMESTAMP_BYTES = 16 * 1024
MAX_SNAPSHOT_BYTES = 1024 * 1024
#: Keep in sync with ``cloud/tuf_repo.py``, which refuses to sign more.
MAX_TARGETS_METADATA_BYTES = 16 * 1024 * 1024
MAX_ROOT_ROTATIONS = 64
MAX_DELEGATIONS = 8
#: Largest single release file (model, vectors, baseline) this device accepts.
MAX_TARGET_BYTES = 256 * 1024 * 1024
#: Seconds within which ``fetch_release`` reuses the metadata ``get_manifest`` refreshed.
REUSE_REFRESH_S = 30.0

HTTP_TIMEOUT_S = 30
HTTP_CHUNK_BYTES = 64 * 1024
#: A download slower than this on average, after the grace period, is refused
#: (slow-retrieval attack; the HTTP timeout only bounds each gap between bytes).
MIN_RATE_BYTES_PER_S = 512
SLOW_GRACE_S = 60.0

_BASENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: ``progress(bytes_done, bytes_total)`` over all files of the release.
ProgressCallback = Callable[[int, int], None]


class ReleaseNotFoundError(ReleaseError):
    """The signed repository does not list the requested release."""

    code = "release_not_found"


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose files TUF verified, at their final paths in ``dest_dir``."""

    manifest: ReleaseManifest
    model_path: Path
    model_sha256: str
    selftest_path: Path
    baseline_path: Path | None

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def release(self) -> int:
        return self.manifest.release


@contextmanager
def _mapped_errors(action: str) -> Iterator[None]:
    """Translate TUF's exceptions, split by who is at fault, into edgefleet's."""
    try:
        yield
    except tuf_errors.DownloadLengthMismatchError as e:
        # TUF files this under download errors, but the server sent more than the
        # signed length: that is the endless-data attack, not a flaky link.
        raise VerificationError(
            f"{action}: the server sent more bytes than the signed metadata allows ({e}); refused"
        ) from e
    except tuf_errors.RepositoryError as e:
        raise VerificationError(
            f"{action}: TUF refused it ({type(e).__name__}: {e}); what was served does not "
            "match what the repository signed (tampering, rollback, or expired metadata); "
            "the running model stays"
        ) from e
    except tuf_errors.DownloadError as e:
        raise TransferError(f"{action} failed ({type(e).__name__}: {e}); retry later") from e
    except OSError as e:
        raise StorageError(f"{action}: local storage failed: {e}") from e


class _GuardedFetcher(FetcherInterface):
    """Wraps any transport: reports progress and refuses a trickle.

    Errors raised while iterating the inner transport's chunks become
    ``DownloadError`` (``FetcherInterface.fetch`` only wraps the initial call).
    """

    def __init__(
        self,
        inner: FetcherInterface,
        min_rate: int,
        grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._min_rate = min_rate
        self._grace_s = grace_s
        self._clock = clock
        self.on_chunk: Callable[[int], None] | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._guard(url, self._inner.fetch(url))

    def _guard(self, url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        start, received = self._clock(), 0
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except tuf_errors.DownloadError:
                    raise
                except Exception as e:
                    raise tuf_errors.DownloadError(f"download of {url} failed: {e}") from e
                received += len(chunk)
                elapsed = self._clock() - start
                if (
                    self._min_rate
                    and elapsed > self._grace_s
                    and received < self._min_rate * elapsed
                ):
                    raise tuf_errors.SlowRetrievalError(
                        f"{url}: {received} bytes in {elapsed:.0f} s is below the minimum "
                        f"{self._min_rate} bytes/s"
                    )
                if self.on_chunk is not None:
                    self.on_chunk(len(chunk))
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_and_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


class ReleaseClient:
    """Fetches and verifies releases from one TUF repository.

    ``metadata_dir`` is the device's TUF metadata cache (it keeps the newest
    trusted versions: rollback protection across restarts). ``root`` is the
    provisioned trust anchor: its bytes, or the path of the provisioned
    ``root.json``, read at every operation. ``repo_url`` is where the
    repository directory is served: metadata under ``metadata/``, targets
    under ``targets/`` (or ``targets_url``, e.g. a CDN). ``fetcher`` replaces
    the HTTP transport (the MQTT fetcher); the TUF checks do not depend on it.
    ``blobs`` takes targets from the broker's retained blobs instead, where it
    holds them (``device.blob_fetcher``); metadata still comes from ``repo_url``.
    Calls are serialized.
    """

    def __init__(
        self,
        metadata_dir: Path,
        root: bytes | Path,
        repo_url: str,
        *,
        targets_url: str | None = None,
        fetcher: FetcherInterface | None = None,
        blobs: BlobFetcher | None = None,
        max_target_bytes: int = MAX_TARGET_BYTES,
        min_rate_bytes_per_s: int = MIN_RATE_BYTES_PER_S,
    ) -> None:
        self.metadata_dir = Path(metadata_dir)
        self._blobs = blobs
        self._root = root if isinstance(root, bytes) else Path(root)
        base = repo_url if repo_url.endswith("/") else repo_url + "/"
        self.metadata_url = base + METADATA_SUBDIR + "/"
        self.targets_url = targets_url or base + TARGETS_SUBDIR + "/"
        self._max_target_bytes = max_target_bytes
        user_agent = f"edgefleet-device/{__version__}"
        transport = fetcher or Urllib3Fetcher(
            socket_timeout=HTTP_TIMEOUT_S, chunk_size=HTTP_CHUNK_BYTES, app_user_agent=user_agent
        )
        self._fetcher = _GuardedFetcher(transport, min_rate_bytes_per_s, SLOW_GRACE_S)
        self._config = UpdaterConfig(
            max_root_rotations=MAX_ROOT_ROTATIONS,
            max_delegations=MAX_DELEGATIONS,
            root_max_length=MAX_ROOT_BYTES,
            timestamp_max_length=MAX_TIMESTAMP_BYTES,
            snapshot_max_length=MAX_SNAPSHOT_BYTES,
            targets_max_length=MAX_TARGETS_METADATA_BYTES,
            prefix_targets_with_hash=True,
            app_user_agent=user_agent,
        )
        self._lock = threading.Lock()
        self._recent: tuple[Updater, float] | None = None

    def get_manifest(self, model: str, release: int) -> ReleaseManifest:
        """Refresh the metadata and return the signed manifest of a release (no download)."""
        with self._lock:
            updater = self._refreshed_updater()
            return self._manifest(updater, model, release)[0]

    def fetch_release(
        self,
        model: str,
        release: int,
        dest_dir: Path,
        progress: ProgressCallback | None = None,
        *,
        reuse_metadata: bool = False,
    ) -> VerifiedRelease:
        """Download and verify every file of a release into ``dest_dir``.

        Files there with the signed length and hashes are reused, not downloaded.
        ``reuse_metadata``: use the metadata ``get_manifest`` verified less than
        ``REUSE_REFRESH_S`` ago instead of refreshing again (the same update).
        """
        dest_dir = Path(dest_dir)
        with self._lock:
            # The metadata ``get_manifest`` just refreshed for this same update is
            # reused: a second refresh a moment later only costs time and bytes.
            updater = self._refreshed_updater(
                reuse_within=REUSE_REFRESH_S if reuse_metadata else 0.0
            )
            manifest, model_info = self._manifest(updater, model, release)
            files = [model_info, *self._companions(updater, manifest)]
            names = [f.path.rpartition("/")[2] for f in files]
            if len(set(names)) != len(names) or not all(_BASENAME.match(n) for n in names):
                raise ManifestError(
                    f"release {release} of {model} names files {names}: expected distinct plain "
                    "file names"
                )
            for info in files:
                if info.length > self._max_target_bytes:
                    raise IncompatibleReleaseError(
                        f"{info.path} is {info.length} bytes; this device accepts at most "
                        f"{self._max_target_bytes} bytes per file"
                    )
            try:
                dest_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create {dest_dir}: {e}") from e
            paths = self._download_all(updater, files, names, dest_dir, progress)
        logger.info(
            "release verified",
            extra={"model": model, "release": release, "dest": str(dest_dir)},
        )
        return VerifiedRelease(
            manifest=manifest,
            model_path=paths[0][0],
            model_sha256=paths[0][1],
            selftest_path=paths[1][0],
            baseline_path=paths[2][0] if manifest.drift is not None else None,
        )

    # -- internals ------------------------------------------------------------

    @property
    def _root_source(self) -> str:
        return "given as bytes" if isinstance(self._root, bytes) else str(self._root)

    def _root_bytes(self) -> bytes:
        if isinstance(self._root, bytes):
            return self._root
        try:
            return self._root.read_bytes()
        except FileNotFoundError as e:
            raise ConfigError(
                f"this device is not provisioned: no trusted root at {self._root}; copy the "
                "release repository's root.json there"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot read the trusted root {self._root}: {e}") from e

    def _refreshed_updater(self, reuse_within: float = 0.0) -> Updater:
        recent = self._recent
        if recent is not None and reuse_within > 0 and time.monotonic() - recent[1] <= reuse_within:
            return recent[0]
        bootstrap = self._root_bytes()
        try:
            self.metadata_dir.mkdir(parents=True, exist_ok=True)
            updater = Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=bootstrap,
            )
        except tuf_errors.RepositoryError as e:
            raise ConfigError(
                f"the provisioned root {self._root_source} is not valid TUF root metadata "
                f"({e}); re-provision the device with the repository's root.json"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot use the metadata cache {self.metadata_dir}: {e}") from e
        with _mapped_errors("refreshing the signed release metadata"):
            updater.refresh()
        self._recent = (updater, time.monotonic())
        return updater

    def _manifest(
        self, updater: Updater, model: str, release: int
    ) -> tuple[ReleaseManifest, TargetFile]:
        path = target_path(model, release, MODEL_FILE)
        with _mapped_errors(f"looking up {path}"):
            info = updater.get_targetinfo(path)
        if info is None:
            raise ReleaseNotFoundError(
                f"release {release} of {model} is not in the signed repository (no target "
                f"{path!r}); check the release number, or whether the release was taken down"
            )
        manifest = ReleaseManifest.from_custom(info.custom, target=path)
        if manifest.model != model or manifest.release != release:
            raise ManifestError(
                f"target {path!r} carries the manifest of release {manifest.release} of "
                f"{manifest.model}, expected release {release} of {model}"
            )
        return manifest, info

    def _companions(self, updater: Updater, manifest: ReleaseManifest) -> list[TargetFile]:
        """The self-test vectors and drift baseline the manifest names, as signed targets."""
        paths = [manifest.selftest.target]
        if manifest.drift is not None:
            paths.append(manifest.drift.target)
        infos = []
        for path in paths:
            with _mapped_errors(f"looking up {path}"):
                info = updater.get_targetinfo(path)
            if info is None:
                raise ManifestError(
                    f"the manifest of release {manifest.release} of {manifest.model} names "
                    f"{path!r}, which the signed repository does not list"
                )
            infos.append(info)
        return infos

    def _download_all(
        self,
        updater: Updater,
        files: list[TargetFile],
        names: list[str],
        dest_dir: Path,
        progress: ProgressCallback | None,
    ) -> list[tuple[Path, str]]:
        """Download, verify and fsync every file under a temporary name, then rename
        them all. Returns (final path, sha256) per file."""
        total = sum(f.length for f in files)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        cached = [
            updater.find_cached_target(info, str(dest_dir / name)) is not None
            for info, name in zip(files, names, strict=True)
        ]
        blobs = self._blobs
        plan: dict[str, BlobMeta] = {}
        if blobs is not None:
            with _mapped_errors("looking for the release files on the broker"):
                plan = blobs.plan([f for f, c in zip(files, cached, strict=True) if not c])
        staged: list[tuple[Path | None, Path]] = []
        result: list[tuple[Path, str]] = []
        try:
            for info, name, is_cached in zip(files, names, cached, strict=True):
                final = dest_dir / name
                if is_cached:
                    staged.append((None, final))
                    result.append((final, _fsync_and_hash(final)))
                    advance(info.length)
                    continue
                fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
                os.close(fd)
                tmp = Path(tmp_name)
                staged.append((tmp, final))
                meta = plan.get(info.path)
                if blobs is None or meta is None:
                    fetched = False
                else:
                    with _mapped_errors(f"fetching {info.path} from the broker"):
                        fetched = blobs.fetch_target(updater, info, meta, tmp, advance)
                if not fetched:
                    self._fetcher.on_chunk = advance
                    try:
                        with _mapped_errors(f"downloading {info.path}"):
                            updater.download_target(info, filepath=str(tmp))
                    finally:
                        self._fetcher.on_chunk = None
                result.append((final, self._check_written(info, tmp)))
            for tmp_or_none, final in staged:
                if tmp_or_none is not None:
                    os.replace(tmp_or_none, final)
            _fsync_dir(dest_dir)
        except OSError as e:
            raise StorageError(f"writing the release to {dest_dir} failed: {e}") from e
        finally:
            for tmp_or_none, _ in staged:
                if tmp_or_none is not None:
                    with suppress(FileNotFoundError):
                        tmp_or_none.unlink()
        return result

    @staticmethod
    def _check_written(info: TargetFile, tmp: Path) -> str:
        """fsync what ngclient copied out of its verified buffer and check it again,
        so the bytes on disk are the bytes TUF verified."""
        sha256 = _fsync_and_hash(tmp)
        size = tmp.stat().st_size
        expected = info.hashes.get("sha256")
        if size != info.length or (expected is not None and expected != sha256):
            raise StorageError(
                f"{tmp} does not hold the verified bytes of {info.path} after writing "
                f"({size} bytes, sha256 {sha256[:16]}…): the storage is failing"
            )
        return sha256
