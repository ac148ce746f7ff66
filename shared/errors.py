"""The edgefleet error hierarchy, shared by cloud and device.

The tree is split by *who is at fault*, because the handling differs:

* ``MessageError``: a peer sent a malformed or unexpected MQTT message.
  Count it, log it, drop it; never crash.
* ``ReleaseError``: the release itself is bad (fails TUF verification, has an
  invalid manifest, fails its self-test, needs something this device lacks).
  Never load it; report the reason code; keep serving the running model.
* ``TransferError``: moving bytes failed (link cut, server down, disk full).
  The release may be fine: retry later, resuming where possible.
* ``PipelineError``: the cloud could not turn a model into a release (it does
  not convert, fails the gate, calibration data has the wrong shape).
  Nothing is published.
* ``ConfigError``: a setting or file given by a person is wrong.

Every class has a stable ``code`` (snake case) that travels in MQTT events as
the machine-readable reason; the message is for humans.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EdgefleetError",
    "IncompatibleReleaseError",
    "ManifestError",
    "MessageError",
    "ModelLoadError",
    "PipelineError",
    "ReleaseError",
    "SelfTestError",
    "StorageError",
    "TransferError",
    "VerificationError",
]


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    code = "error"


class ConfigError(EdgefleetError):
    """A setting, file or command-line value given by a person is wrong."""

    code = "config_invalid"


class MessageError(EdgefleetError):
    """An MQTT message is malformed, oversized, or of an unknown schema."""

    code = "message_invalid"


class ReleaseError(EdgefleetError):
    """The release is bad; it must never be loaded. Retrying will not help."""

    code = "release_invalid"


class VerificationError(ReleaseError):
    """TUF refused the metadata or the target (signature, hash, expiry, version)."""

    code = "verification_failed"


class ManifestError(ReleaseError):
    """The signed release manifest is missing, malformed or inconsistent."""

    code = "manifest_invalid"


class IncompatibleReleaseError(ReleaseError):
    """The release needs a runtime, agent version or hardware this device lacks."""

    code = "incompatible"


class ModelLoadError(ReleaseError):
    """The verified model could not be loaded by the device's interpreter."""

    code = "model_load_failed"


class SelfTestError(ReleaseError):
    """The model loaded but its outputs on the signed vectors are out of tolerance."""

    code = "selftest_failed"


class TransferError(EdgefleetError):
    """Moving bytes failed (network, server, timeout). Safe to retry."""

    code = "transfer_failed"


class StorageError(EdgefleetError):
    """Local storage failed (disk full, permission, corrupt file)."""

    code = "storage_failed"


class PipelineError(EdgefleetError):
    """The cloud could not produce a release from the given model and data."""

    code = "pipeline_failed"
