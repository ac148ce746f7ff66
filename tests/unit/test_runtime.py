"""The device runtime on real LiteRT with real (tiny) models: loading, inference, hot swap."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from device import _litert
from device.runtime import (
    LoadedModel,
    ModelMeta,
    ModelServer,
    NoModelError,
    interpreter_backend,
    model_ops,
    supported_builtin_ops,
)
from shared.errors import EdgefleetError, ManifestError, ModelLoadError
from shared.manifest import ReleaseManifest
from tests.helpers_models import custom_op_tflite, op_version_tflite, tiny_tflite

pytestmark = pytest.mark.timeout(120)


def random_inputs(model: LoadedModel, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, *model.input_spec.shape[1:])
    if model.input_spec.dtype == "int8":
        return rng.integers(-128, 128, size=shape, dtype=np.int8)
    return rng.random(shape, dtype=np.float32)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    s = ModelServer()
    yield s
    s.close()


class GatedModel(LoadedModel):
    """Holds every invoke until ``gate`` opens, and logs invoke ends and the close."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.events: list[str] = []
        super().__init__(*args, **kw)

    def _invoke(self, interp: Any, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        out = super()._invoke(interp, x)
        self.events.append("invoke_done")
        return out

    def _release(self) -> None:
        if not self.closed:
            self.events.append("closed")
        super()._release()


# -- loading ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int8", "float32"])
def test_model_loads_and_runs(kind: str) -> None:
    with LoadedModel(tiny_tflite(kind), meta=ModelMeta("digits", 3, "a")) as model:
        assert model.input_spec.dtype == model.output_spec.dtype == kind
        assert model.input_spec.shape == [1, 8, 8, 1]
        assert model.output_spec.shape == [1, 10]
        assert (model.input_spec.scale is not None) == (kind == "int8")
        xs = random_inputs(model, 6)
        one = model.run(xs[:1])
        assert one.shape == (1, 10) and one.dtype == np.dtype(kind)
        np.testing.assert_array_equal(model.run(xs[0]), one)  # sample shape without batch axis
        batch = model.run_batch(xs)
        assert batch.shape == (6, 10)
        np.testing.assert_array_equal(batch[0], one[0])
        if kind == "float32":
            np.testing.assert_allclose(batch.sum(axis=1), 1.0, rtol=1e-5)  # softmax
    assert model.closed


def test_every_pooled_interpreter_gives_identical_outputs() -> None:
    # The hot-swap tests below compare results bit for bit; that needs this.
    model = LoadedModel(tiny_tflite("int8"), pool_size=3)
    xs = random_inputs(model, 4)
    interps = list(model._free)
    outs = [np.stack([model._invoke(it, x[None]) for x in xs]) for it in interps]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    model.close()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not a model at all" * 20,
        b"\x00" * 4096,
    ],
    ids=["empty", "garbage", "zeros"],
)
def test_corrupt_bytes_raise_model_load_error(data: bytes) -> None:
    with pytest.raises(ModelLoadError) as info:
        LoadedModel(data)
    assert info.value.code == "model_load_failed"


