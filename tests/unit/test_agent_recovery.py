"""What a booting agent makes of the journal and slots it finds (no broker needed).

Each test lays out a data dir as a power cut (or a bad disk) would leave it,
then runs the boot sequence of ``Agent.start`` without the network:
``updater.recover()``, ``_boot()``, ``updater.after_boot()``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device._journal import Journal, JournalStore
from device._probation import LatencyRing, Outcome, ProbationPolicy, ProbationWindow, judge
from device._updater import fault_delays
from device.agent import Agent, AgentConfig
from device.inputs import RandomSource
from device.runtime import LoadedModel, ModelServer
from device.store import SlotStore, StoreState
from shared.messages import Desired, UpdateState
from tests.faults.harness import (
    MODEL,
    baseline_bytes,
    manifest_for,
    model_bytes,
    selftest_for,
)
from tests.helpers_models import tiny_tflite


def desired(release: int) -> Desired:
    return Desired(device_id="dev-u", model=MODEL, release=release, issued_at=1000.0 + release)


def stage(store: SlotStore, slot: str, release: int) -> None:
    seed = release % 3
    store.stage(
        slot,
        manifest_for(release, seed),
        model_bytes(seed),  # type: ignore[arg-type]
        selftest_for(seed),
        baseline_bytes(),
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Release 1 in slot a (serving before the update), release 2 in slot b."""
    d = tmp_path / "device"
    store = SlotStore(d)
    stage(store, "a", 1)
    stage(store, "b", 2)
    store.set_state(StoreState(active="a", previous=None))
    return d


