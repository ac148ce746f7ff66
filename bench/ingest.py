"""Telemetry ingest throughput: messages per second into the database with 1 and 2
ingest workers, lost messages, against the raw broker rate, all in one run.

One stream of N telemetry windows (the demo's shape: 64 features x 10 bins and
10 classes, ~2.3 KB each, from D devices) is published once, QoS 1, while
three consumers are away with persistent sessions, so the broker queues the
same stream for each of them:

* ``mosquitto_sub`` (C, the limit: it only reads and acknowledges);
* one ``edgefleet-cloud ingest`` worker process in share group A;
* two worker processes in share group B (the broker splits the stream).

Then each consumer drains its queue alone and is timed from its first
stored message to its last (so process start-up is not counted). Workers run
the real path: validation, known-device and release checks, batched
idempotent SQL writes (SQLite by default, ``--db postgres`` for PostgreSQL),
acknowledgement after commit. Lost = published - distinct windows stored.

Target: 2 workers >= 0.5x the raw rate, 0 lost.

    python bench/ingest.py [--messages 20000] [--devices 100] [--db sqlite|postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import func, select, text

from cloud.broker import MosquittoProcess
from cloud.db import Database
from cloud.ingest.store import SeenUpdate, TelemetryStore
from cloud.ingest.tables import TelemetryWindow
from cloud.ingest.testing import FakeDevice, publish_synthetic_release
from cloud.tuf_repo import ReleaseRepository
from shared.messages import encode
from shared.topics import Channel, subscription

TOPIC = subscription(Channel.TELEMETRY)
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _database(kind: str, workdir: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / f'{name}.db'}"
    import sqlalchemy

    db_name = f"edgefleet_bench_{name}_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db_name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"


def _drop(url: str) -> None:
    if not url.startswith("postgresql"):
        return
    import sqlalchemy

    admin = sqlalchemy.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _count(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(TelemetryWindow)) or 0)


def _distinct(db: Database) -> int:
    with db.session() as s:
        q = select(func.count()).select_from(
            select(TelemetryWindow.device_id, TelemetryWindow.seq).distinct().subquery()
        )
        return int(s.scalar(q) or 0)


def _worker_cmd(data_dir: Path, port: int, url: str, prefix: str, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cloud.cli",
        "ingest",
        "--workers",
        str(workers),
        "--data-dir",
        str(data_dir),
        "--broker-port",
        str(port),
        "--database-url",
        url,
        "--client-prefix",
        prefix,
        "--batch-size",
        "1000",
    ]


def _register(cmd: list[str], env: dict[str, str]) -> None:
    """Start the workers until subscribed (creating their sessions), then stop them."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        need = int(cmd[cmd.index("--workers") + 1])
        seen = 0
        for line in proc.stdout:
            seen += "subscribed" in line
            if seen >= need:
                break
    finally:
        proc.terminate()
        proc.wait(30)


