"""The edgefleet device agent: verifies signed releases, hot-swaps LiteRT models
without dropping inferences, rolls back on its own, and reports telemetry.

Runs on a Raspberry Pi or any Linux board; never imports TensorFlow.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
