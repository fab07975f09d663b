#!/usr/bin/env bash
# Checks before `make up`, so a failure names its cause instead of surfacing halfway through the start:
# - Buildx: `make up` builds the bridge image, and Compose releases since late 2025 refuse to build without
#   the Buildx plugin 0.17+ ("compose build requires buildx 0.17.0 or later"). Older ones do not need it, so
#   this only warns.
# - Ports, when the stack is not running: are the host ports it publishes free? Typical culprit: the Mosquitto
#   (1883) and InfluxDB 1.x (8086) that `make test` installs from apt, if their services are enabled.
# - Permissions: the containers read the configuration bind-mounted from compose/ as non-root users (Grafana,
#   ThingsBoard, the Ditto gateway, nginx workers). A clone made under umask 077 gives files they cannot read;
#   most then fail to start, the Ditto gateway ignores an unreadable extension file (HOCON includes are
#   optional) and never reports healthy.
# Usage: compose/scripts/preflight.sh [env file]
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=${1:-$compose_dir/.env}

# shellcheck source=lib.sh
source "$compose_dir/scripts/lib.sh"
get() { env_get "$env_file" "$@"; }  # value of $1 in the env file, else $2

buildx=$(docker buildx version 2>/dev/null | awk '{print $2}' | sed 's/^v//' || true)
if [ -z "$buildx" ] || version_before "$buildx" 0 17; then
    echo "Warning: Docker Buildx ${buildx:-is not installed}${buildx:+ is older than 0.17}; newer Compose releases need" \
         "Buildx 0.17+ to build the bridge image (package docker-buildx-plugin)." >&2
fi

mounted=("$compose_dir/thingsboard" "$compose_dir/mosquitto" "$compose_dir/ditto" "$compose_dir/grafana")
unreadable=$(find "${mounted[@]}" \( \( -type f ! -perm -o=r \) -o \( -type d ! -perm -o=rx \) \) -print)
if [ -n "$unreadable" ]; then
    echo "These files are mounted into the containers but only their owner may read them:" >&2
    echo "$unreadable" | sed 's/^/  /' >&2
    echo "Fix: chmod -R o+rX ${mounted[*]}" >&2
    exit 1
fi

# Our own running containers hold these ports: nothing to check then (make up only updates the stack).
if [ -n "$(docker ps -q --filter label=com.docker.compose.project=racktwin 2>/dev/null)" ]; then
    exit 0
fi

vars=(GRAFANA_HTTP_PORT DITTO_HTTP_PORT INFLUX_HTTP_PORT)
if [ "$(get TB_MODE demo)" = external ]; then
    vars+=(MOSQUITTO_HOST_PORT)
else
    vars+=(TB_HTTP_PORT TB_MQTT_PORT SIM_CONTROL_PORT)
fi

taken=0
for var in "${vars[@]}"; do
    port=$(get "$var" "")
    [ -n "$port" ] || continue
    # Anything accepting a connection on loopback would collide with our binding of the same port.
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "Port $port ($var in compose/.env) is already in use by another program." >&2
        taken=1
    fi
done
if [ "$taken" = 1 ]; then
    echo "Change those ports in compose/.env, or stop what holds them (find it with: sudo ss -ltnp)." >&2
    echo "If 'make test' installed mosquitto or influxdb here: sudo systemctl disable --now mosquitto influxdb" >&2
    exit 1
fi
