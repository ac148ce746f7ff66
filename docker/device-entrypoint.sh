#!/bin/sh
# Provision this container as a device (once), then run its agent.
# The trust anchor (TUF root metadata) comes out of band: the cloud's data
# volume mounted read-only at /cloud, as a factory would flash it.
set -eu
ID="${EDGEFLEET_DEVICE_ID:-dev-$(hostname)}"
DATA="${EDGEFLEET_DEVICE_DATA:-/var/lib/edgefleet/$ID}"
ROOT="${EDGEFLEET_ROOT_FILE:-/cloud/repository/metadata/root.json}"

i=0
while [ ! -s "$ROOT" ]; do
  i=$((i + 1))
  if [ "$i" -gt 120 ]; then
    echo "edgefleet-device: no trust anchor at $ROOT after 120 s" >&2
    exit 1
  fi
  sleep 1
done

if [ ! -f "$DATA/agent.toml" ]; then
  edgefleet-device provision --data-dir "$DATA" --device-id "$ID" --root "$ROOT" \
    --broker-host "${EDGEFLEET_BROKER_HOST:-broker}" \
    --broker-port "${EDGEFLEET_BROKER_PORT:-1883}" \
    --repo-url "${EDGEFLEET_REPO_URL:-http://cloud:8080/tuf/}" \
    --inference-interval "${EDGEFLEET_INFERENCE_INTERVAL:-0.05}" \
    --telemetry-interval "${EDGEFLEET_TELEMETRY_INTERVAL:-5}"
fi
exec edgefleet-device --log-level "${EDGEFLEET_LOG_LEVEL:-INFO}" run --data-dir "$DATA" \
  --source "${EDGEFLEET_SOURCE:-random}"
