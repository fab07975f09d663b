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


@pytest.mark.slow
def test_process_delivers_survives_restart_and_exits_cleanly(bridge_env, publisher, ditto, influxd, influx_db,
                                                             tmp_path):
    prefix = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    bridge = BridgeProcess(bridge_env, tmp_path / "bridge.log").start()
    now = int(time.time() * 1000)
    try:
        publisher.publish_all([
            (prefix + "rack-e1", reading("rack-e1", now - 3000, 26.0, 21.0)),
            (prefix + "rack-e1", b'{"deviceName": "rack-e1", "values": {"tempTop": "n/a"}}'),
            (prefix + "rack-e2", reading("rack-e2", now - 3000, 24.0, 20.0)),
        ])
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 4, what="4 points")
        rows = influxd.rows('SELECT temperature, humidity, dew_point FROM rack_environment WHERE rack = \'rack-e1\' '
                            "GROUP BY position", influx_db)
        assert {r["position"]: (r["time"], r["temperature"], r["humidity"], r["dew_point"]) for r in rows} == {
            "top": (now - 3000, 26.0, 40.0, dew_point(26.0, 40.0)),
            "bottom": (now - 3000, 21.0, 50.0, dew_point(21.0, 50.0)),
        }
        wait_until(lambda: ditto.things.get("dc.test:rack-e2", {}).get("features", {}).get("environment", {})
                   .get("properties", {}).get("deltaT") == 4.0, what="twin rack-e2")
        assert 'racktwin_messages_rejected_total{reason="non_numeric"} 1.0' in bridge.metrics()
        assert bridge.terminate() == 0
        assert "stopped" in bridge.log()

        # Published while the bridge is away: the broker keeps them for our persistent session.
        publisher.publish_all([(prefix + "rack-e1", reading("rack-e1", now - 1000, 27.0, 21.5))])
        time.sleep(0.3)
        assert len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 4
        bridge.start()
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 6,
                   what="reading queued during the restart")
        wait_until(lambda: ditto.things["dc.test:rack-e1"]["features"]["environment"]["properties"]["tsTop"]
                   == iso_ms(now - 1000), what="twin updated after restart")
        assert bridge.terminate() == 0
    finally:
        bridge.kill()
