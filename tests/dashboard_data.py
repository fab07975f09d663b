"""The provisioned Grafana files, and crafted rack readings fed through the real bridge (MQTT -> bridge ->
InfluxDB + Ditto double), shared by the dashboard-query and alert-rule tests and the query bench. The bridge's forecast (bridge/forecast) turns them into
``rack_forecast`` points, published once after the history is in."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bridge.config import load_settings
from bridge.service import Bridge
from tests.harness.mqtt import Publisher, wait_until

PROVISIONING = Path(__file__).resolve().parent.parent / "provisioning" / "grafana"
# What Grafana is given: dashboards by file stem (their uid), datasources by uid, the alert rule groups.
DASHBOARDS = {p.stem: json.loads(p.read_text()) for p in sorted((PROVISIONING / "dashboards").rglob("*.json"))}
DATASOURCES = {d["uid"]: d for d in yaml.safe_load((PROVISIONING / "datasources/racktwin.yaml").read_text())["datasources"]}
DS_MIN_INTERVAL = DATASOURCES["influxdb"]["jsonData"]["timeInterval"]
RULE_GROUPS = yaml.safe_load((PROVISIONING / "alerting/rules.yaml").read_text())["groups"]
STEP_MS = 60_000  # one reading per rack per minute, the reporting interval the thresholds assume
HISTORY = 20      # minutes of history per rack

# rack -> (room, row)
RACKS = {
    "rack-a01": ("hall-1", "A"), "rack-a02": ("hall-1", "A"), "rack-a03": ("hall-1", "A"),
    "rack-a04": ("hall-1", "A"), "rack-b01": ("hall-2", "B"), "rack-b02": ("hall-2", "B"),
    "rack-b03": ("hall-2", "B"), "rack-a05": ("hall-1", "A"), "rack-b04": ("hall-2", "B"),
    "rack-b05": ("hall-2", "B"),
}
NORMAL = {"tempTop": 24.0, "tempBottom": 21.0, "humidityTop": 40.0, "humidityBottom": 45.0}
# What each rack reports (constant unless a function of the minute index i, 0 = oldest).
PROFILES = {
    "rack-a01": {},                                                    # in the envelope
    "rack-a02": {"tempTop": 29.0, "humidityTop": 35.0},                # top above recommended, 8 °C top-bottom
    "rack-a03": {},                                                    # goes silent 6 minutes ago
    "rack-a04": {"tempTop": 33.0, "humidityTop": 30.0},                # top above A1 allowable
    "rack-b01": {"humidityTop": 85.0, "humidityBottom": 60.0},         # humid top: RH > 80 %, dew point > 17 °C
    # cold, dry bottom: 14 °C (below A1's 15), RH < 8 %, dew point < -12 °C; 10 °C below its top
    "rack-b02": {"tempBottom": 14.0, "humidityBottom": 6.0},
    "rack-b03": {"tempTop": lambda i: 19.0 if i < 10 else 25.0},       # top jumps 6 °C within 15 min
    # Forecast: top +6 °C/h from 22.5 °C reaches 24.4 °C now, 27 °C in about 26 min (< 30: the alert fires);
    # bottom flat (dithering by 0.1 °C, so it is neither stuck nor rising): a forecast without a crossing.
    "rack-a05": {"tempTop": lambda i: round(22.5 + 0.1 * i, 3), "tempBottom": lambda i: 21.0 + (i % 2) * 0.1},
    # top +2 °C/h: 27 °C in about 2 h 10 min (listed as heading for trouble, no alert); bottom flat.
    "rack-b04": {"tempTop": lambda i: round(22.0 + i / 30, 3), "tempBottom": lambda i: 21.0 + (i % 2) * 0.1},
    "rack-b05": {},                                                    # stuck: the very same values every minute
}
STUCK = {"rack-b05"}
# Real sensors wander by their noise: every other rack's constant values dither by 0.05 on odd minutes from the
# newest, so the newest reading is exactly the profile's value.
DITHER = 0.05
RISING_FAST, RISING_SLOW = ("rack-a05", "top"), ("rack-b04", "top")
FLAT = [("rack-a05", "bottom"), ("rack-b04", "bottom")]
SILENT_FROM_MINUTE = {"rack-a03": HISTORY - 6}
# Stuck and silent sensors get no forecast; every other position does (most with a flat trend). rack-b03's top
# repeats 25.0 exactly since its step (no dither), so the forecast holds it back as stuck for now.
FORECAST_POSITIONS = [(rack, position) for rack in RACKS if rack not in STUCK and rack not in SILENT_FROM_MINUTE
                      for position in ("top", "bottom") if (rack, position) != ("rack-b03", "top")]


@dataclass
class Fed:
    now_ms: int
    instance: str
    namespace: str
    points: int
    forecast_ms: int  # when the bridge published the forecasts (their timestamp)


def bridge_env_with_racks(bridge_env: dict[str, str]) -> dict[str, str]:
    mapping = {"racks": {rack: {"site": "site1", "room": room, "row": row} for rack, (room, row) in RACKS.items()}}
    # Forecasts are published by hand (publish_once) once the whole history is in, not while it streams.
    return dict(bridge_env, RACKTWIN_MAPPING=json.dumps(mapping), RACKTWIN_FORECAST_PUBLISH_INTERVAL_S="3600")


def messages(now_ms: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(HISTORY):
        ts = now_ms - (HISTORY - 1 - i) * STEP_MS - 2000
        for rack, profile in PROFILES.items():
            if i >= SILENT_FROM_MINUTE.get(rack, HISTORY):
                continue
            dither = 0.0 if rack in STUCK else ((HISTORY - 1 - i) % 2) * DITHER
            values = {k: (v(i) if callable(v) else round(v + dither, 3)) for k, v in {**NORMAL, **profile}.items()}
            out.append((rack, {"deviceName": rack, "deviceType": "rack-sensor", "ts": ts, "values": values}))
    return out


def feed_through_bridge(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto,
                        stats_bucket_ms: int | None = None) -> Fed:
    """Publish the crafted history, wait until both sinks hold it, stop the bridge.

    ``stats_bucket_ms``: also wait until the bridge's stats cover two such time buckets, so that rates
    (derivatives between buckets) have something to show."""
    env = bridge_env_with_racks(bridge_env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bridge = Bridge(load_settings())
    bridge.start()
    publisher = Publisher(mosquitto.port)
    try:
        wait_until(bridge.source.connected.is_set, what="bridge connected to MQTT")
        now_ms = int(time.time() * 1000)
        batch = messages(now_ms)
        prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
        publisher.publish_all([(prefix + rack, payload) for rack, payload in batch])
        expected = 2 * len(batch)  # a top and a bottom point per message
        wait_until(lambda: influxd.rows('SELECT count("temperature") FROM "rack_environment"', influx_db)
                   and influxd.rows('SELECT count("temperature") FROM "rack_environment"', influx_db)[0]["count"]
                   == expected, timeout=30, what=f"{expected} points in InfluxDB")
        # The real publisher: tracker -> forecast_line -> the bridge's Influx writer (a few seconds after the
        # newest reading, as every 30 s in production).
        alive = len(FORECAST_POSITIONS)
        wait_until(lambda: sum(f.status == "ok" for f in bridge.forecast.forecasts(time.time())) >= alive,
                   what="tracker fed")
        forecast_ms = int(time.time() * 1000)
        published = bridge.forecast_publisher.publish_once(forecast_ms / 1000)
        assert published.lines >= alive, published
        wait_until(lambda: len(influxd.rows('SELECT "level_c" FROM "rack_forecast"', influx_db)) == published.lines,
                   what="forecast points in InfluxDB")
        namespace = env["RACKTWIN_DITTO_NAMESPACE"]
        wait_until(lambda: all(f"{namespace}:{r}" in ditto.things for r in RACKS), what="all twins")
        # at least two stats rows after the backlog, so "last" sees the final counters and lag
        wait_until(lambda: len(influxd.rows('SELECT "ready" FROM "racktwin_bridge"', influx_db)) >= 3,
                   what="bridge stats")
        if stats_bucket_ms:
            def two_buckets() -> bool:
                times = [r["time"] for r in influxd.rows('SELECT "ready" FROM "racktwin_bridge"', influx_db)]
                return times[0] // stats_bucket_ms != times[-1] // stats_bucket_ms
            wait_until(two_buckets, timeout=stats_bucket_ms / 1000 + 5, what="bridge stats in two buckets")
        return Fed(now_ms, env["RACKTWIN_MQTT_CLIENT_ID"], namespace, expected, forecast_ms)
    finally:
        publisher.close()
        bridge.stop()