@pytest.fixture
def boot(data_dir: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    agents: list[Agent] = []

    def run() -> Agent:
        cfg = AgentConfig(
            device_id="dev-u",
            data_dir=data_dir,
            broker_host="127.0.0.1",
            broker_port=1,
            repo_url="http://127.0.0.1:1/",
        )
        agent = Agent(cfg, RandomSource())
        agent.updater.recover()
        agent._boot()
        agent.updater.after_boot()
        agents.append(agent)
        return agent

    yield run
    for a in agents:
        a.updater.close()
        a.server.close()


def write_journal(data_dir: Path, **fields: object) -> None:
    JournalStore(data_dir).save(Journal(**fields))  # type: ignore[arg-type]


def serving(agent: Agent) -> int | None:
    m = agent.running_manifest
    return m.release if m else None


def test_crash_in_probation_after_the_switch_continues_probation(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    write_journal(
        data_dir,
        state=UpdateState.PROBATION,
        target=desired(2),
        slot="b",
        previous="a",
        prev_p99_ms=0.5,
    )
    agent = boot()
    assert serving(agent) == 2
    assert agent.updater._resume_probation
    assert agent.updater._previous_model is not None, "previous model preloaded for rollback"
    assert agent.updater.j.crashes == 1 and agent.state == UpdateState.PROBATION


def test_crash_loop_in_probation_rolls_back(data_dir: Path, boot: callable) -> None:  # type: ignore[valid-type]
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    write_journal(
        data_dir, state=UpdateState.PROBATION, target=desired(2), slot="b", previous="a", crashes=2
    )
    agent = boot()
    assert serving(agent) == 1
    store = SlotStore(data_dir)
    assert store.state().active == "a" and store.read("b") is None
    assert agent.state == UpdateState.ROLLED_BACK
    assert agent._last_error is not None and agent._last_error.code == "model_crashed"
    assert agent.updater.j.is_rejected(desired(2))


def test_crash_in_swapped_before_the_pointer_moved_goes_back_to_selftest(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    write_journal(data_dir, state=UpdateState.SWAPPED, target=desired(2), slot="b", previous="a")
    agent = boot()
    assert serving(agent) == 1
    assert agent.state == UpdateState.SELFTEST
    assert agent._desired == desired(2), "the update resumes without waiting for MQTT"


def test_new_slot_that_no_longer_boots_during_probation_is_rolled_back(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    write_journal(data_dir, state=UpdateState.PROBATION, target=desired(2), slot="b", previous="a")
    model = data_dir / "slots" / "b" / "model.tflite"
    model.write_bytes(model.read_bytes()[:-10])  # bit rot: the hash no longer matches
    agent = boot()
    assert serving(agent) == 1
    assert agent.state == UpdateState.ROLLED_BACK
    assert SlotStore(data_dir).state().active == "a"


def test_crash_in_staged_three_times_refuses_the_release(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    write_journal(data_dir, state=UpdateState.STAGED, target=desired(2), slot="b", crashes=2)
    agent = boot()
    assert serving(agent) == 1
    assert agent.state == UpdateState.FAILED
    assert agent.updater.j.reason is not None
    assert agent.updater.j.reason.code == "model_crashed"
    assert SlotStore(data_dir).read("b") is None, "the refused release is not left valid"
    assert agent._needs_update() is None


def test_committed_finishes_and_cleans_up(data_dir: Path, boot: callable) -> None:  # type: ignore[valid-type]
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    (data_dir / "download" / "tiny-2").mkdir(parents=True)
    (data_dir / "download" / "tiny-2" / ".model.tflite.x.part").write_bytes(b"x")
    write_journal(data_dir, state=UpdateState.COMMITTED, target=desired(2), slot="b", previous="a")
    agent = boot()
    assert serving(agent) == 2 and agent.state == UpdateState.IDLE
    assert not (data_dir / "download" / "tiny-2").exists()


def test_corrupt_journal_is_reported_and_the_device_serves(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    (data_dir / "update.json").write_bytes(b'{"state": "probat')
    agent = boot()
    assert serving(agent) == 1 and agent.state == UpdateState.IDLE
    assert agent._last_error is not None and agent._last_error.code == "journal_corrupt"
    assert json.loads((data_dir / "update.json").read_text())["state"] == "idle"


def test_missing_active_slot_falls_back_to_the_previous_one(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    shutil.rmtree(data_dir / "slots" / "b")
    agent = boot()
    assert serving(agent) == 1
    assert agent._last_error is not None and agent._last_error.code == "slot_invalid"
    assert SlotStore(data_dir).state() == StoreState(active="a", previous=None)


def test_model_that_fails_to_load_falls_back(data_dir: Path, boot: callable) -> None:  # type: ignore[valid-type]
    SlotStore(data_dir).set_state(StoreState(active="b", previous="a"))
    store = SlotStore(data_dir)
    # A slot whose (hash-consistent) model the interpreter refuses.
    store.stage(
        "b",
        manifest_for(2, 2),
        b"TFL3 but not a model",
        selftest_for(2),  # type: ignore[arg-type]
        baseline_bytes(),
    )
    agent = boot()
    assert serving(agent) == 1
    assert agent._last_error is not None and agent._last_error.code == "model_load_failed"


def test_corrupt_slot_pointer_is_rebuilt_from_the_slots(
    data_dir: Path,
    boot: callable,  # type: ignore[valid-type]
) -> None:
    (data_dir / "slots.json").write_bytes(b"\x00\x01garbage")
    agent = boot()
    assert serving(agent) == 2, "the newest valid slot serves"


# -- pure parts ------------------------------------------------------------------------


def test_journal_round_trips_and_rejects_garbage(tmp_path: Path) -> None:
    j = Journal(
        state=UpdateState.PROBATION,
        target=desired(3),
        slot="b",
        previous="a",
        prev_p99_ms=1.5,
        crashes=1,
        rejected={"tiny/2": 1.0},
        event_seq=7,
    )
    store = JournalStore(tmp_path)
    store.save(j)
    assert store.load() == (j, None)
    for bad in (b"[]", b'{"state": "exploded"}', b'{"slot": "c"}', b'{"target": {"x": 1}}'):
        (tmp_path / "update.json").write_bytes(bad)
        loaded, problem = store.load()
        assert loaded == Journal() and problem is not None


def test_probation_verdicts() -> None:
    clock = [0.0]
    policy = ProbationPolicy(
        duration_s=5,
        min_inferences=100,
        max_duration_s=30,
        max_error_rate=0.05,
        max_errors_absolute=20,
    )
    w = ProbationWindow(object(), clock=lambda: clock[0])
    for _ in range(200):
        w.record(0.001)
    assert judge(w, policy, 1.0).outcome == Outcome.PENDING  # too early
    clock[0] = 6
    assert judge(w, policy, 1.0).outcome == Outcome.PASSED
    assert judge(w, policy, 0.1).outcome == Outcome.PASSED  # within the slack
    slow = ProbationWindow(object(), clock=lambda: clock[0])
    for _ in range(200):
        slow.record(0.020)
    clock[0] = 12
    v = judge(slow, policy, 1.0)
    assert v.outcome == Outcome.FAILED and v.code == "probation_latency"
    bad = ProbationWindow(object(), clock=lambda: clock[0])
    for _ in range(20):
        bad.record_error()
    v = judge(bad, policy, None)
    assert v.outcome == Outcome.FAILED and v.code == "probation_errors"
    idle = ProbationWindow(object(), clock=lambda: clock[0])
    clock[0] = 50
    assert judge(idle, policy, None).outcome == Outcome.PASSED  # too little traffic to judge


def test_latency_ring_needs_enough_samples() -> None:
    ring = LatencyRing(capacity=100)
    for _ in range(10):
        ring.add(0.001)
    assert ring.p99_ms() is None
    for i in range(200):
        ring.add(0.001 * (i % 2 + 1))
    assert ring.p99_ms() == pytest.approx(2.0)


def test_fault_delays_parse_only_known_states() -> None:
    got = fault_delays(
        {
            "EDGEFLEET_FAULT_DELAY_STAGED": "0.5",
            "EDGEFLEET_FAULT_DELAY_BOGUS": "1",
            "EDGEFLEET_FAULT_DELAY_SWAPPED": "x",
        }
    )
    assert got == {UpdateState.STAGED: 0.5}
    assert fault_delays({}) == {}


def test_infer_real_quantizes_with_the_serving_models_own_parameters() -> None:
    """A swap between models with different input types never feeds one the other's."""
    import threading

    f32, i8 = LoadedModel(tiny_tflite("float32", 0)), LoadedModel(tiny_tflite("int8", 0))
    x = np.random.default_rng(0).random((8, 8, 1), dtype=np.float32)
    np.testing.assert_array_equal(
        i8.quantize(x),
        np.clip(
            np.round(x[None] / i8.input_spec.scale + i8.input_spec.zero_point), -128, 127
        ).astype(np.int8),
    )
    server = ModelServer()
    server.swap(f32, retire_old=False)
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                y, model = server.infer_real(x)
                assert y.dtype == np.dtype(model.output_spec.dtype)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(100):
            server.swap(i8 if i % 2 == 0 else f32, retire_old=False)
            time.sleep(0.001)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.close()
        f32.close()
        i8.close()
    assert errors == []
