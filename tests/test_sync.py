"""`racktwin sync` against the ThingsBoard double, the Ditto double and the real InfluxDB."""

from __future__ import annotations

import time

import pytest
import requests

from bridge.config import MappingConfig, RackMeta, load_settings
from bridge.thingsboard.sync import SyncWorker, groups_from_timeseries, merged_mapping, run_sync
from tests.harness.mqtt import wait_until


@pytest.fixture
def settings_factory(bridge_environ, tb_double, monkeypatch):
    monkeypatch.delenv("RACKTWIN_CONFIG", raising=False)

    def make(**overrides):
        return load_settings(tb_url=tb_double.url, tb_username=tb_double.username, tb_password=tb_double.password,
                             sync_page_size=2, **overrides)
    return make


def add_rack(double, name, ts, top, bottom, attrs=None, device_type="rack-sensor"):
    double.add_device(name, device_type, attributes=attrs)
    double.add_telemetry(name, ts, {"tempTop": top, "tempBottom": bottom, "humidityTop": 41.0,
                                    "humidityBottom": 47.5, "battery": 90})


def thing(ditto, rack):
    return ditto.things.get(f"dc.test:{rack}")


def test_groups_from_timeseries_regroups_by_timestamp():
    groups = groups_from_timeseries("d", "t", {"tempTop": [{"ts": 2, "value": 25.0}, {"ts": 1, "value": 24.0}],
                                               "tempBottom": [{"ts": 1, "value": 21.0}]})
    assert [(g.ts_ms, g.values) for g in groups] == [(1, {"tempTop": 24.0, "tempBottom": 21.0}), (2, {"tempTop": 25.0})]


def test_merged_mapping_keeps_configured_values_first():
    mapping = MappingConfig(racks={"r1": RackMeta(room="from-config")})
    merged = merged_mapping(mapping, {"r1": RackMeta(site="s", room="from-tb", row="A"), "r2": RackMeta(room="x")})
    assert merged.racks["r1"] == RackMeta(site="s", room="from-config", row="A")
    assert merged.racks["r2"].room == "x"


def test_sync_pages_through_devices_creates_twins_and_backfills_latest(tb_double, ditto, settings_factory):
    now = int(time.time() * 1000) - 5000
    for i in range(1, 6):
        add_rack(tb_double, f"rack-{i:02d}", now + i, 24.0 + i, 21.0,
                 {"site": "fra1", "room": "hall-2", "row": "C", "positionInRow": i})
    add_rack(tb_double, "thermostat-1", now, 30.0, 30.0, device_type="thermostat")

    result = run_sync(settings_factory())
    assert result.devices == 5 and result.things_created == 5 and not result.errors
    pages = [q for m, q in tb_double.requests if q == "/api/tenant/devices"]
    assert len(pages) == 3  # 5 devices, 2 per page
    assert thing(ditto, "thermostat-1") is None
    t3 = thing(ditto, "rack-03")
    rack03_id = tb_double.device_id("rack-03")
    assert t3["attributes"] == {"site": "fra1", "room": "hall-2", "row": "C", "rack": "rack-03", "positionInRow": 3,
                                "tbDevices": {"bottom": "rack-03", "top": "rack-03"},
                                "tbDeviceIds": {"bottom": rack03_id, "top": rack03_id}}
    props = t3["features"]["environment"]["properties"]
    assert props["tempTop"] == 27.0 and props["tempBottom"] == 21.0 and props["deltaT"] == 6.0
    assert props["humidityBottom"] == 47.5 and "dewPointTop" in props
    assert result.racks["rack-03"] == RackMeta(site="fra1", room="hall-2", row="C", position_in_row=3)


def test_attribute_changes_reach_the_twin_and_newer_twin_values_win(tb_double, ditto, settings_factory):
    now = int(time.time() * 1000) - 60000
    add_rack(tb_double, "rack-01", now, 25.0, 21.0, {"room": "hall-1", "row": "A"})
    settings = settings_factory()
    run_sync(settings)
    assert thing(ditto, "rack-01")["attributes"]["room"] == "hall-1"

    tb_double.set_attributes("rack-01", {"room": "hall-9", "positionInRow": 4})
    # Meanwhile the bridge wrote a newer reading than ThingsBoard's latest one we will read.
    ditto.things["dc.test:rack-01"]["features"]["environment"]["properties"].update(
        {"tempTop": 26.5, "tsTop": "2999-01-01T00:00:00.000Z"})
    result = run_sync(settings)
    attrs = thing(ditto, "rack-01")["attributes"]
    assert attrs["room"] == "hall-9" and attrs["positionInRow"] == 4 and attrs["row"] == "A"
    assert result.things_updated == 1 and result.racks["rack-01"].room == "hall-9"
    assert thing(ditto, "rack-01")["features"]["environment"]["properties"]["tempTop"] == 26.5


