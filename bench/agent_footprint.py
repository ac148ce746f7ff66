"""Agent footprint: resident memory and idle CPU of a real agent process with a ~2 MB model.

Sets up a device data dir whose active slot holds MobileNetV2 (alpha 0.35,
96x96, int8, ~1.9 MB; built once with TensorFlow by ``bench/hotswap.py`` and
cached), starts a private Mosquitto, and runs ``python -m device.cli run`` as
its own process, exactly as the systemd unit does. After a settling period it
samples the process from ``/proc``:

* RSS (``VmRSS``) and peak RSS (``VmHWM``) against the 80 MB target;
* CPU of an *idle* agent (``--interval``: one inference per thread every
  second, as a device waiting for sensor data would), as a share of one core,
  against a 2 % budget;
* the same while serving back to back, for scale.

    python bench/agent_footprint.py [--seconds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from hotswap import model_bytes  # noqa: E402

RSS_TARGET_MB = 80.0
IDLE_CPU_BUDGET = 2.0  # percent of one core


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stage(data_dir: Path, model: bytes) -> None:
    from device.runtime import LoadedModel
    from device.store import SlotStore, StoreState
    from shared.manifest import (
        SELFTEST_FILE,
        ReleaseManifest,
        SelfTestSpec,
        target_path,
    )
    from shared.selftest import pack_vectors

    with LoadedModel(model, pool_size=1) as m:
        rng = np.random.default_rng(0)
        xs = rng.integers(-128, 128, size=(4, *m.input_spec.shape[1:]), dtype=np.int8)
        vectors = pack_vectors(xs, m.run_batch(xs))
        manifest = ReleaseManifest(
            model="mobilenet",
            release=1,
            created_at=time.time(),
            quantization="int8",
            input=m.input_spec,
            output=m.output_spec,
            selftest=SelfTestSpec(
                target=target_path("mobilenet", 1, SELFTEST_FILE),
                count=4,
                atol=2 * (m.output_spec.scale or 1e-3),
            ),
        )
    store = SlotStore(data_dir)
    store.stage("a", manifest, model, vectors, None)
    store.set_state(StoreState(active="a"))


def measure(data_dir: Path, settle: float, seconds: float) -> dict[str, float]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    log = open(data_dir / "agent.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device.cli",
            "--log-level",
            "WARNING",
            "run",
            "--data-dir",
            str(data_dir),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        time.sleep(settle)
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited: {(data_dir / 'agent.log').read_text()[-2000:]}")
        c0, t0 = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu = 100.0 * (_cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        st = _status(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    return {
        "rss_mb": st["VmRSS"] / 1024,
        "peak_mb": st["VmHWM"] / 1024,
        "cpu": cpu,
        "threads": st["Threads"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="sampling time per mode")
    p.add_argument("--settle", type=float, default=5.0, help="seconds after start before sampling")
    p.add_argument("--threads", type=int, default=2, help="inference threads")
    p.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "edgefleet-bench-models"
    )
    args = p.parse_args(argv)

    from cloud.broker import MosquittoProcess
    from device.config import provision
    from device.runtime import interpreter_backend

    model = model_bytes("mobilenet", 0, args.cache_dir)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-footprint-") as tmp:
        tmp_path = Path(tmp)
        root = tmp_path / "root.json"
        root.write_text(json.dumps({"signed": {}, "signatures": []}))  # no update is fetched
        with MosquittoProcess(tmp_path / "broker") as broker:
            for mode, interval in (("idle", 1.0), ("busy", 0.0)):
                data = tmp_path / mode
                provision(
                    data,
                    device_id=f"bench-{mode}",
                    root_file=root,
                    broker_host="127.0.0.1",
                    broker_port=broker.port,
                    repo_url="http://127.0.0.1:9/tuf/",
                    inference_threads=args.threads,
                    inference_interval=interval,
                    telemetry_interval=5.0,
                )
                _stage(data, model)
                results[mode] = measure(data, args.settle, args.seconds)

    idle, busy = results["idle"], results["busy"]
    ok_rss = idle["peak_mb"] <= RSS_TARGET_MB and busy["peak_mb"] <= RSS_TARGET_MB
    ok_cpu = idle["cpu"] <= IDLE_CPU_BUDGET
    print(
        f"model mobilenet_v2 0.35 96x96 int8: {len(model) / 1e6:.2f} MB; "
        f"{interpreter_backend()[1]}; {args.threads} inference threads; "
        f"{os.cpu_count()} cores"
    )
    for mode, r in results.items():
        print(
            f"  {mode:4}: RSS {r['rss_mb']:.1f} MB (peak {r['peak_mb']:.1f} MB), "
            f"CPU {r['cpu']:.1f}% of a core, {int(r['threads'])} threads"
        )
    print(
        f"RSS (peak, busy) / target {RSS_TARGET_MB:.0f} MB: "
        f"{busy['peak_mb'] / RSS_TARGET_MB:.2f}  {'PASS' if ok_rss else 'FAIL'}"
    )
    print(
        f"idle CPU / budget {IDLE_CPU_BUDGET:.0f}% of a core: "
        f"{idle['cpu'] / IDLE_CPU_BUDGET:.2f}  {'PASS' if ok_cpu else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