def test_truncated_model_raises_model_load_error_with_cause() -> None:
    good = tiny_tflite("int8")
    with pytest.raises(ModelLoadError, match="not a valid Flatbuffer") as info:
        LoadedModel(good[: len(good) // 2])
    assert isinstance(info.value.__cause__, ValueError)


def test_custom_op_is_refused_at_load() -> None:
    with pytest.raises(ModelLoadError, match="EdgefleetNoSuchOp") as info:
        LoadedModel(custom_op_tflite())
    assert info.value.__cause__ is not None


def test_op_version_newer_than_runtime_is_refused_at_load() -> None:
    with pytest.raises(ModelLoadError, match=r"CONV_2D.*version '999'"):
        LoadedModel(op_version_tflite())


def test_wrong_input_dtype_and_shape_raise_clear_value_errors() -> None:
    model = LoadedModel(tiny_tflite("int8"))
    with pytest.raises(ValueError, match=r"dtype is float32.*expects int8.*quantize"):
        model.run(np.zeros((1, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape is \[1, 8, 8, 2\].*expects \[1, 8, 8, 1\]"):
        model.run(np.zeros((1, 8, 8, 2), np.int8))
    with pytest.raises(ValueError, match=r"expects int8\[n, 8, 8, 1\]"):
        model.run_batch(np.zeros((3, 8, 8), np.int8))
    assert model.in_flight == 0  # a refused input never took an interpreter
    model.close()


def test_closed_model_refuses_to_run() -> None:
    model = LoadedModel(tiny_tflite("int8"))
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.run(np.zeros((1, 8, 8, 1), np.int8))


def test_check_manifest_catches_io_mismatch() -> None:
    model = LoadedModel(tiny_tflite("int8"))
    spec = model.input_spec.model_dump()
    out = model.output_spec.model_dump()
    base = {
        "model": "digits",
        "release": 3,
        "created_at": 1.0,
        "quantization": "int8",
        "input": spec,
        "output": out,
        "selftest": {"target": "digits/3/selftest.npz", "count": 4, "atol": 0.01},
    }
    model.check_manifest(ReleaseManifest.model_validate(base))
    wrong = dict(base, output=dict(out, shape=[1, 12]))
    with pytest.raises(ManifestError, match=r"output is int8\[1, 10\].*says int8\[1, 12\]"):
        model.check_manifest(ReleaseManifest.model_validate(wrong))
    model.close()


def test_pool_grows_to_max_then_callers_wait() -> None:
    model = GatedModel(tiny_tflite("int8"), pool_size=1, max_pool=2)
    model.gate.clear()
    x = random_inputs(model, 1)[0]
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(model.run(x))) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while model.in_flight < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert model.in_flight == 3 and model.interpreters == 2  # the third waits for one
    model.gate.set()
    for t in threads:
        t.join(5)
    assert len(results) == 3 and model.interpreters == 2 and model.in_flight == 0
    model.close()


# -- serving and hot swap ------------------------------------------------------


def test_infer_before_first_model_raises_no_model_error(server: ModelServer) -> None:
    with pytest.raises(NoModelError) as info:
        server.infer(np.zeros((1, 8, 8, 1), np.int8))
    assert info.value.code == "no_model" and isinstance(info.value, EdgefleetError)
    assert server.current is None and server.errors == 0


def test_infer_after_close_raises_no_model_error(server: ModelServer) -> None:
    model = LoadedModel(tiny_tflite("int8"))
    server.swap(model)
    server.close()
    assert model.closed
    with pytest.raises(NoModelError):
        server.infer(np.zeros((1, 8, 8, 1), np.int8))


def test_swap_warms_new_model_and_reports(server: ModelServer) -> None:
    a = LoadedModel(tiny_tflite("int8"), meta=ModelMeta("digits", 1, "a"))
    b = LoadedModel(tiny_tflite("int8", seed=1), meta=ModelMeta("digits", 2, "b"))
    first = server.swap(a)
    assert first.old is None and first.new.release == 1 and a.warmed
    x = random_inputs(a, 1)
    np.testing.assert_array_equal(server.infer(x), a.run(x))
    report = server.swap(b)
    assert report.old == ModelMeta("digits", 1, "a") and report.new.slot == "b"
    assert report.drained and a.closed and not b.closed
    assert 0 <= report.pause_s < 0.5  # ~1 us; loose so a preempted CI box cannot fail it
    assert server.current is b and server.swaps == 2
    with pytest.raises(ValueError, match="already the current"):
        server.swap(b)
    with pytest.raises(ValueError, match="closed"):
        server.swap(a)


def test_old_model_closes_only_after_its_running_inference_finishes(server: ModelServer) -> None:
    old = GatedModel(tiny_tflite("int8"), meta=ModelMeta(release=1))
    new = LoadedModel(tiny_tflite("int8", seed=1), meta=ModelMeta(release=2))
    server.swap(old)
    x = random_inputs(old, 1)
    expected_old = old.run(x)
    old.events.clear()
    old.gate.clear()
    old.entered.clear()
    slow: list[np.ndarray] = []
    runner = threading.Thread(target=lambda: slow.append(server.infer(x)))
    runner.start()
    assert old.entered.wait(5)  # the inference is inside invoke on the old model
    reports = []
    swapper = threading.Thread(target=lambda: reports.append(server.swap(new)))
    swapper.start()
    deadline = time.monotonic() + 5
    while server.current is not new and time.monotonic() < deadline:
        time.sleep(0.001)
    # Switched: new inferences already run on the new model, the old one is draining.
    np.testing.assert_array_equal(server.infer(x), new.run(x))
    time.sleep(0.05)
    assert swapper.is_alive() and not old.closed and old.in_flight == 1
    old.gate.set()
    runner.join(5)
    swapper.join(5)
    assert old.events == ["invoke_done", "closed"]
    np.testing.assert_array_equal(slow[0], expected_old)  # finished on the model it started on
    assert reports[0].drained and reports[0].drain_s >= 0.04


def test_drain_timeout_leaves_close_to_the_last_inference(server: ModelServer) -> None:
    old = GatedModel(tiny_tflite("int8"))
    server.swap(old)
    old.gate.clear()
    x = random_inputs(old, 1)
    runner = threading.Thread(target=server.infer, args=(x,))
    runner.start()
    assert old.entered.wait(5)
    report = server.swap(LoadedModel(tiny_tflite("int8", seed=1)), drain_timeout=0.02)
    assert not report.drained and not old.closed and old.retired
    old.gate.set()
    runner.join(5)
    assert old.closed and old.events[-2:] == ["invoke_done", "closed"]


def test_inference_that_loses_the_race_with_a_swap_retries_on_the_new_model(
    server: ModelServer,
) -> None:
    new = LoadedModel(tiny_tflite("int8", seed=1))

    class Racy(LoadedModel):
        def _try_run(self, x: np.ndarray) -> np.ndarray | None:
            # The swap lands between infer() reading the reference and checking out.
            if new.retired is False and server.current is self:
                server.swap(new)
            return super()._try_run(x)

    old = Racy(tiny_tflite("int8"))
    server.swap(old)
    x = random_inputs(old, 1)
    np.testing.assert_array_equal(server.infer(x), new.run(x))
    assert old.closed and server.errors == 0


def test_hot_swap_under_load_never_fails_or_tears(server: ModelServer) -> None:
    blobs = [tiny_tflite("int8", seed=0), tiny_tflite("int8", seed=1)]
    violations: list[str] = []

    class Checked(LoadedModel):
        def _invoke(self, interp: Any, x: np.ndarray) -> np.ndarray:
            if self.closed:
                violations.append("invoke on a closed model")
            return super()._invoke(interp, x)

    ref = [LoadedModel(b) for b in blobs]
    xs = random_inputs(ref[0], 16, seed=7)
    expected = [np.stack([m.run(x[None]) for x in xs]) for m in ref]
    assert sum(not np.array_equal(expected[0][i], expected[1][i]) for i in range(16)) >= 12
    models = [Checked(blobs[0], meta=ModelMeta(release=0))]
    server.swap(models[0])
    stop = threading.Event()
    counts: list[int] = []
    problems: list[str] = []

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        n = 0
        while not stop.is_set():
            i = int(rng.integers(16))
            try:
                y = server.infer(xs[i][None])
            except Exception as e:  # any failure is the finding
                problems.append(repr(e))
                continue
            if not (np.array_equal(y, expected[0][i]) or np.array_equal(y, expected[1][i])):
                problems.append(f"torn or foreign result for input {i}: {y}")
            n += 1
        counts.append(n)

    # Three threads for a pool of two: the pool has to grow on the request path too.
    threads = [threading.Thread(target=load, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for k in range(1, 201):
            model = Checked(blobs[k % 2], meta=ModelMeta(release=k))
            models.append(model)
            report = server.swap(model)
            assert report.drained
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert problems == [] and violations == []
    assert server.errors == 0 and server.swaps == 201
    assert sum(counts) == server.inferences and sum(counts) > 200
    assert all(m.closed for m in models[:-1]) and not models[-1].closed
    assert all(m.in_flight == 0 for m in models)
    for m in ref:
        m.close()


def test_window_counts_and_resets(server: ModelServer) -> None:
    server.swap(LoadedModel(tiny_tflite("int8")))
    x = np.zeros((1, 8, 8, 1), np.int8)
    for _ in range(5):
        server.infer(x)
    with pytest.raises(ValueError):
        server.infer(x.astype(np.float32))
    w = server.window()
    assert (w.inferences, w.errors, w.swaps) == (5, 1, 1)
    assert len(w.latencies_s) == 5 and 0 < w.percentile(99) < 1
    w2 = server.window()
    assert (w2.inferences, w2.errors, len(w2.latencies_s)) == (0, 0, 0)
    assert np.isnan(w2.percentile(50))
    assert server.inferences == 5 and server.errors == 1


def test_latency_ring_keeps_the_most_recent() -> None:
    s = ModelServer(latency_capacity=4)
    s.swap(LoadedModel(tiny_tflite("int8")))
    for _ in range(10):
        s.infer(np.zeros((1, 8, 8, 1), np.int8))
    w = s.window()
    assert w.inferences == 10 and len(w.latencies_s) == 4
    s.close()


# -- backend and ops -----------------------------------------------------------


def test_backend_is_litert_and_named_with_version() -> None:
    cls, name = interpreter_backend()
    assert cls.__module__ == "ai_edge_litert.interpreter"
    assert name.startswith("ai-edge-litert ") and name.split()[1][0].isdigit()


def test_backend_chain_falls_back_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = _litert.Backend(
        "edgefleet_no_such_runtime.interpreter", "Interpreter", ("edgefleet-no-such-runtime",), None
    )
    cls, name, backend = _litert._import_backend([missing, _litert.BACKENDS[0]])
    assert backend is _litert.BACKENDS[0] and name.startswith("ai-edge-litert")
    with pytest.raises(ImportError, match="no TFLite interpreter is installed"):
        _litert._import_backend([missing])
    # Neither runtime wheel importable: TensorFlow's interpreter is the last resort.
    # A stand-in module keeps the test from importing TensorFlow itself (~5 s).
    fake_tf = types.ModuleType("tensorflow")
    fake_tf.__version__ = "9.9.9"
    fake_tf.lite = types.SimpleNamespace(Interpreter=type("Interpreter", (), {}))
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    cls, name, backend = _litert._import_backend(_litert.BACKENDS)
    assert backend.module == "tensorflow" and name.startswith("tensorflow ")
    assert cls is fake_tf.lite.Interpreter


def test_device_runtime_does_not_import_tensorflow() -> None:
    code = (
        "import sys, numpy as np; from device.runtime import LoadedModel, "
        "interpreter_backend, supported_builtin_ops; interpreter_backend(); "
        "supported_builtin_ops(); assert 'tensorflow' not in sys.modules, 'tf imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_supported_ops_cover_what_models_use() -> None:
    ops = supported_builtin_ops()
    assert ops is not None and {"CONV_2D", "FULLY_CONNECTED", "SOFTMAX"} <= ops
    assert "CUSTOM" not in ops and "DELEGATE" not in ops
    used = model_ops(tiny_tflite("int8"))
    assert used is not None and "CONV_2D" in used and used <= ops
    custom = model_ops(custom_op_tflite())
    assert custom is not None and "EdgefleetNoSuchOp" in custom
    assert not custom <= ops
    with pytest.raises(ModelLoadError):
        model_ops(b"definitely not a flatbuffer")
