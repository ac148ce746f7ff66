"""Attacks on what a device installs: every one is refused by the real agent.

Each test publishes or serves one attack against a device serving release 1
(see ``conftest.py``) and asserts that the device names the cause (its
``failed`` event), keeps serving its model, and changes nothing in its A/B
slots or slot pointer.

The attacker sits where a compromised mirror or CDN sits: between the cloud's
repository and the device (``served``). Where an attack needs more (a stolen
online key), the test says so.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from cloud.tuf_repo import ReleaseRepository, _canonical
from tests.attacks.harness import (
    DeviceUnderAttack,
    RepoServer,
    blob_path,
    model_bytes,
    publish_release,
    selftest_for,
)

pytestmark = pytest.mark.integration


def _online_signer(keys_dir: Path, role: str) -> CryptoSigner:
    """The cloud's online key for ``role``, as an attacker who stole it would use it."""
    pub = next((keys_dir / "online").glob(f"{role}-*.pub.json"))
    info = json.loads(pub.read_text())
    private = load_pem_private_key(
        pub.with_name(pub.name.replace(".pub.json", ".pem")).read_bytes(), None
    )
    return CryptoSigner(private, SSlibKey.from_dict(info["keyid"], dict(info["key"])))


def _served_version(served: RepoServer, role: str) -> int:
    ts = Metadata.from_bytes((served.root / "metadata" / "timestamp.json").read_bytes())
    if role == "snapshot":
        return ts.signed.snapshot_meta.version
    snap = Metadata.from_bytes(
        (served.root / "metadata" / f"{ts.signed.snapshot_meta.version}.snapshot.json").read_bytes()
    )
    return snap.signed.meta["targets.json"].version


def test_tampered_model_bytes_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    served.tamper(
        blob_path(served.root, repo, 2), lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:]
    )
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "LengthOrHashMismatchError" in reason.message
    device.assert_untouched(before, release=1)


def test_target_signed_by_unknown_key_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer, tmp_path: Path
) -> None:
    # The attacker holds the online snapshot and timestamp keys, not the targets
    # key: it lists its own model as release 2 and signs that with a key of its own.
    manifest = publish_release(
        ReleaseRepository.init(tmp_path / "r2", tmp_path / "k2"), 2, model="good-2"
    )
    version = _served_version(served, "targets")
    meta = served.root / "metadata"
    targets = Metadata.from_bytes((meta / f"{version}.targets.json").read_bytes())
    for path, data in (
        (manifest.model_target, model_bytes("good-2")),
        (manifest.selftest.target, selftest_for("good-2")),
    ):
        info = TargetFile.from_data(path, data, ["sha256"])
        if path == manifest.model_target:
            info.unrecognized_fields["custom"] = _canonical(manifest.to_custom(), "custom")
        targets.signed.targets[path] = info
        blob = (
            served.root
            / "targets"
            / path.rpartition("/")[0]
            / f"{info.hashes['sha256']}.{path.rpartition('/')[2]}"
        )
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(CryptoSigner.generate_ed25519())  # the attacker's key
    _write_chain(served, targets, keys_dir=tmp_path / "keys")
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "UnsignedMetadataError" in reason.message and "targets" in reason.message
    device.assert_untouched(before, release=1)


def _write_chain(served: RepoServer, targets: Metadata, *, keys_dir: Path) -> None:
    """Write ``targets`` and a snapshot and timestamp over it, signed with the real keys."""
    meta = served.root / "metadata"
    data = targets.to_bytes()
    (meta / f"{targets.signed.version}.targets.json").write_bytes(data)
    snap_version = _served_version(served, "snapshot")
    snapshot = Metadata.from_bytes((meta / f"{snap_version}.snapshot.json").read_bytes())
    snapshot.signed.meta["targets.json"] = MetaFile.from_data(
        targets.signed.version, data, ["sha256"]
    )
    snapshot.signed.version += 1
    snapshot.signatures.clear()
    snapshot.sign(_online_signer(keys_dir, "snapshot"))
    snap_data = snapshot.to_bytes()
    (meta / f"{snapshot.signed.version}.snapshot.json").write_bytes(snap_data)
    timestamp = Metadata.from_bytes((meta / "timestamp.json").read_bytes())
    timestamp.signed.snapshot_meta = MetaFile.from_data(
        snapshot.signed.version, snap_data, ["sha256"]
    )
    timestamp.signed.version += 1
    timestamp.signatures.clear()
    timestamp.sign(_online_signer(keys_dir, "timestamp"))
    (meta / "timestamp.json").write_bytes(timestamp.to_bytes())