def test_per_sensor_devices_are_placed_by_attributes(tb_double, ditto, settings_factory):
    now = int(time.time() * 1000) - 1000
    for position, temp in (("top", 26.0), ("bottom", 21.5)):
        name = f"sensor-{position}-7"
        tb_double.add_device(name, "rack-sensor", attributes={"rack": "rack-07", "position": position, "row": "B"})
        tb_double.add_telemetry(name, now, {"temperature": temp, "humidity": 45.0})
    tb_double.add_device("sensor-nowhere", "rack-sensor")
    settings = settings_factory(mapping={"mode": "per_sensor",
                                         "device_pattern": r"(?P<rack>sensor)-(?P<position>[a-z]+)-\d+"})
    result = run_sync(settings)
    t7 = thing(ditto, "rack-07")
    assert t7["attributes"]["tbDevices"] == {"bottom": "sensor-bottom-7", "top": "sensor-top-7"}
    assert t7["attributes"]["tbDeviceIds"] == {p: tb_double.device_id(f"sensor-{p}-7") for p in ("bottom", "top")}
    props = t7["features"]["environment"]["properties"]
    assert (props["tempTop"], props["tempBottom"], props["deltaT"]) == (26.0, 21.5, 4.5)
    assert any(s.startswith("sensor-nowhere") for s in result.skipped)


def test_placements_are_reported_before_the_telemetry_history_and_twins(tb_double, ditto, influxd, influx_db,
                                                                        settings_factory):
    """A bridge holding its messages for the first sync needs the placements only: they go to on_placed once every
    device's attributes are read, before any telemetry or history request (a backfill can take minutes)."""
    now = int(time.time() * 1000)
    for i in range(3):
        add_rack(tb_double, f"rack-0{i}", now - 60_000, 24.0, 20.0, attrs={"room": f"hall-{i}", "row": "B"})
    seen: list[tuple[int, dict]] = []

    def on_placed(result):
        seen.append((len(tb_double.requests), {r: m.room for r, m in result.racks.items()}))

    result = run_sync(settings_factory(sync_backfill_hours=1), on_placed=on_placed)
    [(requests_then, rooms)] = seen
    assert rooms == {"rack-00": "hall-0", "rack-01": "hall-1", "rack-02": "hall-2"}
    assert not any("timeseries" in path for _, path in tb_double.requests[:requests_then])
    assert any("timeseries" in path for _, path in tb_double.requests[requests_then:])
    assert result.racks.keys() == rooms.keys() and result.devices == 3 and result.things_created == 3


def test_history_backfill_into_influx_is_idempotent(tb_double, ditto, influxd, influx_db, settings_factory):
    now = int(time.time() * 1000)
    tb_double.add_device("rack-01", "rack-sensor", attributes={"room": "hall-1", "row": "A"})
    for minutes in (90, 60, 30):
        tb_double.add_telemetry("rack-01", now - minutes * 60000, {"tempTop": 24.0 + minutes / 30, "tempBottom": 21.0})
    tb_double.add_telemetry("rack-01", now - 5 * 3600_000, {"tempTop": 99.0, "tempBottom": 21.0})  # outside window
    settings = settings_factory(sync_backfill_hours=2)
    assert run_sync(settings).backfilled_points == 6
    run_sync(settings)
    rows = influxd.rows("SELECT temperature, room, rack, position FROM rack_environment WHERE position='top'",
                        influx_db)
    assert [r["temperature"] for r in rows] == [27.0, 26.0, 25.0]
    assert {r["room"] for r in rows} == {"hall-1"} and len(influxd.rows("SELECT * FROM rack_environment",
                                                                        influx_db)) == 6


