"""A private Mosquitto broker: its configuration, its ACL and its process.

The cloud owns the broker's configuration, so the same code renders the config
for a production broker (``edgefleet-cloud broker config``), for ``make demo``
and for every test, which starts its own broker on a free loopback port
instead of sharing the machine's.

Two modes:

* plain (the default): one anonymous listener, for local experiments and the
  tests that do not exercise security;
* secure (``security=BrokerSecurity(...)``): one mutual-TLS listener. A client
  without a certificate from the cloud CA, or with a revoked one (``crlfile``),
  fails the handshake. The certificate CN becomes the MQTT username *and* the
  client id (so no client can kick another off by reusing its client id), and
  the ACL confines every device to ``edgefleet/v1/devices/<its CN>/...``
  (plus read-only access to the release blobs under ``edgefleet/v1/blobs/``).
  The cloud's own identities get their role's topics by name (``user`` entries:
  Mosquitto has no wildcard user names, so each issued identity is listed).

Revocation, as measured on Mosquitto 2.0.11: SIGHUP re-reads the CRL (new
handshakes of a revoked certificate fail) and the ACL file, but keeps existing
connections. So a revoked device is also listed in the ACL with ``topic deny #``,
which (measured) overrides the device patterns: after the reload its open
session can neither publish nor receive anything. ``disconnect=True`` also
restarts the broker to drop the socket itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from shared.errors import ConfigError
from shared.messages import MAX_MESSAGE_BYTES
from shared.topics import (
    BLOBS,
    REPO_REQUEST,
    REPO_RESPONSE,
    ROOT,
    acl_blob_topics,
    acl_device_topics,
    acl_ingest_topics,
)

if TYPE_CHECKING:
    from cloud.pki import CertificateAuthority, IssuedCert

__all__ = [
    "CLOUD_ROLE",
    "DEFAULT_SERVICES",
    "FANOUT_ROLE",
    "INGEST_PREFIX",
    "INGEST_ROLE",
    "REPO_ROLE",
    "BrokerConfig",
    "BrokerSecurity",
    "BrokerTls",
    "MosquittoProcess",
    "free_port",
    "render_acl",
    "render_mosquitto_conf",
    "service_role",
]

log = logging.getLogger(__name__)

#: Mosquitto's default ``max_queued_messages`` (1000) silently drops part of a
#: fast QoS 1 stream to a slow subscriber (measured: ~1/5 lost); a fleet's
#: telemetry burst must queue instead.
DEFAULT_MAX_QUEUED = 200_000
#: Above the largest edgefleet message plus MQTT overhead, so oversize payloads
#: reach the application and get refused there with a reason, and TUF chunks fit.
DEFAULT_MAX_PACKET = 4 * MAX_MESSAGE_BYTES + 64 * 1024

#: Service roles in the ACL: the cloud (desired state out, every device stream in),
#: the repository server (repository requests in, responses out, nothing else), the
#: blob fan-out (``cloud.fanout``: release blobs out, nothing else) and the telemetry
#: ingest workers (``cloud.ingest``: telemetry, status and reported in, nothing out).
CLOUD_ROLE = "cloud"
REPO_ROLE = "repo"
FANOUT_ROLE = "fanout"
INGEST_ROLE = "ingest"
#: Service names starting with this get the ingest role: ``edgefleet-ingest-<index>``,
#: one identity per worker (its client id; ``edgefleet-cloud ca ingest``).
INGEST_PREFIX = "edgefleet-ingest"
DEFAULT_SERVICES: Mapping[str, str] = {
    "edgefleet-cloud": CLOUD_ROLE,
    "edgefleet-repo": REPO_ROLE,
    "edgefleet-fanout": FANOUT_ROLE,
}
_ROLE_RULES: Mapping[str, tuple[tuple[str, str], ...]] = {
    CLOUD_ROLE: (("readwrite", f"{ROOT}/#"),),
    REPO_ROLE: (
        ("read", f"{ROOT}/devices/+/{REPO_REQUEST}"),
        ("write", f"{ROOT}/devices/+/{REPO_RESPONSE}"),
    ),
    FANOUT_ROLE: (("readwrite", f"{ROOT}/{BLOBS}/#"),),
    INGEST_ROLE: tuple(acl_ingest_topics()),
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """The broker's side of mutual TLS: files issued by ``cloud.pki``."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path | None = None


