"""Cloud settings, from the environment (``EDGEFLEET_*``) or the command line."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CloudSettings"]


class CloudSettings(BaseSettings):
    """Everything the cloud service needs to know to start."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    data_dir: Path = Field(default=Path("var/cloud"), description="keys, TUF repository, database")
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, ge=1, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: Shared-subscription group of the ingest workers (MQTT 5 ``$share/<group>/...``).
    ingest_group: str = "edgefleet-ingest"
    #: How often the service re-signs TUF metadata that is close to expiry (seconds).
    refresh_interval: float = Field(default=3600.0, gt=0)
    #: SQLAlchemy URL; default: SQLite in the data dir. PostgreSQL:
    #: ``postgresql+psycopg://user@host/db``.
    database_url: str | None = None
    #: Serve the operator API without tokens. Local experiments only: logs a warning.
    unsafe_disable_auth: bool = False
    #: Rate limit of the operator API (``/api/v1/*`` but enrollment; never ``/tuf``,
    #: ``/healthz`` or ``/metrics``): a token bucket per API token, else per source
    #: address, refilling at this many requests per second (0: no limit) ...
    api_rate_limit: float = Field(default=50.0, ge=0, le=1_000_000)
    #: ... holding this many, the requests a client may make at once.
    api_rate_burst: int = Field(default=200, ge=1, le=1_000_000)
    #: Mutual TLS to the broker (files from ``edgefleet-cloud ca init --service``):
    #: the cloud CA, and this service's certificate and key. Unset: plain MQTT
    #: (a broker on loopback for local runs only).
    broker_tls_ca: Path | None = None
    broker_tls_cert: Path | None = None
    broker_tls_key: Path | None = None
    #: With ``broker_tls_ca`` set, each ingest worker connects with its own identity,
    #: ``<dir>/<client id>.pem`` and ``.key``, from here (default: ``<data dir>/pki/
    #: services``, where ``edgefleet-cloud ca ingest`` issues them; a copy on an
    #: ingest-only host).
    broker_tls_ingest_dir: Path | None = None

    #: Also serve the TUF repository over MQTT 5 (for devices whose ``repo_url`` is
    #: ``mqtt://edgefleet-repo/``). On a secure broker this connection needs its own
    #: service identity: run ``edgefleet-cloud repo-mqtt`` with it instead.
    mqtt_repo: bool = False
    #: Fan release blobs out through the broker (``cloud.fanout``): each target is
    #: published once, retained, and the broker copies it to every device whose
    #: ``blob_source`` is ``auto`` or ``mqtt``. On a secure broker it connects as
    #: ``edgefleet-fanout`` (issued from the CA in ``<data dir>/pki``).
    fanout: bool = True
    #: Chunk size of fanned-out blobs; a chunk must fit the broker's ``max_packet_size``.
    fanout_chunk_bytes: int = Field(default=256 * 1024, ge=1024, le=1024 * 1024)

    @property
    def broker_tls(self) -> dict[str, str] | None:
        """The TLS settings in the form ``CloudMqtt(tls=...)`` takes, or ``None``."""
        if self.broker_tls_ca is None:
            return None
        tls = {"ca_file": str(self.broker_tls_ca)}
        if self.broker_tls_cert is not None:
            tls["cert_file"] = str(self.broker_tls_cert)
        if self.broker_tls_key is not None:
            tls["key_file"] = str(self.broker_tls_key)
        return tls

    # -- observability (cloud.ingest, cloud.drift_monitor, cloud.retrain) --
    #: Telemetry ingest workers this process runs (0: run ``edgefleet-cloud ingest`` apart).
    ingest_workers: int = Field(default=1, ge=0, le=64)
    #: Share group of the storing workers (apart from ``ingest_group``, which feeds the
    #: live fleet view) and the stable prefix of their client ids (persistent sessions).
    ingest_store_group: str = "edgefleet-store"
    ingest_client_prefix: str = "edgefleet-ingest"
    #: Drift is judged per window of this many seconds, once it holds enough samples.
    drift_window_seconds: float = Field(default=60.0, gt=0)
    drift_min_samples: int = Field(default=500, ge=1)
    #: Alert when ``drift_k`` of the last ``drift_m`` windows exceed the threshold.
    drift_threshold: float = Field(default=0.2, gt=0)
    drift_k: int = Field(default=2, ge=1)
    drift_m: int = Field(default=3, ge=1)
    #: Retraining job a drift alert starts (``digits-shift``, or a command); none by default.
    retrain_job: str | None = None
    retrain_canary_devices: int = Field(default=1, ge=1)

    # -- device registry and rollouts (cloud.device_registry, cloud.rollouts) --
    #: Run the rollout controller in this process (exactly one process per database).
    rollout_controller: bool = True
    #: Seconds between the controller's looks at the live rollouts.
    rollout_tick: float = Field(default=1.0, gt=0, le=60)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'edgefleet.db'}"

    @property
    def repo_dir(self) -> Path:
        return self.data_dir / "repository"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"
