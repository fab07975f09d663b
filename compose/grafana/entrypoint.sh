#!/bin/sh
# Prepares the environment Grafana's provisioning files read, then hands over to the image's entrypoint.
# - The InfluxDB token: InfluxDB 2.x creates token values itself, so bootstrap writes the read-only token to a
#   file in the racktwin-secrets volume; it goes into $GRAFANA_INFLUX_TOKEN here.
# - Alert receivers: Grafana refuses to start when a provisioned webhook has no url or an email receiver no
#   address, so an unset ALERT_WEBHOOK_URL / ALERT_EMAIL_TO becomes a placeholder that delivers nowhere
#   (alerts still show on the wall and in Grafana's alert list).
# - Email: SMTP_HOST set switches Grafana's SMTP client on, with SMTP_USER, SMTP_PASSWORD, SMTP_FROM.
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

if [ -z "${ALERT_WEBHOOK_URL:-}" ]; then
    ALERT_WEBHOOK_URL=http://127.0.0.1:9/racktwin-alert-webhook-not-configured
    echo "grafana: ALERT_WEBHOOK_URL is empty: alert webhooks go nowhere until it is set in compose/.env" >&2
fi
if [ -z "${ALERT_EMAIL_TO:-}" ]; then
    ALERT_EMAIL_TO=alert-email-not-configured@racktwin.invalid
    echo "grafana: ALERT_EMAIL_TO is empty: alert emails go nowhere until it is set in compose/.env" >&2
fi
export ALERT_WEBHOOK_URL ALERT_EMAIL_TO

if [ -n "${SMTP_HOST:-}" ]; then
    GF_SMTP_ENABLED=true
    GF_SMTP_HOST=$SMTP_HOST
    GF_SMTP_USER=${SMTP_USER:-}
    GF_SMTP_PASSWORD=${SMTP_PASSWORD:-}
    GF_SMTP_FROM_ADDRESS=${SMTP_FROM:-racktwin@localhost}
    export GF_SMTP_ENABLED GF_SMTP_HOST GF_SMTP_USER GF_SMTP_PASSWORD GF_SMTP_FROM_ADDRESS
fi

exec "${GRAFANA_RUN:-/run.sh}" "$@"
