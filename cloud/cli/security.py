"""``ca``, ``device``, ``root sign``, ``key``, ``broker``: identities and signing keys.

* ``ca init``: the device CA, the broker's server certificate and the cloud's
  own client identities (``edgefleet-cloud``, ``edgefleet-repo``).
* ``ca ingest --workers N``: one identity per telemetry ingest worker
  (``edgefleet-ingest-0`` .. ``N-1``, the workers' client ids), read-only in the ACL.
* ``device enroll --csr``: sign a CSR a device made (its key stays on it);
  ``device issue``: a one-time bootstrap token for online enrollment;
  ``device revoke``: revoke a device (CRL + ACL; reload the broker).
* ``root sign``: the next root version, signed with offline root key files
  given on the command line (a threshold of them).
* ``key rotate`` / ``key revoke``: replace or drop a TUF role key; devices
  follow through the new root, without re-provisioning.
* ``broker config``: the secure ``mosquitto.conf`` and ACL for this CA;
  ``broker acl``: only the ACL (a hand-tuned ``mosquitto.conf`` stays).
* ``repo-mqtt``: serve the TUF repository over MQTT (devices without HTTP).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud.cli.common import local_args, settings_from

if TYPE_CHECKING:
    from cloud.pki import CertificateAuthority

__all__ = ["register"]


def _ca(args: argparse.Namespace) -> Any:
    from cloud.pki import CertificateAuthority

    return CertificateAuthority.open(settings_from(args).data_dir / "pki")


def _repo(args: argparse.Namespace) -> Any:
    from cloud.tuf_repo import ReleaseRepository

    settings = settings_from(args)
    return ReleaseRepository.open(settings.repo_dir, settings.keys_dir)


def _write_or_print(data: bytes, out: Path | None) -> None:
    if out is None or str(out) == "-":
        sys.stdout.write(data.decode())
    else:
        out.write_bytes(data)
        print(f"wrote {out}", file=sys.stderr)


def cmd_ca_init(args: argparse.Namespace) -> int:
    from cloud.pki import CertificateAuthority

    ca = CertificateAuthority.open_or_init(settings_from(args).data_dir / "pki")
    ca.issue_server_cert(
        names=args.broker_name or ["localhost"], ips=args.broker_ip or ["127.0.0.1"]
    )
    for name in args.service or ["edgefleet-cloud", "edgefleet-repo"]:
        ident = ca.issue_service_identity(name)
        print(f"service identity {name}: {ident.cert_file}")
    print(f"CA certificate (give it to devices): {ca.ca_cert_path}")
    print(f"broker certificate: {ca.server_cert_path}; CRL: {ca.crl_path}")
    return 0


def cmd_ca_ingest(args: argparse.Namespace) -> int:
    from cloud.broker import INGEST_PREFIX, INGEST_ROLE, service_role
    from cloud.ingest.pool import ingest_client_ids
    from shared.errors import ConfigError

    if args.workers < 1 or args.index < 0:
        raise ConfigError("--workers must be at least 1 and --index at least 0")
    names = ingest_client_ids(
        settings_from(args), args.workers, first_index=args.index, client_prefix=args.client_prefix
    )
    # The ACL grants by name: an identity outside the ingest prefix would get the
    # cloud's full role.
    wrong = [n for n in names if service_role(n) != INGEST_ROLE]
    if wrong:
        raise ConfigError(
            f"{wrong[0]!r} would not get the read-only ingest role in the broker ACL; "
            f"use a --client-prefix starting with {INGEST_PREFIX!r}"
        )
    ca = _ca(args)
    for name in names:
        ident = ca.issue_service_identity(name)
        print(f"ingest identity {name}: {ident.cert_file} (key {ident.key_file.name})")
    print(
        "rewrite the broker ACL (`edgefleet-cloud broker acl --out FILE --broker-pid PID`); "
        "ingest hosts without this data dir need the files in EDGEFLEET_BROKER_TLS_INGEST_DIR"
    )
    return 0


def cmd_ca_crl(args: argparse.Namespace) -> int:
    ca = _ca(args)
    changed = ca.refresh_crl(force=args.force)
    print(f"{'re-signed' if changed else 'still fresh:'} {ca.crl_path}")
    return 0


def cmd_device_enroll(args: argparse.Namespace) -> int:
    cert = _ca(args).sign_device_csr(args.csr.read_bytes(), device_id=args.device_id)
    _write_or_print(cert, args.out)
    return 0


def cmd_device_issue(args: argparse.Namespace) -> int:
    from cloud.enrollment import BootstrapTokens

    secret = BootstrapTokens(_ca(args)).create(args.device_id, ttl=timedelta(hours=args.ttl_hours))
    # The secret alone on stdout, so a provisioning script can capture it.
    print(secret)
    return 0


def _write_acl(ca: CertificateAuthority, path: Path) -> None:
    """The broker ACL for what ``ca`` issued and revoked, replaced in one rename: a
    broker reloading meanwhile reads the old file or the new one, never half of one."""
    from cloud._files import atomic_write
    from cloud.broker import BrokerSecurity, render_acl

    atomic_write(path, render_acl(BrokerSecurity.from_ca(ca)).encode())


def _reload_broker(pid: int | None) -> None:
    if pid is not None:
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to mosquitto ({pid}): it re-reads the CRL and ACL")
    else:
        print("reload the broker (SIGHUP, e.g. `systemctl reload mosquitto`) to enforce it")


def cmd_device_revoke(args: argparse.Namespace) -> int:
    ca = _ca(args)
    serials = ca.revoke(args.device_id)
    print(f"revoked {len(serials)} certificate(s) of {args.device_id}; CRL: {ca.crl_path}")
    if args.acl_out is not None:
        _write_acl(ca, args.acl_out)
        print(f"wrote ACL {args.acl_out} (the device is denied every topic)")
    _reload_broker(args.broker_pid)
    return 0


def cmd_broker_acl(args: argparse.Namespace) -> int:
    """Rewrite only the ACL (after ``ca ingest``, ``ca init --service``, a revocation
    done elsewhere), leaving a hand-tuned ``mosquitto.conf`` alone."""
    _write_acl(_ca(args), args.out)
    print(f"wrote ACL {args.out}")
    _reload_broker(args.broker_pid)
    return 0


def cmd_device_list(args: argparse.Namespace) -> int:
    for c in _ca(args).issued():
        state = "live" if c.live else f"revoked {c.revoked_at:%Y-%m-%d}"
        print(
            f"{c.common_name:<32} {c.kind:<8} until {c.not_after:%Y-%m-%d} {state:<18} {c.serial:x}"
        )
    return 0


def cmd_root_sign(args: argparse.Namespace) -> int:
    version = _repo(args).sign_new_root(root_key_files=args.root_key)
    print(f"signed root version {version}; devices pick it up at their next update check")
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    version = _repo(args).rotate_role_key(args.role, keyid=args.keyid, root_key_files=args.root_key)
    print(f"rotated the {args.role} key: root version {version}")
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    version = _repo(args).revoke_key(args.keyid, root_key_files=args.root_key)
    print(f"revoked key {args.keyid[:12]}: root version {version}")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from cloud.broker import BrokerConfig, BrokerSecurity, render_acl, render_mosquitto_conf

    security = BrokerSecurity.from_ca(_ca(args))
    args.out.mkdir(parents=True, exist_ok=True)
    acl = args.out / "edgefleet.acl"
    acl.write_text(render_acl(security))
    conf = BrokerConfig(
        port=args.port, host=args.host, security=security, acl_file=acl, data_dir=args.persist_dir
    )
    (args.out / "mosquitto.conf").write_text(render_mosquitto_conf(conf))
    print(
        f"wrote {args.out / 'mosquitto.conf'} and {acl}; the broker must be able to read "
        "the server key and the CRL"
    )
    return 0


def cmd_repo_mqtt(args: argparse.Namespace) -> int:
    """Serve the TUF repository over MQTT until SIGTERM/SIGINT (scale out: run several)."""
    import threading

    from cloud.mqtt_repo import MqttRepoServer
    from cloud.pki import CertificateAuthority

    settings = settings_from(args)
    tls = None
    ca = CertificateAuthority(settings.data_dir / "pki")
    if ca.initialized:
        ident = ca.service_identity(args.service)
        if not ident.cert_file.is_file():
            ident = ca.issue_service_identity(args.service)
        tls = ident.as_tls_dict()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = MqttRepoServer(
        settings.repo_dir,
        settings.broker_host,
        settings.broker_port,
        tls=tls,
        client_id=args.service,
    )
    with server:
        print(
            f"serving {settings.repo_dir} over MQTT at {settings.broker_host}:"
            f"{settings.broker_port} as {args.service}",
            flush=True,
        )
        stop.wait()
    return 0


def _root_keys(sp: argparse.ArgumentParser, required: bool) -> None:
    sp.add_argument(
        "--root-key",
        type=Path,
        action="append",
        required=required,
        help="a root private key file (repeat for each; a threshold is needed)",
    )


def register(sub: Any) -> None:
    ca = sub.add_parser("ca", help="the device certificate authority")
    csub = ca.add_subparsers(dest="ca_action", required=True)
    s = local_args(csub.add_parser("init", help="create the CA, broker and service certificates"))
    s.add_argument("--broker-name", action="append", help="DNS name of the broker (repeatable)")
    s.add_argument("--broker-ip", action="append", help="IP address of the broker (repeatable)")
    s.add_argument("--service", action="append", help="cloud identity to issue (repeatable)")
    s.set_defaults(func=cmd_ca_init)
    s = local_args(csub.add_parser("ingest", help="issue the ingest workers' identities"))
    s.add_argument("--workers", type=int, required=True, help="how many identities")
    s.add_argument("--index", type=int, default=0, help="index of the first one")
    s.add_argument("--client-prefix", help="client id prefix (default edgefleet-ingest)")
    s.set_defaults(func=cmd_ca_ingest)
    s = local_args(csub.add_parser("crl", help="re-sign the CRL if it is close to expiry"))
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_ca_crl)

    dev = sub.add_parser("device", help="device identities: enroll, issue, revoke, list")
    dsub = dev.add_subparsers(dest="device_action", required=True)
    s = local_args(dsub.add_parser("enroll", help="sign a device's CSR"))
    s.add_argument("--csr", type=Path, required=True)
    s.add_argument("--device-id", help="refuse a CSR for any other device")
    s.add_argument("--out", type=Path, help="certificate file (default stdout)")
    s.set_defaults(func=cmd_device_enroll)
    s = local_args(dsub.add_parser("issue", help="a one-time bootstrap token for a device"))
    s.add_argument("--device-id", required=True)
    s.add_argument("--ttl-hours", type=float, default=24.0)
    s.set_defaults(func=cmd_device_issue)
    s = local_args(dsub.add_parser("revoke", help="revoke a device's certificates"))
    s.add_argument("--device-id", required=True)
    s.add_argument("--acl-out", type=Path, help="rewrite the broker ACL file here")
    s.add_argument("--broker-pid", type=int, help="send SIGHUP to this mosquitto")
    s.set_defaults(func=cmd_device_revoke)
    local_args(dsub.add_parser("list", help="every certificate issued")).set_defaults(
        func=cmd_device_list
    )

    # ``root`` (export the root metadata) belongs to cloud.cli.service; ``root sign``
    # hangs below it when it is registered first, else it gets its own parser.
    root = sub.choices.get("root") or local_args(sub.add_parser("root", help="root metadata"))
    rsub = root.add_subparsers(dest="root_action", required=False)
    s = rsub.add_parser("sign", help="sign the next root version with offline root keys")
    s.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS)
    _root_keys(s, required=True)
    s.set_defaults(func=cmd_root_sign)

    key = sub.add_parser("key", help="TUF role keys: rotate, revoke")
    ksub = key.add_subparsers(dest="key_action", required=True)
    s = local_args(ksub.add_parser("rotate", help="replace a role's key (a new root version)"))
    s.add_argument("--role", required=True, choices=["root", "targets", "snapshot", "timestamp"])
    s.add_argument("--keyid", help="the key to replace (default: all keys of the role)")
    _root_keys(s, required=False)
    s.set_defaults(func=cmd_key_rotate)
    s = local_args(ksub.add_parser("revoke", help="drop a key from every role using it"))
    s.add_argument("--keyid", required=True)
    _root_keys(s, required=False)
    s.set_defaults(func=cmd_key_revoke)

    s = local_args(sub.add_parser("repo-mqtt", help="serve the TUF repository over MQTT"))
    s.add_argument("--broker-host")
    s.add_argument("--broker-port", type=int)
    s.add_argument(
        "--service",
        default="edgefleet-repo",
        help="service identity (certificate CN) when the CA exists",
    )
    s.set_defaults(func=cmd_repo_mqtt)

    brk = sub.add_parser("broker", help="the secure broker configuration")
    bsub = brk.add_subparsers(dest="broker_action", required=True)
    s = local_args(bsub.add_parser("config", help="write mosquitto.conf and the ACL file"))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--port", type=int, default=8883)
    s.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a broker serves devices
    s.add_argument("--persist-dir", type=Path)
    s.set_defaults(func=cmd_broker_config)
    s = local_args(bsub.add_parser("acl", help="rewrite only the ACL file"))
    s.add_argument("--out", type=Path, required=True, help="the ACL file mosquitto reads")
    s.add_argument("--broker-pid", type=int, help="send SIGHUP to this mosquitto")
    s.set_defaults(func=cmd_broker_acl)
