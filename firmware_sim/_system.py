"""Host resources the simulator creates (namespaces, links, mounts), and their ledger.

Everything the simulator changes on the host goes through ``run`` (so a failing
command raises ``SimError`` with its stderr) and is written down in a ledger
file under ``LEDGER_DIR`` before it is created (child processes right after).
The owner removes it on exit; ``cleanup_stale`` removes what a killed owner
(``kill -9`` of the simulator) left behind, so nothing outlives a crash for
longer than the next ``edgefleet-sim cleanup``.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Self

from shared.errors import EdgefleetError

__all__ = [
    "LEDGER_DIR",
    "Ledger",
    "SimError",
    "StartStop",
    "cleanup_stale",
    "run",
    "unmount_under",
]

log = logging.getLogger(__name__)

LEDGER_DIR = Path(os.environ.get("EDGEFLEET_SIM_LEDGER", "/run/edgefleet-sim"))


class SimError(EdgefleetError):
    """The simulator could not set up or undo something on the host."""

    code = "sim_failed"


def run(
    *cmd: str, input: str | None = None, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run a host command; ``SimError`` naming the command if it fails."""
    try:
        out = subprocess.run(  # noqa: S603 - fixed commands
            list(cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SimError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if check and out.returncode != 0:
        raise SimError(
            f"`{' '.join(cmd)}` failed ({out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[-500:]}"
        )
    return out


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def unmount_under(root: Path) -> None:
    """Lazily unmount every mount point at or below ``root`` (deepest first)."""
    root = Path(os.path.realpath(root))
    points: list[str] = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(str(root) + "/"):
                points.append(point)
    for point in sorted(points, key=len, reverse=True):
        run("umount", "-l", point, check=False)


class StartStop(abc.ABC):
    """``with thing:`` starts it and always closes it, also when starting fails half-way
    (``close`` must undo a partial ``start``)."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ledger:
    """A JSON file listing what one simulator process created on the host."""

    def __init__(self, run_id: str) -> None:
        self.path = LEDGER_DIR / f"{run_id}.json"
        self.entries: dict[str, list[str]] = {
            "netns": [],
            "links": [],
            "mounts": [],
            "workdirs": [],
        }

    def add(self, kind: str, name: str) -> None:
        self.entries.setdefault(kind, []).append(name)
        self._save()

    def remove(self, kind: str, name: str) -> None:
        with contextlib.suppress(ValueError):
            self.entries.get(kind, []).remove(name)
        self._save()

    def _save(self) -> None:
        try:
            LEDGER_DIR.mkdir(parents=True, exist_ok=True)
            if not any(self.entries.values()):
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), **self.entries}))
            os.replace(tmp, self.path)
        except OSError as e:  # the ledger is a safety net, not a requirement
            log.warning("cannot write the resource ledger %s: %s", self.path, e)


def _kill_marked(workdir: str) -> list[str]:
    """SIGKILL every process whose command line names a path inside ``workdir``."""
    marker = workdir.rstrip("/").encode() + b"/"
    done = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)
                done.append(f"killed orphaned process {entry.name}")
    return done


def release_entries(entries: dict[str, Any]) -> list[str]:
    """Undo ledger entries: unmount, delete namespaces, delete links. Returns what was done."""
    done: list[str] = []
    for marker in entries.get("workdirs", []):
        done += _kill_marked(str(marker))
    for point in entries.get("mounts", []):
        unmount_under(Path(point))
        done.append(f"unmounted {point}")
    for ns in entries.get("netns", []):
        if run("ip", "netns", "delete", ns, check=False).returncode == 0:
            done.append(f"deleted netns {ns}")
    for link in entries.get("links", []):
        if run("ip", "link", "delete", link, check=False).returncode == 0:
            done.append(f"deleted link {link}")
    return done


def cleanup_stale() -> list[str]:
    """Remove resources of simulator processes that died without cleaning up."""
    done: list[str] = []
    if not LEDGER_DIR.is_dir():
        return done
    for path in sorted(LEDGER_DIR.glob("*.json")):
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(int(entries.get("pid", 0))):
            continue
        done += release_entries(entries)
        path.unlink(missing_ok=True)
    return done
