"""The cloud TUF repository, checked by the real ngclient on the device side.

No TUF mocks: ``RepoDirFetcher`` serves the repository directory the way a
static web server would, in memory, and ``ReleaseClient`` verifies with
``tuf.ngclient.Updater``. ngclient checks expiry against the real clock, so
repositories are signed "now" unless a test builds an expired one on purpose.
"""

from __future__ import annotations

import json
import shutil
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import FetcherInterface

from cloud.tuf_repo import (
    ImmutableReleaseError,
    ReleaseRepository,
    RepositoryStateError,
    SigningKeyError,
    TargetPathError,
)
from device.tuf_client import ReleaseClient, ReleaseNotFoundError, _GuardedFetcher
from shared.errors import ConfigError, ManifestError, TransferError, VerificationError
from shared.manifest import (
    BASELINE_FILE,
    SELFTEST_FILE,
    DriftSpec,
    ReleaseManifest,
    SelfTestSpec,
    TensorSpec,
    target_path,
)

BASE = "http://repo.test/"


class RepoDirFetcher(FetcherInterface):
    """Serves ``BASE/<path>`` from a repository directory, 404 when absent."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir
        self.requests: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        assert url.startswith(BASE), url
        self.requests.append(url[len(BASE) :])
        try:
            data = (self.repo_dir / url[len(BASE) :]).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise tuf_errors.DownloadHTTPError(f"{url} not found", 404) from None
        return iter([data[i : i + 1000] for i in range(0, len(data), 1000)] or [b""])


def make_manifest(model: str, release: int) -> ReleaseManifest:
    return ReleaseManifest(
        model=model,
        release=release,
        created_at=1_732_000_000.25,
        quantization="int8",
        input=TensorSpec(
            name="x", shape=[1, 8, 8, 1], dtype="int8", scale=0.0039215, zero_point=-128
        ),
        output=TensorSpec(name="y", shape=[1, 10], dtype="float32"),
        metrics={"accuracy": 0.978},
        selftest=SelfTestSpec(
            target=target_path(model, release, SELFTEST_FILE), count=4, atol=0.05
        ),
        drift=DriftSpec(
            target=target_path(model, release, BASELINE_FILE),
            features="flatten",
            n_features=64,
            bins=8,
        ),
    )


def release_files(
    model: str = "digits", release: int = 1, body: bytes = b"weights"
) -> tuple[dict[str, bytes], dict[str, dict[str, object]]]:
    manifest = make_manifest(model, release)
    assert manifest.drift is not None
    files = {
        manifest.model_target: b"TFL3" + body * 300,
        manifest.selftest.target: b"vectors-" + body,
        manifest.drift.target: b"baseline-" + body,
    }
    return files, {manifest.model_target: manifest.to_custom()}


def utcnow() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    return ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys", now=utcnow())


def provision(repo: ReleaseRepository, data_dir: Path, root: bytes | None = None) -> RepoDirFetcher:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "root.json").write_bytes(root if root is not None else repo.root_bytes())
    return RepoDirFetcher(repo.repo_dir)


def client_for(repo: ReleaseRepository, data_dir: Path, root: bytes | None = None) -> ReleaseClient:
    fetcher = provision(repo, data_dir, root)
    return ReleaseClient(data_dir / "tuf", data_dir / "root.json", BASE, fetcher=fetcher)


def signer_from(pem: Path, repo: ReleaseRepository, keyid: str) -> CryptoSigner:
    key = repo.root().get_key(keyid)
    return CryptoSigner(load_pem_private_key(pem.read_bytes(), None), key)  # type: ignore[arg-type]


# -- initialization and layout ------------------------------------------------


def test_open_or_init_is_idempotent(tmp_path: Path) -> None:
    first = ReleaseRepository.open_or_init(tmp_path / "repo", tmp_path / "keys")
    keys = sorted(p.name for p in (tmp_path / "keys").rglob("*"))
    again = ReleaseRepository.open_or_init(tmp_path / "repo", tmp_path / "keys")
    assert again.root_bytes() == first.root_bytes()
    assert sorted(p.name for p in (tmp_path / "keys").rglob("*")) == keys
    assert ReleaseRepository.open(tmp_path / "repo", tmp_path / "keys").targets_version() == 1
    with pytest.raises(RepositoryStateError, match="already holds"):
        ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    with pytest.raises(RepositoryStateError, match="no TUF repository"):
        ReleaseRepository.open(tmp_path / "elsewhere", tmp_path / "keys")


def test_layout_keys_and_thresholds(repo: ReleaseRepository) -> None:
    md = repo.metadata_dir
    for name in ["1.root.json", "root.json", "1.targets.json", "1.snapshot.json", "timestamp.json"]:
        assert (md / name).is_file(), name
    assert (md / "root.json").read_bytes() == (md / "1.root.json").read_bytes() == repo.root_bytes()
    root = repo.root()
    assert root.consistent_snapshot
    assert (len(root.roles["root"].keyids), root.roles["root"].threshold) == (3, 2)
    for role in ["targets", "snapshot", "timestamp"]:
        assert (len(root.roles[role].keyids), root.roles[role].threshold) == (1, 1)
    offline = sorted((repo.keys_dir / "offline").glob("*.pem"))
    online = sorted((repo.keys_dir / "online").glob("*.pem"))
    assert {p.name.split("-")[0] for p in offline} == {"root"} and len(offline) == 3
    assert {p.name.split("-")[0] for p in online} == {"targets", "snapshot", "timestamp"}
    for pem in offline + online:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        keyid = pem.name.split("-", 1)[1].removesuffix(".pem")
        pub = json.loads(pem.with_name(pem.name.replace(".pem", ".pub.json")).read_text())
        assert pub["keyid"] == keyid and keyid in root.keys
    for d in ("offline", "online"):
        assert stat.S_IMODE((repo.keys_dir / d).stat().st_mode) == 0o700


def test_init_warns_to_move_root_keys_offline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys")
    assert any("offline" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# -- publishing -------------------------------------------------------------------


def test_published_release_verifies_with_ngclient(repo: ReleaseRepository, tmp_path: Path) -> None:
    files, custom = release_files()
    assert repo.publish(files, custom) == 2
    listed = repo.list_targets()
    assert set(listed) == set(files)
    model_target = "digits/1/model.tflite"
    sha = listed[model_target].hashes["sha256"]
    assert (repo.targets_dir / "digits" / "1" / f"{sha}.model.tflite").read_bytes() == files[
        model_target
    ]
    assert {"2.targets.json", "2.snapshot.json"} <= {p.name for p in repo.metadata_dir.iterdir()}

    got = client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")
    assert got.manifest == make_manifest("digits", 1)  # floats survive canonical JSON signing
    assert got.model_path.read_bytes() == files[model_target]
    assert got.model_sha256 == sha
    assert got.selftest_path.read_bytes() == files["digits/1/selftest.npz"]
    assert got.baseline_path is not None
    assert got.baseline_path.read_bytes() == files["digits/1/baseline.npz"]
    assert not list((tmp_path / "slot").glob(".*"))  # no temporary files left


def test_republishing_identical_release_is_a_noop(repo: ReleaseRepository) -> None:
    files, custom = release_files()
    version = repo.publish(files, custom)
    assert repo.publish(files, custom) == version
    assert repo.targets_version() == version


def test_overwriting_published_target_refused(repo: ReleaseRepository) -> None:
    files, custom = release_files()
    version = repo.publish(files, custom)
    tampered = dict(files, **{"digits/1/model.tflite": b"other model"})
    with pytest.raises(ImmutableReleaseError, match="new release number"):
        repo.publish(tampered, custom)
    other_manifest = make_manifest("digits", 1).model_copy(update={"created_at": 5.0})
    with pytest.raises(ImmutableReleaseError, match="manifest"):
        repo.publish(files, {"digits/1/model.tflite": other_manifest.to_custom()})
    assert repo.targets_version() == version
    assert repo.list_targets()["digits/1/model.tflite"].length == len(
        files["digits/1/model.tflite"]
    )


def test_removed_release_cannot_return_with_other_bytes(repo: ReleaseRepository) -> None:
    files, custom = release_files()
    repo.publish(files, custom)
    repo.remove(list(files))
    with pytest.raises(ImmutableReleaseError, match="never reused"):
        repo.publish(release_files(body=b"retrained")[0], custom)
    repo.publish(files, custom)  # the same bytes may be listed again
    assert set(repo.list_targets()) == set(files)


def test_remove_delists_release(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(*release_files(release=1))
    repo.publish(*release_files(release=2))
    before = repo.targets_version()
    assert repo.remove([p for p in repo.list_targets() if p.startswith("digits/1/")]) == before + 1
    assert all(p.startswith("digits/2/") for p in repo.list_targets())
    client = client_for(repo, tmp_path / "dev")
    with pytest.raises(ReleaseNotFoundError, match="release 1 of digits is not in the signed"):
        client.fetch_release("digits", 1, tmp_path / "slot")
    assert not (tmp_path / "slot" / "model.tflite").exists()
    client.fetch_release("digits", 2, tmp_path / "slot")
    with pytest.raises(TargetPathError, match="do not list"):
        repo.remove(["digits/1/model.tflite"])


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "/abs/model.tflite", "a//b", "a/./b", "a/../b", "", "a\\b", "dir/"]
)
def test_path_traversal_target_refused(repo: ReleaseRepository, path: str) -> None:
    with pytest.raises(TargetPathError):
        repo.publish({path: b"x"})


def test_custom_without_file_refused(repo: ReleaseRepository) -> None:
    with pytest.raises(TargetPathError, match="not among the files"):
        repo.publish({"a/b": b"x"}, {"a/c": {"k": 1}})
    with pytest.raises(ConfigError, match="nan"):
        repo.publish({"a/b": b"x"}, {"a/b": {"k": float("nan")}})


def test_concurrent_publishes_serialize(repo: ReleaseRepository) -> None:
    errors: list[BaseException] = []

    def publish(release: int) -> None:
        try:
            ReleaseRepository.open(repo.repo_dir, repo.keys_dir).publish(
                *release_files(release=release)
            )
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(r,)) for r in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert repo.targets_version() == 7
    assert {p.split("/")[1] for p in repo.list_targets()} == {str(r) for r in range(1, 7)}


# -- expiry and refresh -----------------------------------------------------------


def test_refresh_resigns_only_what_is_due(tmp_path: Path) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys", now=t0)
    assert repo.refresh(t0 + timedelta(hours=1)).resigned == ()
    result = repo.refresh(t0 + timedelta(hours=13))
    assert result.resigned == ("timestamp",) and not result.root_needs_resign
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes()).signed
    assert ts.version == 2 and ts.expires == t0 + timedelta(hours=13, days=1)
    assert repo.refresh(t0 + timedelta(days=5)).resigned == ("snapshot", "timestamp")
    assert repo.refresh(t0 + timedelta(days=61)).resigned == ("targets", "snapshot", "timestamp")
    assert repo.targets_version() == 2
    late = repo.refresh(t0 + timedelta(days=310))
    assert late.root_needs_resign and late.root_expires == t0 + timedelta(days=365)


def test_expired_timestamp_rejected(tmp_path: Path) -> None:
    """Freeze attack: a server replaying metadata that was valid once is refused."""
    past = utcnow() - timedelta(days=2)
    repo = ReleaseRepository.init(tmp_path / "repo", tmp_path / "keys", now=past)
    repo.publish(*release_files(), now=past)
    client = client_for(repo, tmp_path / "dev")
    with pytest.raises(VerificationError, match="expired") as info:
        client.fetch_release("digits", 1, tmp_path / "slot")
    assert isinstance(info.value.__cause__, tuf_errors.ExpiredMetadataError)
    assert not (tmp_path / "slot" / "model.tflite").exists()
    assert repo.refresh().resigned == ("timestamp",)
    client.fetch_release("digits", 1, tmp_path / "slot")


def test_rollback_attack_rejected(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(*release_files(release=1))
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.publish(*release_files(release=2))
    client = client_for(repo, tmp_path / "dev")
    client.fetch_release("digits", 2, tmp_path / "slot")
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # validly signed, but older
    with pytest.raises(VerificationError) as info:
        client.fetch_release("digits", 1, tmp_path / "slot1")
    assert isinstance(info.value.__cause__, tuf_errors.BadVersionNumberError)


# -- keys -----------------------------------------------------------------------


def test_rotated_targets_key_followed_without_reprovisioning(
    repo: ReleaseRepository, tmp_path: Path
) -> None:
    provisioned = repo.root_bytes()
    repo.publish(*release_files(release=1))
    client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot1")
    old_keyid = repo.root().roles["targets"].keyids[0]
    assert repo.rotate_role_key("targets") == 2
    new_keyid = repo.root().roles["targets"].keyids[0]
    assert new_keyid != old_keyid and old_keyid not in repo.root().keys
    assert not list(repo.keys_dir.rglob(f"*{old_keyid}*"))  # retired key deleted
    repo.publish(*release_files(release=2))
    client = client_for(repo, tmp_path / "dev", root=provisioned)  # still the v1 root file
    assert client.fetch_release("digits", 2, tmp_path / "slot2").release == 2
    assert (tmp_path / "dev" / "tuf" / "root_history" / "2.root.json").is_file()


def test_rotation_metadata_valid_under_old_and_new_root(repo: ReleaseRepository) -> None:
    """Online metadata is re-signed before the new root is written, valid under both:
    a device reading the repository mid-rotation never sees a root/timestamp mismatch."""
    old_root = repo.root()
    repo.rotate_role_key("timestamp")
    new_root = repo.root()
    ts = Metadata[Timestamp].from_bytes((repo.metadata_dir / "timestamp.json").read_bytes())
    for root in (old_root, new_root):
        assert root.get_verification_result("timestamp", ts.signed_bytes, ts.signatures)


def test_retired_targets_key_cannot_sign(repo: ReleaseRepository, tmp_path: Path) -> None:
    """An attacker holding the rotated-out targets key cannot publish a release."""
    repo.publish(*release_files(release=1))
    old_keyid = repo.root().roles["targets"].keyids[0]
    stolen = signer_from(
        next((repo.keys_dir / "online").glob(f"targets-{old_keyid}.pem")), repo, old_keyid
    )
    repo.rotate_role_key("targets")
    client = client_for(repo, tmp_path / "dev")
    client.fetch_release("digits", 1, tmp_path / "slot")

    # Forge: targets signed by the old key, snapshot/timestamp by the real keys.
    md_dir = repo.metadata_dir
    ts = Metadata[Timestamp].from_bytes((md_dir / "timestamp.json").read_bytes())
    snap = Metadata[Snapshot].from_bytes(
        (md_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes()
    )
    tv = snap.signed.meta["targets.json"].version
    targets = Metadata[Targets].from_bytes((md_dir / f"{tv}.targets.json").read_bytes())
    evil = b"evil model"
    targets.signed.targets["digits/9/model.tflite"] = TargetFile.from_data(
        "digits/9/model.tflite", evil
    )
    targets.signed.version += 1
    targets.sign(stolen)
    data = targets.to_bytes()
    (md_dir / f"{targets.signed.version}.targets.json").write_bytes(data)
    root = repo.root()

    def online(role: str) -> CryptoSigner:
        keyid = root.roles[role].keyids[0]
        return signer_from(repo.keys_dir / "online" / f"{role}-{keyid}.pem", repo, keyid)

    snap.signed.meta["targets.json"] = MetaFile(targets.signed.version, len(data))
    snap.signed.version += 1
    snap.sign(online("snapshot"))
    sdata = snap.to_bytes()
    (md_dir / f"{snap.signed.version}.snapshot.json").write_bytes(sdata)
    ts.signed.snapshot_meta = MetaFile(snap.signed.version, len(sdata))
    ts.signed.version += 1
    ts.sign(online("timestamp"))
    (md_dir / "timestamp.json").write_bytes(ts.to_bytes())

    with pytest.raises(VerificationError) as info:
        client.fetch_release("digits", 1, tmp_path / "slot2")
    assert isinstance(info.value.__cause__, tuf_errors.UnsignedMetadataError)


def test_root_key_rotation_followed(repo: ReleaseRepository, tmp_path: Path) -> None:
    provisioned = repo.root_bytes()
    repo.publish(*release_files(release=1))
    first = repo.root().roles["root"].keyids[0]
    assert repo.rotate_role_key("root", keyid=first) == 2
    assert first not in repo.root().roles["root"].keyids
    assert not list(repo.keys_dir.rglob(f"*{first}*"))
    assert repo.rotate_role_key("root") == 3  # all three root keys replaced
    assert len(list((repo.keys_dir / "offline").glob("*.pem"))) == 3
    client = client_for(repo, tmp_path / "dev", root=provisioned)
    client.fetch_release("digits", 1, tmp_path / "slot")
    assert (tmp_path / "dev" / "tuf" / "root_history" / "3.root.json").is_file()


def test_new_root_needs_threshold_of_root_keys(repo: ReleaseRepository, tmp_path: Path) -> None:
    offline = sorted((repo.keys_dir / "offline").glob("*.pem"))
    with pytest.raises(SigningKeyError, match="needs 2 signatures"):
        repo.sign_new_root(offline[:1])
    with pytest.raises(SigningKeyError, match="not one of the root keys"):
        repo.sign_new_root(sorted((repo.keys_dir / "online").glob("*.pem"))[:2])
    assert repo.root().version == 1
    # The root keys moved offline: a root change without them is refused.
    moved = tmp_path / "usb"
    shutil.move(repo.keys_dir / "offline", moved)
    with pytest.raises(SigningKeyError):
        repo.rotate_role_key("timestamp")
    assert len(list((repo.keys_dir / "online").glob("timestamp-*.pem"))) == 1
    assert repo.sign_new_root(sorted(moved.glob("*.pem"))[1:]) == 2


def test_revoke_key(repo: ReleaseRepository, tmp_path: Path) -> None:
    provisioned = repo.root_bytes()
    repo.publish(*release_files())
    with pytest.raises(SigningKeyError, match="edgefleet-cloud key rotate --role"):
        repo.revoke_key(repo.root().roles["targets"].keyids[0])
    with pytest.raises(SigningKeyError, match="not used"):
        repo.revoke_key("0" * 64)
    root_key = repo.root().roles["root"].keyids[2]
    assert repo.revoke_key(root_key) == 2
    assert repo.root().roles["root"].keyids == repo.root().roles["root"].keyids[:2]
    assert root_key not in repo.root().keys
    client_for(repo, tmp_path / "dev", root=provisioned).fetch_release("digits", 1, tmp_path / "s")


def test_lost_online_key_is_replaced_by_rotation(repo: ReleaseRepository, tmp_path: Path) -> None:
    for pem in (repo.keys_dir / "online").glob("targets-*"):
        pem.unlink()
    with pytest.raises(SigningKeyError, match="edgefleet-cloud key rotate --role"):
        repo.publish(*release_files())
    repo.rotate_role_key("targets")
    repo.publish(*release_files())
    client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")


# -- device side against the same repository ---------------------------------------


def test_tampered_target_rejected(repo: ReleaseRepository, tmp_path: Path) -> None:
    files, custom = release_files()
    repo.publish(files, custom)
    info = repo.list_targets()["digits/1/selftest.npz"]
    blob = repo.targets_dir / "digits" / "1" / f"{info.hashes['sha256']}.selftest.npz"
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as err:
        client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")
    assert isinstance(err.value.__cause__, tuf_errors.LengthOrHashMismatchError)
    assert list((tmp_path / "slot").iterdir()) == []  # not even the good model file


def test_endless_data_rejected(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(*release_files())
    info = repo.list_targets()["digits/1/model.tflite"]
    blob = repo.targets_dir / "digits" / "1" / f"{info.hashes['sha256']}.model.tflite"
    blob.write_bytes(blob.read_bytes() + b"\0" * 100_000)
    with pytest.raises(VerificationError, match="more bytes"):
        client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")
    assert list((tmp_path / "slot").iterdir()) == []


def test_manifest_attached_to_other_target_rejected(
    repo: ReleaseRepository, tmp_path: Path
) -> None:
    """Mix-and-match: release 1's manifest on release 2's model is refused."""
    files, _ = release_files(release=2)
    repo.publish(files, {"digits/2/model.tflite": make_manifest("digits", 1).to_custom()})
    with pytest.raises(ManifestError, match="attached to target"):
        client_for(repo, tmp_path / "dev").fetch_release("digits", 2, tmp_path / "slot")


def test_manifest_naming_unsigned_file_rejected(repo: ReleaseRepository, tmp_path: Path) -> None:
    files, custom = release_files()
    del files["digits/1/baseline.npz"]
    repo.publish(files, custom)
    with pytest.raises(ManifestError, match="does not list"):
        client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")


def test_missing_target_file_is_a_transfer_error(repo: ReleaseRepository, tmp_path: Path) -> None:
    repo.publish(*release_files())
    shutil.rmtree(repo.targets_dir)
    with pytest.raises(TransferError):
        client_for(repo, tmp_path / "dev").fetch_release("digits", 1, tmp_path / "slot")


def test_unprovisioned_device_refused(repo: ReleaseRepository, tmp_path: Path) -> None:
    root_file = tmp_path / "dev" / "root.json"
    fetcher = RepoDirFetcher(repo.repo_dir)
    client = ReleaseClient(tmp_path / "dev" / "tuf", root_file, BASE, fetcher=fetcher)
    with pytest.raises(ConfigError, match="not provisioned"):
        client.get_manifest("digits", 1)
    root_file.parent.mkdir(exist_ok=True)
    root_file.write_bytes(b"{}")
    with pytest.raises(ConfigError, match="re-provision"):
        client.get_manifest("digits", 1)


def test_verified_files_are_reused_and_progress_reported(
    repo: ReleaseRepository, tmp_path: Path
) -> None:
    files, custom = release_files()
    repo.publish(files, custom)
    fetcher = provision(repo, tmp_path / "dev")
    client = ReleaseClient(tmp_path / "dev" / "tuf", repo.root_bytes(), BASE, fetcher=fetcher)
    seen: list[tuple[int, int]] = []
    client.fetch_release("digits", 1, tmp_path / "slot", progress=lambda d, t: seen.append((d, t)))
    total = sum(len(b) for b in files.values())
    assert seen[-1] == (total, total) and seen == sorted(seen)
    fetcher.requests.clear()
    assert client.get_manifest("digits", 1) == make_manifest("digits", 1)
    client.fetch_release("digits", 1, tmp_path / "slot")
    assert not [r for r in fetcher.requests if r.startswith("targets/")]


def test_slow_retrieval_refused() -> None:
    class Drip(FetcherInterface):
        def _fetch(self, url: str) -> Iterator[bytes]:
            return iter([b"x"] * 10)

    ticks = iter(range(0, 1000, 30))
    guarded = _GuardedFetcher(Drip(), min_rate=100, grace_s=60, clock=lambda: float(next(ticks)))
    with pytest.raises(tuf_errors.SlowRetrievalError):
        guarded.download_bytes("http://x/y", 1000)
