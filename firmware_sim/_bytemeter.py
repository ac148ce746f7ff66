"""Counting the bytes a process's TCP connections carry, per owner (``ByteMeter``).

Kept apart from ``firmware_sim.massfleet`` so a worker can install it before
importing any device module (``firmware_sim._massworker``).
"""

from __future__ import annotations

import contextlib
import resource
import threading
import weakref
from collections import defaultdict
from typing import Any

__all__ = ["ByteMeter", "raise_fd_limit"]


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class ByteMeter:
    """Counts bytes through ``socket.socket`` per (owner, channel, direction).

    ``ports`` maps a peer TCP port to a channel name (``{1883: "mqtt", 8080:
    "http"}``); connections to other ports and non-TCP sockets (paho's wake-up
    socket pair) are not counted. A connection's owner is decided at its first
    send or receive from the thread doing it: a thread tagged with ``tag``
    (the agent's updater), a paho network thread (named after its client id),
    or ``default_owner``. Install once per process; ``uninstall`` restores.
    """

    _METHODS = ("send", "sendall", "recv", "recv_into")

    def __init__(
        self,
        ports: dict[int, str],
        owners: set[str] | None = None,
        default_owner: str = "?",
    ) -> None:
        self.ports = dict(ports)
        self.owners = owners
        self.default_owner = default_owner
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conn: weakref.WeakKeyDictionary[Any, tuple[str, str] | None] = (
            weakref.WeakKeyDictionary()
        )
        self.counts: dict[tuple[str, str, str], int] = defaultdict(int)
        self._saved: dict[str, Any] = {}
        self._id_len = len(next(iter(owners))) if owners else 0

    def tag(self, owner: str) -> None:
        """Connections first used by the calling thread belong to ``owner``."""
        self._local.owner = owner

    def _owner(self) -> str:
        owner = getattr(self._local, "owner", None)
        if owner is not None:
            return str(owner)
        name = threading.current_thread().name
        prefix = "paho-mqtt-client-"
        if name.startswith(prefix) and self.owners is not None:
            client = name[len(prefix) :]
            # Another connection of the same device (say "dev-0001-blobs") counts for it.
            for cand in (client, client[: self._id_len]):
                if cand in self.owners:
                    return cand
        return self.default_owner

    def _classify(self, sock: Any) -> tuple[str, str] | None:
        try:
            return self._conn[sock]
        except KeyError:
            pass
        except TypeError:
            return None
        found: tuple[str, str] | None = None
        with contextlib.suppress(OSError, ValueError, TypeError, IndexError):
            peer = sock.getpeername()
            if isinstance(peer, tuple) and peer[1] in self.ports:
                found = (self._owner(), self.ports[peer[1]])
        if found is None and not _connected(sock):
            return None  # not connected yet: decide at the next call
        with contextlib.suppress(TypeError):
            self._conn[sock] = found
        return found

    def _add(self, sock: Any, direction: str, n: int) -> None:
        if n <= 0:
            return
        key = self._classify(sock)
        if key is None:
            return
        with self._lock:
            self.counts[(key[0], key[1], direction)] += n

    def install(self) -> ByteMeter:
        import socket

        cls = socket.socket
        meter = self
        for name in self._METHODS:
            self._saved[name] = cls.__dict__.get(name, getattr(cls, name))
        send, sendall = self._saved["send"], self._saved["sendall"]
        recv, recv_into = self._saved["recv"], self._saved["recv_into"]

        def m_send(sock: Any, data: Any, *a: Any) -> int:
            n = send(sock, data, *a)
            meter._add(sock, "tx", n)
            return int(n)

        def m_sendall(sock: Any, data: Any, *a: Any) -> None:
            sendall(sock, data, *a)
            meter._add(sock, "tx", memoryview(data).nbytes)

        def m_recv(sock: Any, *a: Any) -> bytes:
            data = recv(sock, *a)
            meter._add(sock, "rx", len(data))
            return bytes(data)

        def m_recv_into(sock: Any, buf: Any, *a: Any) -> int:
            n = recv_into(sock, buf, *a)
            meter._add(sock, "rx", n)
            return int(n)

        cls.send = m_send  # type: ignore[method-assign]
        cls.sendall = m_sendall  # type: ignore[method-assign]
        cls.recv = m_recv  # type: ignore[method-assign]
        cls.recv_into = m_recv_into  # type: ignore[method-assign,assignment]
        return self

    def uninstall(self) -> None:
        import socket

        for name, fn in self._saved.items():
            setattr(socket.socket, name, fn)
        self._saved.clear()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{owner: {"mqtt_rx": n, "mqtt_tx": n, "http_rx": n, ...}}``."""
        with self._lock:
            items = list(self.counts.items())
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for (owner, channel, direction), n in items:
            out[owner][f"{channel}_{direction}"] = n
        return dict(out)


def _connected(sock: Any) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True
