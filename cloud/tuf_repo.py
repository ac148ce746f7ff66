"""The cloud's TUF release repository: keys, signing and the files devices fetch.

Layout of ``repo_dir`` (served read-only, as is, over HTTP or relayed over MQTT)::

    metadata/1.root.json 2.root.json ...   every root version; clients walk the chain
    metadata/root.json                     copy of the newest root, for provisioning
    metadata/N.targets.json N.snapshot.json   consistent snapshots
    metadata/timestamp.json                the commit point: always written last
    targets/<dir>/<sha256>.<basename>      content-addressed target files
    .lock                                  writers' flock

``keys_dir`` holds ``online/`` (the targets, snapshot and timestamp keys this
service signs with) and ``offline/`` (the root keys made on first run; they
belong on offline media, and every root change takes them as file paths).
Key files are named ``<role>-<keyid>.pem`` (PKCS8, mode 0600) with a public
``<role>-<keyid>.pub.json`` beside each; the root metadata says which are in use.

Write protocol: each write takes an exclusive ``flock`` on ``.lock``, re-reads the
state from disk, signs everything in memory, then writes new files (temp file,
fsync, rename) in dependency order: target files, targets, snapshot and
``timestamp.json`` last. Readers take no lock: the timestamp they read names a
snapshot and targets version that were complete before it was written, and a
version a timestamp has named is never rewritten.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.exceptions import RepositoryError as TufRepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from cloud._files import atomic_write as _atomic_write
from shared.errors import ConfigError, ReleaseError

__all__ = [
    "DEFAULT_EXPIRY",
    "DEFAULT_REFRESH_MARGIN",
    "MAX_TARGETS_METADATA_BYTES",
    "METADATA_DIR",
    "ROLES",
    "ROOT_KEY_COUNT",
    "ROOT_THRESHOLD",
    "TARGETS_DIR",
    "ImmutableReleaseError",
    "RefreshResult",
    "ReleaseRepository",
    "RepositoryStateError",
    "SigningKeyError",
    "TargetPathError",
]

logger = logging.getLogger(__name__)

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
LOCK_FILE = ".lock"
ONLINE_KEYS = "online"
OFFLINE_KEYS = "offline"

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
_ONLINE = (Targets.type, Snapshot.type, Timestamp.type)
ROOT_KEY_COUNT = 3
ROOT_THRESHOLD = 2
DEFAULT_EXPIRY: Mapping[str, timedelta] = {
    Root.type: timedelta(days=365),
    Targets.type: timedelta(days=90),
    Snapshot.type: timedelta(days=7),
    Timestamp.type: timedelta(days=1),
}
#: ``refresh()`` re-signs a role once it has less than this left before it expires.
DEFAULT_REFRESH_MARGIN: Mapping[str, timedelta] = {
    Root.type: timedelta(days=60),
    Targets.type: timedelta(days=30),
    Snapshot.type: timedelta(days=3),
    Timestamp.type: timedelta(hours=12),
}
#: Devices refuse targets metadata above this size (keep in sync with
#: ``device/tuf_client.py``), so the repository refuses to write it.
MAX_TARGETS_METADATA_BYTES = 16 * 1024 * 1024
MAX_TARGET_PATH = 255
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_ALGORITHMS = ["sha256"]

S = TypeVar("S", bound=Signed)


class RepositoryStateError(ConfigError):
    """The repository directory is missing, not initialized, or corrupt."""

    code = "repository_invalid"


class SigningKeyError(ConfigError):
    """A signing key is missing, unreadable, does not match the root, or too few were given."""

    code = "signing_key_invalid"


class TargetPathError(ConfigError):
    """A target path is malformed, or names a target the repository does not list."""

    code = "target_path_invalid"


class ImmutableReleaseError(ReleaseError):
    """A published target path would get different bytes or a different manifest."""

    code = "release_immutable"


@dataclass(frozen=True)
class RefreshResult:
    """What ``ReleaseRepository.refresh()`` did, for a periodic job to log or alert on."""

    resigned: tuple[str, ...]
    root_expires: datetime
    #: True once root is within its refresh margin: only the offline root keys can fix it.
    root_needs_resign: bool


@dataclass
class _State:
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return now.astimezone(UTC)


def _check_target_path(path: str) -> None:
    segments = path.split("/") if isinstance(path, str) else []
    if not segments or len(path) > MAX_TARGET_PATH or not all(_SEGMENT.match(s) for s in segments):
        raise TargetPathError(
            f"invalid target path {path!r}: expected '/'-separated names of letters, digits, "
            f"'.', '_' or '-', each starting with a letter or digit, at most {MAX_TARGET_PATH} "
            "characters in all (for example 'digits/2/model.tflite')"
        )


def _canonical(value: Any, where: str) -> Any:
    """``value`` with floats as decimal strings: TUF signs OLPC canonical JSON, which
    has no floats. ``repr`` round-trips exactly and pydantic reads it back as a float."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where} holds {value}, which signed metadata cannot carry")
        return repr(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} has a non-string key: custom data must be JSON objects")
        return {k: _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    raise ConfigError(f"{where} holds a {type(value).__name__}; custom data must be plain JSON")


def _key_files(key_dir: Path, role: str, keyid: str) -> tuple[Path, Path]:
    return key_dir / f"{role}-{keyid}.pem", key_dir / f"{role}-{keyid}.pub.json"


def _save_key(key_dir: Path, role: str, signer: CryptoSigner) -> None:
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    key = signer.public_key
    pem, pub = _key_files(key_dir, role, key.keyid)
    _atomic_write(pem, signer.private_bytes, mode=0o600)
    public = {"role": role, "keyid": key.keyid, "key": key.to_dict()}
    _atomic_write(pub, json.dumps(public, indent=1, sort_keys=True).encode(), mode=0o644)


def _load_private(path: Path) -> Any:
    try:
        return load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SigningKeyError(
            f"cannot load the private key {path}: {e}; expected an unencrypted PKCS8 PEM "
            "ed25519 key written by edgefleet"
        ) from e


def _signer_for(path: Path, key: Key) -> CryptoSigner:
    try:
        return CryptoSigner(_load_private(path), cast(SSlibKey, key))
    except SigningKeyError:
        raise
    except Exception as e:  # KeyMismatchError, ValueError from securesystemslib
        raise SigningKeyError(
            f"private key {path} does not match key {key.keyid[:12]} of the root metadata: {e}; "
            "restore the right key file from backup"
        ) from e


def _sign(md: Metadata[Any], signers: Iterable[CryptoSigner]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


def _short(keyids: Iterable[str]) -> str:
    return ", ".join(k[:12] for k in keyids) or "none"


class ReleaseRepository:
    """A TUF repository on local disk that signs edgefleet releases.

    Construct with ``init`` (first run, makes keys), ``open`` or ``open_or_init``.
    Every method re-reads the state from disk, so many processes may share a
    repository; writers serialize on a file lock.
    """

    def __init__(
        self,
        repo_dir: Path,
        keys_dir: Path,
        *,
        expiry: Mapping[str, timedelta] | None = None,
        refresh_margin: Mapping[str, timedelta] | None = None,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.keys_dir = Path(keys_dir)
        self.metadata_dir = self.repo_dir / METADATA_DIR
        self.targets_dir = self.repo_dir / TARGETS_DIR
        self.expiry = {**DEFAULT_EXPIRY, **(expiry or {})}
        self.refresh_margin = {**DEFAULT_REFRESH_MARGIN, **(refresh_margin or {})}
        for role in ROLES:
            exp, margin = self.expiry[role], self.refresh_margin[role]
            if exp <= timedelta(0) or not timedelta(0) <= margin < exp:
                raise ConfigError(
                    f"{role} expiry {exp} with refresh margin {margin}: the expiry must be "
                    "positive and the margin shorter than the expiry"
                )
        if set(self.expiry) != set(ROLES) or set(self.refresh_margin) != set(ROLES):
            raise ConfigError(f"expiry and refresh margins take only the roles {ROLES}")

    # -- construction ---------------------------------------------------------

    @classmethod
    def init(
        cls, repo_dir: Path, keys_dir: Path, *, now: datetime | None = None, **options: Any
    ) -> ReleaseRepository:
        """Create keys and version 1 of every role. Refuses an initialized repository."""
        repo = cls(repo_dir, keys_dir, **options)
        with repo._locked():
            if repo.initialized:
                raise RepositoryStateError(
                    f"{repo.repo_dir} already holds a TUF repository; open it instead "
                    "(re-initializing would replace the keys every device trusts)"
                )
            repo._create(_utc(now))
        return repo

    @classmethod
    def open(cls, repo_dir: Path, keys_dir: Path, **options: Any) -> ReleaseRepository:
        """Open an initialized repository."""
        repo = cls(repo_dir, keys_dir, **options)
        if not repo.initialized:
            raise RepositoryStateError(
                f"no TUF repository at {repo.repo_dir} ({METADATA_DIR}/timestamp.json is "
                "missing); create one with ReleaseRepository.init / open_or_init"
            )
        return repo

    @classmethod
    def open_or_init(
        cls, repo_dir: Path, keys_dir: Path, *, now: datetime | None = None, **options: Any
    ) -> ReleaseRepository:
        """Open the repository, creating it (and its keys) if it does not exist yet."""
        repo = cls(repo_dir, keys_dir, **options)
        with repo._locked():
            if not repo.initialized:
                repo._create(_utc(now))
        return repo

    @property
    def initialized(self) -> bool:
        return (self.metadata_dir / "timestamp.json").is_file()

    # -- reading (no lock) ----------------------------------------------------

    @property
    def root_path(self) -> Path:
        """``metadata/root.json``: a copy of the newest root, for provisioning devices."""
        return self.metadata_dir / "root.json"

    def root_bytes(self) -> bytes:
        """The newest root metadata: the trust anchor devices are provisioned with."""
        return self._read_bytes(f"{self._root_version()}.root.json")

    def root(self) -> Root:
        return self._load().root.signed

    def list_targets(self) -> dict[str, TargetFile]:
        """Every target the current signed targets metadata lists."""
        return dict(self._load().targets.signed.targets)

    def read_target(self, path: str) -> bytes:
        """The bytes of listed target ``path``, checked against its signed sha256."""
        info = self.list_targets().get(path)
        if info is None:
            raise TargetPathError(f"target {path!r} is not listed in the signed targets")
        sha = info.hashes["sha256"]
        try:
            data = self._blob_path(path, sha).read_bytes()
        except OSError as e:
            raise RepositoryStateError(f"target {path!r} is listed but unreadable: {e}") from e
        if hashlib.sha256(data).hexdigest() != sha:
            raise RepositoryStateError(f"target {path!r} on disk does not match its signed hash")
        return data

    def targets_version(self) -> int:
        return self._load().targets.signed.version

    # -- releases -------------------------------------------------------------

    def publish(
        self,
        files: Mapping[str, bytes],
        custom: Mapping[str, Mapping[str, Any]] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Add targets (path -> bytes, path -> ``custom`` value) and sign; return the
        targets version. Republishing identical targets is a no-op."""
        now = _utc(now)
        custom = dict(custom or {})
        for path in files:
            _check_target_path(path)
        stray = sorted(set(custom) - set(files))
        if stray:
            raise TargetPathError(f"custom data given for {stray}, which are not among the files")
        infos: dict[str, TargetFile] = {}
        for path, data in files.items():
            info = TargetFile.from_data(path, data, _HASH_ALGORITHMS)
            if path in custom:
                info.unrecognized_fields["custom"] = _canonical(custom[path], f"custom[{path!r}]")
            infos[path] = info
        with self._locked():
            state = self._load()
            listed = state.targets.signed.targets
            new = {p: i for p, i in infos.items() if listed.get(p) != i}
            for path, info in new.items():
                self._check_immutable(path, info, listed.get(path))
            if not new:
                return state.targets.signed.version
            listed.update(new)
            writes = self._prepare_online(state, now, {Targets.type})
            for path, info in new.items():
                self._write_blob(info, files[path])
            self._write_all(writes)
            version = state.targets.signed.version
        logger.info("published targets", extra={"targets_version": version, "paths": sorted(new)})
        return version

    def remove(self, paths: Iterable[str], now: datetime | None = None) -> int:
        """Delist targets (take a release down); return the targets version.

        The target files stay on disk so the same path can never be republished
        with other bytes, and devices mid-download still finish."""
        now = _utc(now)
        paths = list(paths)
        with self._locked():
            state = self._load()
            listed = state.targets.signed.targets
            missing = sorted(p for p in paths if p not in listed)
            if missing:
                raise TargetPathError(
                    f"cannot remove {missing}: the signed targets do not list them "
                    f"(see list_targets(); {len(listed)} targets are listed)"
                )
            if not paths:
                return state.targets.signed.version
            for p in paths:
                del listed[p]
            self._write_all(self._prepare_online(state, now, {Targets.type}))
            version = state.targets.signed.version
        logger.info("removed targets", extra={"targets_version": version, "paths": sorted(paths)})
        return version

    def refresh(self, now: datetime | None = None) -> RefreshResult:
        """Re-sign online roles that are within their margin of expiry (periodic job)."""
        now = _utc(now)
        with self._locked():
            state = self._load()
            current: dict[str, Metadata[Any]] = {
                Targets.type: state.targets,
                Snapshot.type: state.snapshot,
                Timestamp.type: state.timestamp,
            }
            due = {
                r for r, md in current.items() if md.signed.expires - now <= self.refresh_margin[r]
            }
            resigned: tuple[str, ...] = ()
            if due:
                writes = self._prepare_online(state, now, due)
                self._write_all(writes)
                resigned = tuple(name.split(".")[-2] for name, _ in writes)
            root = state.root.signed
        root_due = root.expires - now <= self.refresh_margin[Root.type]
        if root_due:
            logger.warning(
                "root metadata expires soon: sign a new root with the offline root keys",
                extra={"root_version": root.version, "root_expires": root.expires.isoformat()},
            )
        if resigned:
            logger.info("re-signed metadata before expiry", extra={"roles": list(resigned)})
        return RefreshResult(
            resigned=resigned, root_expires=root.expires, root_needs_resign=root_due
        )

    # -- root changes ---------------------------------------------------------

    def sign_new_root(
        self,
        root_key_files: Sequence[Path] | None = None,
        *,
        now: datetime | None = None,
        edit: Callable[[Root], None] | None = None,
    ) -> int:
        """Write the next root version (new expiry, optional ``edit``), signed by a
        threshold of the old and of the new root keys; return its version.

        ``root_key_files`` are PEM files of root keys; by default the ones still in
        ``keys_dir/offline``."""
        now = _utc(now)
        with self._locked():
            state = self._load()
            new_root = copy.deepcopy(state.root.signed)
            if edit is not None:
                edit(new_root)
            return self._change_root(state, new_root, now, root_key_files)

    def rotate_role_key(
        self,
        role: str,
        *,
        keyid: str | None = None,
        now: datetime | None = None,
        root_key_files: Sequence[Path] | None = None,
    ) -> int:
        """Replace the key ``keyid`` of ``role`` (default: all its keys) with new ones.

        Devices follow through the new root version, signed by the root keys, with no
        re-provisioning. The replaced private keys are deleted from ``keys_dir``.
        Returns the new root version."""
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}; expected one of {ROLES}")
        now = _utc(now)
        with self._locked():
            state = self._load()
            new_root = copy.deepcopy(state.root.signed)
            current = list(new_root.roles[role].keyids)
            if keyid is not None and keyid not in current:
                raise SigningKeyError(
                    f"key {keyid[:12]} is not a {role} key; the {role} keys are {_short(current)}"
                )
            replaced = [keyid] if keyid is not None else current
            signers = [CryptoSigner.generate_ed25519() for _ in replaced]
            key_dir = self.keys_dir / (OFFLINE_KEYS if role == Root.type else ONLINE_KEYS)
            for old in replaced:
                new_root.revoke_key(old, role)
            for signer in signers:
                new_root.add_key(signer.public_key, role)
                _save_key(key_dir, role, signer)
            try:
                if role == Root.type:
                    version = self._change_root(
                        state, new_root, now, root_key_files, extra_root=signers, retired=replaced
                    )
                else:
                    version = self._change_root(
                        state,
                        new_root,
                        now,
                        root_key_files,
                        extra_online={role: signers},
                        retired=replaced,
                    )
            except BaseException:
                if not (self.metadata_dir / f"{state.root.signed.version + 1}.root.json").exists():
                    for signer in signers:  # no root names them: they were never used
                        for f in _key_files(key_dir, role, signer.public_key.keyid):
                            f.unlink(missing_ok=True)
                raise
            if role == Root.type:
                logger.warning(
                    "new root keys written: move them to offline storage",
                    extra={"dir": str(key_dir)},
                )
        logger.info(
            "rotated key",
            extra={"role": role, "root_version": version, "retired": [k[:12] for k in replaced]},
        )
        return version

    def revoke_key(
        self,
        keyid: str,
        *,
        now: datetime | None = None,
        root_key_files: Sequence[Path] | None = None,
    ) -> int:
        """Remove ``keyid`` from every role that uses it (a new root version).

        A role left with fewer keys than its threshold is refused: use
        ``rotate_role_key(role, keyid=...)`` to replace the key instead."""
        now = _utc(now)
        with self._locked():
            state = self._load()
            new_root = copy.deepcopy(state.root.signed)
            roles = [r for r, role in new_root.roles.items() if keyid in role.keyids]
            if not roles:
                raise SigningKeyError(
                    f"key {keyid[:12]} is not used by any role; nothing to revoke"
                )
            for r in roles:
                role = new_root.roles[r]
                if len(role.keyids) - 1 < role.threshold:
                    raise SigningKeyError(
                        f"revoking {keyid[:12]} would leave {r} with {len(role.keyids) - 1} keys "
                        f"for a threshold of {role.threshold}; replace it with a new key instead: "
                        f"edgefleet-cloud key rotate --role {r} --keyid {keyid}"
                    )
                new_root.revoke_key(keyid, r)
            version = self._change_root(state, new_root, now, root_key_files, retired=[keyid])
        logger.info(
            "revoked key", extra={"keyid": keyid[:12], "roles": roles, "root_version": version}
        )
        return version

    # -- internals ------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.repo_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _create(self, now: datetime) -> None:
        root_signers = [CryptoSigner.generate_ed25519() for _ in range(ROOT_KEY_COUNT)]
        online = {role: CryptoSigner.generate_ed25519() for role in _ONLINE}
        for signer in root_signers:
            _save_key(self.keys_dir / OFFLINE_KEYS, Root.type, signer)
        for role, signer in online.items():
            _save_key(self.keys_dir / ONLINE_KEYS, role, signer)
        logger.warning(
            "created root keys: move them to offline storage and pass their paths when "
            "signing a new root",
            extra={"dir": str(self.keys_dir / OFFLINE_KEYS), "threshold": ROOT_THRESHOLD},
        )
        root = Root(expires=now + self.expiry[Root.type], consistent_snapshot=True)
        for signer in root_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = ROOT_THRESHOLD
        for role, signer in online.items():
            root.add_key(signer.public_key, role)
        root_md = Metadata(root)
        _sign(root_md, root_signers)
        state = _State(
            root=root_md,
            targets=Metadata(Targets(expires=now)),
            snapshot=Metadata(Snapshot(expires=now)),
            timestamp=Metadata(Timestamp(expires=now)),
        )
        for md in (state.targets, state.snapshot, state.timestamp):
            md.signed.version = 0  # _prepare_online bumps every role to version 1
        writes = self._prepare_online(state, now, {Targets.type})
        self._write_root(root_md)
        self._write_all(writes)
        logger.info("initialized TUF repository", extra={"repo_dir": str(self.repo_dir)})

    def _root_version(self) -> int:
        versions = []
        with suppress(FileNotFoundError):
            for p in self.metadata_dir.iterdir():
                head, _, tail = p.name.partition(".")
                if tail == "root.json" and head.isdigit():
                    versions.append(int(head))
        if not versions:
            raise RepositoryStateError(
                f"no root metadata in {self.metadata_dir}; is {self.repo_dir} a repository made by "
                "ReleaseRepository.init?"
            )
        return max(versions)

    def _read_bytes(self, name: str) -> bytes:
        try:
            return (self.metadata_dir / name).read_bytes()
        except OSError as e:
            raise RepositoryStateError(
                f"cannot read {self.metadata_dir / name}: {e}; the repository is incomplete "
                "(restore it from backup)"
            ) from e

    def _read(self, name: str, cls: type[S]) -> Metadata[Any]:
        try:
            md = Metadata.from_bytes(self._read_bytes(name))
        except TufRepositoryError as e:
            raise RepositoryStateError(
                f"{self.metadata_dir / name} is not valid metadata: {e}"
            ) from e
        if not isinstance(md.signed, cls):
            raise RepositoryStateError(
                f"{self.metadata_dir / name} holds {md.signed.type} metadata, expected {cls.type}"
            )
        return md

    def _load(self) -> _State:
        root = self._read(f"{self._root_version()}.root.json", Root)
        timestamp = self._read("timestamp.json", Timestamp)
        snap_version = timestamp.signed.snapshot_meta.version
        snapshot = self._read(f"{snap_version}.snapshot.json", Snapshot)
        meta = snapshot.signed.meta.get("targets.json")
        if meta is None:
            raise RepositoryStateError(
                f"snapshot version {snap_version} does not list targets.json"
            )
        targets = self._read(f"{meta.version}.targets.json", Targets)
        return _State(root=root, targets=targets, snapshot=snapshot, timestamp=timestamp)

    def _online_signers(self, roots: Sequence[Root], role: str) -> list[CryptoSigner]:
        """Signers for every key of ``role`` in ``roots`` whose private key is on disk."""
        signers: dict[str, CryptoSigner] = {}
        for root in roots:
            for keyid in root.roles[role].keyids:
                pem, _ = _key_files(self.keys_dir / ONLINE_KEYS, role, keyid)
                if keyid not in signers and pem.is_file():
                    signers[keyid] = _signer_for(pem, root.get_key(keyid))
        return list(signers.values())

    def _root_signers(
        self, files: Sequence[Path] | None, roots: Sequence[Root]
    ) -> list[CryptoSigner]:
        """Signers for the given root key files, matched to keys of ``roots`` by value."""
        explicit = files is not None
        if files is None:
            files = sorted((self.keys_dir / OFFLINE_KEYS).glob(f"{Root.type}-*.pem"))
        known = {}
        for root in roots:
            for keyid in root.roles[Root.type].keyids:
                known[json.dumps(root.get_key(keyid).keyval, sort_keys=True)] = root.get_key(keyid)
        signers: dict[str, CryptoSigner] = {}
        for path in files:
            private = _load_private(Path(path))
            value = json.dumps(SSlibKey.from_crypto(private.public_key()).keyval, sort_keys=True)
            key = known.get(value)
            if key is None:
                if explicit:
                    raise SigningKeyError(
                        f"{path} is not one of the root keys "
                        f"({_short(k.keyid for k in known.values())})"
                    )
                continue  # leftover of an interrupted init: not ours to sign with
            signers[key.keyid] = CryptoSigner(private, cast(SSlibKey, key))
        return list(signers.values())

    def _change_root(
        self,
        state: _State,
        new_root: Root,
        now: datetime,
        root_key_files: Sequence[Path] | None,
        *,
        extra_root: Sequence[CryptoSigner] = (),
        extra_online: Mapping[str, Sequence[CryptoSigner]] | None = None,
        retired: Sequence[str] = (),
    ) -> int:
        old = state.root.signed
        new_root.version = old.version + 1
        new_root.expires = now + self.expiry[Root.type]
        md = Metadata(new_root)
        signers = {
            s.public_key.keyid: s for s in self._root_signers(root_key_files, [old, new_root])
        }
        signers.update({s.public_key.keyid: s for s in extra_root})
        _sign(md, signers.values())
        result = new_root.get_root_verification_result(old, md.signed_bytes, md.signatures)
        if not result:
            raise SigningKeyError(
                f"root v{new_root.version} needs {result.first.threshold} signatures from the "
                f"root keys of v{old.version} (got {len(result.first.signed)}) and "
                f"{result.second.threshold} from its own (got {len(result.second.signed)}); pass "
                "root_key_files naming enough of the root keys "
                f"{_short(old.roles[Root.type].keyids)}"
            )
        # Re-sign the online roles first, valid under both the old and the new root
        # where the old keys are at hand: devices never see a root that rejects the
        # current timestamp, nor a timestamp the root they hold rejects.
        writes = self._prepare_online(
            state, now, {Targets.type}, new_root=new_root, extra=extra_online or {}
        )
        self._write_all(writes)
        self._write_root(md)
        for keyid in retired:
            for sub in (ONLINE_KEYS, OFFLINE_KEYS):
                for f in (self.keys_dir / sub).glob(f"*-{keyid}.*"):
                    f.unlink()
        return new_root.version

    def _prepare_online(
        self,
        state: _State,
        now: datetime,
        roles: set[str],
        *,
        new_root: Root | None = None,
        extra: Mapping[str, Sequence[CryptoSigner]] | None = None,
    ) -> list[tuple[str, bytes]]:
        """Bump, re-sign and serialize ``roles`` and the roles that depend on them
        (targets -> snapshot -> timestamp), in memory. Returns (file name, bytes) in
        the order they must be written. ``state`` is updated in place."""
        extra = extra or {}
        roots = [state.root.signed] + ([new_root] if new_root is not None else [])
        must_verify = roots[-1]
        writes: list[tuple[str, bytes]] = []
        due = set(roles)
        for role in _ONLINE:  # dependency order
            if role not in due:
                continue
            md: Metadata[Any] = getattr(state, role)
            md.signed.version += 1
            md.signed.expires = now + self.expiry[role]
            _sign(md, [*self._online_signers(roots, role), *extra.get(role, ())])
            for root in roots:
                result = root.get_verification_result(role, md.signed_bytes, md.signatures)
                if result:
                    continue
                if root is must_verify:
                    raise SigningKeyError(
                        f"cannot sign {role}: root v{root.version} needs {result.threshold} "
                        f"signature(s) from keys {_short(root.roles[role].keyids)} but no private "
                        f"key for them is in {self.keys_dir / ONLINE_KEYS}; restore the key file, "
                        f"or replace the key: edgefleet-cloud key rotate --role {role}"
                    )
                logger.warning(
                    "old %s key unavailable: devices may fail once during rotation", role
                )
            data = md.to_bytes()
            if role == Targets.type:
                if len(data) > MAX_TARGETS_METADATA_BYTES:
                    raise ConfigError(
                        f"targets metadata would be {len(data)} bytes, over the "
                        f"{MAX_TARGETS_METADATA_BYTES}-byte limit devices accept; remove old "
                        "releases first"
                    )
                writes.append((f"{md.signed.version}.targets.json", data))
                state.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
                    md.signed.version, data, _HASH_ALGORITHMS
                )
                due.add(Snapshot.type)
            elif role == Snapshot.type:
                writes.append((f"{md.signed.version}.snapshot.json", data))
                state.timestamp.signed.snapshot_meta = MetaFile.from_data(
                    md.signed.version, data, _HASH_ALGORITHMS
                )
                due.add(Timestamp.type)
            else:
                writes.append(("timestamp.json", data))
        return writes

    def _write_all(self, writes: Sequence[tuple[str, bytes]]) -> None:
        for name, data in writes:
            _atomic_write(self.metadata_dir / name, data)

    def _write_root(self, md: Metadata[Root]) -> None:
        data = md.to_bytes()
        _atomic_write(self.metadata_dir / f"{md.signed.version}.root.json", data)
        _atomic_write(self.metadata_dir / "root.json", data)

    def _blob_path(self, path: str, sha256: str) -> Path:
        parent, _, name = path.rpartition("/")
        return self.targets_dir / parent / f"{sha256}.{name}"

    def _check_immutable(self, path: str, info: TargetFile, listed: TargetFile | None) -> None:
        if listed is not None:
            what = "bytes" if listed.hashes != info.hashes else "custom data (the release manifest)"
            raise ImmutableReleaseError(
                f"target {path!r} is already published with other {what} "
                f"(sha256 {listed.hashes['sha256'][:16]}…); releases are immutable: publish "
                "under a new release number"
            )
        parent, _, name = path.rpartition("/")
        directory = self.targets_dir / parent
        sha = info.hashes["sha256"]
        if directory.is_dir():
            for f in directory.iterdir():
                head, _, tail = f.name.partition(".")
                if tail == name and len(head) == 64 and head != sha:
                    raise ImmutableReleaseError(
                        f"target {path!r} was published before with other bytes ({f}); release "
                        "numbers are never reused: publish under a new release number (if that "
                        f"path was never published, e.g. an interrupted publish, delete {f})"
                    )

    def _write_blob(self, info: TargetFile, data: bytes) -> None:
        sha = info.hashes["sha256"]
        blob = self._blob_path(info.path, sha)
        with suppress(OSError):
            if hashlib.sha256(blob.read_bytes()).hexdigest() == sha:
                return
        _atomic_write(blob, data)
