#!/bin/sh
# Install the Debian packages edgefleet's demo and tests need, where missing.
set -eu
missing=""
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$missing mosquitto"
# Debian's Chromium for the dashboard's browser test (Playwright drives it; it never
# downloads a browser of its own).
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || missing="$missing chromium"
# The QEMU arm64 device (firmware_sim/qemu) and the simulator's network faults.
for tool in qemu-system-aarch64:qemu-system-arm qemu-aarch64-static:qemu-user-static \
            update-binfmts:binfmt-support mmdebstrap:mmdebstrap arch-test:arch-test \
            cpio:cpio nft:nftables ip:iproute2; do
    cmd=${tool%%:*}; pkg=${tool#*:}
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing="$missing $pkg"
done
[ -n "$missing" ] || exit 0
echo "installing Debian packages:$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
