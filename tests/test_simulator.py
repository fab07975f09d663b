"""The simulator: physics of the pure hall model, scenarios, control endpoint, and the publishers
against the real Mosquitto (envelope mode feeding a real bridge, gateway mode's wire format)."""

from __future__ import annotations

import json
import statistics
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from bridge.config import Settings, load_settings
from bridge.decode import decode
from bridge.mapping import Mapper
from bridge.simulator import hall as model
from bridge.simulator.publish import GatewayPublisher
from bridge.simulator.run import ScenarioBoard, control_server, run
from bridge.twin import dew_point
from tests.harness.mqtt import wait_until

DAY0 = 1_790_000_000 - (1_790_000_000 % 86400)  # a UTC midnight


@pytest.fixture(scope="module")
def hall() -> model.Hall:
    return model.build_hall(racks=40, rooms=2, rows=4, seed=7)


def day_samples(hall, step_s=900):
    return [(ts, model.sample(hall, ts)) for ts in range(DAY0, DAY0 + 86400, step_s)]


def test_layout_names_and_mapping(hall):
    assert len(hall.racks) == 40 and [r.name for r in hall.rooms] == ["hall1", "hall2"]
    assert hall.racks[0].name == "hall1-a01" and hall.racks[-1].name == "hall2-d05"
    settings = Settings(mapping={"device_pattern": model.DEVICE_PATTERN})
    location, _ = Mapper(settings).locate("hall2-c04")
    assert (location.room, location.row, location.rack) == ("hall2", "c", "hall2-c04")
    uneven = model.build_hall(racks=10, rooms=1, rows=3)
    assert [sum(r.row == w for r in uneven.racks) for w in "abc"] == [4, 3, 3]


def test_readings_look_like_a_real_cold_aisle(hall):
    samples = day_samples(hall)
    bottoms = [v["tempBottom"] for _, s in samples for v in s.values()]
    tops = [v["tempTop"] for _, s in samples for v in s.values()]
    hums = [v[k] for _, s in samples for v in s.values() for k in ("humidityTop", "humidityBottom")]
    assert 19.5 <= min(bottoms) and max(bottoms) <= 23.0
    assert 20.0 <= statistics.mean(bottoms) <= 22.0
    assert max(tops) < 27.0  # healthy hall: no alert without a scenario
    assert 35.0 <= min(hums) and max(hums) <= 56.0 and 40.0 <= statistics.mean(hums) <= 50.0
    # dew point consistent across positions: same air, different temperature
    v = samples[0][1]["hall1-a03"]
    assert abs(dew_point(v["tempTop"], v["humidityTop"]) - dew_point(v["tempBottom"], v["humidityBottom"])) < 0.8


def test_top_is_warmer_than_bottom_by_a_rack_specific_amount(hall):
    samples = day_samples(hall)
    gaps = {r.name: [s[r.name]["tempTop"] - s[r.name]["tempBottom"] for _, s in samples] for r in hall.racks}
    assert all(statistics.mean(g) > 0.4 for g in gaps.values())
    positive = sum(x > 0 for g in gaps.values() for x in g) / sum(len(g) for g in gaps.values())
    assert positive > 0.99
    means = [statistics.mean(g) for g in gaps.values()]
    assert max(means) - min(means) > 1.0  # racks differ
    ends = statistics.mean(statistics.mean(gaps[r.name]) for r in hall.racks if r.position_in_row in (1, 5))
    middles = statistics.mean(statistics.mean(gaps[r.name]) for r in hall.racks if r.position_in_row == 3)
    assert ends > middles  # row ends recirculate more


def test_daily_drift_noise_and_determinism(hall):
    def mean_bottom(ts):
        return statistics.mean(v["tempBottom"] for v in model.sample(hall, ts).values())
    assert mean_bottom(DAY0 + 16 * 3600) - mean_bottom(DAY0 + 4 * 3600) > 0.4
    series = [model.reading(hall, "hall1-b02", DAY0 + 36000 + i)["tempBottom"] for i in range(60)]
    assert 0.02 < statistics.pstdev(series) < 0.3  # noisy, but only sensor noise within a minute
    assert model.sample(hall, DAY0 + 123.4) == model.sample(hall, DAY0 + 123.4)
    other = model.build_hall(racks=40, rooms=2, rows=4, seed=8)
    assert model.sample(other, DAY0 + 123.4) != model.sample(hall, DAY0 + 123.4)


def at(hall, spec, start, minutes):
    scenario = model.parse_scenario(spec, hall, start)
    return model.sample(hall, start + minutes * 60, [scenario]), model.sample(hall, start + minutes * 60)


