"""The incident runbook (docs/RUNBOOK.md), followed to the letter on a simulated fleet.

Every fenced ``sh`` block of the runbook is marked with the step it belongs to
(``<!-- runbook-step: NAME -->``). This test reads the blocks from the document,
checks each command against the real CLI parsers, and runs it as written, in
bash, with the placeholders (``$MODEL``, ``$BAD``, ``$DEVICE`` ...) as shell
variables, against eight device agents (threads) on a real broker and cloud:
the whole fleet runs a bad release 2; the recall puts every device on release 3
(release 1's bytes); ``devices ran`` finds all eight; the take-down makes
release 2 unfetchable; a leaked API token stops working; the TUF online and
root keys are rotated, a device and a service identity are revoked and
re-issued; and a roll-forward afterwards proves that devices still update and
trust the new root. A block the test does not know, or a step missing from
the document, fails the test: the runbook and the test cannot drift apart.

The simulated broker is plain MQTT, so revoking a certificate cannot cut a
simulated device off here (tests/attacks covers that against a TLS broker);
what this test checks for those steps is what the commands leave behind: the
CRL, the ACL, the certificates, and the broker's reload.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_sim.fleet import FleetOptions, SimFleet
from firmware_sim.releases import publish_variant
from shared.manifest import MODEL_FILE, SELFTEST_FILE, target_path

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNBOOK = Path(__file__).resolve().parents[2] / "docs" / "RUNBOOK.md"
BIN = Path(sys.executable).parent
MODEL = "digits"
N = 8
DEVICE = "dev-003"
BROKER_HOST = "broker.sim.test"
#: The runbook's steps, in the order the document gives them.
STEPS = [
    "setup",
    "recall",
    "recall-status",
    "ran",
    "takedown",
    "api-token",
    "online-keys",
    "root-keys",
    "device-revoke",
    "device-reenroll",
    "service-identity",
    "verify",
    "root-sign",
    "roll-forward",
]
_MARKED_BLOCK = re.compile(r"<!-- runbook-step: ([a-z0-9-]+) -->\n```sh\n(.*?)^```$", re.M | re.S)
_VAR = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")


# -- reading the runbook -------------------------------------------------------------
def _commands(block: str) -> list[str]:
    """The commands of a block: one per line (``\\`` continues a line), no comments."""
    out: list[str] = []
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line.strip())
    assert not pending, f"a block ends in a line continuation: {block!r}"
    return out


def read_runbook() -> tuple[dict[str, list[str]], str]:
    text = RUNBOOK.read_text()
    fences = re.findall(r"^```(.*)$", text, re.M)
    openings = fences[::2]
    assert len(fences) % 2 == 0, "an unclosed code fence in RUNBOOK.md"
    assert set(openings) == {"sh"}, f"every code block of the runbook is a ```sh block: {openings}"
    found = _MARKED_BLOCK.findall(text)
    assert len(found) == len(openings), (
        f"{len(openings)} sh blocks but {len(found)} are marked with <!-- runbook-step: NAME -->"
    )
    names = [name for name, _ in found]
    assert names == STEPS, f"the runbook's steps changed: {names}; teach this test the new ones"
    return {name: _commands(block) for name, block in found}, text


def _placeholders(text: str) -> set[str]:
    """The variables the runbook's table explains (first cell of each row)."""
    out: set[str] = set()
    for line in text.splitlines():
        if line.startswith("| `$"):
            out |= set(re.findall(r"`\$(\w+)`", line.split("|")[1]))
    return out


def _expand(word: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"the runbook uses ${m.group(1)}, which this test never sets"
        return env[m.group(1)]

    return _VAR.sub(sub, word)


def check_syntax(cmd: str, env: dict[str, str]) -> None:
    """Parse ``cmd`` with the CLI it names, as the shell would hand it over."""
    from cloud.cli import build_parser as cloud_parser
    from device.cli import build_parser as device_parser

    words = [_expand(w, env) for w in shlex.split(cmd, comments=True)]
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words.pop(0)  # VAR=value prefix: the command's own environment
    assert words, f"no command in {cmd!r}"
    if words[0] == "kill":
        assert words[1:2] == ["-HUP"] and len(words) == 3 and words[2].isdigit(), cmd
        return
    parsers = {"edgefleet-cloud": cloud_parser, "edgefleet-device": device_parser}
    assert words[0] in parsers, f"the runbook runs {words[0]!r}; only edgefleet CLIs are checked"
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            parsers[words[0]]().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"runbook command `{cmd}` does not parse:\n{err.getvalue()}")