def _drain(
    cmd: list[str], env: dict[str, str], db: Database, n: int, timeout: float
) -> tuple[float, int]:
    """Run the workers until all ``n`` windows are stored; (messages/s, stored)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        t0 = c0 = None
        deadline = time.monotonic() + timeout
        count = 0
        while time.monotonic() < deadline:
            count = _count(db)
            now = time.perf_counter()
            if t0 is None and count > 0:
                t0, c0 = now, count
            if count >= n:
                break
            time.sleep(0.05)
        t1 = time.perf_counter()
        time.sleep(1.0)  # anything extra (duplicates) would show now
        stored = _distinct(db)
    finally:
        proc.terminate()
        proc.wait(30)
    if t0 is None or c0 is None or t1 <= t0:
        return 0.0, stored
    return (count - c0) / (t1 - t0), stored


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    args = p.parse_args()
    n = args.messages
    workdir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    urls: list[str] = []
    try:
        repo = ReleaseRepository.open_or_init(
            workdir / "cloud" / "repository", workdir / "cloud" / "keys"
        )
        rel = publish_synthetic_release(repo, model="digits", n_features=64, bins=10, n_classes=10)
        devices = [FakeDevice(f"dev-{i:05d}", release=rel, seed=i) for i in range(args.devices)]
        payloads = [
            (
                devices[i % len(devices)].topic(Channel.TELEMETRY),
                encode(devices[i % len(devices)].telemetry(samples=200)),
            )
            for i in range(n)
        ]
        size = sum(len(pl) for _, pl in payloads) / n
        dbs: dict[str, Database] = {}
        for name in ("one", "two"):
            urls.append(_database(args.db, workdir, name))
            dbs[name] = Database(urls[-1])
            dbs[name].create_all()
            TelemetryStore(dbs[name], worker="setup", bucket_seconds=60).write_batch(
                [], [SeenUpdate(d.device_id, time.time(), None) for d in devices]
            )
        with MosquittoProcess(workdir / "broker") as broker:
            env = dict(os.environ)
            cmds = {}
            for name, workers in (("one", 1), ("two", 2)):
                env_g = {**env, "EDGEFLEET_INGEST_STORE_GROUP": f"bench-{name}"}
                cmds[name] = (
                    _worker_cmd(
                        workdir / "cloud", broker.port, urls[len(cmds)], f"bench-{name}", workers
                    ),
                    env_g,
                )
                _register(*cmds[name])
            raw = [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-V",
                "5",
                "-q",
                "1",
                "-c",
                "-i",
                "bench-raw",
                "-x",
                "3600",
                "-t",
                TOPIC,
            ]
            subprocess.run([*raw, "-E"], check=True)

            pub = mqtt.Client(
                callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                client_id="bench-pub",
                protocol=mqtt.MQTTv5,
            )
            pub.max_inflight_messages_set(1000)
            pub.max_queued_messages_set(0)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
            pub.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
            pub.loop_start()
            t = time.perf_counter()
            infos = [pub.publish(tp, pl, qos=1) for tp, pl in payloads]
            for info in infos:
                info.wait_for_publish(60)
            pub_rate = n / (time.perf_counter() - t)
            pub.disconnect()
            pub.loop_stop()
            print(
                f"published {n} telemetry windows ({size:.0f} B each, {args.devices} devices) "
                f"at {pub_rate:.0f} msg/s, QoS 1; queued for 3 consumers\n",
                flush=True,
            )

            t = time.perf_counter()
            subprocess.run(
                [*raw, "-C", str(n), "-W", "120"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            raw_rate = n / (time.perf_counter() - t)
            results = {name: _drain(*cmds[name], dbs[name], n, timeout=300) for name in cmds}
        print(f"{'consumer':<32} {'msg/s':>9} {'x raw':>7} {'stored':>8} {'lost':>6}")
        print(f"{'mosquitto_sub (raw broker)':<32} {raw_rate:>9.0f} {1.0:>7.2f} {'-':>8} {'-':>6}")
        ok = True
        for name, label in (("one", "ingest, 1 worker"), ("two", "ingest, 2 worker processes")):
            rate, stored = results[name]
            lost = n - stored
            print(
                f"{label + f' ({args.db})':<32} {rate:>9.0f} {rate / raw_rate:>7.2f} "
                f"{stored:>8} {lost:>6}"
            )
            ok &= lost == 0
        two = results["two"][0] / raw_rate
        ok &= two >= 0.5
        print(
            f"\nscale-out 2 vs 1 worker: {results['two'][0] / max(results['one'][0], 1e-9):.2f}x"
            f"\ntarget: 2 workers >= 0.50x raw and 0 lost: {'MET' if ok else 'NOT MET'} "
            f"({two:.2f}x)"
        )
        for db in dbs.values():
            db.dispose()
        return 0 if ok else 1
    finally:
        for url in urls:
            _drop(url)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
