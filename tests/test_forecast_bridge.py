"""The forecast wired into the running bridge: a rising rack gets a forecast in InfluxDB and in its twin."""

from __future__ import annotations

import time

from bridge.config import load_settings
from bridge.service import Bridge
from tests.harness.mqtt import Publisher, wait_until


def test_rising_rack_gets_forecast_in_influx_and_twin(bridge_env, monkeypatch, mosquitto, ditto, influxd, influx_db):
    for key, value in dict(bridge_env, RACKTWIN_FORECAST_PUBLISH_INTERVAL_S="3600").items():
        monkeypatch.setenv(key, value)
    bridge = Bridge(load_settings())
    bridge.start()
    try:
        wait_until(bridge.source.connected.is_set, what="connected")
        now = int(time.time() * 1000)
        prefix = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
        items = []
        for minute in range(20, -1, -1):  # the last 20 minutes, one report a minute
            ts = now - minute * 60_000
            rising = 24.0 + 6.0 * (20 - minute) / 60  # +6 °C/h: reaches 26 °C now, 27 °C in 10 min
            items.append((prefix + "rack-hot", {"deviceName": "rack-hot", "ts": ts,
                                                "values": {"tempTop": round(rising, 3), "tempBottom": 21.0}}))
            items.append((prefix + "rack-flat", {"deviceName": "rack-flat", "ts": ts,
                                                 "values": {"tempTop": 23.0 + (minute % 2) * 0.1, "tempBottom": 21.0}}))
        publisher = Publisher(mosquitto.port)
        publisher.publish_all(items)
        publisher.close()
        wait_until(lambda: bridge.metrics.value("racktwin_readings_accepted_total") == 4 * 21, what="readings in")
        # The forecast goes only into twins that exist: wait until the readings have created both.
        wait_until(lambda: all(ditto.things.get(f"dc.test:{rack}", {}).get("features", {}).get("environment")
                               for rack in ("rack-hot", "rack-flat")), what="both twins created")
        result = bridge.forecast_publisher.publish_once()
        assert result.heading == 1
        rows = wait_until(lambda: influxd.rows('SELECT minutes_to_recommended, trend_c_per_h FROM rack_forecast '
                                               'GROUP BY rack, position', influx_db), what="forecast points")
        hot = [r for r in rows if (r["rack"], r["position"]) == ("rack-hot", "top")]
        assert len(hot) == 1 and 8 <= hot[0]["minutes_to_recommended"] <= 12
        assert 5.0 <= hot[0]["trend_c_per_h"] <= 7.0
        assert all(r["minutes_to_recommended"] is None for r in rows if r["rack"] == "rack-flat")
        props = wait_until(lambda: ditto.things["dc.test:rack-hot"]["features"].get("forecast", {}).get("properties"),
                           what="forecast feature in the twin")
        assert 8 <= props["minutesToRecommendedTop"] <= 12
        assert "minutesToRecommendedTop" not in ditto.things["dc.test:rack-flat"]["features"]["forecast"]["properties"]
    finally:
        bridge.stop()