@dataclass(frozen=True)
class BrokerSecurity:
    """A mutual-TLS listener plus the ACL: who may use which topics.

    ``services`` maps the cloud's own usernames (certificate CNs) to a role
    (``CLOUD_ROLE``, ``REPO_ROLE``, ``FANOUT_ROLE`` or ``INGEST_ROLE``); every
    other authenticated client is a device, confined by patterns to its own
    topics. ``denied`` lists revoked
    identities, muted even on a connection opened before the revocation.
    """

    tls: BrokerTls
    services: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SERVICES))
    denied: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, role in self.services.items():
            if role not in _ROLE_RULES:
                raise ConfigError(
                    f"service {name!r} has unknown role {role!r}; use {sorted(_ROLE_RULES)}"
                )
            _check_acl_name(name)
        for name in self.denied:
            _check_acl_name(name)

    @classmethod
    def from_ca(
        cls, ca: CertificateAuthority, services: Mapping[str, str] | None = None
    ) -> BrokerSecurity:
        """Security for a broker whose server certificate and CRL ``ca`` issued.

        ``services`` defaults to every live service identity the CA issued
        (``ca init --service NAME``, ``ca ingest``), each with the role
        ``service_role`` gives its name. Each cloud connection needs its own
        identity, as the client id is the certificate CN. Devices with a revoked
        certificate and no live one are denied."""
        if not ca.server_cert_path.is_file():
            raise ConfigError(f"no broker certificate in {ca.dir}: run `edgefleet-cloud ca init`")
        ca.refresh_crl()  # an expired CRL would lock every client out
        issued = ca.issued()
        live = {c.common_name for c in issued if c.live}
        denied = sorted(
            {
                c.common_name
                for c in issued
                if not c.live and c.kind == "device" and c.common_name not in live
            }
        )
        return cls(
            tls=BrokerTls(
                ca_file=ca.ca_cert_path,
                cert_file=ca.server_cert_path,
                key_file=ca.server_key_path,
                crl_file=ca.crl_path,
            ),
            services=dict(_issued_services(issued) if services is None else services),
            denied=tuple(denied),
        )


def _issued_services(issued: Sequence[IssuedCert]) -> dict[str, str]:
    services = dict(DEFAULT_SERVICES)
    for c in issued:
        if c.kind == "service" and c.live:
            services[c.common_name] = service_role(c.common_name)
    return services


def service_role(service: str) -> str:
    """The ACL role of a service identity, by name: ``edgefleet-repo*`` the repository
    role, ``edgefleet-fanout*`` the blob fan-out role, ``edgefleet-ingest*`` the ingest
    role, any other the cloud role."""
    if service.startswith("edgefleet-repo"):
        return REPO_ROLE
    if service.startswith("edgefleet-fanout"):
        return FANOUT_ROLE
    if service.startswith(INGEST_PREFIX):
        return INGEST_ROLE
    return CLOUD_ROLE


def _check_acl_name(name: str) -> None:
    # A username goes into the ACL file verbatim: no room for a second directive.
    if not name or any(c.isspace() or c in "#+/" for c in name):
        raise ConfigError(f"{name!r} cannot be an MQTT username in the ACL")


def render_acl(security: BrokerSecurity) -> str:
    """The Mosquitto ACL file for ``security`` (``%u`` is the certificate CN)."""
    lines = [
        "# Generated by edgefleet; edits are overwritten.",
        "# Devices: only their own topics (a device never writes its desired state).",
    ]
    for access, suffix in acl_device_topics():
        lines.append(f"pattern {access} {ROOT}/devices/%u/{suffix}")
    lines.append("# Everyone: read the release blobs the cloud fans out (TUF checks them).")
    for access, topic in acl_blob_topics():
        lines.append(f"pattern {access} {topic}")
    for name, role in sorted(security.services.items()):
        lines += ["", f"user {name}"]
        lines += [f"topic {access} {topic}" for access, topic in _ROLE_RULES[role]]
    for name in security.denied:
        lines += ["", "# revoked", f"user {name}", "topic deny #"]
    return "\n".join(lines) + "\n"


@dataclass
class BrokerConfig:
    """What a private broker listens on and how it is limited."""

    port: int
    host: str = "127.0.0.1"
    data_dir: Path | None = None  # persistence (retained messages survive restarts)
    max_queued_messages: int = DEFAULT_MAX_QUEUED
    max_packet_size: int = DEFAULT_MAX_PACKET
    allow_anonymous: bool = True
    extra_lines: list[str] = field(default_factory=list)
    #: Mutual TLS + ACL; ``None`` is the plain anonymous listener.
    security: BrokerSecurity | None = None
    #: Where the ACL file is (written next to the config by ``MosquittoProcess``).
    acl_file: Path | None = None
    #: Mosquitto started as root switches to this user (default ``mosquitto``).
    run_as_user: str | None = None