def test_worker_picks_up_devices_added_later(tb_double, ditto, settings_factory):
    add_rack(tb_double, "rack-01", int(time.time() * 1000), 25.0, 21.0)
    results = []
    worker = SyncWorker(settings_factory(sync_interval_s=0), on_result=results.append)
    worker.start()
    try:
        wait_until(lambda: thing(ditto, "rack-01"), what="first sync")
        add_rack(tb_double, "rack-02", int(time.time() * 1000), 25.0, 21.0)
        worker.trigger()
        wait_until(lambda: thing(ditto, "rack-02"), what="device added later")
        wait_until(lambda: results and "rack-02" in results[-1].racks, what="result handed to the bridge")
    finally:
        worker.stop()


def test_bridge_places_racks_by_thingsboard_attributes(tb_double, ditto, settings_factory, mosquitto, influxd,
                                                       influx_db, bridge_env):
    """The running bridge learns site/room/row from ThingsBoard server attributes and uses them for new readings."""
    from bridge.service import Bridge
    from tests.harness.mqtt import Publisher

    now = int(time.time() * 1000)
    add_rack(tb_double, "rack-77", now - 60_000, 24.0, 20.0, attrs={"site": "fra1", "room": "hall-9", "row": "C"})
    bridge = Bridge(settings_factory(sync_interval_s=0))
    bridge.start()
    try:
        wait_until(lambda: "rack-77" in bridge.pipeline.mapper.mapping.racks, what="sync result reached the mapper")
        wait_until(bridge.source.connected.is_set, what="bridge connected")
        publisher = Publisher(mosquitto.port)
        topic = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#") + "rack-77"
        publisher.publish_all([(topic, {"deviceName": "rack-77", "ts": now, "values": {"tempTop": 25.5}})])
        publisher.close()
        rows = wait_until(lambda: influxd.rows(f"SELECT temperature FROM rack_environment WHERE time = {now}ms "
                                               "GROUP BY site, room, row", influx_db), what="point written")
        assert [(r["site"], r["room"], r["row"], r["temperature"]) for r in rows] == [("fra1", "hall-9", "C", 25.5)]
        wait_until(lambda: thing(ditto, "rack-77")["features"]["environment"]["properties"].get("tempTop") == 25.5,
                   what="twin updated")
        assert thing(ditto, "rack-77")["attributes"]["room"] == "hall-9"
    finally:
        bridge.stop()


def test_bridge_places_per_sensor_devices_by_their_rack_and_position_attributes(tb_double, ditto, settings_factory,
                                                                                 mosquitto, influxd, influx_db,
                                                                                 bridge_env):
    """Per-sensor devices whose rack and top/bottom come only from ThingsBoard attributes: live readings land
    in the twin and series sync created, not in whatever the name pattern would say."""
    from bridge.service import Bridge
    from tests.harness.mqtt import Publisher

    now = int(time.time() * 1000)
    for position in ("top", "bottom"):
        tb_double.add_device(f"probe-{position}-3", "rack-sensor", attributes={"rack": "rack-33", "position": position})
        tb_double.add_telemetry(f"probe-{position}-3", now - 60_000, {"temperature": 22.0})
    settings = settings_factory(sync_interval_s=0, mapping={
        "mode": "per_sensor", "device_pattern": r"(?P<rack>probe)-(?P<position>[a-z]+)-\d+"})
    bridge = Bridge(settings)
    bridge.start()
    try:
        wait_until(lambda: "probe-top-3" in bridge.pipeline.mapper.placements, what="placements reached the mapper")
        wait_until(bridge.source.connected.is_set, what="bridge connected")
        publisher = Publisher(mosquitto.port)
        prefix = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
        publisher.publish_all([(prefix + f"probe-{pos}-3", {"deviceName": f"probe-{pos}-3", "ts": now,
                                                             "values": {"temperature": temp, "humidity": 40.0}})
                               for pos, temp in (("top", 27.5), ("bottom", 21.0))])
        publisher.close()
        rows = wait_until(lambda: influxd.rows(f"SELECT temperature FROM rack_environment WHERE time = {now}ms "
                                               "GROUP BY rack, position", influx_db), what="points written")
        assert sorted((r["rack"], r["position"], r["temperature"]) for r in rows) == [
            ("rack-33", "bottom", 21.0), ("rack-33", "top", 27.5)]
        wait_until(lambda: thing(ditto, "rack-33")["features"]["environment"]["properties"].get("deltaT") == 6.5,
                   what="twin updated from both sensors")
        assert thing(ditto, "probe") is None  # the name pattern's rack never got a twin
        # A device added in ThingsBoard is placed at once on demand (POST /sync), not after sync_interval_s.
        tb_double.add_device("probe-top-4", "rack-sensor", attributes={"rack": "rack-44", "position": "top"})
        resp = requests.post(f"http://127.0.0.1:{bridge.ops.port}/sync", timeout=5)
        assert resp.status_code == 202
        wait_until(lambda: "probe-top-4" in bridge.pipeline.mapper.placements, what="on-demand sync")
    finally:
        bridge.stop()


