"""End to end with the bridge as its own process: publish to Mosquitto, read InfluxDB (InfluxQL) and the twin."""

from __future__ import annotations

import time

import pytest

from bridge.twin import dew_point, iso_ms
from tests.harness.mqtt import Publisher, wait_until
from tests.harness.process import BridgeProcess


def reading(device: str, ts: int, top: float, bottom: float) -> dict:
    return {"deviceName": device, "deviceType": "rack-sensor", "ts": ts,
            "values": {"tempTop": top, "tempBottom": bottom, "humidityTop": 40.0, "humidityBottom": 50.0}}


@pytest.fixture
def publisher(mosquitto):
    pub = Publisher(mosquitto.port)
    yield pub
    pub.close()


def bad_inputs(now: int) -> list[tuple[str, bytes | dict, str]]:
    """(device topic, payload, expected reject reason): every kind of bad input the bridge must refuse."""
    def env(device: str, ts: int = now, **values) -> dict:
        return {"deviceName": device, "deviceType": "rack-sensor", "ts": ts, "values": values}

    return [
        ("rack-bad", b'{"deviceName": "rack-bad", "values": {"tempTop": 2', "invalid_json"),
        ("rack-bad", b'[1, 2]', "not_object"),
        ("rack-bad", b'"just a string"', "not_object"),
        ("rack-bad", env("rack-bad", tempTop="n/a"), "non_numeric"),
        ("rack-bad", b'{"deviceName": "rack-bad", "ts": 1, "values": {"tempTop": NaN}}', "not_finite"),
        ("rack-bad", b'{"tempTop": Infinity}', "not_finite"),
        ("rack-bad", env("rack-bad", tempTop=120.0), "out_of_range"),
        ("rack-bad", env("rack-bad", humidityTop=140.0), "out_of_range"),
        ("rack-bad", env("rack-bad", now + 3_600_000, tempTop=22.0), "ts_future"),
        ("rack-bad", env("rack-bad", now - 30 * 86_400_000, tempTop=22.0), "ts_too_old"),
        ("rack-bad", b"x" * 70_000, "payload_too_large"),
        ("rack-bad", env("rack/bad", tempTop=22.0), "invalid_rack_name"),
        ("rack-bad", env("rack-bad", battery=90), "no_readings"),
    ]


@pytest.mark.slow
def test_process_delivers_survives_restart_and_exits_cleanly(bridge_env, publisher, ditto, influxd, influx_db,
                                                             tmp_path):
    env = dict(bridge_env, RACKTWIN_MAPPING='{"device_types": ["rack-sensor"]}')
    prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    now = int(time.time() * 1000)
    bad = bad_inputs(now) + [("thermo-1", {"deviceName": "thermo-1", "deviceType": "thermostat", "ts": now,
                                           "values": {"tempTop": 22.0}}, "unknown_device")]
    try:
        publisher.publish_all([
            (prefix + "rack-e1", reading("rack-e1", now - 3000, 26.0, 21.0)),
            *[(prefix + device, payload) for device, payload, _ in bad],
            (prefix + "rack-e2", reading("rack-e2", now - 3000, 24.0, 20.0)),
            (prefix + "rack e3,row=2", reading("rack e3,row=2", now - 3000, 23.0, 19.5)),  # tag escaping
        ])
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 6, what="6 points")
        rows = influxd.rows('SELECT temperature, humidity, dew_point FROM rack_environment GROUP BY rack, position',
                            influx_db)
        got = {(r["rack"], r["position"]): (r["time"], r["temperature"], r["humidity"], r["dew_point"]) for r in rows}
        assert got == {
            (rack, position): (now - 3000, temp, rh, dew_point(temp, rh))
            for rack, top, bottom in (("rack-e1", 26.0, 21.0), ("rack-e2", 24.0, 20.0), ("rack e3,row=2", 23.0, 19.5))
            for position, temp, rh in (("top", top, 40.0), ("bottom", bottom, 50.0))
        }
        wait_until(lambda: ditto.things.get("dc.test:rack-e2", {}).get("features", {}).get("environment", {})
                   .get("properties", {}).get("deltaT") == 4.0, what="twin rack-e2")
        assert ditto.things["dc.test:rack-e1"]["features"]["environment"]["properties"] == {
            "tempTop": 26.0, "tempBottom": 21.0, "humidityTop": 40.0, "humidityBottom": 50.0,
            "dewPointTop": dew_point(26.0, 40.0), "dewPointBottom": dew_point(21.0, 50.0), "deltaT": 5.0,
            "tsTop": iso_ms(now - 3000), "tsBottom": iso_ms(now - 3000), "envelope": "OK",
        }
        # Rejected messages are acknowledged at once, the good ones once both sinks confirmed: none left.
        wait_until(lambda: "racktwin_messages_in_flight 0.0" in bridge.metrics(), what="nothing in flight")
        assert sorted(ditto.things) == ["dc.test:rack e3,row=2", "dc.test:rack-e1", "dc.test:rack-e2"]
        metrics = bridge.metrics()
        expected: dict[str, int] = {}
        for _, _, reason in bad:
            expected[reason] = expected.get(reason, 0) + 1
        for reason, n in expected.items():
            assert f'racktwin_messages_rejected_total{{reason="{reason}"}} {float(n)}' in metrics, reason
        assert bridge.terminate() == 0
        assert "stopped" in bridge.log()

        # Published while the bridge is away: the broker keeps them for our persistent session.
        publisher.publish_all([(prefix + "rack-e1", reading("rack-e1", now - 1000, 27.0, 21.5))])
        time.sleep(0.3)
        assert len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 6
        bridge.start()
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 8,
                   what="reading queued during the restart")
        wait_until(lambda: ditto.things["dc.test:rack-e1"]["features"]["environment"]["properties"]["tsTop"]
                   == iso_ms(now - 1000), what="twin updated after restart")
        assert bridge.terminate() == 0
    finally:
        bridge.kill()
