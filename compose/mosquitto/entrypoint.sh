#!/bin/sh
# Writes Mosquitto's password file from the environment (compose/.env), then runs the broker.
# The file lives in a tmpfs: hashes are rebuilt at every start and never reach a volume or the repo.
set -eu

auth_dir=${MOSQUITTO_AUTH_DIR:-/mosquitto/auth}
conf=${MOSQUITTO_CONF:-/racktwin/mosquitto.conf}
passwd="$auth_dir/passwd"

for var in MQTT_BRIDGE_PASSWORD MQTT_TB_PASSWORD MQTT_HEALTHCHECK_PASSWORD; do
    eval "value=\${$var:-}"
    if [ -z "$value" ]; then
        echo "mosquitto: $var is empty; run 'make up' (it generates compose/.env)" >&2
        exit 1
    fi
done

umask 077
mkdir -p "$auth_dir"
rm -f "$passwd"
mosquitto_passwd -c -b "$passwd" bridge "$MQTT_BRIDGE_PASSWORD"
mosquitto_passwd -b "$passwd" thingsboard "$MQTT_TB_PASSWORD"
mosquitto_passwd -b "$passwd" healthcheck "$MQTT_HEALTHCHECK_PASSWORD"
# The broker drops root for the mosquitto user before it reads the file.
if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto:mosquitto "$auth_dir" "$passwd"
fi

exec mosquitto -c "$conf"
