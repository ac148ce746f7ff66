"""The pure rules of rollouts: wave sizes, canary order, device verdicts, specs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud.rollouts.spec import (
    DeviceFacts,
    DeviceStatus,
    RolloutSpec,
    Target,
    judge_device,
    pick_percentage,
    wave_order,
    wave_sizes,
)
from shared.errors import IncompatibleReleaseError
from shared.manifest import runtime_allowed


@pytest.mark.parametrize(
    ("n", "waves", "sizes"),
    [
        (1000, [1, 10, 50, 100], [10, 100, 500, 1000]),
        (100, [1, 10, 50, 100], [1, 10, 50, 100]),
        (10, [1, 10, 50, 100], [1, 2, 5, 10]),  # every wave adds at least one device
        (3, [1, 10, 50, 100], [1, 2, 3]),  # waves that would add nobody are dropped
        (1, [1, 10, 50, 100], [1]),
        (7, [100], [7]),
        (200, [0.5, 100], [1, 200]),
    ],
)
def test_wave_sizes(n: int, waves: list[float], sizes: list[int]) -> None:
    assert wave_sizes(n, waves) == sizes


def test_wave_order_puts_online_devices_first_and_depends_on_the_rollout() -> None:
    devices = [(f"d{i}", i % 3 != 0) for i in range(30)]
    a = wave_order("ro-1", devices)
    online = {d for d, up in devices if up}
    assert set(a[: len(online)]) == online
    assert sorted(a) == sorted(d for d, _ in devices)
    assert a == wave_order("ro-1", list(reversed(devices)))  # stable, input order irrelevant
    assert a != wave_order("ro-2", devices)  # another rollout, other canaries


def test_pick_percentage_is_stable_and_at_least_one() -> None:
    ids = [f"d{i:03d}" for i in range(200)]
    ten = pick_percentage("ro-x", ids, 10)
    assert len(ten) == 20 and set(ten) <= set(ids)
    assert ten == pick_percentage("ro-x", list(reversed(ids)), 10)
    assert len(pick_percentage("ro-x", ids[:3], 1)) == 1
    assert pick_percentage("ro-x", ids, 100) == ids


def facts(**kw: object) -> DeviceFacts:
    base: dict[str, object] = dict(
        model="m", release=1, state="idle", target_release=None, error_code=None, error=None
    )
    base.update(kw)
    return DeviceFacts(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "f", "expect"),
    [
        (DeviceStatus.OFFERED, facts(release=2, state="committed"), DeviceStatus.UPDATED),
        (DeviceStatus.OFFERED, facts(release=2, state="idle"), DeviceStatus.UPDATED),
        # On probation it is not updated yet.
        (DeviceStatus.OFFERED, facts(release=2, state="probation"), DeviceStatus.OFFERED),
        (DeviceStatus.OFFERED, facts(state="downloading", target_release=2), DeviceStatus.OFFERED),
        (
            DeviceStatus.OFFERED,
            facts(state="rolled_back", target_release=2, error_code="probation_failed"),
            DeviceStatus.FAILED,
        ),
        (
            DeviceStatus.OFFERED,
            facts(state="failed", target_release=2, error_code="selftest_failed"),
            DeviceStatus.FAILED,
        ),
        # A download that broke off is retried by the agent: not a verdict.
        (
            DeviceStatus.OFFERED,
            facts(state="failed", target_release=2, error_code="transfer_failed"),
            DeviceStatus.RETRYING,
        ),
        (DeviceStatus.RETRYING, facts(release=2, state="idle"), DeviceStatus.UPDATED),
        # A failure of some other release is not this rollout's business.
        (
            DeviceStatus.OFFERED,
            facts(state="failed", target_release=5, error_code="selftest_failed"),
            DeviceStatus.OFFERED,
        ),
        (DeviceStatus.UPDATED, facts(release=1), DeviceStatus.UPDATED),  # final
        (DeviceStatus.OFFERED, None, DeviceStatus.OFFERED),
    ],
)
def test_judge_device(status: DeviceStatus, f: DeviceFacts | None, expect: DeviceStatus) -> None:
    new, why = judge_device(status, f, model="m", release=2)
    assert new == expect
    if new == DeviceStatus.FAILED:
        assert why is not None and f is not None and f.error_code in why


def test_judge_reverting_device() -> None:
    assert judge_device(
        DeviceStatus.REVERTING, facts(release=7, state="idle"), model="m", release=2, revert_to=7
    ) == (DeviceStatus.REVERTED, None)
    assert (
        judge_device(
            DeviceStatus.REVERTING,
            facts(release=2, state="idle"),
            model="m",
            release=2,
            revert_to=7,
        )[0]
        == DeviceStatus.REVERTING
    )


def test_spec_validation() -> None:
    ok = RolloutSpec(model="digits", release=3, target=Target(group="lab"))
    assert ok.waves == [1.0, 10.0, 50.0, 100.0]
    with pytest.raises(ValidationError, match="grow strictly"):
        RolloutSpec(model="digits", release=3, target=Target(all=True), waves=[10, 10, 100])
    with pytest.raises(ValidationError, match="last wave must be 100"):
        RolloutSpec(model="digits", release=3, target=Target(all=True), waves=[10, 50])
    with pytest.raises(ValidationError, match="name the devices"):
        Target()
    with pytest.raises(ValidationError, match="cannot be combined"):
        Target(all=True, group="lab")
    with pytest.raises(ValidationError):
        Target(devices=["bad id with spaces"])
    with pytest.raises(ValidationError):
        RolloutSpec(model="digits", release=0, target=Target(all=True))
    with pytest.raises(ValidationError):
        RolloutSpec(
            model="digits", release=1, target=Target(all=True), success_threshold=float("nan")
        )


@pytest.mark.parametrize(
    ("allowed", "runtime", "ok"),
    [
        (["ai-edge-litert"], "ai-edge-litert 2.3.0", True),
        (["ai-edge-litert>=2.4"], "ai-edge-litert 2.3.0", False),
        (["ai-edge-litert>=2.3"], "ai-edge-litert 2.3.0", True),
        (["tflite-runtime"], "ai-edge-litert 2.3.0", False),
        (["tflite-runtime", "ai-edge-litert>=1"], "ai-edge-litert 2.3.0", True),
        (["tflite-runtime>=2.14"], "tflite-runtime 2.14.0", True),
        (["tflite-runtime>=2.15"], "tflite-runtime garbage", False),
    ],
)
def test_runtime_allowed(allowed: list[str], runtime: str, ok: bool) -> None:
    assert runtime_allowed(allowed, runtime) is ok


def test_check_compatible_names_the_runtime() -> None:
    from shared.manifest import ReleaseManifest, check_compatible

    m = ReleaseManifest.model_validate(
        {
            "model": "digits",
            "release": 2,
            "created_at": 0,
            "quantization": "int8",
            "input": {"name": "x", "shape": [1, 4], "dtype": "int8", "scale": 1, "zero_point": 0},
            "output": {"name": "y", "shape": [1, 2], "dtype": "int8", "scale": 1, "zero_point": 0},
            "runtime": {"runtimes": ["tflite-runtime>=2.14"]},
            "selftest": {"target": "digits/2/selftest.npz", "count": 1, "atol": 0},
        }
    )
    with pytest.raises(IncompatibleReleaseError, match="tflite-runtime"):
        check_compatible(
            m,
            agent_version="9.9.9",
            runtime_ops=None,
            hardware_tags=frozenset(),
            runtime="ai-edge-litert 2.3.0",
        )
    check_compatible(
        m,
        agent_version="9.9.9",
        runtime_ops=None,
        hardware_tags=frozenset(),
        runtime="tflite-runtime 2.14.0",
    )
