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
    assert 18.5 <= min(bottoms) and max(bottoms) <= 22.5
    assert 19.8 <= statistics.mean(bottoms) <= 21.5
    # Healthy hall: no alert without a scenario, and headroom under 27 °C for a failure to eat into.
    assert 23.0 < max(tops) <= 25.0
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


def test_cooling_failure_warms_one_room_at_its_rate_and_levels_off(hall):
    start = DAY0 + 10 * 3600
    with_fault, normal = at(hall, "cooling_failure:hall1", start, 60)  # default: 6 °C/h levelling off at +10
    for rack in hall.racks:
        rise = with_fault[rack.name]["tempBottom"] - normal[rack.name]["tempBottom"]
        if rack.room == "hall1":
            assert 4.0 < rise < 5.0  # 10·(1 − e^(−0.6)) = 4.5: a bit under 6 °C/h × 1 h, it is levelling off
            assert with_fault[rack.name]["humidityBottom"] < normal[rack.name]["humidityBottom"]  # warmer air, lower RH
        else:
            assert abs(rise) < 0.01

    def hottest_top(spec, minutes):
        return max(v["tempTop"] for k, v in at(hall, spec, start, minutes)[0].items() if k.startswith("hall1"))
    # A partial loss leaves time before the first top inlet passes 27 °C (the warning's room), then fires the alert.
    assert hottest_top("cooling_failure:hall1", 20) < 27.0 < hottest_top("cooling_failure:hall1", 90)
    # The rate is a parameter: a total loss (30 °C/h) gets there in a fraction of the time.
    assert hottest_top("cooling_failure:hall1,rate=30", 15) > 27.0
    slow = model.parse_scenario("cooling_failure:hall1,rate=3,rise=5", hall, start)
    assert slow.offset(start + 60) == pytest.approx(0.05, abs=0.001)  # 3 °C/h at the start
    assert slow.offset(start + 86400) == pytest.approx(5.0)  # settles at the rise
    assert slow.offset(start - 1) == 0.0


def test_hotspot_builds_up_at_the_top_of_one_rack(hall):
    start = DAY0 + 10 * 3600

    def top_rise(spec, minutes):
        with_fault, normal = at(hall, spec, start, minutes)
        return with_fault, normal, with_fault["hall1-b03"]["tempTop"] - normal["hall1-b03"]["tempTop"]
    _, _, early = top_rise("hotspot:hall1-b03", 15)
    assert 1.2 < early < 2.4  # gradual: 8 °C/h at the start, not a step
    with_fault, normal, late = top_rise("hotspot:hall1-b03", 120)
    assert late > 6.0  # most of the default +8 °C after two hours
    assert with_fault["hall1-b03"]["tempTop"] > 27.0
    assert with_fault["hall1-b03"]["tempBottom"] - normal["hall1-b03"]["tempBottom"] < 1.0
    assert all(with_fault[k] == normal[k] for k in normal if k != "hall1-b03")
    assert top_rise("hotspot:hall1-b03,rate=40,rise=4", 15)[2] > 3.0  # abrupt and smaller, on request
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
    default = model.parse_scenario("cooling_failure:hall2", hall, 0)
    assert (default.rate_c_per_h, default.rise_c) == model.RAMP_DEFAULTS["cooling_failure"]
    fast = model.parse_scenario("cooling_failure:hall2,rate=30@60", hall, 100)
    assert (fast.target, fast.start_ts, fast.rate_c_per_h, fast.rise_c) == ("hall2", 160, 30.0, 10.0)
    assert fast.label() == "cooling_failure:hall2" and fast.spec() == "cooling_failure:hall2,rate=30,rise=10"
    either_order = model.parse_scenario("hotspot:hall1-a02@-60,rise=5, rate=12", hall, 100)
    assert (either_order.start_ts, either_order.rate_c_per_h, either_order.rise_c) == (40, 12.0, 5.0)
    assert model.parse_scenario("hotspot,rate=4", hall, 0).target == "hall1-a03"
    assert model.parse_scenario("stuck:hall1-a01", hall, 0).rate_c_per_h is None
    for bad in ("meteor", "hotspot:hall9-z99", "cooling_failure:hall1-a01", "silent:hall1-a01/side", "hotspot@soon",
                "cooling_failure:hall1,rate=fast", "cooling_failure:hall1,speed=3", "hotspot,rate=-1",
                "hotspot,rise=0", "stuck:hall1-a01,rate=3"):
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
        assert run(settings, ["hotspot:hall1-a02,rate=30@-1800"], ticks=2) == 0  # an abrupt one, 30 min old
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