class Runbook:
    """Runs the runbook's steps as written, in bash, with placeholder variables."""

    def __init__(self, steps: dict[str, list[str]], env: dict[str, str], cwd: Path) -> None:
        self.steps, self.env, self.cwd = steps, env, cwd
        self.ran: list[str] = []

    def run(self, name: str, timeout: float = 120) -> list[subprocess.CompletedProcess[str]]:
        results = []
        for cmd in self.steps[name]:
            check_syntax(cmd, self.env)
            r = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", cmd],
                env=self.env,
                cwd=self.cwd,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            assert r.returncode == 0, (
                f"runbook step {name}: `{cmd}` exited {r.returncode}\n"
                f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
            )
            results.append(r)
        self.ran.append(name)
        return results


# -- looking at the fleet ---------------------------------------------------------------
def _api(fleet: SimFleet, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
    assert fleet.cloud is not None
    headers = {"Authorization": f"Bearer {token or fleet.cloud.token}"}
    return httpx.request(method, fleet.cloud.api + path, headers=headers, timeout=60, **kw)


def _wait_on(fleet: SimFleet, release: int, timeout: float = 120) -> None:
    assert fleet.cloud is not None
    want = set(fleet.device_ids)
    fleet.cloud.wait_for(
        lambda devs: (
            want
            <= {
                d["device_id"]
                for d in devs
                if d["release"] == release and d["state"] in ("idle", "committed")
            }
        ),
        f"every device on release {release}",
        timeout=timeout,
        check=fleet.check_alive,
    )


def _root(fleet: SimFleet) -> dict[str, Any]:
    r = _api(fleet, "GET", "/tuf/metadata/root.json")
    assert r.status_code == 200, r.text
    return dict(r.json()["signed"])


def _tuf_client(fleet: SimFleet, workdir: Path) -> tuple[Any, int]:
    """A fresh TUF client that trusts only root version 1 and walks the chain,
    as a new device would; returns it and the root version it ends on."""
    from tuf.ngclient import Updater

    assert fleet.cloud is not None
    api = fleet.cloud.api
    root1 = _api(fleet, "GET", "/tuf/metadata/1.root.json")
    assert root1.status_code == 200
    d = workdir / f"tuf-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    updater = Updater(
        metadata_dir=str(d),
        metadata_base_url=f"{api}/tuf/metadata/",
        target_base_url=f"{api}/tuf/targets/",
        bootstrap=root1.content,
    )
    updater.refresh()
    version = json.loads((d / "root.json").read_text())["signed"]["version"]
    return updater, int(version)


def _broker_pid(fleet: SimFleet) -> int:
    assert fleet.broker is not None
    conf = str(fleet.broker.conf_path).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if conf in argv:
            return int(entry.name)
    raise AssertionError(f"no mosquitto process runs with {conf!r}")


def _reloads(fleet: SimFleet) -> int:
    assert fleet.broker is not None
    return fleet.broker.log_path.read_text(errors="replace").count("Reloading config")


def _wait_reloads(fleet: SimFleet, above: int) -> None:
    deadline = time.monotonic() + 10
    while _reloads(fleet) <= above:
        assert time.monotonic() < deadline, "mosquitto never logged the reload the runbook asked"
        time.sleep(0.1)


def _table_rows(out: str) -> list[list[str]]:
    """Rows of a CLI table (the first line is the header)."""
    lines = out.strip().splitlines()
    assert lines, "no table header"
    return [line.split() for line in lines[1:]]


def _certs(ca: Any, cn: str) -> tuple[list[int], list[int]]:
    live = [c.serial for c in ca.issued() if c.common_name == cn and c.live]
    dead = [c.serial for c in ca.issued() if c.common_name == cn and not c.live]
    return live, dead