def render_mosquitto_conf(cfg: BrokerConfig) -> str:
    """The ``mosquitto.conf`` text for ``cfg`` (Mosquitto 2.x syntax)."""
    sec = cfg.security
    lines = [
        "# Generated by edgefleet; edits are overwritten.",
        "per_listener_settings false",
        f"listener {cfg.port} {cfg.host}",
        "protocol mqtt",
    ]
    if sec is not None:
        if cfg.acl_file is None:
            raise ConfigError("a secure broker needs an ACL file path (BrokerConfig.acl_file)")
        lines += [
            f"cafile {sec.tls.ca_file}",
            f"certfile {sec.tls.cert_file}",
            f"keyfile {sec.tls.key_file}",
            *([f"crlfile {sec.tls.crl_file}"] if sec.tls.crl_file is not None else []),
            "tls_version tlsv1.2",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "allow_anonymous false",
            f"acl_file {cfg.acl_file}",
        ]
    else:
        lines.append(f"allow_anonymous {'true' if cfg.allow_anonymous else 'false'}")
    lines += [
        f"max_queued_messages {cfg.max_queued_messages}",
        "max_queued_bytes 0",
        "max_inflight_messages 0",
        f"max_packet_size {cfg.max_packet_size}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",  # "Reloading config": reload() waits for it
        "connection_messages false",
    ]
    if cfg.run_as_user is not None:
        lines.append(f"user {cfg.run_as_user}")
    if cfg.data_dir is not None:
        lines += [
            "persistence true",
            f"persistence_location {cfg.data_dir}/",
            "autosave_interval 1",
        ]
    else:
        lines.append("persistence false")
    lines += cfg.extra_lines
    return "\n".join(lines) + "\n"


class MosquittoProcess:
    """Runs ``mosquitto -c <conf>`` as a child process and stops it on exit.

    Use as a context manager. The process is killed (not orphaned) on any exit,
    including test failures. With ``security`` the broker is mutual-TLS only.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persist: bool = False,
        extra_lines: list[str] | None = None,
        allow_anonymous: bool = True,
        security: BrokerSecurity | None = None,
    ) -> None:
        exe = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if exe is None:
            raise ConfigError(
                "mosquitto is not installed: run `sudo apt-get install mosquitto` "
                "(make demo / make test do this for you)"
            )
        self.exe = exe
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = BrokerConfig(
            port=port or free_port(),
            data_dir=self.workdir / "data" if persist else None,
            extra_lines=list(extra_lines or []),
            allow_anonymous=allow_anonymous,
            security=security,
            acl_file=self.workdir / "acl.conf" if security is not None else None,
            # A private broker runs as whoever started it: as root, Mosquitto would
            # switch to its own user, which cannot read our 0600 key files.
            run_as_user=pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else None,
        )
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def security(self) -> BrokerSecurity | None:
        return self.config.security

    def _write_config(self) -> None:
        if self.config.security is not None and self.config.acl_file is not None:
            self.config.acl_file.write_text(render_acl(self.config.security))
        self.conf_path.write_text(render_mosquitto_conf(self.config))

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        if self.config.data_dir is not None:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        log_file = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed executable, our own config
                [self.exe, "-c", str(self.conf_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(
                    f"mosquitto exited with code {self._proc.returncode} on port {self.port}: "
                    f"{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                log.info("mosquitto listening", extra={"port": self.port})
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the broker (SIGKILL), for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self, security: BrokerSecurity | None = None, timeout: float = 5.0) -> None:
        """Rewrite the config and ACL (with ``security`` if given), send SIGHUP, and
        wait until Mosquitto logs that it reloaded.

        Mosquitto re-reads the ACL and the CRL; listeners stay up, and so do
        open connections."""
        if security is not None:
            if self.config.security is None:
                raise ConfigError(
                    "cannot turn a plain broker into a secure one by a reload; restart it"
                )
            self.config.security = security
        self._write_config()
        if self._proc is None or self._proc.poll() is not None:
            raise ConfigError("mosquitto is not running; nothing to reload")
        before = self._reload_count()
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reload_count() == before:
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise ConfigError(
                    f"mosquitto did not confirm the reload in {timeout}s: "
                    f"{self.log_path.read_text(errors='replace')[-1000:]}"
                )
            time.sleep(0.02)

    def _reload_count(self) -> int:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace").count("Reloading config")
        return 0

    def sync_with_ca(self, ca: CertificateAuthority, *, disconnect: bool = False) -> None:
        """Enforce the CA's current state: its CRL, ACL denials for revoked devices,
        and ACL grants for the service identities it issued; then reload.

        A revoked device can no longer connect, and an open session of it is
        muted at once; ``disconnect=True`` restarts the broker so its socket
        closes too (every client reconnects; retained messages need ``persist``)."""
        if self.config.security is None:
            raise ConfigError("a plain broker has no certificates to revoke")
        security = BrokerSecurity.from_ca(ca)
        if disconnect:
            self.config.security = security
            self.restart()
        else:
            self.reload(security)
        log.warning(
            "broker synced with the CA",
            extra={"denied": list(security.denied), "restarted": disconnect},
        )

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
