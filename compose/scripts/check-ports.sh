#!/usr/bin/env bash
# Before `make up` starts a stopped stack: are the host ports it publishes free? A clash otherwise surfaces as
# "port is already allocated" halfway through the start. Typical culprit: the Mosquitto (1883) and InfluxDB 1.x
# (8086) that `make test` installs from apt, which their packages start again at boot.
# Usage: compose/scripts/check-ports.sh [env file]
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=${1:-$compose_dir/.env}

get() {  # value of $1 in the env file, else $2
    local value
    value=$(sed -n "s/^$1=//p" "$env_file" 2>/dev/null | tail -n 1)
    printf '%s' "${value:-$2}"
}

# Our own running containers hold these ports: nothing to check then (make up only updates the stack).
if [ -n "$(docker ps -q --filter label=com.docker.compose.project=racktwin 2>/dev/null)" ]; then
    exit 0
fi

vars=(GRAFANA_HTTP_PORT DITTO_HTTP_PORT INFLUX_HTTP_PORT)
if [ "$(get TB_MODE demo)" = external ]; then
    vars+=(MOSQUITTO_HOST_PORT)
else
    vars+=(TB_HTTP_PORT TB_MQTT_PORT)
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