def _on_crl(ca: Any, serial: int) -> bool:
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    return crl.get_revoked_certificate_by_serial_number(serial) is not None


def _acl_denies(acl: str, name: str) -> bool:
    return f"# revoked\nuser {name}\ntopic deny #" in acl


# -- the test ---------------------------------------------------------------------------
def test_runbook_doc_is_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    """The setup block exports what the CLI reads, and the placeholder table names
    exactly the variables the blocks use."""
    from cloud.cli import build_parser

    steps, text = read_runbook()
    exported = {}
    for cmd in steps["setup"]:
        m = re.match(r"^export (\w+)=\S+$", shlex.join(shlex.split(cmd, comments=True)))
        assert m, f"the setup block only exports variables: {cmd!r}"
        exported[m.group(1)] = f"sentinel-{m.group(1).lower()}"
    assert set(exported) == {"EDGEFLEET_API", "EDGEFLEET_TOKEN"}
    for name, value in exported.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["devices", "ran", "--model", "m", "--release", "1"])
    assert (args.api, args.token) == (exported["EDGEFLEET_API"], exported["EDGEFLEET_TOKEN"])

    used = {v for name in STEPS[1:] for cmd in steps[name] for v in _VAR.findall(cmd)}
    assert used - set(exported) == _placeholders(text)


