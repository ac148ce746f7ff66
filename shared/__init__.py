"""Code that both the cloud and the device use: the wire protocol, the release
manifest, self-test and drift statistics, and the error hierarchy.

Pure: no sockets, no files, no clock. Imports on a device without TensorFlow.
"""

__all__ = ["drift", "errors", "manifest", "messages", "selftest", "topics"]
