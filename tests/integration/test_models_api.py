"""The model registry API over real HTTP with real tokens: upload, build in the
background, release into the signed TUF repository; and every way to get it wrong.

The digits CNN is trained once per module with few epochs; each test gets its
own cloud service (``cloud`` fixture: real uvicorn, own Mosquitto, own data dir).
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cloud.pipeline.digits import load_digits_splits, train_digits_cnn
from cloud.tuf_repo import ReleaseRepository
from device.tuf_client import ReleaseClient
from tests.helpers_models import custom_op_tflite

pytestmark = pytest.mark.integration

PROXY_VARS = ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
BUILD_TIMEOUT_S = 240


def _npz(**arrays: Any) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Upload bodies: the trained digits model, its data, and a model that cannot convert."""
    d = tmp_path_factory.mktemp("api-models")
    splits = load_digits_splits(seed=0)
    train_digits_cnn(splits, epochs=4, seed=0).save(d / "digits.keras")
    return {
        "keras": (d / "digits.keras").read_bytes(),
        "calib": _npz(x=splits.x_calib),
        "eval": _npz(x=splits.x_test, y=splits.y_test),
        "calib_2d": _npz(x=splits.x_calib[..., 0]),
        "no_x": _npz(images=splits.x_calib),
        "unconvertible": _unconvertible_saved_model_zip(d),
        "det_x": _npz(x=np.random.default_rng(0).random((20, 4, 4)).astype(np.float32)),
    }


def _unconvertible_saved_model_zip(d: Path) -> bytes:
    """A SavedModel whose only op (MatrixDeterminant) TFLite has no builtin for."""
    import tensorflow as tf

    class Det(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4], tf.float32)])
        def serve(self, x: Any) -> Any:
            return tf.reshape(tf.linalg.det(x), [1, 1])

    module = Det()
    tf.saved_model.save(module, str(d / "det"), signatures={"serving_default": module.serve})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted((d / "det").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(d / "det").as_posix())
    return buf.getvalue()


def _add(cloud: Any, name: str, filename: str, data: bytes, role: str = "operator") -> Any:
    return httpx.post(
        f"{cloud.url}/api/v1/models",
        data={"name": name},
        files={"file": (filename, data)},
        headers=cloud.headers(role),
        timeout=120,
    )


def _candidate(
    cloud: Any, name: str, data: dict[str, Any], uploads: dict[str, bytes], role: str = "operator"
) -> Any:
    return httpx.post(
        f"{cloud.url}/api/v1/models/{name}/candidates",
        data=data,
        files={k: (f"{k}.npz", v) for k, v in uploads.items()} or None,
        headers=cloud.headers(role),
        timeout=120,
    )


def _wait(cloud: Any, job_id: int) -> tuple[dict[str, Any], list[float]]:
    """Poll the job until it ends; return its last state and the progress seen."""
    seen: list[float] = []
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        job = httpx.get(f"{cloud.url}/api/v1/jobs/{job_id}", headers=cloud.headers("viewer"))
        assert job.status_code == 200, job.text
        body = job.json()
        seen.append(body["progress"])
        if body["status"] in ("ready", "failed"):
            return body, seen
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {BUILD_TIMEOUT_S} s: {body}")


def _published(cloud: Any) -> tuple[list[Any], dict[str, Any]]:
    releases = httpx.get(f"{cloud.url}/api/v1/releases", headers=cloud.headers("viewer")).json()
    s = cloud.settings
    targets = ReleaseRepository.open(s.repo_dir, s.keys_dir).list_targets()
    return releases, targets