def test_runbook_on_a_simulated_fleet(tmp_path: Path, cloud_template: Path) -> None:
    from cloud.auth import create_token
    from cloud.config import CloudSettings
    from cloud.db import Database
    from cloud.pki import CertificateAuthority
    from device.config import create_csr, identity_files, install_certificate, provision

    steps, _ = read_runbook()
    assert (BIN / "edgefleet-cloud").is_file() and (BIN / "edgefleet-device").is_file()
    opts = FleetOptions(
        devices=N,
        mode="thread",
        telemetry_interval=0.5,
        # Slow enough that a wave passes before 200 inferences (the default gates'
        # minimum) come in: on two shared cores a p99 latency gate measured in
        # microseconds would judge the machine's load, not the release.
        inference_interval=0.5,
        cloud_template=cloud_template,
        agent_settings={"probation_s": 0.5, "probation_min_inferences": 5},
    )
    with SimFleet(tmp_path / "fleet", opts) as fleet:
        assert fleet.cloud is not None and fleet.broker is not None
        cloud, ids = fleet.cloud, fleet.device_ids
        data_dir = cloud.cloud_dir

        # -- the incident: every device runs release 2 (it came after release 1) --------
        cloud.deploy(MODEL, 1, ids)
        _wait_on(fleet, 1)
        bad = publish_variant(data_dir, MODEL, 1)
        assert bad == 2
        cloud.deploy(MODEL, bad, ids)
        _wait_on(fleet, bad)

        db = Database(CloudSettings(data_dir=data_dir).db_url)
        try:
            admin_token = create_token(db, "oncall-admin", "admin")
            leaked_token = create_token(db, "ci-deploy", "operator")
        finally:
            db.dispose()
        ops = tmp_path / "ops"
        ops.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            EDGEFLEET_API=cloud.api,
            EDGEFLEET_TOKEN=cloud.token,
            MODEL=MODEL,
            BAD=str(bad),
            DEVICE=DEVICE,
            ADMIN_TOKEN=admin_token,
            DATA_DIR=str(data_dir),
            TOKEN_NAME="ci-deploy",
        )
        book = Runbook(steps, env, ops)

        # -- 1. recall: one command -------------------------------------------------------
        t0 = time.monotonic()
        (recall,) = book.run("recall", timeout=240)
        recall_s = time.monotonic() - t0
        m = re.search(
            rf"^recall rollout (rc-\S+): {N} devices go to release 3 \(recall of release 2 "
            r"to release 1: INC-1234: wrong predictions\)$",
            recall.stdout,
            re.M,
        )
        assert m, recall.stdout
        rid = m.group(1)
        assert "aborted rollout" not in recall.stdout  # none was running
        assert re.search(rf"^rollout {rid}: release 3 of digits — COMPLETED ", recall.stdout, re.M)
        status = _api(fleet, "GET", f"/api/v1/rollouts/{rid}").json()
        assert (status["state"], status["release"], status["counts"]) == (
            "completed",
            3,
            {"updated": N},
        )
        _wait_on(fleet, 3, timeout=30)
        manifest = _api(fleet, "GET", f"/api/v1/releases/{MODEL}/3").json()
        assert manifest["source"]["rerelease_of"] == "1"
        tuf, _ = _tuf_client(fleet, tmp_path)
        one, three = (tuf.get_targetinfo(target_path(MODEL, r, MODEL_FILE)) for r in (1, 3))
        assert one is not None and three is not None
        assert (three.hashes, three.length) == (one.hashes, one.length)  # release 1's bytes
        book.env["RECALL"] = rid

        status_out, events_out = book.run("recall-status")
        assert status_out.stdout.startswith(
            f"rollout {rid}: release 3 of digits — COMPLETED (wave 1/1, {N} devices)"
        ), status_out.stdout
        assert f"updated {N}" in status_out.stdout
        kinds = [line.split()[1] for line in events_out.stdout.strip().splitlines()]
        assert kinds[0] == "started" and kinds[-1] == "completed", events_out.stdout

        # -- 2. every device that ran it ---------------------------------------------------
        ran, history = book.run("ran")
        lines = ran.stdout.strip().splitlines()
        assert lines[0] == f"{N} devices ran release 2 of digits"
        rows = {line.split()[0]: line for line in lines[1:]}
        assert sorted(rows) == sorted(ids)
        assert all(line.endswith("now on 3") for line in rows.values()), ran.stdout
        hist = history.stdout
        assert re.search(r"\bdigits 2\b", hist) and re.search(r"\bdigits 3\b", hist), hist
        assert rid in hist, hist

        # -- 3. take it down ---------------------------------------------------------------
        two = target_path(MODEL, bad, MODEL_FILE)
        assert tuf.get_targetinfo(two) is not None
        (down,) = book.run("takedown")
        assert down.stdout.startswith("release 2 of digits taken down: "), down.stdout
        listed = down.stdout.split(": ", 1)[1].strip().split(", ")
        assert two in listed and target_path(MODEL, bad, SELFTEST_FILE) in listed
        assert all(p.startswith("digits/2/") for p in listed)
        assert _api(fleet, "GET", f"/api/v1/releases/{MODEL}/2").status_code == 404
        r = _api(
            fleet,
            "POST",
            "/api/v1/rollouts",
            json={"model": MODEL, "release": 2, "target": {"all": True}},
        )
        assert r.status_code == 404 and "release 2" in r.json()["detail"], r.text
        r = _api(
            fleet,
            "POST",
            "/api/v1/deployments",
            json={"model": MODEL, "release": 2, "devices": [DEVICE]},
        )
        assert r.status_code == 404, r.text
        tuf, _ = _tuf_client(fleet, tmp_path)  # what a device sees now
        assert tuf.get_targetinfo(two) is None
        assert tuf.get_targetinfo(target_path(MODEL, 3, MODEL_FILE)) is not None

        # -- 4. leaked API token -----------------------------------------------------------
        assert _api(fleet, "GET", "/api/v1/devices", token=leaked_token).status_code == 200
        listing, revoked, created = book.run("api-token")
        assert ["ci-deploy", "operator", "live", "expires"] in [
            ln.split()[:4] for ln in listing.stdout.splitlines()
        ]
        assert revoked.stdout.strip() == "revoked 1 token(s) named 'ci-deploy'"
        replacement = created.stdout.strip()
        assert replacement.startswith("efk_") and "\n" not in replacement
        assert _api(fleet, "GET", "/api/v1/devices", token=leaked_token).status_code == 401
        r = _api(fleet, "POST", f"/api/v1/rollouts/{rid}/pause", token=leaked_token, json={})
        assert r.status_code == 401
        assert _api(fleet, "GET", "/api/v1/devices", token=replacement).status_code == 200
        assert _api(fleet, "GET", "/api/v1/devices").status_code == 200  # other tokens live

        # -- 4. TUF online keys ------------------------------------------------------------
        before = _root(fleet)
        offline = data_dir / "keys" / "offline"
        online = data_dir / "keys" / "online"
        old_root_keys = sorted(offline.glob("root-*.pem"))
        assert len(old_root_keys) == 3
        book.env.update(ROOT_KEY_A=str(old_root_keys[0]), ROOT_KEY_B=str(old_root_keys[1]))
        # The runbook says `key revoke` refuses a role's only key (rotate instead).
        ts_key = before["roles"]["timestamp"]["keyids"][0]
        refused = subprocess.run(
            [
                str(BIN / "edgefleet-cloud"),
                "key",
                "revoke",
                "--keyid",
                ts_key,
                "--data-dir",
                str(data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert refused.returncode == 2 and "would leave timestamp with 0 keys" in refused.stderr
        assert _root(fleet)["version"] == before["version"]

        rotated = book.run("online-keys")
        v0 = before["version"]
        for i, (role, out) in enumerate(
            zip(("targets", "snapshot", "timestamp"), rotated, strict=True)
        ):
            assert out.stdout.strip() == f"rotated the {role} key: root version {v0 + i + 1}"
        after = _root(fleet)
        assert after["version"] == v0 + 3
        for role in ("targets", "snapshot", "timestamp"):
            old, new = before["roles"][role]["keyids"], after["roles"][role]["keyids"]
            assert len(new) == 1 and not set(old) & set(new), role
            assert not list(online.glob(f"*-{old[0]}.*")), f"old {role} key left on disk"
        assert after["roles"]["root"] == before["roles"]["root"]

        # -- 4. TUF root keys --------------------------------------------------------------
        (rooted,) = book.run("root-keys")
        assert rooted.stdout.strip() == f"rotated the root key: root version {v0 + 4}"
        after_root = _root(fleet)
        old_ids, new_ids = before["roles"]["root"]["keyids"], after_root["roles"]["root"]["keyids"]
        assert len(new_ids) == 3 and not set(old_ids) & set(new_ids)
        assert after_root["roles"]["root"]["threshold"] == 2
        assert not any(p.exists() for p in old_root_keys)
        new_root_keys = sorted(offline.glob("root-*.pem"))
        assert len(new_root_keys) == 3

        # -- 4. a device's key: the device was enrolled with the cloud CA ------------------
        ca = CertificateAuthority.open_or_init(data_dir / "pki")
        ca.issue_server_cert(names=["localhost"], ips=["127.0.0.1"])
        ca.issue_service_identity("edgefleet-cloud")
        device_dir = tmp_path / "on-device" / DEVICE
        provision(
            device_dir,
            device_id=DEVICE,
            root_file=data_dir / "repository" / "metadata" / "1.root.json",
            broker_host="127.0.0.1",
            broker_port=fleet.broker.port,
            repo_url=f"{cloud.api}/tuf/",
        )
        install_certificate(
            device_dir,
            ca.sign_device_csr(create_csr(device_dir), device_id=DEVICE),
            ca.ca_cert_pem(),
        )
        files = identity_files(device_dir)
        leaked_key = files.key_file.read_bytes()
        (old_serial,), _ = _certs(ca, DEVICE)
        conf_dir = tmp_path / "broker-conf"
        conf_dir.mkdir()
        acl = conf_dir / "edgefleet.acl"
        book.env.update(
            BROKER_CONF_DIR=str(conf_dir),
            BROKER_PID=str(_broker_pid(fleet)),
            DEVICE_DIR=str(device_dir),
        )
        reloads = _reloads(fleet)
        (cut,) = book.run("device-revoke")
        assert f"revoked 1 certificate(s) of {DEVICE}" in cut.stdout
        assert f"sent SIGHUP to mosquitto ({book.env['BROKER_PID']})" in cut.stdout
        assert _certs(ca, DEVICE) == ([], [old_serial]) and _on_crl(ca, old_serial)
        assert _acl_denies(acl.read_text(), DEVICE)
        _wait_reloads(fleet, reloads)

        reloads = _reloads(fleet)
        book.run("device-reenroll")
        assert files.key_file.read_bytes() != leaked_key
        (new_serial,), dead = _certs(ca, DEVICE)
        assert dead == [old_serial] and new_serial != old_serial
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        assert cert.serial_number == new_serial
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        key = serialization.load_pem_private_key(files.key_file.read_bytes(), None)
        assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
        assert not _acl_denies(acl.read_text(), DEVICE)  # it speaks again, with the new key
        assert (
            "persistence_location /var/lib/mosquitto/" in (conf_dir / "mosquitto.conf").read_text()
        )
        _wait_reloads(fleet, reloads)

        # -- 4. a cloud service identity (and the broker certificate) ---------------------
        (old_service,), _ = _certs(ca, "edgefleet-cloud")
        old_server = x509.load_pem_x509_certificate(ca.server_cert_path.read_bytes())
        book.env.update(SERVICE="edgefleet-cloud", BROKER_HOST=BROKER_HOST)
        revoke_service, reissue = book.run("service-identity")
        assert "revoked 1 certificate(s) of edgefleet-cloud" in revoke_service.stdout
        assert "service identity edgefleet-cloud:" in reissue.stdout
        (new_service,), dead = _certs(ca, "edgefleet-cloud")
        assert dead == [old_service] and new_service != old_service and _on_crl(ca, old_service)
        assert "\nuser edgefleet-cloud\n" in acl.read_text()
        server = x509.load_pem_x509_certificate(ca.server_cert_path.read_bytes())
        assert server.serial_number != old_server.serial_number
        sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [BROKER_HOST]

        # -- 5. verify -----------------------------------------------------------------------
        st, on_bad, offline_devs, running, releases = book.run("verify")
        assert st.stdout.startswith(f"rollout {rid}: release 3 of digits — COMPLETED")
        assert _table_rows(on_bad.stdout) == []
        assert _table_rows(offline_devs.stdout) == []
        assert _table_rows(running.stdout) == []
        assert [int(row[1]) for row in _table_rows(releases.stdout)] == [1, 3]

        book.env.update(ROOT_KEY_A=str(new_root_keys[0]), ROOT_KEY_B=str(new_root_keys[2]))
        (signed,) = book.run("root-sign")
        final_root = v0 + 5
        assert signed.stdout.startswith(f"signed root version {final_root};"), signed.stdout
        assert _root(fleet)["version"] == final_root

        # -- 5. roll forward: devices still update, under every new key ----------------------
        fixed = publish_variant(data_dir, MODEL, 3)
        assert fixed == 4
        book.env["FIXED"] = str(fixed)
        t0 = time.monotonic()
        (forward,) = book.run("roll-forward", timeout=240)
        forward_s = time.monotonic() - t0
        assert re.search(r"^rollout \S+: release 4 of digits — COMPLETED ", forward.stdout, re.M)
        assert f"updated {N}" in forward.stdout
        _wait_on(fleet, fixed, timeout=30)

        # -- and the recall again: the running service signs with the rotated keys --------
        # (release 4 was published by this process; the re-release is the service's own.)
        book.env["BAD"] = str(fixed)
        (again,) = book.run("recall", timeout=240)
        assert re.search(
            rf"^recall rollout rc-\S+: {N} devices go to release 5 \(recall of release 4 to "
            r"release 3: ",
            again.stdout,
            re.M,
        ), again.stdout
        assert re.search(r"^rollout rc-\S+: release 5 of digits — COMPLETED ", again.stdout, re.M)
        _wait_on(fleet, 5, timeout=30)
        tuf, version = _tuf_client(fleet, tmp_path)
        assert version == final_root
        five = tuf.get_targetinfo(target_path(MODEL, 5, MODEL_FILE))
        assert five is not None and (five.hashes, five.length) == (one.hashes, one.length)
        assert tuf.get_targetinfo(target_path(MODEL, fixed, MODEL_FILE)) is not None
        assert tuf.get_targetinfo(two) is None
        for d in ids:
            trusted = json.loads((fleet.data_dir(d) / "tuf" / "root.json").read_text())
            assert trusted["signed"]["version"] == final_root, d

        assert book.ran == [*STEPS[1:], "recall"], book.ran
        print(f"recall to completion: {recall_s:.1f}s; roll-forward: {forward_s:.1f}s")
