"""The QEMU arm64 device: a cached Debian arm64 guest running this checkout's agent."""

__all__: list[str] = []
