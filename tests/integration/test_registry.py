"""The model registry service on SQLite and on PostgreSQL: real TensorFlow, real LiteRT,
a real TUF repository, no HTTP.

PostgreSQL runs against the local server (``EDGEFLEET_TEST_PG_ADMIN``, default
``postgresql://postgres@127.0.0.1:5432/postgres``): each test gets a throwaway
database ``edgefleet_test_<random>`` that is dropped afterwards. Those tests
are skipped, with the reason, only when no server answers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from cloud.db import Database
from cloud.pipeline.artifacts import build_artifacts
from cloud.pipeline.digits import DigitsSplits, load_digits_splits, train_digits_cnn
from cloud.pipeline.gate import GateConfig, run_pipeline
from cloud.registry import ConflictError, QuantizeOptions, Registry, UnknownEntryError
from cloud.registry.tables import Candidate, CandidateStatus, ReleaseRecord
from cloud.releases import ReleaseService
from cloud.tuf_repo import ReleaseRepository
from shared.errors import PipelineError, StorageError
from tests.helpers_models import custom_op_tflite, tiny_tflite
from tests.pg import open_database

pytestmark = pytest.mark.integration

#: Out of int8's reach on purpose (its output step alone is 1/256).
STRICT = GateConfig(max_accuracy_drop=0.0, min_top1_agreement=1.0, max_abs_error=1e-4)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits CNN trained once (few epochs), saved as files an operator would have."""
    d = tmp_path_factory.mktemp("digits")
    splits: DigitsSplits = load_digits_splits(seed=0)
    model = train_digits_cnn(splits, epochs=4, seed=0)
    model.save(d / "digits.keras")
    np.savez(d / "calib.npz", x=splits.x_calib)
    np.savez(d / "eval.npz", x=splits.x_test, y=splits.y_test)
    np.savez(d / "calib_2d.npz", x=splits.x_calib[..., 0])
    return {"dir": d, "splits": splits, "model": model}


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    yield from open_database(request.param, tmp_path)


@pytest.fixture
def repo(tmp_path: Path) -> ReleaseRepository:
    return ReleaseRepository.open_or_init(tmp_path / "repo", tmp_path / "keys")


@pytest.fixture
def registry(db: Database, repo: ReleaseRepository, tmp_path: Path) -> Registry:
    return Registry(db, repo, tmp_path / "blobs")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantize_then_release_records_lineage(
    registry: Registry, repo: ReleaseRepository, digits: dict[str, Any]
) -> None:
    d = digits["dir"]
    src = registry.add_model("digits", d / "digits.keras", who="alice", description="8x8")
    assert src.kind == "keras" and src.input_shape == [8, 8, 1]
    steps: list[float] = []
    cand = registry.quantize(
        "digits",
        QuantizeOptions(mode="int8", labels=tuple("0123456789")),
        who="alice",
        calibration=d / "calib.npz",
        eval_set=d / "eval.npz",
        progress=lambda step, fraction: steps.append(fraction),
    )
    assert cand.status == CandidateStatus.READY and cand.mode == "int8"
    assert steps == sorted(steps) and steps[-1] == 1.0
    assert cand.metrics["accuracy_drop"] <= 0.01 and cand.metrics["size_ratio"] < 0.35
    assert any(line.startswith("int8: passed") for line in cand.decisions)
    assert repo.list_targets() == {}  # a candidate is not a release

    rel = registry.release(cand.id, who="bob")
    assert rel.release == 1 and rel.candidate_id == cand.id and rel.published_by == "bob"
    target = repo.list_targets()["digits/1/model.tflite"]
    assert target.hashes["sha256"] == rel.model_sha256 == cand.model_sha256
    lineage = rel.lineage
    assert lineage.source_sha256 == _sha(d / "digits.keras")
    assert lineage.calibration_sha256 == _sha(d / "calib.npz")
    assert lineage.eval_sha256 == _sha(d / "eval.npz")
    assert lineage.tensorflow_version[0].isdigit() and lineage.litert_version[0].isdigit()
    assert lineage.parameters["gate"]["max_accuracy_drop"] == 0.01
    assert lineage.decisions == cand.decisions and lineage.created_by == "alice"

    detail = registry.show("digits")
    assert detail.model.latest_release == 1 and detail.model.description == "8x8"
    assert [c.status for c in detail.candidates] == ["released"]
    assert detail.candidates[0].release == 1
    assert [m.name for m in registry.list_models()] == ["digits"]
    with pytest.raises(ConflictError, match="already release 1"):
        registry.release(cand.id, who="bob")


def test_gate_failure_recorded_and_nothing_published(
    registry: Registry, repo: ReleaseRepository, digits: dict[str, Any]
) -> None:
    d = digits["dir"]
    registry.add_model("digits", d / "digits.keras", who="alice")
    with pytest.raises(PipelineError, match="no quantization mode passed the gate"):
        registry.quantize(
            "digits",
            QuantizeOptions(mode="int8", gate=STRICT, fallback=False),
            who="alice",
            calibration=d / "calib.npz",
            eval_set=d / "eval.npz",
        )
    (cand,) = registry.candidates("digits")
    assert cand.status == "failed" and "max |output error|" in (cand.error or "")
    with pytest.raises(ConflictError, match="failed and cannot be released"):
        registry.release(cand.id, who="bob")
    assert repo.list_targets() == {} and registry.release_records("digits") == []


