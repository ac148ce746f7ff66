"""One worker process of a ``firmware_sim.massfleet.MassFleet``: many agents as threads.

``python -m firmware_sim._massworker SPEC.json`` starts an ``Agent`` per device
named in the spec (data dirs provisioned by the parent), at most
``start_rate`` per second, each fed by a ``RandomSource``. A ``ByteMeter``
counts every byte each device sends or receives on its broker and HTTP
connections. Commands arrive as JSON lines on stdin and each gets one JSON
line back on the process's original stdout (everything else, LiteRT's banners
included, goes to stderr):

* ``{"cmd": "bytes"}`` -> ``{"bytes": {device: {"mqtt_rx": n, ...}}}``
* ``{"cmd": "status"}`` -> ``{"status": {device: {...}}}``, which includes a
  test inference on the serving model;
* ``{"cmd": "info"}`` -> ``{"base_rss_mb": ..., "agents": n}`` (RSS before any agent);
* ``{"cmd": "stop"}`` (or end of input): stop every agent and exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim._bytemeter import ByteMeter, raise_fd_limit

log = logging.getLogger("firmware_sim.massworker")


def _status(agent: Any) -> dict[str, Any]:
    from device.runtime import NoModelError

    model = agent.server.current
    m = agent.running_manifest
    serving, error = False, None
    if model is not None:
        try:
            x = np.full(tuple(model.input_spec.shape[1:]), 0.5, dtype=np.float32)
            agent.server.infer_real(x)
            serving = True
        except (NoModelError, ValueError, RuntimeError) as e:
            error = f"{type(e).__name__}: {e}"[:200]
    return {
        "release": m.release if m else None,
        "state": str(agent.state),
        "serving": serving,
        "error": error,
        "inferences": agent.server.inferences,
    }


def _stop(agent: Any) -> None:
    try:
        agent.stop()
    except Exception:
        log.exception("stopping %s failed", agent.cfg.device_id)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    # The protocol owns the original stdout; C libraries' prints go to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(
        level=getattr(logging, spec.get("log_level", "WARNING")),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raise_fd_limit()
    cores = spec.get("device_cores")
    if cores:
        # Each simulated device is a board with this many cores: what the agent
        # sizes by it (the interpreter pool per model) must be sized the same
        # way here. Set before any device module is imported.
        os.cpu_count = lambda: int(cores)
    if spec.get("switch_interval"):
        # Hundreds of threads per process: the default 5 ms GIL hand-off makes them
        # thrash when every agent works at once (see MassOptions.switch_interval).
        sys.setswitchinterval(float(spec["switch_interval"]))
    ids: list[str] = spec["devices"]
    meter = ByteMeter({int(p): c for p, c in spec["ports"].items()}, owners=set(ids)).install()

    from device.agent import Agent
    from device.config import load_config
    from device.inputs import RandomSource
    from device.runtime import interpreter_backend
    from device.telemetry import rss_bytes

    interpreter_backend()  # loads LiteRT: a cost per process, not per device
    base_rss_mb = rss_bytes() / 2**20

    agents: dict[str, Agent] = {}
    stop = threading.Event()

    def start_all() -> None:
        gap = 1.0 / max(float(spec.get("start_rate", 50.0)), 1e-3)
        for i, device_id in enumerate(ids):
            if stop.is_set():
                return
            t0 = time.monotonic()
            try:
                agent = Agent(
                    load_config(Path(spec["data_root"]) / device_id),
                    RandomSource(seed=int(spec.get("seed_base", 0)) + i),
                )
                run = agent.updater.run

                def tagged(run: Any = run, device_id: str = device_id) -> None:
                    meter.tag(device_id)  # its HTTP connections are the device's
                    run()

                agent.updater.run = tagged  # type: ignore[method-assign]
                agent.start()
            except Exception:
                log.exception("agent %s did not start", device_id)
                continue
            agents[device_id] = agent
            stop.wait(max(0.0, gap - (time.monotonic() - t0)))

    starter = threading.Thread(target=start_all, name="starter", daemon=True)
    starter.start()
    try:
        for line in sys.stdin:
            cmd = json.loads(line).get("cmd")
            if cmd == "bytes":
                reply: dict[str, Any] = {"bytes": meter.snapshot()}
            elif cmd == "status":
                reply = {"status": {d: _status(a) for d, a in list(agents.items())}}
                reply["status"].update(
                    {
                        d: {"release": None, "state": "not started", "serving": False}
                        for d in ids
                        if d not in agents
                    }
                )
            elif cmd == "info":
                reply = {"base_rss_mb": base_rss_mb, "agents": len(agents)}
            elif cmd == "stop":
                break
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            proto.write(json.dumps(reply) + "\n")
    finally:
        stop.set()
        starter.join(timeout=30)
        # Stopping joins each agent's threads: do many at once.
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(_stop, list(agents.values())))
        meter.uninstall()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
