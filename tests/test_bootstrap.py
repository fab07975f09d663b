"""`racktwin bootstrap` against the Ditto contract double, an InfluxDB 2.x admin double and a small
ThingsBoard auth fake: it sets up what the stack needs, and a second run changes nothing."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from bridge.bootstrap import (
    INFLUX_JOBS,
    BootstrapConfig,
    BootstrapError,
    config_from_env,
    install_thingsboard_side,
    rotate_tb_demo_passwords,
    run_bootstrap,
)
from tests.conftest import DITTO_USERS
from tests.doubles.influx_admin import InfluxAdminDouble
from tests.harness.http import send_json

ADMIN_TOKEN = "influx-admin-token-for-tests"


@pytest.fixture
def influx_admin():
    double = InfluxAdminDouble(ADMIN_TOKEN, org="racktwin", buckets=("racktwin", "other")).start()
    yield double
    double.stop()
    assert double.violations == []


def make_cfg(ditto, influx_admin, secrets_dir: Path, **over) -> BootstrapConfig:
    values = dict(
        secrets_dir=secrets_dir,
        wait_timeout_s=5,
        ditto_url=ditto.url,
        ditto_admin_password=DITTO_USERS["ditto"],
        ditto_namespace="dc.boot",
        influx_url=influx_admin.url,
        influx_admin_token=ADMIN_TOKEN,
        influx_org="racktwin",
        influx_bucket="racktwin",
        tb_mode="off",
    )
    values.update(over)
    return BootstrapConfig(**values)


def token_of(secrets_dir: Path, name: str) -> str:
    job = next(j for j in INFLUX_JOBS if j.name == name)
    return (secrets_dir / job.file_name).read_text().strip()


def test_first_run_sets_up_policy_and_scoped_tokens(ditto, influx_admin, tmp_path):
    cfg = make_cfg(ditto, influx_admin, tmp_path)
    changes = run_bootstrap(cfg)

    assert any("created policy dc.boot:racktwin" in c for c in changes)
    assert sum("created token" in c for c in changes) == 2
    policy = ditto.policies["dc.boot:racktwin"]
    subjects = {s for e in policy["entries"].values() for s in e["subjects"]}
    assert subjects == {"nginx:ditto", "nginx:bridge", "nginx:grafana"}

    bridge_token, grafana_token = token_of(tmp_path, "bridge"), token_of(tmp_path, "grafana")
    assert influx_admin.token_allows(bridge_token, "write", "racktwin")
    assert not influx_admin.token_allows(bridge_token, "read", "racktwin")
    assert not influx_admin.token_allows(bridge_token, "write", "other")
    assert influx_admin.token_allows(grafana_token, "read", "racktwin")
    assert not influx_admin.token_allows(grafana_token, "write", "racktwin")
    for job in INFLUX_JOBS:
        assert (tmp_path / job.file_name).stat().st_mode & 0o777 == 0o640


def test_second_run_changes_nothing(ditto, influx_admin, tmp_path):
    cfg = make_cfg(ditto, influx_admin, tmp_path)
    assert run_bootstrap(cfg)
    policy_before = copy.deepcopy(ditto.policies)
    files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    mutations_before = influx_admin.mutations

    assert run_bootstrap(cfg) == []

    assert ditto.policies == policy_before
    assert influx_admin.mutations == mutations_before
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files_before


def test_lost_token_file_is_replaced_and_the_old_token_revoked(ditto, influx_admin, tmp_path):
    cfg = make_cfg(ditto, influx_admin, tmp_path)
    run_bootstrap(cfg)
    old = token_of(tmp_path, "bridge")
    (tmp_path / "influx-bridge.token").unlink()

    changes = run_bootstrap(cfg)

    assert any("deleted stale token racktwin:bridge" in c for c in changes)
    assert any("created token racktwin:bridge" in c for c in changes)
    assert not any("grafana" in c for c in changes)
    new = token_of(tmp_path, "bridge")
    assert new != old
    assert not influx_admin.token_allows(old, "write", "racktwin")
    assert influx_admin.token_allows(new, "write", "racktwin")
    descriptions = [a["description"] for a in influx_admin.authorizations.values()]
    assert sorted(descriptions) == ["racktwin:bridge", "racktwin:grafana"]


def test_changed_bucket_gets_a_token_for_the_new_bucket(ditto, influx_admin, tmp_path):
    run_bootstrap(make_cfg(ditto, influx_admin, tmp_path))
    changes = run_bootstrap(make_cfg(ditto, influx_admin, tmp_path, influx_bucket="other"))
    assert sum("created token" in c for c in changes) == 2
    assert influx_admin.token_allows(token_of(tmp_path, "bridge"), "write", "other")
    assert not influx_admin.token_allows(token_of(tmp_path, "bridge"), "write", "racktwin")


def test_policy_edited_by_hand_is_put_back(ditto, influx_admin, tmp_path):
    cfg = make_cfg(ditto, influx_admin, tmp_path)
    run_bootstrap(cfg)
    url = f"{ditto.url}/api/2/policies/dc.boot:racktwin"
    admin = ("ditto", DITTO_USERS["ditto"])
    edited = requests.get(url, auth=admin, timeout=5).json()
    del edited["entries"]["reader"]
    resp = requests.put(url, json={"entries": edited["entries"]}, auth=admin, timeout=5)
    assert resp.status_code == 204, resp.text
    assert "reader" not in ditto.policies["dc.boot:racktwin"]["entries"]

    changes = run_bootstrap(cfg)

    assert changes == ["ditto: updated policy dc.boot:racktwin"]
    assert "reader" in ditto.policies["dc.boot:racktwin"]["entries"]


def test_the_policy_lets_the_bridge_write_and_grafana_read(ditto, influx_admin, tmp_path):
    run_bootstrap(make_cfg(ditto, influx_admin, tmp_path))
    thing = f"{ditto.url}/api/2/things/dc.boot:rack-a01"
    body = {"policyId": "dc.boot:racktwin", "attributes": {"rack": "rack-a01"}}
    put = requests.put(thing, json=body, auth=("bridge", DITTO_USERS["bridge"]), headers={"If-None-Match": "*"}, timeout=5)
    assert put.status_code == 201, put.text
    got = requests.get(thing, auth=("grafana", DITTO_USERS["grafana"]), timeout=5)
    assert got.status_code == 200 and got.json()["attributes"]["rack"] == "rack-a01"
    denied = requests.patch(
        thing,
        data=json.dumps({"attributes": {"rack": "x"}}),
        headers={"Content-Type": "application/merge-patch+json"},
        auth=("grafana", DITTO_USERS["grafana"]),
        timeout=5,
    )
    assert denied.status_code == 403


def test_wrong_influx_admin_token_is_named(ditto, influx_admin, tmp_path):
    cfg = make_cfg(ditto, influx_admin, tmp_path, influx_admin_token="wrong")
    with pytest.raises(BootstrapError, match="INFLUX_ADMIN_TOKEN"):
        run_bootstrap(cfg)


def test_unhealthy_product_times_out_with_its_name(ditto, influx_admin, tmp_path):
    influx_admin.healthy = False
    cfg = make_cfg(ditto, influx_admin, tmp_path, wait_timeout_s=0.1)
    with pytest.raises(BootstrapError, match=r"InfluxDB not healthy .* HTTP 503"):
        run_bootstrap(cfg)


def test_config_from_env_names_the_missing_variable():
    env = {"DITTO_URL": "http://d", "DITTO_ADMIN_PASSWORD": "x", "INFLUX_URL": "http://i", "INFLUX_ORG": "o",
           "INFLUX_BUCKET": "b", "TB_MODE": "off"}
    with pytest.raises(BootstrapError, match="INFLUX_ADMIN_TOKEN"):
        config_from_env(env)
    cfg = config_from_env({**env, "INFLUX_ADMIN_TOKEN": "t"})
    assert cfg.tb_mode == "off" and cfg.policy_id == "dc.site1:racktwin"
    external = {**env, "INFLUX_ADMIN_TOKEN": "t", "TB_MODE": "external", "TB_URL": "http://tb",
                "TB_MQTT_BROKER_HOST": "192.0.2.10"}
    with pytest.raises(BootstrapError, match="TB_TENANT_PASSWORD"):
        config_from_env(external)
    # The demo's container names left in place for an external ThingsBoard are refused, naming the variable.
    with pytest.raises(BootstrapError, match="TB_URL"):
        config_from_env({**external, "TB_URL": "http://thingsboard:8080"})
    with pytest.raises(BootstrapError, match="TB_MQTT_BROKER_HOST"):
        config_from_env({**external, "TB_MQTT_BROKER_HOST": "mosquitto"})
    ready = {**external, "TB_TENANT_PASSWORD": "p", "MQTT_TB_PASSWORD": "m"}
    assert config_from_env(ready).tb_mqtt_host == "192.0.2.10"
    # Your devices' profile reaches the installer (rule chain, profile) as the bridge's own setting.
    from bridge.bootstrap import thingsboard_settings
    assert thingsboard_settings(config_from_env(ready)).tb_device_profile == "rack-sensor"
    assert thingsboard_settings(config_from_env({**ready, "TB_DEVICE_PROFILE": "TH"})).tb_device_profile == "TH"


# --- ThingsBoard demo password rotation ------------------------------------------------------------------


class TbAuthFake:
    """ThingsBoard's /api/auth/login and /api/auth/changePassword for the demo accounts, nothing else."""

    def __init__(self):
        self.passwords = {"sysadmin@thingsboard.org": "sysadmin", "tenant@thingsboard.org": "tenant",
                          "customer@thingsboard.org": "customer"}
        self.sessions: dict[str, str] = {}
        self.changes = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path == "/api/noauth/userPasswordPolicy":
                    return self._send(200, {"minimumLength": 6})
                return self._send(404, {"message": "not found"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if self.path == "/api/auth/login":
                    user = body.get("username")
                    if fake.passwords.get(user) != body.get("password"):
                        return self._send(401, {"status": 401, "message": "Invalid username or password"})
                    token = f"jwt-{user}-{len(fake.sessions)}"
                    fake.sessions[token] = user
                    return self._send(200, {"token": token, "refreshToken": "r"})
                if self.path == "/api/auth/changePassword":
                    auth = self.headers.get("X-Authorization", "")
                    user = fake.sessions.get(auth.removeprefix("Bearer "))
                    if user is None:
                        return self._send(401, {"message": "unauthorized"})
                    if fake.passwords[user] != body.get("currentPassword"):
                        return self._send(400, {"message": "Current password doesn't match!"})
                    fake.passwords[user] = body["newPassword"]
                    fake.changes += 1
                    return self._send(200, {"token": "new", "refreshToken": "r"})
                return self._send(404, {"message": "not found"})

            def _send(self, status, body):
                send_json(self, status, body)

            def log_message(self, *args):
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tb_auth():
    fake = TbAuthFake()
    yield fake
    fake.stop()


def tb_cfg(url: str, tmp_path: Path) -> BootstrapConfig:
    return BootstrapConfig(
        secrets_dir=tmp_path, wait_timeout_s=1, ditto_url="http://unused", ditto_admin_password="x",
        ditto_namespace="dc.x", influx_url="http://unused", influx_admin_token="x", influx_org="o",
        influx_bucket="b", tb_mode="demo", tb_url=url, tb_sysadmin_password="Sys-generated-1",
        tb_tenant_password="Tenant-generated-1", tb_customer_password="Customer-generated-1",
    )


def test_demo_passwords_are_rotated_once(tb_auth, tmp_path):
    cfg = tb_cfg(tb_auth.url, tmp_path)
    session = requests.Session()
    changes = rotate_tb_demo_passwords(cfg, session)
    assert len(changes) == 3
    assert tb_auth.passwords == {"sysadmin@thingsboard.org": "Sys-generated-1",
                                 "tenant@thingsboard.org": "Tenant-generated-1",
                                 "customer@thingsboard.org": "Customer-generated-1"}
    assert rotate_tb_demo_passwords(cfg, session) == []
    assert tb_auth.changes == 3


def test_unknown_tb_password_stops_with_advice(tb_auth, tmp_path):
    tb_auth.passwords["tenant@thingsboard.org"] = "changed-by-someone"
    with pytest.raises(BootstrapError, match="tenant@thingsboard.org"):
        rotate_tb_demo_passwords(tb_cfg(tb_auth.url, tmp_path), requests.Session())


def tb_only_config(tmp_path, double, **tb) -> BootstrapConfig:
    """A bootstrap config for the ThingsBoard side alone (Ditto and InfluxDB are not called)."""
    return BootstrapConfig(
        secrets_dir=tmp_path, wait_timeout_s=1, ditto_url="http://unused", ditto_admin_password="x",
        ditto_namespace="dc.x", influx_url="http://unused", influx_admin_token="x", influx_org="o", influx_bucket="b",
        tb_url=double.url, tb_tenant_username=double.username, tb_tenant_password=double.password,
        mqtt_tb_password="tb-mqtt-secret", **tb,
    )


def test_demo_bootstrap_creates_the_simulated_racks_once(tmp_path):
    from bridge.simulator.hall import build_hall
    from tests.doubles.thingsboard import ThingsBoardDouble

    double = ThingsBoardDouble().start()
    try:
        cfg = tb_only_config(tmp_path, double, tb_mode="demo", sim_racks=12)
        first = install_thingsboard_side(cfg)
        hall = build_hall(12)
        assert sum(c.startswith("thingsboard: create device '") for c in first) == 12, first
        racks = {d.name: d for d in double.devices.values() if d.type == "rack-sensor"}
        assert set(racks) == {r.name for r in hall.racks}
        one = hall.racks[5]
        attrs = {k: v for k, (_, v) in double.attributes[racks[one.name].id.id].items()}
        assert (attrs["site"], attrs["room"], attrs["row"], attrs["positionInRow"]) == (
            hall.site, one.room, one.row, one.position_in_row)
        assert install_thingsboard_side(cfg) == []
    finally:
        double.stop()
    double.assert_no_violations()


def test_sim_racks_must_be_a_positive_number():
    env = {"DITTO_URL": "http://d", "DITTO_ADMIN_PASSWORD": "x", "INFLUX_URL": "http://i", "INFLUX_ADMIN_TOKEN": "t",
           "INFLUX_ORG": "o", "INFLUX_BUCKET": "b", "TB_MODE": "off"}
    assert config_from_env(env).sim_racks == 40
    assert config_from_env({**env, "SIM_RACKS": "7"}).sim_racks == 7
    with pytest.raises(BootstrapError, match="SIM_RACKS"):
        config_from_env({**env, "SIM_RACKS": "forty"})


def test_thingsboard_side_is_installed_once(tmp_path):
    from tests.doubles.thingsboard import ThingsBoardDouble

    double = ThingsBoardDouble().start()
    try:
        cfg = tb_only_config(tmp_path, double, tb_mode="external", tb_mqtt_host="broker.example", tb_mqtt_port=1884)
        first = install_thingsboard_side(cfg)
        assert any("create rule chain" in c for c in first), first
        chain = next(c for c in double.chains.values() if not getattr(c, "root", False))
        meta = json.dumps(double.metadata[chain.id.id].to_dict())
        assert "broker.example" in meta and "tb-mqtt-secret" in meta and '"thingsboard"' in meta
        assert install_thingsboard_side(cfg) == []
    finally:
        double.stop()
    double.assert_no_violations()
