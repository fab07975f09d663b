#!/bin/sh
# Prepares the environment Grafana's provisioning files read, then hands over to the image's entrypoint.
# - The InfluxDB token: InfluxDB 2.x creates token values itself, so bootstrap writes the read-only token to a
#   file in the racktwin-secrets volume; it goes into $GRAFANA_INFLUX_TOKEN here.
# - Alert receivers: Grafana refuses to start when a provisioned webhook has no url or an email receiver no
#   address, so an unset ALERT_WEBHOOK_URL / ALERT_EMAIL_TO becomes a placeholder that delivers nowhere
#   (alerts still show on the wall and in Grafana's alert list).
# - Email: SMTP_HOST set switches Grafana's SMTP client on, with SMTP_USER, SMTP_PASSWORD, SMTP_FROM. It warns
#   (and starts all the same) of recipients without SMTP_HOST (no email can go out) and of SMTP_HOST without
#   SMTP_FROM (the fallback sender racktwin@localhost is refused by many relays).
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
elif [ -z "${SMTP_HOST:-}" ]; then
    echo "grafana: ALERT_EMAIL_TO is set but SMTP_HOST is empty: Grafana cannot send alert emails until SMTP_HOST (and SMTP_FROM) are set in compose/.env" >&2
fi
# The watchdog's contact point exists only where grafana-provisioning saw WATCHDOG_URL set; should Grafana be
# started alone after it was cleared, a placeholder still lets it start.
WATCHDOG_URL=${WATCHDOG_URL:-http://127.0.0.1:9/racktwin-watchdog-not-configured}
export ALERT_WEBHOOK_URL ALERT_EMAIL_TO WATCHDOG_URL

if [ -n "${SMTP_HOST:-}" ]; then
    if [ -z "${SMTP_FROM:-}" ]; then
        echo "grafana: SMTP_HOST is set but SMTP_FROM is empty: alert emails are sent from racktwin@localhost, which many relays reject; set SMTP_FROM in compose/.env" >&2
    fi
    GF_SMTP_ENABLED=true
    GF_SMTP_HOST=$SMTP_HOST
    GF_SMTP_USER=${SMTP_USER:-}
    GF_SMTP_PASSWORD=${SMTP_PASSWORD:-}
    GF_SMTP_FROM_ADDRESS=${SMTP_FROM:-racktwin@localhost}
    export GF_SMTP_ENABLED GF_SMTP_HOST GF_SMTP_USER GF_SMTP_PASSWORD GF_SMTP_FROM_ADDRESS
fi

# - Wall only for anonymous visitors: they get the Viewer role (the NOC screen needs no login), and Grafana
#   cannot provision folder permissions from files. So once Grafana answers, a background job replaces the
#   permissions of the "RackTwin operations" folder (rack detail, bridge health) with "Editors may view":
#   the Viewer role, and with it every anonymous visitor, loses it; Admins always keep access. The wall's
#   folder keeps Grafana's defaults. The request replaces rather than adds, so every start applies it again.
operations_folder=${GRAFANA_OPERATIONS_FOLDER_UID:-racktwin-operations}

http_post() {  # url json-body basic-credentials; succeeds on a 2xx answer (Alpine images: busybox wget)
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -o /dev/null -X POST -H "Authorization: Basic $3" -H "Content-Type: application/json" \
            --data "$2" "$1" 2>/dev/null
    else
        wget -q -O /dev/null --header "Authorization: Basic $3" --header "Content-Type: application/json" \
            --post-data "$2" "$1" 2>/dev/null
    fi
}

restrict_operations_folder() {
    url="${GRAFANA_API_URL:-http://127.0.0.1:3000}/api/folders/$operations_folder/permissions"
    credentials=$(printf '%s:%s' "${GF_SECURITY_ADMIN_USER:-admin}" "${GF_SECURITY_ADMIN_PASSWORD:-}" | base64 | tr -d '\n')
    body='{"items":[{"role":"Editor","permission":1}]}'
    tries=0
    # Grafana needs a while to start and to provision the folder (404 until then).
    while [ "$tries" -lt "${GRAFANA_PERMISSIONS_TRIES:-120}" ]; do
        tries=$((tries + 1))
        if http_post "$url" "$body" "$credentials"; then
            echo "grafana: folder $operations_folder (rack detail, bridge health) is for logged-in Editors and Admins; anonymous visitors see the wall"
            return 0
        fi
        sleep "${GRAFANA_PERMISSIONS_RETRY_S:-5}"
    done
    echo "grafana: could not restrict folder $operations_folder (was the admin password changed in Grafana? it must match GRAFANA_ADMIN_PASSWORD): anonymous visitors can open rack detail and bridge health" >&2
}
if [ "${GRAFANA_PERMISSIONS_TRIES:-120}" -gt 0 ]; then  # 0: leave folder permissions alone
    restrict_operations_folder &
fi

exec "${GRAFANA_RUN:-/run.sh}" "$@"
