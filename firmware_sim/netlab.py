"""Network namespaces for simulated devices: link cuts, slow links, packet loss.

``NetLab`` puts a Linux bridge on the host (address ``198.18.X.1/24``; the
RFC 2544 benchmarking range, so it never collides with a real LAN) and gives
each device that needs network faults its own namespace, joined to the bridge
by a veth pair. The device process runs under ``ip netns exec`` and reaches
the broker and the cloud at the bridge address. Faults act on that veth:

* link cut: the host end goes down (no carrier), and up again to restore;
* slow link: ``tc tbf`` on both ends (``tc netem`` is not in every kernel);
* packet loss: an nftables table in the namespace drops ``numgen random`` packets.

``close()`` deletes every namespace (which deletes its veth) and the bridge,
whatever happened; a ledger entry covers a simulator that is killed outright.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass

from firmware_sim._system import LEDGER_DIR, Ledger, SimError, run

__all__ = ["CREATED_RUN_IDS", "DeviceLink", "NetLab", "netns_unavailable"]

log = logging.getLogger(__name__)

_LOSS_TABLE = "edgefleet_loss"
#: Run ids of the labs this process opened (tests check none is left behind).
CREATED_RUN_IDS: set[str] = set()
_RATE = re.compile(r"^([0-9]+)(bit|kbit|mbit|gbit)$")
_RATE_BITS = {"bit": 1, "kbit": 1000, "mbit": 1000**2, "gbit": 1000**3}


def netns_unavailable() -> str | None:
    """Why namespace faults cannot run here, or None if they can (tries one for real)."""
    if os.geteuid() != 0:
        return "network faults need root (creating namespaces, veths and qdiscs)"
    for tool in ("ip", "tc", "nft"):
        if shutil.which(tool) is None:
            return f"network faults need `{tool}` (Debian: iproute2, nftables)"
    probe = f"edgefleet-probe-{os.getpid()}"
    try:
        run("ip", "netns", "add", probe)
    except SimError as e:
        return f"`ip netns add` does not work here: {e}"
    run("ip", "netns", "delete", probe, check=False)
    return None


@dataclass(frozen=True)
class DeviceLink:
    """One device's namespace and veth pair."""

    device_id: str
    netns: str
    host_if: str
    ns_if: str
    address: str


