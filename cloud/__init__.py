"""The edgefleet cloud service: model pipeline, signed releases (TUF), rollouts,
telemetry ingest and the HTTP API. The only part that imports TensorFlow."""

__version__ = "0.1.0"
__all__ = ["__version__"]
