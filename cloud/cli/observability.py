"""``ingest``, ``retrain``: telemetry ingest workers and retraining jobs.

``edgefleet-cloud retrain digits --shift A`` is the job behind the retrain
loop's ``digits-shift`` (``cloud.retrain``), run as a child process so
TensorFlow never loads into the service.

``edgefleet-cloud ingest --workers N`` runs N ingest workers as N processes
(Python threads would share one core), each with the stable client id
``<prefix>-<index>`` so its persistent broker session survives restarts; a
worker process that dies is restarted. Run the service with
``EDGEFLEET_INGEST_WORKERS=0`` when ingest runs apart, or give the two
different ``--client-prefix`` values.

On a mutual-TLS broker (``--broker-tls-ca`` / ``EDGEFLEET_BROKER_TLS_CA``) each
worker connects with the certificate issued for its own client id
(``edgefleet-cloud ca ingest --workers N``), found in ``--broker-tls-ingest-dir``
(default ``<data dir>/pki/services``); a missing one stops the command before
any worker starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.cli.common import local_args, settings_from

__all__ = ["register"]

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Any:
    settings = settings_from(args)
    updates: dict[str, Any] = {}
    if args.database_url:
        updates["database_url"] = args.database_url
    if args.window:
        updates["drift_window_seconds"] = args.window
    if args.broker_tls_ca:
        updates["broker_tls_ca"] = args.broker_tls_ca
    if args.broker_tls_ingest_dir:
        updates["broker_tls_ingest_dir"] = args.broker_tls_ingest_dir
    return settings.model_copy(update=updates) if updates else settings


def _run_one(args: argparse.Namespace) -> int:
    from cloud.db import Database
    from cloud.ingest import IngestPool, cached_release_lookup, worker_configs
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository
    from shared.errors import ConfigError

    settings = _settings(args)
    # First, so a missing TLS identity stops the worker before it opens anything.
    configs = worker_configs(settings, 1, first_index=args.index, client_prefix=args.client_prefix)
    db = Database(settings.db_url)
    db.create_all()
    try:
        releases = cached_release_lookup(
            ReleaseService(ReleaseRepository.open(settings.repo_dir, settings.keys_dir))
        )
    except ConfigError as e:
        log.warning("no release repository (%s): histogram shapes are not checked", e)
        releases = None
    for c in configs:
        c.batch_size = args.batch_size
    pool = IngestPool(db, configs, releases=releases)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = None
    if args.metrics_port:
        from prometheus_client import start_http_server

        from cloud.metrics import ingest_registry

        server, _ = start_http_server(
            args.metrics_port, addr=args.metrics_host, registry=ingest_registry(lambda: pool.stats)
        )
    pool.start(wait=30)
    print(
        f"ingest worker {configs[0].client_id} subscribed (group {settings.ingest_store_group})",
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            pass
    finally:
        pool.stop()
        if server is not None:
            server.shutdown()
        db.dispose()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    if args.workers == 1:
        return _run_one(args)
    from cloud.ingest import worker_configs

    # Every worker's identity is checked here, so a missing certificate is one clear
    # error rather than a child process restarted forever.
    worker_configs(
        _settings(args), args.workers, first_index=args.index, client_prefix=args.client_prefix
    )
    children: dict[int, subprocess.Popen[bytes]] = {}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def spawn(i: int) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable,
            "-m",
            "cloud.cli",
            "--log-level",
            args.log_level,
            "ingest",
            "--workers",
            "1",
            "--index",
            str(args.index + i),
            "--batch-size",
            str(args.batch_size),
        ]
        for flag, value in (
            ("--data-dir", args.data_dir),
            ("--broker-host", args.broker_host),
            ("--broker-port", args.broker_port),
            ("--database-url", args.database_url),
            ("--client-prefix", args.client_prefix),
            ("--window", args.window),
            ("--broker-tls-ca", args.broker_tls_ca),
            ("--broker-tls-ingest-dir", args.broker_tls_ingest_dir),
        ):
            if value:
                argv += [flag, str(value)]
        if args.metrics_port:
            argv += ["--metrics-port", str(args.metrics_port + i)]
        return subprocess.Popen(argv)  # noqa: S603 - our own CLI

    try:
        for i in range(args.workers):
            children[i] = spawn(i)
        while not stop.wait(1.0):
            for i, proc in list(children.items()):
                if proc.poll() is not None:
                    log.error("ingest worker %d exited with %s; restarting", i, proc.returncode)
                    time.sleep(1.0)
                    children[i] = spawn(i)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return 0


def _with_output_reference(baseline_bytes: bytes, outputs: npt.NDArray[np.int64]) -> bytes:
    """``baseline.npz`` plus ``output_counts`` (devices read only ``edges`` and ``counts``)."""
    import io

    with np.load(io.BytesIO(baseline_bytes), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["output_counts"] = outputs.astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def publish_digits_on_shift(
    data_dir: Path,
    model_name: str,
    shift: float,
    *,
    epochs: int = 8,
    variant: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the digits CNN on the original plus brightness-shifted images, calibrate,
    gate and baseline it on the shifted world, and publish it. Imports TensorFlow."""
    import dataclasses

    from cloud.pipeline.artifacts import build_artifacts
    from cloud.pipeline.digits import DigitsSplits, load_digits_splits, train_digits_cnn
    from cloud.pipeline.evaluate import Runner
    from cloud.pipeline.gate import GateConfig, run_pipeline
    from cloud.releases import ReleaseService
    from cloud.tuf_repo import ReleaseRepository

    def shifted(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out: npt.NDArray[np.float32] = np.clip(x + np.float32(shift), 0.0, 1.0).astype(np.float32)
        return out

    base = load_digits_splits(seed=seed)
    splits = DigitsSplits(
        x_train=np.concatenate([base.x_train, shifted(base.x_train)]),
        y_train=np.concatenate([base.y_train, base.y_train]),
        x_calib=shifted(base.x_calib),
        y_calib=base.y_calib,
        x_test=shifted(base.x_test),
        y_test=base.y_test,
    )
    model = train_digits_cnn(splits, epochs=epochs, seed=seed, variant=variant)
    result = run_pipeline(
        model,
        splits.x_calib,
        (splits.x_test, splits.y_test),
        mode="int8",
        gate=GateConfig(),
        seed=seed,
    )
    artifacts = build_artifacts(result, seed=seed)
    if artifacts.baseline_bytes is not None and artifacts.drift_spec_kwargs:
        n_classes = int(artifacts.drift_spec_kwargs.get("n_classes", 0))
        if n_classes:
            top1 = np.argmax(Runner(result.model_bytes).run(splits.x_calib), axis=1)
            outputs = np.bincount(top1, minlength=n_classes).astype(np.int64)
            artifacts = dataclasses.replace(
                artifacts, baseline_bytes=_with_output_reference(artifacts.baseline_bytes, outputs)
            )
    from cloud.config import CloudSettings
    from cloud.db import Database

    db = Database(CloudSettings(data_dir=data_dir).db_url)
    db.create_all()
    # With the database the release is also recorded in the model registry.
    service = ReleaseService(
        ReleaseRepository.open(data_dir / "repository", data_dir / "keys"), db=db
    )
    manifest = service.publish(model_name, artifacts, published_by="retrain-job")
    return {
        "model": manifest.model,
        "release": manifest.release,
        "shift": shift,
        "quantization": manifest.quantization,
        "size_bytes": len(artifacts.model_bytes),
        "metrics": manifest.metrics,
    }


def cmd_retrain_digits(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    out = publish_digits_on_shift(
        settings.data_dir,
        args.model_name,
        args.shift,
        epochs=args.epochs,
        variant=args.variant,
        seed=args.seed,
    )
    print(json.dumps(out), flush=True)
    return 0


def register(sub: Any) -> None:
    s = local_args(sub.add_parser("ingest", help="run telemetry ingest workers"))
    s.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    s.add_argument("--index", type=int, default=0, help="index of the first worker's client id")
    s.add_argument("--client-prefix", help="client id prefix (default edgefleet-ingest)")
    s.add_argument("--broker-host")
    s.add_argument("--broker-port", type=int)
    s.add_argument("--database-url", help="SQLAlchemy URL (default SQLite in the data dir)")
    s.add_argument("--window", type=float, help="drift window seconds (default 60)")
    s.add_argument("--batch-size", type=int, default=500)
    s.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (+index)")
    s.add_argument("--metrics-host", default="127.0.0.1")
    s.add_argument(
        "--broker-tls-ca",
        type=Path,
        help="cloud CA file: mutual TLS to the broker (env EDGEFLEET_BROKER_TLS_CA)",
    )
    s.add_argument(
        "--broker-tls-ingest-dir",
        type=Path,
        help="directory of the workers' <client id>.pem/.key (default <data dir>/pki/services)",
    )
    s.set_defaults(func=cmd_ingest)

    r = sub.add_parser("retrain", help="retraining jobs")
    rsub = r.add_subparsers(dest="kind", required=True)
    s = local_args(rsub.add_parser("digits", help="retrain the digits CNN on shifted images"))
    s.add_argument("--model-name", default="digits")
    s.add_argument("--shift", type=float, required=True, help="brightness offset of the drift")
    s.add_argument("--epochs", type=int, default=8)
    s.add_argument("--variant", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_retrain_digits)