def test_cooling_failure_warms_one_room_steadily(hall):
    start = DAY0 + 10 * 3600
    with_fault, normal = at(hall, "cooling_failure:hall1", start, 20)
    for rack in hall.racks:
        rise = with_fault[rack.name]["tempBottom"] - normal[rack.name]["tempBottom"]
        if rack.room == "hall1":
            assert 4.0 < rise < 6.0
            assert with_fault[rack.name]["humidityBottom"] < normal[rack.name]["humidityBottom"]  # warmer air, lower RH
        else:
            assert abs(rise) < 0.01
    assert max(v["tempTop"] for k, v in with_fault.items() if k.startswith("hall1")) > 27.0  # fires the alert
    earlier, _ = at(hall, "cooling_failure:hall1", start, 10)
    assert statistics.mean(v["tempBottom"] for k, v in earlier.items() if k.startswith("hall1")) < \
        statistics.mean(v["tempBottom"] for k, v in with_fault.items() if k.startswith("hall1"))


def test_hotspot_raises_the_top_of_one_rack(hall):
    start = DAY0 + 10 * 3600
    with_fault, normal = at(hall, "hotspot:hall1-b03", start, 15)
    assert with_fault["hall1-b03"]["tempTop"] - normal["hall1-b03"]["tempTop"] > 6.0
    assert with_fault["hall1-b03"]["tempTop"] > 27.0
    assert with_fault["hall1-b03"]["tempBottom"] - normal["hall1-b03"]["tempBottom"] < 1.0
    assert all(with_fault[k] == normal[k] for k in normal if k != "hall1-b03")
    before, _ = at(hall, "hotspot:hall1-b03@600", start, 5)  # not started yet
    assert before["hall1-b03"] == model.sample(hall, start + 300)["hall1-b03"]


def test_silent_and_stuck_sensors(hall):
    start = DAY0 + 3600
    gone, _ = at(hall, "silent:hall2-a01", start, 1)
    assert "hall2-a01" not in gone and len(gone) == 39
    half, _ = at(hall, "silent:hall2-a01/top", start, 1)
    assert set(half["hall2-a01"]) == {"tempBottom", "humidityBottom"}
    stuck = model.parse_scenario("stuck:hall1-a02", hall, start)
    tops = {model.reading(hall, "hall1-a02", start + m * 60, [stuck])["tempTop"] for m in range(0, 30, 3)}
    bottoms = {model.reading(hall, "hall1-a02", start + m * 60, [stuck])["tempBottom"] for m in range(0, 30, 3)}
    assert len(tops) == 1 and len(bottoms) > 5


def test_humidity_excursion_crosses_rh_and_dew_point_limits(hall):
    start = DAY0 + 3600
    with_fault, normal = at(hall, "humidity_excursion:hall2", start, 20)
    for name, v in with_fault.items():
        if name.startswith("hall2"):
            assert v["humidityBottom"] > 70.0 and dew_point(v["tempBottom"], v["humidityBottom"]) > 15.0
            assert abs(v["tempBottom"] - normal[name]["tempBottom"]) < 0.01
        else:
            assert v == normal[name]


def test_scenario_specs_are_validated(hall):
    assert model.parse_scenario("hotspot", hall, 0).target == "hall1-a03"
    assert model.parse_scenario("cooling-failure", hall, 100).target == "hall1"
    assert model.parse_scenario("stuck:hall1-a01/bottom@30", hall, 100).start_ts == 130
    for bad in ("meteor", "hotspot:hall9-z99", "cooling_failure:hall1-a01", "silent:hall1-a01/side", "hotspot@soon"):
        with pytest.raises(model.ScenarioError):
            model.parse_scenario(bad, hall, 0)


