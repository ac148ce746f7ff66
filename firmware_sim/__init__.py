"""Simulated devices and fleets, fault injection, the QEMU arm64 device runner,
and the end-to-end demo."""

__all__: list[str] = []
