"""The typed config: env, YAML and secret files; unknown keys and bad values stop start-up by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bridge.config import ConfigError, effective_config, load_settings

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(__import__("os").environ):
        if key.upper().startswith("RACKTWIN_"):
            monkeypatch.delenv(key)


def test_defaults_are_valid():
    s = load_settings()
    assert s.mqtt_topic == "racktwin/telemetry/#"
    assert s.policy_id == "dc.site1:racktwin"
    assert s.subscription_topic == "racktwin/telemetry/#"


def test_env_overrides_and_shared_subscription(monkeypatch):
    monkeypatch.setenv("RACKTWIN_MQTT_SHARED_GROUP", "bridges")
    monkeypatch.setenv("RACKTWIN_MQTT_PORT", "1884")
    s = load_settings()
    assert s.mqtt_port == 1884
    assert s.subscription_topic == "$share/bridges/racktwin/telemetry/#"


@pytest.mark.parametrize("name, value", [("MAPPING", "{bad"), ("DITTO_POLICY_SUBJECTS", "[1,")])
def test_json_that_does_not_parse_names_its_variable_without_a_traceback(monkeypatch, name, value):
    monkeypatch.setenv("RACKTWIN_" + name, value)
    with pytest.raises(ConfigError, match=rf"{name.lower()} \(env RACKTWIN_{name}\): not valid JSON \(Expecting"):
        load_settings()


def test_unknown_env_key_is_named(monkeypatch):
    monkeypatch.setenv("RACKTWIN_MQTT_HOTS", "x")
    with pytest.raises(ConfigError, match="RACKTWIN_MQTT_HOTS: unknown setting"):
        load_settings()


def test_variables_of_the_projects_other_tools_do_not_stop_the_bridge(monkeypatch):
    """The dashboard generator, compose and the tests read RACKTWIN_* names of their own; one shell may export them."""
    import re
    from pathlib import Path

    from bridge.config import OTHER_TOOLS_ENV, _field_of_env

    repo = Path(__file__).resolve().parent.parent
    read_elsewhere = set()
    for path in [*repo.glob("dashboards/*.py"), repo / "compose" / "docker-compose.yml", *repo.glob("tests/**/*.py")]:
        read_elsewhere |= set(re.findall(r"RACKTWIN_([A-Z0-9_]+[A-Z0-9])", path.read_text()))
    not_settings = {n for n in read_elsewhere if _field_of_env("RACKTWIN_" + n) is None} - {"MQTT_HOTS"}
    assert not_settings and not_settings <= OTHER_TOOLS_ENV, not_settings - OTHER_TOOLS_ENV
    for name in not_settings - {"CONFIG"}:  # CONFIG is the bridge's own: the file it reads
        monkeypatch.setenv("RACKTWIN_" + name, "1")
    load_settings()


def test_a_thingsboard_profile_the_mapping_would_reject_stops_start_up(monkeypatch):
    monkeypatch.setenv("RACKTWIN_MAPPING", '{"device_types": ["rack-sensor"]}')
    monkeypatch.setenv("RACKTWIN_TB_DEVICE_PROFILE", "TH-sensor")
    assert load_settings().tb_device_profile == "TH-sensor"  # no ThingsBoard to read devices from: no conflict
    monkeypatch.setenv("RACKTWIN_TB_URL", "http://tb:8080")
    with pytest.raises(ConfigError, match=r"tb_device_profile \('TH-sensor'\) is not among mapping.device_types "
                                          r"\('rack-sensor'\)"):
        load_settings()
    monkeypatch.setenv("RACKTWIN_MAPPING", '{"device_types": ["rack-sensor", "TH-sensor"]}')
    assert load_settings().tb_device_profile == "TH-sensor"


def test_bad_value_names_field_and_env(monkeypatch):
    monkeypatch.setenv("RACKTWIN_DITTO_NAMESPACE", "1bad ns")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "ditto_namespace (env RACKTWIN_DITTO_NAMESPACE)" in str(info.value)


@pytest.mark.parametrize("value", ["-1", "3601"])
def test_the_wait_for_the_first_sync_is_bounded(monkeypatch, value):
    """Telemetry must never wait on ThingsBoard without end: no negative wait, none longer than an hour."""
    assert load_settings().sync_first_wait_s == 60.0
    monkeypatch.setenv("RACKTWIN_SYNC_FIRST_WAIT_S", value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "sync_first_wait_s (env RACKTWIN_SYNC_FIRST_WAIT_S)" in str(info.value)


def test_yaml_file_with_mapping_and_unknown_key(tmp_path, monkeypatch):
    path = tmp_path / "racktwin.yaml"
    path.write_text("mqtt_host: broker\nmapping:\n  mode: per_sensor\n"
                    "  device_pattern: '(?P<rack>.+)-(?P<position>top|bottom)'\n"
                    "  racks:\n    r1: {room: hall-1}\n")
    monkeypatch.setenv("RACKTWIN_CONFIG", str(path))
    s = load_settings()
    assert s.mqtt_host == "broker" and s.mapping.mode == "per_sensor" and s.mapping.racks["r1"].room == "hall-1"
    path.write_text("mapping:\n  racks:\n    r1: {rooom: hall-1}\n")
    with pytest.raises(ConfigError, match=r"mapping\.racks\.r1\.rooom: Extra inputs are not permitted"):
        load_settings()


def test_per_sensor_without_position_group_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("mapping:\n  mode: per_sensor\n")
    monkeypatch.setenv("RACKTWIN_CONFIG", str(path))
    with pytest.raises(ConfigError, match="position"):
        load_settings()


def test_secret_from_file_is_masked_in_effective_config(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("RACKTWIN_DITTO_PASSWORD_FILE", str(secret))
    s = load_settings()
    assert s.ditto_password.get_secret_value() == "s3cret"
    shown = json.dumps(effective_config(s))
    assert "s3cret" not in shown and effective_config(s)["ditto_password"] == "***"


def test_a_secret_set_both_directly_and_as_a_file_is_refused_naming_both(tmp_path, monkeypatch):
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.setenv("RACKTWIN_DITTO_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("RACKTWIN_DITTO_PASSWORD", "from-env")
    with pytest.raises(ConfigError, match="RACKTWIN_DITTO_PASSWORD and RACKTWIN_DITTO_PASSWORD_FILE are both set"):
        load_settings()


def test_a_busy_ops_port_stops_start_up_naming_the_setting(monkeypatch):
    import socket

    from bridge.service import Bridge

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        settings = load_settings(http_host="127.0.0.1", http_port=busy.getsockname()[1])
        with pytest.raises(ConfigError, match="http_port: cannot listen on 127.0.0.1:.*RACKTWIN_HTTP_PORT"):
            Bridge(settings)


def test_check_config_exits_2_naming_the_field():
    env = {"RACKTWIN_INFLUX_URL": "ftp://nope", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "bridge", "check-config"], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "influx_url (env RACKTWIN_INFLUX_URL): Value error, must be an http:// or https:// URL" in proc.stderr


def test_forecast_window_shorter_than_its_minimum_span_stops_start_up(monkeypatch):
    monkeypatch.setenv("RACKTWIN_FORECAST_WINDOW_S", "600")
    monkeypatch.setenv("RACKTWIN_FORECAST_MIN_SPAN_S", "900")
    with pytest.raises(ConfigError, match=r"forecast_window_s \(600 s\) is shorter than forecast_min_span_s \(900 s\)"):
        load_settings()
    monkeypatch.setenv("RACKTWIN_FORECAST_MIN_SPAN_S", "600")  # a window exactly that long can span it
    assert load_settings().forecast_min_span_s == 600


def test_forecast_window_of_fewer_than_two_buckets_stops_start_up(monkeypatch):
    # Each within its own range, but the trend window could not be built: every reading would fail.
    monkeypatch.setenv("RACKTWIN_FORECAST_WINDOW_S", "600")
    monkeypatch.setenv("RACKTWIN_FORECAST_MIN_SPAN_S", "600")
    monkeypatch.setenv("RACKTWIN_FORECAST_BUCKET_S", "400")
    with pytest.raises(ConfigError, match=r"forecast_window_s \(600 s\) must hold at least two buckets"):
        load_settings()
    monkeypatch.setenv("RACKTWIN_FORECAST_BUCKET_S", "300")
    assert load_settings().forecast_bucket_s == 300


def test_forecast_horizon_beyond_the_furthest_reported_crossing_stops_start_up(monkeypatch):
    monkeypatch.setenv("RACKTWIN_FORECAST_HORIZON_MIN", "300")
    beyond = r"forecast_horizon_min \(300 min\) is beyond forecast_max_minutes \(240 min\)"
    with pytest.raises(ConfigError, match=beyond):
        load_settings()
    monkeypatch.setenv("RACKTWIN_FORECAST_MAX_MINUTES", "300")
    assert load_settings().forecast_horizon_min == 300


def test_readiness_says_ditto_is_down_once_the_bridge_found_it_stalled():
    """A hung Ditto fails nothing until its requests time out; the stall the bridge found is the better word."""
    from bridge.service import Bridge

    bridge = Bridge(load_settings(http_port=0))
    try:
        bridge.ditto.healthy, bridge.ditto.policy_ready = True, True
        assert bridge.readiness()["ditto"] is True
        bridge.ditto._stalled = True
        assert bridge.readiness()["ditto"] is False
    finally:
        bridge.ops.server.server_close()


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "mqtt://broker", "broker:1883/x", "my broker", ""])
def test_an_mqtt_host_the_client_could_never_connect_to_is_refused_naming_the_field(host):
    with pytest.raises(ConfigError, match="mqtt_host"):
        load_settings(mqtt_host=host)


@pytest.mark.parametrize("host", ["localhost", "mosquitto", "broker.dc1.example.com", "10.0.0.5", "::1"])
def test_ordinary_mqtt_hosts_are_accepted(host):
    assert load_settings(mqtt_host=host).mqtt_host == host
