"""Fork server that starts device agents as real processes in milliseconds.

Importing the agent (numpy, pydantic schemas, paho, tuf, LiteRT) takes 1-2 s
of CPU; the power-loss test restarts an agent hundreds of times. This
process imports everything once, then forks one child per ``start``: the
child is a real, separate agent process (its own threads, sockets, files)
that the test kills with SIGKILL like a power cut, exactly as it would a
``python -m device.cli run``. No thread runs in this process before a fork.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.

* ``{"op": "start", "data_dir": D, "log": F, "env": {...}, "seed": n}`` -> ``{"pid": p}``
* ``{"op": "kill", "pid": p}`` -> SIGKILL and reap -> ``{"killed": p}``
* ``{"op": "stop", "pid": p}`` -> SIGTERM, reap (SIGKILL after 10 s) -> ``{"code": c}``

End of stdin kills every child left and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from device.agent import Agent
from device.cli import run_agent
from device.config import load_config
from device.inputs import RandomSource
from device.runtime import interpreter_backend, supported_builtin_ops

interpreter_backend()
supported_builtin_ops()


def _child(cmd: dict[str, object]) -> int:
    fd = os.open(str(cmd["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.environ.update({str(k): str(v) for k, v in dict(cmd.get("env") or {}).items()})
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format=f"%(asctime)s [{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
    cfg = load_config(Path(str(cmd["data_dir"])))
    return run_agent(Agent(cfg, RandomSource(seed=int(str(cmd.get("seed", 0))))))


def _reap(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)


def main() -> None:
    children: set[int] = set()
    out = sys.stdout
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "start":
                out.flush()
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        code = _child(cmd)
                    except BaseException:
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                children.add(pid)
                answer: dict[str, object] = {"pid": pid}
            elif op == "kill":
                pid = int(cmd["pid"])
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                children.discard(pid)
                answer = {"killed": pid}
            elif op == "stop":
                pid = int(cmd["pid"])
                os.kill(pid, signal.SIGTERM)
                answer = {"code": _reap(pid, 10.0)}
                children.discard(pid)
            else:
                answer = {"error": f"unknown op {op!r}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    main()