def test_history_is_read_in_windows_so_no_answer_hits_thingsboards_limit(tb_double, monkeypatch):
    """ThingsBoard caps each history answer per key: a long backfill is asked for window by window, the
    windows neither overlap nor leave gaps (points exactly on a boundary come once)."""
    from bridge.thingsboard import sync
    from bridge.thingsboard.rest import ThingsBoard

    monkeypatch.setattr(sync, "BACKFILL_WINDOW_S", 3600)
    monkeypatch.setattr(sync, "HISTORY_LIMIT", 5)
    start = 1_790_000_000_000
    tb_double.add_device("rack-01", "rack-sensor")
    stamps = [start + i * 20 * 60_000 for i in range(30)]  # every 20 min for 10 h: 3 per window, some on boundaries
    for ts in stamps:
        tb_double.add_telemetry("rack-01", ts, {"tempTop": 20.0 + (ts - start) / 3_600_000})
    tb = ThingsBoard(tb_double.url, tb_double.username, tb_double.password)
    try:
        series = sync.history_series(tb, tb_double.device_id("rack-01"), ["tempTop"], start, stamps[-1])
    finally:
        tb.close()
    assert [p["ts"] for p in series["tempTop"]] == stamps


def test_backfill_cannot_reach_past_the_readings_age_limit():
    from bridge.config import ConfigError

    with pytest.raises(ConfigError, match="sync_backfill_hours .* max_age_s"):
        load_settings(sync_backfill_hours=200)  # 7 days = 168 h is the default max age
    assert load_settings(sync_backfill_hours=200, max_age_s=200 * 3600).sync_backfill_hours == 200


def leave_a_session(bridge_env) -> None:
    """Run the bridge once without ThingsBoard and stop it: the broker keeps its session and queues what comes
    while it is away, as after any restart."""
    from bridge.service import Bridge

    first = Bridge(load_settings())
    first.start()
    try:
        wait_until(first.source.connected.is_set, what="first bridge connected")
    finally:
        first.stop()


def publish_backlog(mosquitto, bridge_env, device, stamps):
    from tests.harness.mqtt import Publisher

    publisher = Publisher(mosquitto.port)
    topic = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#") + device
    publisher.publish_all([(topic, {"deviceName": device, "ts": ts, "values": {"tempTop": 20.0 + i}})
                           for i, ts in enumerate(stamps)])
    publisher.close()


def unreachable_tb_url() -> str:
    from tests.harness.services import free_port

    return f"http://127.0.0.1:{free_port()}"  # nothing listens: every sync fails at once


def test_the_backlog_after_a_restart_is_placed_by_thingsboard_not_by_the_defaults(tb_double, ditto, settings_factory,
                                                                                  mosquitto, influxd, influx_db,
                                                                                  bridge_env):
    """Readings the broker queued while the bridge was away are processed only after the first sync placed their
    rack, so none reaches InfluxDB or the twin at default_site/room/row (ghost racks, wrong alert labels)."""
    from bridge.service import Bridge

    now = int(time.time() * 1000)
    add_rack(tb_double, "rack-77", now - 60_000, 24.0, 20.0, attrs={"site": "fra1", "room": "hall-9", "row": "C"})
    leave_a_session(bridge_env)
    stamps = [now - 5000 + i * 1000 for i in range(5)]
    publish_backlog(mosquitto, bridge_env, "rack-77", stamps)
    tb_double.delay_s = 0.3  # a ThingsBoard that takes a moment: the first sync needs over a second
    bridge = Bridge(settings_factory(sync_interval_s=0, sync_first_wait_s=30))
    bridge.start()
    try:
        assert bridge.readiness()["first_sync_wait_over"] is False
        resp = requests.get(f"http://127.0.0.1:{bridge.ops.port}/readyz", timeout=5)
        assert resp.status_code == 503 and resp.json()["checks"]["first_sync_wait_over"] is False
        # Subscribed at once (nothing published meanwhile is lost), processing held back.
        wait_until(lambda: bridge.readiness()["mqtt"], what="subscribed during the wait")
        assert bridge.readiness()["first_sync_wait_over"] is False
        assert not influxd.rows("SELECT temperature FROM rack_environment", influx_db)
        rows = wait_until(lambda: (lambda r: len(r) == 5 and r)(influxd.rows(
            "SELECT temperature FROM rack_environment WHERE position = 'top' GROUP BY site, room, row", influx_db)),
            what="the backlog written")
        assert {(r["site"], r["room"], r["row"]) for r in rows} == {("fra1", "hall-9", "C")}
        wait_until(lambda: thing(ditto, "rack-77")["features"]["environment"]["properties"].get("tempTop") == 24.0,
                   what="twin has the newest backlog reading")
        assert {k: thing(ditto, "rack-77")["attributes"][k] for k in ("site", "room", "row")} == {
            "site": "fra1", "room": "hall-9", "row": "C"}
        assert bridge.readiness()["first_sync_wait_over"] is True
    finally:
        bridge.stop()