def test_upload_quantize_release_lands_in_signed_repository(
    cloud: Any, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = _add(cloud, "digits", "digits.keras", files["keras"])
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [8, 8, 1] and r.json()["created_by"] == "test-operator"

    r = _candidate(
        cloud,
        "digits",
        {"mode": "int8", "labels": list("0123456789")},
        {"calibration": files["calib"], "eval_set": files["eval"]},
    )
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/api/v1/jobs/{r.json()['job_id']}"
    job, seen = _wait(cloud, r.json()["job_id"])
    assert job["status"] == "ready", job["error"]
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert _published(cloud) == ([], {})  # built, not yet released

    cand = httpx.get(f"{cloud.url}{job['candidate']}", headers=cloud.headers("viewer")).json()
    assert cand["mode"] == "int8" and cand["metrics"]["accuracy_drop"] <= 0.01
    r = httpx.post(f"{cloud.url}{job['candidate']}/release", headers=cloud.headers("operator"))
    assert r.status_code == 201, r.text
    rel = r.json()
    assert rel["release"] == 1 and rel["published_by"] == "test-operator"
    assert rel["lineage"]["calibration_sha256"] and rel["lineage"]["decisions"]

    releases, targets = _published(cloud)
    assert [(m["model"], m["release"], m["labels"][3]) for m in releases] == [("digits", 1, "3")]
    assert targets["digits/1/model.tflite"].hashes["sha256"] == rel["model_sha256"]
    # A device verifies the release through TUF over the service's own HTTP.
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    s = cloud.settings
    root = ReleaseRepository.open(s.repo_dir, s.keys_dir).root_bytes()
    got = ReleaseClient(tmp_path / "dev", root, f"{cloud.url}/tuf/").fetch_release(
        "digits", 1, tmp_path / "slot"
    )
    assert got.model_sha256 == rel["model_sha256"] and got.manifest.quantization == "int8"

    listed = httpx.get(f"{cloud.url}/api/v1/models", headers=cloud.headers("viewer")).json()
    assert [(m["name"], m["latest_release"]) for m in listed] == [("digits", 1)]
    r = httpx.post(f"{cloud.url}{job['candidate']}/release", headers=cloud.headers("operator"))
    assert r.status_code == 409 and "already release 1" in r.json()["detail"]


def test_viewer_cannot_change_anything(cloud: Any, files: dict[str, bytes]) -> None:
    assert _add(cloud, "digits", "digits.keras", files["keras"], role="viewer").status_code == 403
    r = httpx.post(f"{cloud.url}/api/v1/models", files={"file": ("m.keras", b"x")})
    assert r.status_code == 401
    assert _add(cloud, "digits", "digits.keras", files["keras"]).status_code == 201
    r = _candidate(cloud, "digits", {}, {"calibration": files["calib"]}, role="viewer")
    assert r.status_code == 403 and "needs operator" in r.json()["detail"]
    r = httpx.post(
        f"{cloud.url}/api/v1/models/digits/candidates/1/release", headers=cloud.headers("viewer")
    )
    assert r.status_code == 403
    detail = httpx.get(f"{cloud.url}/api/v1/models/digits", headers=cloud.headers("viewer"))
    assert detail.status_code == 200 and detail.json()["candidates"] == []


@pytest.mark.parametrize(
    ("name", "filename", "key", "status", "needle"),
    [
        ("Bad Name", "m.keras", "keras", 422, "invalid model name"),
        ("digits", "m.h5", "keras", 422, "unsupported model file 'm.h5'"),
        ("digits", "m.keras", "garbage", 422, "not a readable zip"),
        ("digits", "m.tflite", "garbage", 422, "not a TFLite model"),
        ("custom", "m.tflite", "custom_op", 422, "EdgefleetNoSuchOp"),
        ("digits", "m.keras", "empty", 422, "is empty"),
    ],
)
def test_bad_model_uploads_get_4xx(
    cloud: Any,
    files: dict[str, bytes],
    name: str,
    filename: str,
    key: str,
    status: int,
    needle: str,
) -> None:
    bodies = {
        "keras": files["keras"],
        "garbage": b"\x00not a model" * 50,
        "custom_op": custom_op_tflite(),
        "empty": b"",
    }
    r = _add(cloud, name, filename, bodies[key])
    assert r.status_code == status and needle in r.json()["detail"], r.text
    models = httpx.get(f"{cloud.url}/api/v1/models", headers=cloud.headers("viewer")).json()
    assert models == []


def test_upload_limits_and_framing(
    cloud: Any, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cloud.api.models as api

    monkeypatch.setattr(api, "MAX_MODEL_UPLOAD_BYTES", 1000)
    r = _add(cloud, "digits", "digits.keras", files["keras"])
    assert r.status_code == 413 and "larger than the limit of 1000" in r.json()["detail"]
    monkeypatch.setattr(api, "_FORM_OVERHEAD", 0)  # now refused from the Content-Length alone
    r = _add(cloud, "digits", "digits.keras", files["keras"])
    assert r.status_code == 413 and "exceeds the limit of 1000" in r.json()["detail"]
    r = httpx.post(
        f"{cloud.url}/api/v1/models", json={"name": "digits"}, headers=cloud.headers("operator")
    )
    assert r.status_code == 415
    r = httpx.post(
        f"{cloud.url}/api/v1/models",
        data={"name": "digits"},
        files={"other": ("x", b"1")},
        headers=cloud.headers("operator"),
    )
    assert r.status_code == 422 and "unknown form fields ['other']" in r.json()["detail"]


@pytest.mark.parametrize(
    ("data", "uploads", "status", "needle"),
    [
        ({}, {"calibration": "calib_2d"}, 422, "expects samples of shape (8, 8, 1)"),
        ({}, {"calibration": "no_x"}, 422, "has no array 'x'"),
        ({}, {"calibration": "garbage"}, 422, "not an .npz file"),
        ({}, {}, 422, "needs calibration data"),
        ({"mode": "float32"}, {}, 422, "give calibration or evaluation data"),
        ({"mode": "int4"}, {"calibration": "calib"}, 422, "mode"),
        ({"max_accuracy_drop": "2"}, {"calibration": "calib"}, 422, "max_accuracy_drop"),
        ({"min_top1_agreement": "nan"}, {"calibration": "calib"}, 422, "min_top1_agreement"),
        ({"colour": "red"}, {"calibration": "calib"}, 422, "colour"),
        ({"source_id": "7"}, {"calibration": "calib"}, 404, "has no source 7"),
    ],
)
def test_bad_build_requests_get_4xx_and_queue_nothing(
    cloud: Any,
    files: dict[str, bytes],
    data: dict[str, Any],
    uploads: dict[str, str],
    status: int,
    needle: str,
) -> None:
    assert _add(cloud, "digits", "digits.keras", files["keras"]).status_code == 201
    bodies = {**files, "garbage": b"garbage"}
    r = _candidate(cloud, "digits", data, {k: bodies[v] for k, v in uploads.items()})
    assert r.status_code == status and needle in str(r.json()["detail"]), r.text
    cands = httpx.get(
        f"{cloud.url}/api/v1/models/digits/candidates", headers=cloud.headers("viewer")
    ).json()
    assert cands == []


def test_unknown_entries_are_404(cloud: Any, files: dict[str, bytes]) -> None:
    r = _candidate(cloud, "nope", {}, {"calibration": files["calib"]})
    assert r.status_code == 404 and "'nope' is not in the registry" in r.json()["detail"]
    for path in ("/api/v1/models/nope", "/api/v1/jobs/99", "/api/v1/models/nope/releases"):
        assert httpx.get(f"{cloud.url}{path}", headers=cloud.headers("viewer")).status_code == 404
    r = httpx.post(
        f"{cloud.url}/api/v1/models/nope/candidates/1/release", headers=cloud.headers("operator")
    )
    assert r.status_code == 404


def test_failed_builds_name_the_cause_and_publish_nothing(
    cloud: Any, files: dict[str, bytes]
) -> None:
    assert _add(cloud, "digits", "digits.keras", files["keras"]).status_code == 201
    strict = {
        "mode": "int8",
        "fallback": "false",
        "max_accuracy_drop": "0",
        "min_top1_agreement": "1",
        "max_abs_error": "0.0001",
    }
    r = _candidate(
        cloud, "digits", strict, {"calibration": files["calib"], "eval_set": files["eval"]}
    )
    assert r.status_code == 202, r.text
    gate_job = r.json()["job_id"]

    r = _add(cloud, "det", "det.zip", files["unconvertible"])
    assert r.status_code == 201 and r.json()["input_shape"] == [4, 4], r.text
    r = _candidate(cloud, "det", {"mode": "float32"}, {"eval_set": files["det_x"]})
    assert r.status_code == 202, r.text
    convert_job = r.json()["job_id"]

    job, _ = _wait(cloud, gate_job)
    assert job["status"] == "failed"
    assert "no quantization mode passed the gate (fallback was off)" in job["error"]
    assert "max |output error|" in job["error"]
    job, _ = _wait(cloud, convert_job)
    assert job["status"] == "failed" and "conversion to float32 failed" in job["error"]
    assert "MatrixDeterminant" in job["error"]

    r = httpx.post(
        f"{cloud.url}/api/v1/models/digits/candidates/{gate_job}/release",
        headers=cloud.headers("operator"),
    )
    assert r.status_code == 409 and "failed and cannot be released" in r.json()["detail"]
    r = httpx.post(
        f"{cloud.url}/api/v1/models/digits/candidates/{convert_job}/release",
        headers=cloud.headers("operator"),
    )
    assert r.status_code == 404  # a candidate of another model
    assert _published(cloud) == ([], {})