class NetLab:
    """A bridge plus per-device namespaces; a context manager that removes them all."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:5]
        CREATED_RUN_IDS.add(self.run_id)
        self.bridge = f"e{self.run_id}b"
        self.ledger = Ledger(f"netlab-{self.run_id}")
        self.subnet: str | None = None
        self.links: dict[str, DeviceLink] = {}

    @property
    def host_ip(self) -> str:
        if self.subnet is None:
            raise SimError("the network lab is not open")
        return f"{self.subnet}.1"

    def open(self) -> NetLab:
        why = netns_unavailable()
        if why:
            raise SimError(why)
        LEDGER_DIR.mkdir(parents=True, exist_ok=True)
        # Parallel simulators pick different subnets: choose and claim under a lock.
        with open(LEDGER_DIR / "netlab.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            used = run("ip", "-o", "-4", "addr", "show").stdout
            for second in (18, 19):
                for third in range(256):
                    if f"198.{second}.{third}." not in used:
                        self.subnet = f"198.{second}.{third}"
                        break
                if self.subnet:
                    break
            if self.subnet is None:
                raise SimError("no free /24 left in 198.18.0.0/15 for the network lab")
            self.ledger.add("links", self.bridge)
            try:
                run("ip", "link", "add", self.bridge, "type", "bridge")
                run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
                run("ip", "link", "set", self.bridge, "up")
            except SimError:
                self.close()
                raise
        log.info("network lab %s on %s.0/24", self.bridge, self.subnet)
        return self

    def add_device(self, device_id: str) -> DeviceLink:
        """Create ``device_id``'s namespace, joined to the bridge."""
        index = len(self.links) + 2
        if index > 254:
            raise SimError("a network lab holds at most 253 devices")
        link = DeviceLink(
            device_id=device_id,
            netns=f"edgefleet-{self.run_id}-{device_id}",
            host_if=f"e{self.run_id}{index:03d}h",
            ns_if=f"e{self.run_id}{index:03d}n",
            address=f"{self.subnet}.{index}",
        )
        self.ledger.add("netns", link.netns)
        run("ip", "netns", "add", link.netns)
        self.links[device_id] = link
        run("ip", "link", "add", link.host_if, "type", "veth", "peer", "name", link.ns_if)
        run("ip", "link", "set", link.ns_if, "netns", link.netns)
        run("ip", "link", "set", link.host_if, "master", self.bridge)
        run("ip", "link", "set", link.host_if, "up")
        run("ip", "-n", link.netns, "addr", "add", f"{link.address}/24", "dev", link.ns_if)
        run("ip", "-n", link.netns, "link", "set", link.ns_if, "up")
        run("ip", "-n", link.netns, "link", "set", "lo", "up")
        return link

    def exec_prefix(self, device_id: str) -> list[str]:
        """Prefix a command with this to run it inside the device's namespace."""
        return ["ip", "netns", "exec", self._link(device_id).netns]

    def _link(self, device_id: str) -> DeviceLink:
        try:
            return self.links[device_id]
        except KeyError:
            raise SimError(
                f"{device_id} has no network namespace (network faults need "
                "process devices started in the lab)"
            ) from None

    # -- faults ------------------------------------------------------------------
    def set_link(self, device_id: str, up: bool) -> None:
        """Cut (``up=False``) or restore a device's link."""
        link = self._link(device_id)
        run("ip", "link", "set", link.host_if, "up" if up else "down")
        if up:  # forget ARP failures from the outage, or connects fail for a while
            run("ip", "-n", link.netns, "neigh", "flush", "dev", link.ns_if, check=False)
            run("ip", "neigh", "flush", "dev", self.bridge, check=False)
        log.info("%s link %s", device_id, "restored" if up else "cut")

    def set_rate(self, device_id: str, rate: str | None) -> None:
        """Limit both directions to ``rate`` (e.g. ``64kbit``); None removes the limit."""
        link = self._link(device_id)
        if rate is None:
            run("tc", "qdisc", "del", "dev", link.host_if, "root", check=False)
            run("tc", "-n", link.netns, "qdisc", "del", "dev", link.ns_if, "root", check=False)
            return
        m = _RATE.match(rate)
        if not m:
            raise SimError(f"bad rate {rate!r}: write e.g. 64kbit")
        bits = int(m.group(1)) * _RATE_BITS[m.group(2)]
        burst = max(4096, bits // 8 // 20)  # 50 ms worth, at least a few packets
        spec = ["root", "tbf", "rate", rate, "burst", str(burst), "latency", "500ms"]
        run("tc", "qdisc", "replace", "dev", link.host_if, *spec)
        run("tc", "-n", link.netns, "qdisc", "replace", "dev", link.ns_if, *spec)
        log.info("%s link limited to %s", device_id, rate)

    def set_loss(self, device_id: str, percent: float | None) -> None:
        """Drop ``percent`` of packets in both directions; None stops dropping."""
        link = self._link(device_id)
        prefix = ["ip", "netns", "exec", link.netns]
        run(*prefix, "nft", "delete", "table", "inet", _LOSS_TABLE, check=False)
        if percent is None:
            return
        n = max(1, min(100, round(percent)))
        rules = (
            f"table inet {_LOSS_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority 0; numgen random mod 100 < {n} "
            "drop; }\n"
            f"  chain out {{ type filter hook output priority 0; numgen random mod 100 < "
            f"{n} drop; }}\n}}\n"
        )
        run(*prefix, "nft", "-f", "-", input=rules)
        log.info("%s drops %d%% of packets", device_id, n)

    # -- teardown ----------------------------------------------------------------
    def close(self) -> None:
        """Delete every namespace and the bridge (idempotent, never raises)."""
        for link in list(self.links.values()):
            with contextlib.suppress(SimError):
                run("ip", "netns", "delete", link.netns, check=False)
                # Gone with the namespace, unless setup failed before the move.
                run("ip", "link", "delete", link.host_if, check=False)
            self.ledger.remove("netns", link.netns)
        self.links.clear()
        run("ip", "link", "delete", self.bridge, check=False)
        self.ledger.remove("links", self.bridge)

    def __enter__(self) -> NetLab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
