#!/bin/sh
# Grafana's provisioning files read the InfluxDB token from $GRAFANA_INFLUX_TOKEN. InfluxDB 2.x creates
# token values itself, so bootstrap writes the read-only token to a file in the racktwin-secrets volume;
# this wrapper puts it into the environment and hands over to the image's own entrypoint.
set -eu

token_file=${GRAFANA_INFLUX_TOKEN_FILE:-/run/racktwin/influx-grafana.token}
if [ -z "${GRAFANA_INFLUX_TOKEN:-}" ]; then
    if [ ! -s "$token_file" ]; then
        echo "grafana: $token_file is missing or empty: the bootstrap service creates it (make up)" >&2
        exit 1
    fi
    GRAFANA_INFLUX_TOKEN=$(cat "$token_file")
    export GRAFANA_INFLUX_TOKEN
fi

exec /run.sh "$@"