def test_with_thingsboard_down_the_bridge_consumes_after_the_wait_and_says_what_that_means(
        bridge_env, bridge_environ, mosquitto, influxd, influx_db, monkeypatch, caplog):
    from bridge.service import Bridge

    """No session at the broker yet (a first start): what is published during the wait must not be lost, so the
    bridge subscribes at once and only holds the messages back."""
    monkeypatch.delenv("RACKTWIN_CONFIG", raising=False)
    now = int(time.time() * 1000)
    caplog.set_level("INFO", logger="bridge.service")
    bridge = Bridge(load_settings(tb_url=unreachable_tb_url(), tb_username="t", tb_password="p", sync_first_wait_s=1.5))
    began = time.monotonic()
    bridge.start()
    try:
        assert any("holding MQTT messages until the first ThingsBoard sync places the racks (up to 2 s)"
                   in r.getMessage() for r in caplog.records)
        wait_until(bridge.source.connected.is_set, what="subscribed during the wait")
        publish_backlog(mosquitto, bridge_env, "rack-78", [now - 1000])
        rows = wait_until(lambda: influxd.rows("SELECT temperature FROM rack_environment GROUP BY room", influx_db),
                          what="the reading consumed after the wait")
        assert time.monotonic() - began >= 1.5
        assert [r["room"] for r in rows] == ["room1"]  # the default: ThingsBoard never said otherwise
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "bridge.service"]
        assert any("no ThingsBoard sync within 2 s" in w and "processing MQTT messages anyway (1 held)" in w
                   and "default site/room/row (site1/room1/row1)" in w for w in warnings), warnings
        wait_until(lambda: bridge.readiness()["first_sync_wait_over"], what="the wait over in readiness")
    finally:
        bridge.stop()


def test_sigterm_while_waiting_for_the_first_sync_stops_the_bridge_at_once(bridge_env, tmp_path):
    from tests.harness.process import BridgeProcess

    env = dict(bridge_env, RACKTWIN_TB_URL=unreachable_tb_url(), RACKTWIN_TB_USERNAME="t",
               RACKTWIN_TB_PASSWORD="p", RACKTWIN_SYNC_FIRST_WAIT_S="60")
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start(wait_ready=False)
    try:
        readyz = wait_until(lambda: requests.get(f"http://127.0.0.1:{bridge.port}/readyz", timeout=1).json(),
                            timeout=30, what="ops endpoint up")
        assert readyz["ready"] is False and readyz["checks"]["first_sync_wait_over"] is False
        wait_until(lambda: "holding MQTT messages until the first ThingsBoard sync" in bridge.log(),
                   what="wait logged")
        began = time.monotonic()
        assert bridge.terminate(timeout=15) == 0
        assert time.monotonic() - began < 10
        assert "processing" not in bridge.log()  # nothing held was processed: the broker redelivers it
    finally:
        bridge.kill()


def test_a_thingsboard_that_does_not_answer_fails_the_sync_with_its_own_error(bridge_environ, monkeypatch):
    """The worker logs what run_sync raised: it must be the connection's error, not one of run_sync's own."""
    monkeypatch.delenv("RACKTWIN_CONFIG", raising=False)
    settings = load_settings(tb_url=unreachable_tb_url(), tb_username="t", tb_password="p")
    with pytest.raises(requests.ConnectionError):
        run_sync(settings)