def test_wrong_calibration_shape_refused_before_any_build(
    registry: Registry, digits: dict[str, Any]
) -> None:
    d = digits["dir"]
    registry.add_model("digits", d / "digits.keras", who="alice")
    with pytest.raises(PipelineError, match=r"samples of shape \(8, 8\).*expects.*\(8, 8, 1\)"):
        registry.quantize("digits", QuantizeOptions(), who="a", calibration=d / "calib_2d.npz")
    assert registry.candidates("digits") == []
    with pytest.raises(PipelineError, match="needs calibration data"):
        registry.quantize("digits", QuantizeOptions(mode="int16x8"), who="a")
    with pytest.raises(UnknownEntryError, match="'nope' is not in the registry"):
        registry.quantize("nope", QuantizeOptions(), who="a", calibration=d / "calib.npz")


def test_unsupported_op_refused_when_added(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "custom.tflite"
    path.write_bytes(custom_op_tflite())
    with pytest.raises(PipelineError, match=r"lacks op.*EdgefleetNoSuchOp"):
        registry.add_model("custom", path, who="alice")
    assert registry.list_models() == []
    assert not [p for p in registry.blobs.root.rglob("*") if p.is_file()]


def test_tflite_released_as_is_and_corrupt_blob_never_published(
    registry: Registry, repo: ReleaseRepository, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_tflite("int8"))
    registry.add_model("tiny", path, who="alice")
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).random((40, 8, 8, 1)))
    first = registry.quantize("tiny", QuantizeOptions(), who="a", calibration=tmp_path / "x.npz")
    assert first.mode == "int8" and first.model_sha256 == _sha(path)
    assert any("released as it is" in line for line in first.decisions)
    second = registry.quantize("tiny", QuantizeOptions(), who="a", calibration=tmp_path / "x.npz")
    blob = registry.blobs.path(second.model_sha256 or "")
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")  # rot on disk
    with pytest.raises(StorageError, match="corrupt"):
        registry.release(second.id, who="bob")
    assert repo.list_targets() == {}


def test_release_service_records_releases_built_elsewhere(
    db: Database, repo: ReleaseRepository, registry: Registry, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_tflite("float32"))
    x = np.random.default_rng(1).random((20, 8, 8, 1)).astype(np.float32)
    artifacts = build_artifacts(run_pipeline(path, x, None, mode="float32"))
    ReleaseService(repo).publish("tiny", artifacts)  # the old signature: no registry
    manifest = ReleaseService(repo, db=db).publish("tiny", artifacts, published_by="ci")
    assert manifest.release == 2
    (rec,) = registry.release_records("tiny")
    assert rec.release == 2 and rec.published_by == "ci" and rec.candidate_id is None
    assert rec.lineage.source_sha256 == _sha(path) and rec.lineage.mode == "float32"


def test_release_number_clash_publishes_nothing(
    db: Database, repo: ReleaseRepository, registry: Registry, tmp_path: Path
) -> None:
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_tflite("float32"))
    x = np.random.default_rng(2).random((20, 8, 8, 1)).astype(np.float32)
    artifacts = build_artifacts(run_pipeline(path, x, None, mode="float32"))
    service = ReleaseService(repo, db=db)
    service.publish("tiny", artifacts, published_by="ci")
    # Another process recorded release 2 a moment ago and has not signed it yet.
    with db.session() as s:
        first = s.scalars(select(ReleaseRecord)).one()
        columns = {c.key: getattr(first, c.key) for c in ReleaseRecord.__table__.columns}
        columns.update(id=None, release=2, candidate_id=None, target="tiny/2/model.tflite")
        s.add(ReleaseRecord(**columns))
    with pytest.raises(ConflictError, match="already in the registry"):
        service.publish("tiny", artifacts, published_by="ci")
    assert "tiny/2/model.tflite" not in repo.list_targets()
    with db.session() as s:
        assert len(s.scalars(select(ReleaseRecord)).all()) == 2


def test_build_of_a_dead_process_marked_failed(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "tiny.tflite"
    path.write_bytes(tiny_tflite("int8"))
    registry.add_model("tiny", path, who="alice")
    np.savez(tmp_path / "x.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    data = registry.add_dataset(tmp_path / "x.npz", who="a", filename="x.npz", what="data")
    with pytest.raises(PipelineError, match="give calibration or evaluation data"):
        registry.submit("tiny", QuantizeOptions(mode="float32"), who="a")
    queued = registry.submit("tiny", QuantizeOptions(mode="float32"), who="a", eval_set=data)
    with registry.db.session() as s:
        row = s.get(Candidate, queued.id)
        assert row is not None
        row.status = CandidateStatus.RUNNING
        row.runner = row.runner.rsplit(":", 1)[0] + ":999999999"  # no such pid
    assert registry.recover_interrupted() == 1
    assert "interrupted" in (registry.candidate(queued.id).error or "")
