#!/usr/bin/env bash
# Prints where the running stack is reachable and where its credentials are (never the secrets).
set -euo pipefail

compose_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_file=${1:-$compose_dir/.env}

# shellcheck source=lib.sh
source "$compose_dir/scripts/lib.sh"
get() { env_get "$env_file" "$@"; }  # value of $1 in the env file, else $2

host_of() {  # a bind address as a browsable host name; on all interfaces $2 (default localhost)
    case "$1" in
        0.0.0.0|"") printf '%s' "${2:-localhost}" ;;
        *) printf '%s' "$1" ;;
    esac
}

public=$(host_of "$(get PUBLIC_BIND_ADDRESS 0.0.0.0)")
# On all interfaces, the name README asks for in ADMIN_HOST (the dashboards link to it too).
admin=$(host_of "$(get ADMIN_BIND_ADDRESS 127.0.0.1)" "$(get ADMIN_HOST localhost)")
mode=$(get TB_MODE demo)
wall_uid=$(get GRAFANA_WALL_UID racktwin-wall)
grafana="http://$public:$(get GRAFANA_HTTP_PORT 3000)"

cat <<TEXT

RackTwin is up ($mode mode).

  Grafana NOC wall (kiosk)  $grafana/d/$wall_uid?orgId=1&kiosk&theme=dark&refresh=30s
  Grafana (admin)           $grafana/login          user $(get GRAFANA_ADMIN_USER admin), password GRAFANA_ADMIN_PASSWORD
TEXT
if [ "$mode" = demo ]; then
cat <<TEXT
  ThingsBoard               http://$admin:$(get TB_HTTP_PORT 8080)/   user $(get TB_TENANT_USERNAME tenant@thingsboard.org), password TB_TENANT_PASSWORD
                            (sysadmin@thingsboard.org: TB_SYSADMIN_PASSWORD)
  ThingsBoard MQTT          $public:$(get TB_MQTT_PORT 1883)   (device access tokens)
  Simulator scenarios       curl http://$admin:$(get SIM_CONTROL_PORT 8099)/scenarios   (README: Simulator)
TEXT
else
cat <<TEXT
  ThingsBoard               $(get TB_URL '?') (yours)
  Mosquitto for your TB     port $(get MOSQUITTO_HOST_PORT 1884) on this host, user thingsboard, password MQTT_TB_PASSWORD
TEXT
fi
cat <<TEXT
  Ditto UI                  http://$admin:$(get DITTO_HTTP_PORT 8090)/ui/?primaryEnvironmentName=racktwin&environmentsURL=/ui/racktwin-environments.json
                            user ditto, password DITTO_ADMIN_PASSWORD
  Ditto API                 http://$admin:$(get DITTO_HTTP_PORT 8090)/api/2/
  InfluxDB                  http://$admin:$(get INFLUX_HTTP_PORT 8086)/   user $(get INFLUX_ADMIN_USER admin), password INFLUX_ADMIN_PASSWORD

  The passwords are in $env_file (mode 600), e.g.: grep GRAFANA_ADMIN_PASSWORD $env_file
TEXT