def test_control_endpoint_switches_scenarios_at_run_time(hall):
    board = ScenarioBoard(hall)
    server = control_server(board, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/scenarios"
    try:
        assert requests.post(base, data="hotspot:hall1-a02").status_code == 201
        assert requests.post(base, json={"scenario": "cooling_failure:hall2@60"}).status_code == 201
        assert requests.post(base, data="volcano").status_code == 400
        listed = requests.get(base).json()
        assert {a["scenario"] for a in listed["active"]} == {"hotspot:hall1-a02", "cooling_failure:hall2"}
        assert "humidity_excursion" in listed["available"]
        assert requests.delete(base + "/hotspot:hall1-a02").json() == {"stopped": 1}
        assert [s.label() for s in board.active()] == ["cooling_failure:hall2"]
        assert requests.delete(base).json() == {"stopped": 1} and board.active() == []
    finally:
        server.shutdown()
        server.server_close()


# -- publishers against the real broker ------------------------------------------------------------------


class Collector:
    def __init__(self, port: int, topic: str):
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=uuid.uuid4().hex)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_envelope_mode_feeds_the_bridge_end_to_end(bridge_env, monkeypatch, ditto, influxd, influx_db):
    from bridge.service import Bridge

    prefix = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("/#")
    env = {**bridge_env, "RACKTWIN_SIM_MODE": "envelope", "RACKTWIN_SIM_RACKS": "6", "RACKTWIN_SIM_ROOMS": "1",
           "RACKTWIN_SIM_ROWS": "2", "RACKTWIN_SIM_CONTROL_PORT": "0", "RACKTWIN_SIM_INTERVAL_S": "0.2", "RACKTWIN_TB_TOPIC_PREFIX": prefix}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("RACKTWIN_CONFIG", "")
    settings = load_settings(mapping={"device_pattern": model.DEVICE_PATTERN, "default_site": "site1"})
    bridge = Bridge(settings)
    bridge.start()
    try:
        wait_until(bridge.source.connected.is_set, what="bridge connected")
        assert run(settings, ["hotspot:hall1-a02@-900"], ticks=2) == 0
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 24, what="24 points")
        tid = "dc.test:hall1-b03"
        wait_until(lambda: "tempTop" in ditto.things.get(tid, {}).get("features", {}).get("environment", {})
                   .get("properties", {}), what="twin values")
        assert ditto.things[tid]["attributes"]["room"] == "hall1" and ditto.things[tid]["attributes"]["row"] == "b"
        props = {n: ditto.things[f"dc.test:{n}"]["features"]["environment"]["properties"]
                 for n in ("hall1-a01", "hall1-a02")}
        wait_until(lambda: all("deltaT" in p for p in props.values()), what="deltaT")
        assert props["hall1-a02"]["deltaT"] > props["hall1-a01"]["deltaT"] + 4  # the hotspot is visible
    finally:
        bridge.stop()


def test_gateway_mode_speaks_the_thingsboard_gateway_api(mosquitto, hall):
    collector = Collector(mosquitto.port, "v1/gateway/#")
    names = [r.name for r in hall.racks]
    publisher = GatewayPublisher("127.0.0.1", mosquitto.port, "gw-token", names)
    try:
        assert publisher.connected.wait(5)
        readings = model.sample(hall, DAY0)
        for info in publisher.publish(1_790_000_000_000, readings):
            info.wait_for_publish(5)
        wait_until(lambda: sum(t == "v1/gateway/telemetry" for t, _ in collector.messages) == 1, what="telemetry")
    finally:
        publisher.close()
        collector.close()
    connects = [json.loads(p) for t, p in collector.messages if t == "v1/gateway/connect"]
    assert connects == [{"device": n, "type": "rack-sensor"} for n in names]
    body = json.loads(next(p for t, p in collector.messages if t == "v1/gateway/telemetry"))
    assert set(body) == set(names)  # 40 devices, one message (chunk of 50)
    assert body["hall1-a01"] == [{"ts": 1_790_000_000_000, "values": readings["hall1-a01"]}]
    # The bridge's decoder reads the same document as gateway form.
    groups = decode("x/gateway", json.dumps(body).encode(), 0, 1 << 20)
    assert {g.device for g in groups} == set(names)


def test_device_mode_provisions_thingsboard_and_uses_each_device_token(mosquitto, monkeypatch):
    from tests.doubles.thingsboard import ThingsBoardDouble

    double = ThingsBoardDouble().start()
    collector = Collector(mosquitto.port, "v1/devices/me/telemetry")
    try:
        double.add_device("hall1-a02", "rack-sensor", token="preexisting-token")
        monkeypatch.delenv("RACKTWIN_CONFIG", raising=False)
        settings = load_settings(tb_url=double.url, tb_username=double.username, tb_password=double.password,
                                 sim_mode="device", sim_racks=3, sim_rooms=1, sim_rows=1, sim_control_port=0,
                                 sim_tb_mqtt_host="127.0.0.1", sim_tb_mqtt_port=mosquitto.port)
        assert run(settings, [], ticks=1) == 0
        wait_until(lambda: len(collector.messages) == 3, what="one message per device")
        assert sorted(d.name for d in double.devices.values()) == ["hall1-a01", "hall1-a02", "hall1-a03"]
        assert all(d.type == "rack-sensor" for d in double.devices.values())
        attrs = {k: v for k, (_, v) in double.attributes[double.device_id("hall1-a03")].items()}
        assert attrs == {"site": "site1", "room": "hall1", "row": "a", "positionInRow": 3}
        body = json.loads(collector.messages[0][1])
        assert set(body) == {"ts", "values"} and set(body["values"]) == {"tempTop", "tempBottom", "humidityTop",
                                                                         "humidityBottom"}
        # A second start provisions nothing new.
        writes = len(double.writes)
        assert run(settings, [], ticks=1) == 0
        assert len(double.writes) == writes
        double.assert_no_violations()
    finally:
        collector.close()
        double.stop()
