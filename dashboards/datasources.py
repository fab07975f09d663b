"""Provisioned datasources with fixed uids; secrets only as ${ENV} references resolved by Grafana at load."""

from __future__ import annotations

from .common import DITTO_BASE_URL, DITTO_UID, INFLUX_UID


def datasources_file() -> dict:
    return {"apiVersion": 1, "prune": True, "datasources": [
        {
            # InfluxQL over the v1 /query endpoint: InfluxDB 1.8+, 2.x (automatic DBRP mapping: bucket = db)
            # and 3; the token goes in an Authorization header, so no user/password.
            "name": "InfluxDB (RackTwin)", "type": "influxdb", "uid": INFLUX_UID, "access": "proxy",
            "url": "http://influxdb:8086", "isDefault": True, "editable": False,
            "jsonData": {"dbName": "${INFLUX_BUCKET}", "httpMode": "POST", "timeInterval": "10s",
                         "httpHeaderName1": "Authorization"},
            "secureJsonData": {"httpHeaderValue1": "Token ${GRAFANA_INFLUX_TOKEN}"},
        },
        {
            # Ditto's HTTP API through its nginx, as the read-only user 'grafana' (policy entry 'reader').
            "name": "Ditto (RackTwin)", "type": "yesoreyeram-infinity-datasource", "uid": DITTO_UID,
            "access": "proxy", "url": DITTO_BASE_URL, "basicAuth": True, "basicAuthUser": "grafana",
            "editable": False,
            "jsonData": {"auth_method": "basicAuth", "allowedHosts": [DITTO_BASE_URL], "timeoutInSeconds": 30},
            "secureJsonData": {"basicAuthPassword": "${DITTO_GRAFANA_PASSWORD}"},
        },
    ]}


# The wall is for anyone in front of the NOC screen (anonymous Viewer); rack detail and bridge health are for
# people who log in. Grafana grants per folder, so they live in two: the wall shares "RackTwin" with the alert
# rules (by title, as rules.yaml names it), which the wall's alert count must be able to read; the other folder
# has a fixed uid, so compose/grafana/entrypoint.sh can take the Viewer role off it.
WALL_FOLDER = "RackTwin"
OPERATIONS_FOLDER, OPERATIONS_FOLDER_UID = "RackTwin operations", "racktwin-operations"
WALL_DIR, OPERATIONS_DIR = "dashboards/wall", "dashboards/operations"  # relative to the provisioning root


def dashboard_provider_file() -> dict:
    common = {"orgId": 1, "type": "file", "disableDeletion": True, "allowUiUpdates": False,
              "updateIntervalSeconds": 60}
    return {"apiVersion": 1, "providers": [
        {"name": "racktwin-wall", "folder": WALL_FOLDER, **common,
         "options": {"path": f"/etc/grafana/provisioning/{WALL_DIR}", "foldersFromFilesStructure": False}},
        {"name": "racktwin-operations", "folder": OPERATIONS_FOLDER, "folderUid": OPERATIONS_FOLDER_UID, **common,
         "options": {"path": f"/etc/grafana/provisioning/{OPERATIONS_DIR}", "foldersFromFilesStructure": False}},
    ]}