def test_expired_timestamp_freeze_attack_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    # Metadata signed two days ago: the timestamp (1 day) has expired. A server
    # that freezes a device on old metadata can serve nothing newer than this.
    publish_release(repo, 2, model="good-1", now=datetime.now(UTC) - timedelta(days=2))
    served.sync(repo)
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "ExpiredMetadataError" in reason.message and "expired" in reason.message
    device.assert_untouched(before, release=1)


def test_rollback_to_older_release_refused(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    device.install(2)
    before = device.snapshot()
    reason = device.attack(1)  # a signed, valid, but older release
    assert reason.code == "downgrade_refused"
    assert "older than the running release 2" in reason.message
    device.assert_untouched(before, release=2)


def test_rollback_of_signed_metadata_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer, tmp_path: Path
) -> None:
    old = tmp_path / "old-mirror"
    shutil.copytree(served.root, old)  # what the mirror served at release 1
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    device.install(2)  # the device has now seen newer metadata
    publish_release(repo, 3, model="good-2")
    shutil.rmtree(served.root)
    shutil.copytree(old, served.root)  # the attacker replays the old, validly signed set
    before = device.snapshot()
    reason = device.attack(3)
    assert reason.code == "verification_failed"
    assert "BadVersionNumberError" in reason.message
    device.assert_untouched(before, release=2)


def test_mix_and_match_of_metadata_versions_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    old_version = repo.targets_version()
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    meta = served.root / "metadata"
    # The new snapshot and timestamp, served with the old (validly signed) targets.
    (meta / f"{repo.targets_version()}.targets.json").write_bytes(
        (meta / f"{old_version}.targets.json").read_bytes()
    )
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "LengthOrHashMismatchError" in reason.message
    device.assert_untouched(before, release=1)


def test_endless_data_attack_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    blob = blob_path(served.root, repo, 2)
    path = str(blob.relative_to(served.root))
    served.replace[path] = blob.read_bytes() + b"\0" * (4 * 1024 * 1024)
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "more bytes than the signed metadata allows" in reason.message
    device.assert_untouched(before, release=1)


def test_truncated_download_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    blob = blob_path(served.root, repo, 2)
    served.tamper(blob, lambda b: b[: len(b) // 2])
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "LengthOrHashMismatchError" in reason.message and "length" in reason.message.lower()
    device.assert_untouched(before, release=1)


def test_download_cut_midway_is_a_transfer_failure(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    # The server announces the whole file and hangs up halfway: the release may be
    # fine, so the device reports a transfer failure (and retries later), and
    # never installs the half it has.
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    blob = blob_path(served.root, repo, 2)
    served.cut[str(blob.relative_to(served.root))] = blob.stat().st_size // 2
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "transfer_failed"
    assert "retry later" in reason.message
    device.assert_untouched(before, release=1)


@pytest.mark.parametrize(
    "garbage",
    [
        b'{"signed": {"_type": "timestamp", "version": ',
        b'{"signed": 1, "signatures": []}',
        b"\xff\xfe" + b"\x00" * 64,
    ],
    ids=["cut-short", "json-not-metadata", "not-text"],
)
def test_malformed_metadata_json_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer, garbage: bytes
) -> None:
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    served.replace["metadata/timestamp.json"] = garbage
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    assert "DeserializationError" in reason.message
    device.assert_untouched(before, release=1)


def test_model_failing_its_selftest_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    # Signed and verified, but its outputs are not what its signed vectors expect.
    publish_release(repo, 2, model="good-1", vectors_of="good-2")
    served.sync(repo)
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "selftest_failed"
    assert "failed its self-test" in reason.message
    device.assert_untouched(before, release=1)


def test_model_with_an_op_the_runtime_lacks_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    publish_release(repo, 2, model="custom-op", vectors_of="good-0")
    served.sync(repo)
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code in ("incompatible", "model_load_failed")
    assert "EdgefleetNoSuchOp" in reason.message
    device.assert_untouched(before, release=1)


def test_release_signed_for_another_path_rejected(
    device: DeviceUnderAttack, repo: ReleaseRepository, served: RepoServer
) -> None:
    # The mirror answers the request for release 2's model with release 1's bytes
    # (validly signed, but for another target).
    publish_release(repo, 2, model="good-1")
    served.sync(repo)
    served.tamper(
        blob_path(served.root, repo, 2), lambda _: blob_path(served.root, repo, 1).read_bytes()
    )
    before = device.snapshot()
    reason = device.attack(2)
    assert reason.code == "verification_failed"
    device.assert_untouched(before, release=1)
