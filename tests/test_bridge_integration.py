"""The bridge in-process against a real Mosquitto, a real InfluxDB and the Ditto contract double."""

from __future__ import annotations

import logging
import re
import threading
import time

import pytest
import requests

from bridge.config import load_settings
from bridge.service import Bridge
from bridge import twin
from bridge.twin import dew_point, iso_ms
from tests.harness.mqtt import Publisher, wait_until

TOPIC_PREFIX_KEY = "RACKTWIN_MQTT_TOPIC"


@pytest.fixture(params=["http", "websocket"])
def running_bridge(request, bridge_environ, monkeypatch):
    """The bridge in-process, once with twin updates as HTTP merge-PATCHes and once over Ditto's WebSocket."""
    monkeypatch.setenv("RACKTWIN_DITTO_TRANSPORT", request.param)
    bridge = Bridge(load_settings())
    bridge.start()
    wait_until(bridge.source.connected.is_set, what="bridge connected to MQTT")
    yield bridge
    bridge.stop()


@pytest.fixture
def publisher(mosquitto):
    pub = Publisher(mosquitto.port)
    yield pub
    pub.close()


def topic(env: dict, device: str) -> str:
    return env[TOPIC_PREFIX_KEY].rstrip("#") + device


def envelope(device: str, ts: int, **values) -> dict:
    return {"deviceName": device, "deviceType": "rack-sensor", "ts": ts, "values": values}


def props(ditto, tid: str) -> dict:
    return ditto.things.get(tid, {}).get("features", {}).get("environment", {}).get("properties", {})


def test_readings_reach_influx_and_twin_with_exact_values(running_bridge, bridge_env, publisher, ditto, influxd, influx_db):
    now = int(time.time() * 1000)
    racks = {f"rack-{i:02d}": (20.0 + i, 25.0 + i, 40.0 + i, 45.0 - i) for i in range(1, 4)}
    publisher.publish_all([
        (topic(bridge_env, rack), envelope(rack, now - 1000, tempBottom=b, tempTop=t, humidityTop=ht, humidityBottom=hb))
        for rack, (b, t, ht, hb) in racks.items()
    ])
    wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 6, what="6 points")
    rows = influxd.rows("SELECT temperature, humidity, dew_point, device, site, room, row FROM rack_environment "
                        "GROUP BY rack, position", influx_db)
    got = {(r["rack"], r["position"]): (r["time"], r["temperature"], r["humidity"], r["dew_point"]) for r in rows}
    for rack, (b, t, ht, hb) in racks.items():
        assert got[(rack, "top")] == (now - 1000, t, ht, dew_point(t, ht))
        assert got[(rack, "bottom")] == (now - 1000, b, hb, dew_point(b, hb))
    assert {r["site"] for r in rows} == {"site1"} and {r["device"] for r in rows} == set(racks)

    for rack, (b, t, ht, hb) in racks.items():
        tid = f"dc.test:{rack}"
        wait_until(lambda: props(ditto, tid).get("tsTop") == iso_ms(now - 1000), what=f"twin {tid}")
        p = props(ditto, tid)
        assert p == {
            "tempTop": t, "tempBottom": b, "humidityTop": ht, "humidityBottom": hb,
            "dewPointTop": dew_point(t, ht), "dewPointBottom": dew_point(b, hb),
            "deltaT": round(t - b, 2), "tsTop": iso_ms(now - 1000), "tsBottom": iso_ms(now - 1000),
            "envelope": {"rack-03": "WARM"}.get(rack, "OK"),  # rack-03's top is 28 °C, above the recommended 27
        }
        thing = ditto.things[tid]
        assert thing["policyId"] == "dc.test:racktwin"
        assert thing["attributes"] == {"site": "site1", "room": "room1", "row": "row1", "rack": rack,
                                       "tbDevices": {"bottom": rack, "top": rack}}
    # The updates took the configured way: Ditto Protocol merge commands on /ws/2, or HTTP PATCHes only.
    if running_bridge.settings.ditto_transport == "websocket":
        assert ditto.ws_commands >= len(racks)
    else:
        assert ditto.ws_commands == 0 and any(method == "PATCH" for method, _, _ in ditto.requests)
    # Grafana's read-only user can read the twins the bridge created (shared policy).
    resp = requests.get(ditto.url + "/api/2/things/dc.test:rack-01", auth=("grafana", "grafana-secret"), timeout=5)
    assert resp.status_code == 200


def test_older_reading_never_overwrites_newer_twin(running_bridge, bridge_env, publisher, ditto, influxd, influx_db):
    now = int(time.time() * 1000)
    t = topic(bridge_env, "rack-x")
    publisher.publish_all([(t, envelope("rack-x", now, tempTop=30.0))])
    wait_until(lambda: props(ditto, "dc.test:rack-x").get("tempTop") == 30.0, what="newer reading in twin")
    publisher.publish_all([(t, envelope("rack-x", now - 60_000, tempTop=22.0))])
    wait_until(lambda: running_bridge.metrics.value("racktwin_ditto_stale_total") >= 1, what="stale counted")
    assert props(ditto, "dc.test:rack-x")["tempTop"] == 30.0
    assert props(ditto, "dc.test:rack-x")["tsTop"] == iso_ms(now)
    # History keeps both; a re-delivered reading overwrites its own point instead of adding one.
    publisher.publish_all([(t, envelope("rack-x", now, tempTop=30.0))])
    wait_until(lambda: running_bridge.metrics.value("racktwin_messages_accepted_total") >= 3 and
               running_bridge.pipeline.in_flight.count == 0, what="third message done")
    rows = influxd.rows("SELECT temperature FROM rack_environment", influx_db)
    assert sorted((r["time"], r["temperature"]) for r in rows) == [(now - 60_000, 22.0), (now, 30.0)]


def test_bad_input_is_counted_and_never_written_or_blocking(running_bridge, bridge_env, publisher, ditto, influxd,
                                                            influx_db):
    now = int(time.time() * 1000)
    bad = [
        (topic(bridge_env, "rack-bad"), b"{truncated"),
        (topic(bridge_env, "rack-bad"), b"[1, 2]"),
        (topic(bridge_env, "rack-bad"), envelope("rack-bad", now, tempTop="hot")),
        (topic(bridge_env, "rack-bad"), b'{"tempTop": NaN}'),
        (topic(bridge_env, "rack-bad"), envelope("rack-bad", now, tempTop=120)),
        (topic(bridge_env, "rack-bad"), envelope("rack-bad", now + 3_600_000, tempTop=20)),
        (topic(bridge_env, "rack-bad"), envelope("rack/bad", now, tempTop=20)),
        (topic(bridge_env, "rack-bad"), b"x" * 70_000),
    ]
    good = [(topic(bridge_env, "rack ok,=1"), envelope("rack ok,=1", now, tempTop=23.5, tempBottom=20.5))]
    publisher.publish_all(bad + good)
    wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 2, what="good points")
    m = running_bridge.metrics
    expected = {"invalid_json": 1, "not_object": 1, "non_numeric": 1, "not_finite": 1, "out_of_range": 1,
                "ts_future": 1, "invalid_rack_name": 1, "payload_too_large": 1}
    wait_until(lambda: all(m.value("racktwin_messages_rejected_total", {"reason": r}) == n for r, n in expected.items()),
               what="rejects counted")
    rows = influxd.rows("SELECT temperature, rack FROM rack_environment", influx_db)
    assert {r["rack"] for r in rows} == {"rack ok,=1"}  # escaped tag value round-trips
    wait_until(lambda: props(ditto, "dc.test:rack ok,=1").get("tempTop") == 23.5, what="twin with odd name")
    assert not any("rack-bad" in tid for tid in ditto.things)
    # Rejected messages are acknowledged: nothing is left in flight.
    wait_until(lambda: running_bridge.pipeline.in_flight.count == 0, what="nothing in flight")


def test_ditto_outage_converges_to_newest_and_influx_carries_on(running_bridge, bridge_env, publisher, ditto, influxd,
                                                                influx_db):
    now = int(time.time() * 1000)
    t = topic(bridge_env, "rack-o")
    publisher.publish_all([(t, envelope("rack-o", now - 10_000, tempTop=20.0))])
    wait_until(lambda: props(ditto, "dc.test:rack-o").get("tempTop") == 20.0, what="first reading")
    ditto.inject(status=503, duration=2.0)
    publisher.publish_all([(t, envelope("rack-o", now - 10_000 + i * 1000, tempTop=20.0 + i)) for i in range(1, 6)])
    # InfluxDB keeps receiving while Ditto is down.
    wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == 6, what="influx during outage")
    wait_until(lambda: not running_bridge.readiness()["ditto"], timeout=5, what="readiness reports ditto down")
    wait_until(lambda: props(ditto, "dc.test:rack-o").get("tempTop") == 25.0, timeout=20, what="twin converged")
    assert props(ditto, "dc.test:rack-o")["tsTop"] == iso_ms(now - 5000)
    wait_until(lambda: running_bridge.pipeline.in_flight.count == 0, what="all acked")
    assert running_bridge.metrics.value("racktwin_ditto_updates_total", {"result": "retry"}) >= 1


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_a_ditto_outage_longer_than_the_receive_window_does_not_hold_up_influxdb(transport, bridge_environ,
                                                                                   monkeypatch, publisher, ditto,
                                                                                   influxd, influx_db):
    """Messages waiting on Ditto alone would fill the broker's receive window (here 8) and stop InfluxDB's
    writes too: once Ditto has taken nothing for RACKTWIN_DITTO_RELEASE_AFTER_S, readings are acknowledged on
    InfluxDB's confirmation, and the twins still end at the newest reading once Ditto is back."""
    monkeypatch.setenv("RACKTWIN_DITTO_TRANSPORT", transport)
    monkeypatch.setenv("RACKTWIN_MQTT_RECEIVE_MAXIMUM", "8")
    monkeypatch.setenv("RACKTWIN_DITTO_RELEASE_AFTER_S", "1")
    bridge = Bridge(load_settings())
    bridge.start()
    racks, rounds = 5, 12
    now = int(time.time() * 1000)
    try:
        wait_until(bridge.source.connected.is_set, what="bridge connected to MQTT")
        publisher.publish_all([(topic(bridge_environ, f"rack-w{r}"), envelope(f"rack-w{r}", now - 60_000,
                                                                               tempTop=20.0)) for r in range(racks)])
        wait_until(lambda: all(props(ditto, f"dc.test:rack-w{r}").get("tempTop") == 20.0 for r in range(racks)),
                   what="twins created")
        ditto.inject(status=503, duration=6.0)
        fault_ends = time.monotonic() + 6.0
        publisher.publish_all([(topic(bridge_environ, f"rack-w{r}"),
                                envelope(f"rack-w{r}", now - 60_000 + i * 1000, tempTop=20.0 + i / 10))
                               for i in range(1, rounds + 1) for r in range(racks)])
        wait_until(lambda: len(influxd.rows("SELECT * FROM rack_environment", influx_db)) == racks * (rounds + 1),
                   timeout=fault_ends - time.monotonic(), what="every reading in InfluxDB while Ditto is down")
        assert not bridge.readiness()["ditto"]
        assert bridge.metrics.value("racktwin_ditto_released_total") > 0
        assert props(ditto, "dc.test:rack-w0")["tempTop"] == 20.0  # the twins have not moved yet
        wait_until(lambda: all(props(ditto, f"dc.test:rack-w{r}").get("tempTop") == 20.0 + rounds / 10
                               and props(ditto, f"dc.test:rack-w{r}")["tsTop"] == iso_ms(now - 60_000 + rounds * 1000)
                               for r in range(racks)), timeout=30, what="twins converged to the newest")
        wait_until(lambda: bridge.pipeline.in_flight.count == 0, what="all acknowledged")
    finally:
        bridge.stop()


def patch_things_failing(monkeypatch, error_for) -> None:
    """Twin updates of the racks for which ``error_for(rack)`` returns an exception raise it; the others go to the
    Ditto double as usual."""
    from bridge.sinks import ditto as ditto_sink

    real_patch = ditto_sink.DittoClient.patch_thing

    def patch_thing(self, tid, patch, condition):  # noqa: ANN001, ANN202
        error = error_for(tid.split(":", 1)[1])
        if error is not None:
            raise error
        return real_patch(self, tid, patch, condition)

    monkeypatch.setattr(ditto_sink.DittoClient, "patch_thing", patch_thing)


def started_updater(**overrides):  # noqa: ANN201
    from bridge.metrics import Metrics
    from bridge.sinks.ditto import DittoUpdater

    metrics = Metrics()
    updater = DittoUpdater(load_settings(**overrides), metrics)
    updater.start()
    return updater, metrics


def test_one_twin_refused_on_its_own_releases_nothing_however_quiet_the_traffic(bridge_environ, monkeypatch, ditto,
                                                                                 caplog):
    """Only a Ditto that has stalled as a whole releases readings: one twin refused (its policy edited, say) keeps
    its messages waiting, so the bridge-lagging alert sees them age, while and after the other racks go through."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.ditto import DittoError

    patch_things_failing(monkeypatch, lambda rack: DittoError(403, "not allowed") if rack == "rack-refused" else None)
    updater, metrics = started_updater(ditto_release_after_s=0.5)
    now = int(time.time() * 1000)
    confirmed: list[str] = []
    try:
        for i in range(6):
            for rack in ("rack-refused", "rack-ok"):
                loc = RackLocation("site1", "room1", "row1", rack)
                updater.submit(SensorReading(loc, "top", rack, now - 12_000 + i * 1000, 21.0 + i, 40.0),
                               lambda r=rack: confirmed.append(r))
            time.sleep(0.2)
        wait_until(lambda: confirmed.count("rack-ok") == 6, what="the other rack's readings")
        time.sleep(2.0)  # quiet: four release periods without any update Ditto answered
        assert "rack-refused" not in confirmed and metrics.ditto_released._value.get() == 0
        updater.stop(timeout=1)
        assert "stalled" not in caplog.text  # neither a stall nor, on stopping, twins missing released readings
    finally:
        updater.stop(timeout=2)


@pytest.mark.parametrize("refused", ["every twin", "the shared policy"])
def test_refusals_of_every_twin_or_of_the_policy_are_a_stall_and_log_once(refused, bridge_environ, monkeypatch,
                                                                           ditto, caplog):
    """A grant that lets the bridge write no twin (read-only, or a user the policy does not name) refuses every
    update with 403, as does a shared policy the bridge may not create or read. Those are not one twin's policy:
    held back, the readings would fill the receive window and stop InfluxDB's writes for every rack. They are
    released once nothing was taken for the release period, with one log line for all twins, not one each."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks import ditto as ditto_sink
    from bridge.sinks.ditto import DittoError

    if refused == "every twin":
        patch_things_failing(monkeypatch, lambda rack: DittoError(
            403, f'{{"error":"things:thing.notmodifiable","message":"The Thing with ID \'dc.test:{rack}\' could '
                 'not be modified as the requester had insufficient permissions"}'))
    else:
        def refuse(self, policy_id, body):  # noqa: ANN001, ANN202
            raise DittoError(403, '{"error":"policies:policy.notcreatable"}')
        monkeypatch.setattr(ditto_sink.DittoClient, "ensure_policy", refuse)
    updater, metrics = started_updater(ditto_release_after_s=0.5)
    now = int(time.time() * 1000)
    confirmed: list[str] = []
    racks = [f"rack-r{i}" for i in range(5)]
    try:
        for rack in racks:
            loc = RackLocation("site1", "room1", "row1", rack)
            updater.submit(SensorReading(loc, "top", rack, now - 5_000, 21.0, 40.0), lambda r=rack: confirmed.append(r))
        wait_until(lambda: sorted(confirmed) == racks, timeout=10, what="readings released though Ditto refuses")
        assert metrics.ditto_released._value.get() == len(racks)
        assert not updater.healthy
        failed = [r for r in caplog.records if r.getMessage().startswith("Ditto update of")]
        assert len(failed) == 1, [r.getMessage() for r in failed]
    finally:
        updater.stop(timeout=2)


def test_a_hung_ditto_is_let_go_before_its_requests_time_out(bridge_environ, ditto):
    """A request out for the release period with nothing answered: a hang. What waits behind it is released
    without waiting for the 10 s timeout (the reading in the hung request itself goes when it ends); once Ditto
    answers again, readings wait for their twin again."""
    from bridge.mapping import RackLocation, SensorReading

    updater, metrics = started_updater(ditto_release_after_s=1.0, ditto_timeout_s=10.0, ditto_concurrency=1)
    hung, other = RackLocation("site1", "room1", "row1", "rack-hang"), RackLocation("site1", "room1", "row1", "rack-q")
    now = int(time.time() * 1000)
    confirmed: dict[str, float] = {}
    try:
        for loc in (hung, other):
            updater.submit(SensorReading(loc, "top", "d", now - 9_000, 20.0, 40.0),
                           lambda r=loc.rack: confirmed.setdefault(r, 0.0))
        wait_until(lambda: len(confirmed) == 2, what="twins created")
        confirmed.clear()
        ditto.inject(delay=4.0, count=1)
        started = time.monotonic()
        updater.submit(SensorReading(hung, "top", "d", now - 8_000, 21.0, 40.0),
                       lambda: confirmed.setdefault("hung", time.monotonic() - started))
        time.sleep(0.2)  # the one worker is in the hung request now
        updater.submit(SensorReading(other, "top", "d", now - 8_000, 21.0, 40.0),
                       lambda: confirmed.setdefault("queued", time.monotonic() - started))
        wait_until(lambda: "queued" in confirmed, timeout=3.5, what="the queued reading released during the hang")
        assert 1.0 <= confirmed["queued"] < 3.0 and "hung" not in confirmed
        assert metrics.ditto_released._value.get() == 1
        wait_until(lambda: "hung" in confirmed, timeout=10, what="the hung request answered")
        wait_until(lambda: props(ditto, "dc.test:rack-q").get("tempTop") == 21.0, timeout=10,
                   what="the released reading's twin update once Ditto answers")
        assert not updater._stalled
        ditto.inject(delay=0.5, count=1)
        updater.submit(SensorReading(other, "top", "d", now - 7_000, 22.0, 40.0),
                       lambda: confirmed.setdefault("after", time.monotonic()))
        time.sleep(0.3)
        assert "after" not in confirmed  # waits for its twin again
        wait_until(lambda: "after" in confirmed, what="confirmed by the twin")
        assert metrics.ditto_released._value.get() == 1
    finally:
        updater.stop(timeout=2)


def test_updates_that_need_no_request_do_not_hide_a_stall(bridge_environ, ditto, caplog):
    """Readings older than their twin need no request: confirming them must not count as Ditto answering, or a
    trickle of them (duplicates, a sensor clock stepping back) would keep a dead Ditto from ever being let go."""
    from bridge.mapping import RackLocation, SensorReading

    updater, metrics = started_updater(ditto_release_after_s=1.0, ditto_timeout_s=2.0)
    now = int(time.time() * 1000)
    dup, fresh = RackLocation("site1", "room1", "row1", "rack-dup"), RackLocation("site1", "room1", "row1", "rack-new")
    confirmed: list[str] = []
    try:
        updater.submit(SensorReading(dup, "top", "d", now - 5_000, 20.0, 40.0), lambda: confirmed.append("dup"))
        wait_until(lambda: confirmed == ["dup"], what="twin created")
        ditto.inject(status=503, duration=6.0)
        updater.submit(SensorReading(fresh, "top", "d", now, 24.0, 40.0), lambda: confirmed.append("new"))
        for _ in range(12):
            updater.submit(SensorReading(dup, "top", "d", now - 6_000, 19.0, 40.0), lambda: confirmed.append("dup"))
            time.sleep(0.25)
            if "new" in confirmed:
                break
        assert "new" in confirmed and metrics.ditto_released._value.get() >= 1
        assert "Ditto has taken no twin update" in caplog.text
    finally:
        updater.stop(timeout=2)


def test_a_rack_that_stops_reporting_shows_silent_and_recovers_with_its_next_readings(bridge_environ, ditto):
    """A dead sensor must not leave its tile showing its last colour: after 3 reporting intervals without a
    reading the twin says SILENT (marked on condition that no newer reading reached the twin meanwhile), and the
    rack's next readings of both positions bring its real state back."""
    from bridge.mapping import RackLocation, SensorReading

    updater, _ = started_updater(reading_interval_s=1)  # silent after 3 s, swept every second
    quiet, busy = RackLocation("site1", "room1", "row1", "rack-quiet"), RackLocation("site1", "room1", "row1", "rack-busy")
    envelope = lambda tid: props(ditto, tid).get("envelope")  # noqa: E731
    try:
        now = int(time.time() * 1000)
        for loc in (quiet, busy):
            for pos in ("top", "bottom"):
                updater.submit(SensorReading(loc, pos, "d", now, 22.0, 45.0), None)
        wait_until(lambda: envelope("dc.test:rack-quiet") == envelope("dc.test:rack-busy") == "OK", what="twins")
        # rack-busy's twin gets newer readings behind the bridge's back (another replica): the bridge's own view
        # of it goes stale, but the condition keeps it from being marked silent.
        twin_props = ditto.things["dc.test:rack-busy"]["features"]["environment"]["properties"]
        later = twin.iso_ms(now + 60_000)
        twin_props.update(tsTop=later, tsBottom=later)
        wait_until(lambda: envelope("dc.test:rack-quiet") == "SILENT", timeout=8, what="the quiet rack marked")
        time.sleep(1.5)  # another sweep or two
        assert envelope("dc.test:rack-busy") == "OK"
        # A reading of one position: the other is still silent, so is the rack; both report: its state is back.
        now = int(time.time() * 1000)
        updater.submit(SensorReading(quiet, "top", "d", now, 28.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-quiet").get("tempTop") == 28.0, what="the top reading")
        assert envelope("dc.test:rack-quiet") == "SILENT"
        updater.submit(SensorReading(quiet, "bottom", "d", now, 22.0, 45.0), None)
        wait_until(lambda: envelope("dc.test:rack-quiet") == "WARM", what="the rack's state from both readings")
    finally:
        updater.stop(timeout=2)


def test_racks_gone_quiet_before_the_bridge_started_are_marked_silent(bridge_environ, ditto, monkeypatch, caplog):
    """A rack that stopped reporting while no bridge ran (an upgrade, a crash) sends nothing a new bridge would see
    it by: 3 reporting intervals after start the bridge reads the twins Ditto holds, page by page, and sweeps the
    silent ones like the racks it saw. A twin another replica keeps writing is left alone."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks import ditto as ditto_sink

    racks = [f"rack-before-{i}" for i in range(6)]
    where = {rack: RackLocation("site1", "room1", "row1", rack) for rack in racks}
    envelopes = lambda: [props(ditto, f"dc.test:{r}").get("envelope") for r in racks]  # noqa: E731
    first, _ = started_updater()
    try:
        now = int(time.time() * 1000)
        for rack in racks:
            for pos in ("top", "bottom"):
                first.submit(SensorReading(where[rack], pos, "d", now, 22.0, 45.0), None)
        wait_until(lambda: envelopes() == ["OK"] * 6, what="twins")
    finally:
        first.stop(timeout=2)
    # rack-before-5 is another replica's: its twin is newer than this bridge's start.
    later = twin.iso_ms(int(time.time() * 1000) + 60_000)
    props(ditto, "dc.test:rack-before-5").update(tsTop=later, tsBottom=later)
    caplog.set_level(logging.INFO, logger="bridge.sinks.ditto")
    monkeypatch.setattr(ditto_sink, "SEARCH_PAGE_SIZE", 2)  # three pages: the cursor is followed
    monkeypatch.setattr(ditto_sink, "ADOPT_RETRY_S", 0.2)
    ditto.inject(status=503, count=1, paths_prefix="/api/2/search")  # Ditto not ready at the first try
    second, _ = started_updater(reading_interval_s=1)  # silent after 3 s, swept every second
    stop_live = threading.Event()

    def live_rack() -> None:  # rack-before-0 reports to the new bridge throughout
        while not stop_live.is_set():
            ts = int(time.time() * 1000)
            for pos in ("top", "bottom"):
                second.submit(SensorReading(where["rack-before-0"], pos, "d", ts, 23.0, 45.0), None)
            stop_live.wait(0.5)

    reporter = threading.Thread(target=live_rack, daemon=True)
    reporter.start()
    try:
        wait_until(lambda: envelopes()[1:5] == ["SILENT"] * 4, timeout=15, what="the quiet racks marked")
        assert envelopes() == ["OK", "SILENT", "SILENT", "SILENT", "SILENT", "OK"]
        assert props(ditto, "dc.test:rack-before-0")["tempTop"] == 23.0
        assert "cannot read the twins already in Ditto yet (HTTP 503" in caplog.text
        assert "4 silent racks' twins found in Ditto at start" in caplog.text
        # Ops delete one; it reports again: its twin comes back whole, with our policy and its attributes.
        del ditto.things["dc.test:rack-before-1"]
        ts = int(time.time() * 1000)
        for pos in ("top", "bottom"):
            second.submit(SensorReading(where["rack-before-1"], pos, "d", ts, 24.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-before-1").get("envelope") == "OK", what="twin back")
        thing = ditto.things["dc.test:rack-before-1"]
        assert thing["policyId"] == "dc.test:racktwin"
        assert thing["attributes"]["rack"] == "rack-before-1" and thing["attributes"]["room"] == "room1"
    finally:
        stop_live.set()
        reporter.join(2)
        second.stop(timeout=2)


def test_the_start_up_search_starts_over_on_an_expired_cursor_and_gives_up_on_a_refusal(bridge_environ, monkeypatch,
                                                                                        caplog):
    from bridge.metrics import Metrics
    from bridge.sinks import ditto as ditto_sink
    from bridge.sinks.ditto import DittoError

    calls: list[str | None] = []
    answers: list = []

    class Search:  # stands in for DittoClient: the search answers below, in order
        def __init__(self, *args, **kwargs):
            pass

        def search_page(self, namespace, rql_filter, cursor=None):
            calls.append(cursor)
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

        def close(self):
            pass

    monkeypatch.setattr(ditto_sink, "DittoClient", Search)
    monkeypatch.setattr(ditto_sink, "ADOPT_RETRY_S", 0.05)
    monkeypatch.setattr(ditto_sink, "SILENT_AFTER_INTERVALS", 0)  # no wait before the search
    caplog.set_level(logging.INFO, logger="bridge.sinks.ditto")
    updater = ditto_sink.DittoUpdater(load_settings(), Metrics())
    answers[:] = [([], "page-2"), DittoError(400, "cursor invalid"), ([], "page-2"), ([], None)]
    updater._adopt_existing()
    assert calls == [None, "page-2", None, "page-2"] and "0 silent racks' twins found" in caplog.text
    calls.clear()
    answers[:] = [DittoError(400, "filter invalid")]  # on the first page: waiting cannot fix it
    updater._adopt_existing()
    assert calls == [None] and "cannot read the twins already in Ditto (HTTP 400" in caplog.text


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_a_twin_deleted_under_a_reporting_rack_comes_back_with_the_shared_policy(bridge_environ, ditto, transport):
    """Ditto's merge creates a missing thing with a default policy only the writer may read (ditto.md): the bridge's
    merges are update-only (If-Match: *), so a twin ops deleted is read again and created properly instead, and
    Grafana still sees it."""
    from bridge.mapping import RackLocation, SensorReading

    updater, metrics = started_updater(ditto_transport=transport)
    loc = RackLocation("site1", "room1", "row1", "rack-deleted")
    try:
        now = int(time.time() * 1000)
        updater.submit(SensorReading(loc, "top", "d", now, 22.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-deleted").get("tempTop") == 22.0, what="twin")
        del ditto.things["dc.test:rack-deleted"]
        updater.submit(SensorReading(loc, "top", "d", now + 1000, 23.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-deleted").get("tempTop") == 23.0, what="twin back")
        thing = ditto.things["dc.test:rack-deleted"]
        assert thing["policyId"] == "dc.test:racktwin" and thing["attributes"]["rack"] == "rack-deleted"
        # Counted once Ditto's answer is back, which may be after the double shows the twin.
        created = metrics.ditto_updates.labels("created")._value.get
        wait_until(lambda: created() >= 2, timeout=5, what="the re-creation counted")
        assert created() == 2  # once at first, once after the delete
    finally:
        updater.stop(timeout=2)


def test_two_replicas_writing_one_position_each_never_mark_a_reporting_rack_silent(bridge_environ, ditto):
    """On a shared subscription the top and bottom of one rack may go to different replicas, each with an old view
    of the other position: a write that would say SILENT because of it is conditioned on the twin having nothing
    newer there, and re-reads the twin when it has."""
    from bridge.mapping import RackLocation, SensorReading

    loc = RackLocation("site1", "room1", "row1", "rack-split2")
    a, _ = started_updater(reading_interval_s=1)
    b = None
    seen: set[str] = set()
    try:
        now = int(time.time() * 1000)
        for pos in ("top", "bottom"):  # both replicas start with a view of both positions
            a.submit(SensorReading(loc, pos, "d", now, 22.0, 45.0), None)
        wait_until(lambda: "tsBottom" in props(ditto, "dc.test:rack-split2"), what="twin with both positions")
        b, _ = started_updater(reading_interval_s=1)
        b.submit(SensorReading(loc, "bottom", "b", now, 22.0, 45.0), None)  # b reads the twin (and drops this)
        for i in range(14):  # 7 s, beyond the 3 s after which each replica's view of the other position is old
            now = int(time.time() * 1000)
            a.submit(SensorReading(loc, "top", "t", now, 22.0, 45.0), None)
            b.submit(SensorReading(loc, "bottom", "b", now, 21.0, 45.0), None)
            time.sleep(0.5)
            seen.add(props(ditto, "dc.test:rack-split2").get("envelope"))
        assert seen - {None} == {"OK"}, seen
    finally:
        a.stop(timeout=2)
        if b is not None:
            b.stop(timeout=2)


def test_a_deleted_twin_is_not_brought_back_by_the_silence_sweep(bridge_environ, ditto):
    """Ops delete a decommissioned rack's twin: marking it silent must not create it again (only a new reading
    may)."""
    from bridge.mapping import RackLocation, SensorReading

    updater, _ = started_updater(reading_interval_s=1)
    loc = RackLocation("site1", "room1", "row1", "rack-gone")
    try:
        updater.submit(SensorReading(loc, "top", "d", int(time.time() * 1000), 22.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-gone").get("envelope") == "OK", what="twin")
        del ditto.things["dc.test:rack-gone"]
        time.sleep(5.0)  # past the 3 s of silence, a sweep a second
        assert "dc.test:rack-gone" not in ditto.things
    finally:
        updater.stop(timeout=2)


def test_a_silence_mark_that_fails_is_retried(bridge_environ, ditto):
    from bridge.mapping import RackLocation, SensorReading

    updater, _ = started_updater(reading_interval_s=1)
    updater._watch_stop.set()  # no sweeps of its own: the one below must carry the mark through its retry
    loc = RackLocation("site1", "room1", "row1", "rack-retry")
    try:
        updater.submit(SensorReading(loc, "top", "d", int(time.time() * 1000), 22.0, 45.0), None)
        wait_until(lambda: props(ditto, "dc.test:rack-retry").get("envelope") == "OK", what="twin")
        time.sleep(3.2)
        ditto.inject(status=503, count=1)
        assert updater.mark_silent_racks() == 1
        wait_until(lambda: props(ditto, "dc.test:rack-retry").get("envelope") == "SILENT", timeout=5,
                   what="marked by the retry")
    finally:
        updater.stop(timeout=2)


def test_a_silent_write_goes_through_a_timestamp_the_twin_holds_in_another_form(bridge_environ, ditto):
    """The other position's timestamp edited into "…:00Z": the SILENT write's condition on it, built from our own
    form, fails; the re-read twin's own text makes the retry pass, instead of holding the reading for good."""
    from bridge.mapping import RackLocation, SensorReading

    updater, _ = started_updater(reading_interval_s=1)
    loc = RackLocation("site1", "room1", "row1", "rack-form")
    whole_s = int(time.time()) * 1000 - 1000
    confirmed: list[str] = []
    try:
        for pos in ("top", "bottom"):
            updater.submit(SensorReading(loc, pos, "d", whole_s, 22.0, 45.0), None)
        wait_until(lambda: "tsBottom" in props(ditto, "dc.test:rack-form"), what="twin")
        props(ditto, "dc.test:rack-form")["tsBottom"] = twin.iso_ms(whole_s).replace(".000Z", "Z")
        time.sleep(3.5)  # the bottom is silent now
        updater.submit(SensorReading(loc, "top", "d", int(time.time() * 1000), 23.0, 45.0),
                       lambda: confirmed.append("top"))
        wait_until(lambda: confirmed == ["top"], timeout=8, what="the top reading confirmed")
        assert props(ditto, "dc.test:rack-form")["envelope"] == "SILENT"
        assert props(ditto, "dc.test:rack-form")["tempTop"] == 23.0
    finally:
        updater.stop(timeout=2)


def test_a_hung_sink_shows_as_the_age_of_the_oldest_unconfirmed_message(running_bridge, bridge_env, publisher,
                                                                          ditto):
    """Nothing gets through a Ditto that hangs, so no lag is observed: the waiting message must show it."""
    m = running_bridge.metrics
    assert m.value("racktwin_oldest_in_flight_seconds") == 0.0
    ditto.inject(delay=2.5, count=1)
    publisher.publish_all([(topic(bridge_env, "rack-h"), envelope("rack-h", int(time.time() * 1000), tempTop=21.0))])
    waited = wait_until(lambda: (age := m.value("racktwin_oldest_in_flight_seconds")) >= 1.0 and age,
                        timeout=10, what="the waiting message's age")
    assert waited < 10 and running_bridge.pipeline.in_flight.count == 1
    wait_until(lambda: running_bridge.pipeline.in_flight.count == 0, timeout=20, what="confirmed once Ditto answers")
    assert m.value("racktwin_oldest_in_flight_seconds") == 0.0


def test_ops_endpoints(running_bridge, bridge_env, publisher, influxd, influx_db):
    port = running_bridge.ops.port
    base = f"http://127.0.0.1:{port}"
    assert requests.get(base + "/healthz", timeout=5).json() == {"status": "alive"}
    assert requests.post(base + "/sync", timeout=5).status_code == 409  # no ThingsBoard configured here
    wait_until(lambda: requests.get(base + "/readyz", timeout=5).status_code == 200, what="ready")
    publisher.publish_all([(topic(bridge_env, "rack-m"), b"oops")])
    wait_until(lambda: 'racktwin_messages_rejected_total{reason="invalid_json"} 1.0' in
               requests.get(base + "/metrics", timeout=5).text, what="reject in /metrics")
    text = requests.get(base + "/metrics", timeout=5).text
    for name in ("racktwin_messages_received_total", "racktwin_influx_points_written_total",
                 "racktwin_ditto_updates_total", "racktwin_ditto_coalesced_total", "racktwin_ditto_stale_total",
                 "racktwin_messages_in_flight", "racktwin_oldest_in_flight_seconds",
                 "racktwin_end_to_end_lag_seconds_bucket"):
        assert name in text
    # A poller can ask for only what it needs (the bench polls this way, many times a second).
    some = requests.get(base + "/metrics", timeout=5, params={
        "name[]": ["racktwin_messages_rejected_total", "racktwin_messages_in_flight"]}).text
    samples = {line.split("{")[0].split(" ")[0] for line in some.splitlines() if line and not line.startswith("#")}
    assert samples == {"racktwin_messages_rejected_total", "racktwin_messages_in_flight"}, some
    assert 'racktwin_messages_rejected_total{reason="invalid_json"} 1.0' in some
    # The bridge's own counters land in InfluxDB for the health dashboard.
    # The first points may predate the message: wait for one written after it was counted.
    def newest_stats():
        rows = influxd.rows("SELECT received, rejected, ready, oldest_in_flight_s FROM racktwin_bridge", influx_db)
        return rows and (rows[-1]["received"] or 0) >= 1 and (rows[-1]["rejected"] or 0) >= 1 and rows[-1]

    newest = wait_until(newest_stats, what="a stats point counting the message")
    assert newest["ready"] in (0.0, 1.0) and newest["oldest_in_flight_s"] is not None, newest


def test_influx_writer_sheds_only_side_points_and_counts_readings_apart(bridge_environ, monkeypatch, influxd,
                                                                        influx_db):
    """While InfluxDB is behind, forecast/stats points are capped (oldest shed, counted); readings never are,
    and the written counter tells readings from the bridge's own points."""
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink

    monkeypatch.setattr(influx_sink, "MAX_QUEUED_SIDE_POINTS", 4)
    metrics = Metrics()
    writer = influx_sink.InfluxWriter(load_settings(), metrics)  # not started yet: everything queues
    confirmed = []
    ts = int(time.time() * 1000) - 60_000
    for i in range(6):
        writer.submit([f"rack_environment,rack=r{i},position=top temperature=21.5 {ts}"], lambda i=i: confirmed.append(i))
        writer.submit([f"rack_forecast,rack=r{i},position=top trend_c_per_h=0.5 {ts + i}"], None, kind="forecast")
    assert metrics.value("racktwin_influx_points_shed_total", {"kind": "forecast"}) == 2  # the two oldest
    writer.start()
    wait_until(lambda: len(confirmed) == 6, what="readings confirmed")
    writer.stop(timeout=5)
    assert sorted(confirmed) == list(range(6))
    assert metrics.value("racktwin_influx_points_written_total", {"kind": "reading"}) == 6
    assert metrics.value("racktwin_influx_points_written_total", {"kind": "forecast"}) == 4
    rows = influxd.rows("SELECT trend_c_per_h, rack FROM rack_forecast", influx_db)
    assert sorted(r["rack"] for r in rows) == ["r2", "r3", "r4", "r5"]
    assert len(influxd.rows("SELECT temperature FROM rack_environment", influx_db)) == 6


def _writer_with_client_write(metrics, wrap):
    """A started InfluxWriter whose client write() goes through ``wrap(the client's own write)``."""
    from bridge.sinks.influx import InfluxWriter

    writer = InfluxWriter(load_settings(), metrics)
    writer.start()
    writer._batching.write = wrap(writer._batching.write)
    return writer


def test_influx_writer_hands_a_burst_to_the_client_in_few_items(bridge_environ, influxd, influx_db):
    """Messages that arrive while the feeder is busy go to the client together, cut into items of at most
    MAX_LINES_PER_ITEM lines: the client's per-item cost is paid per pass, not per message."""
    import threading

    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink

    release, calls = threading.Event(), []

    def held(client_write):
        def write(**kwargs):
            record = kwargs["record"]
            calls.append(record if isinstance(record, list) else [record])
            release.wait(10)  # the first pass blocks the feeder while the burst arrives
            return client_write(**kwargs)
        return write

    writer = _writer_with_client_write(Metrics(), held)
    confirmed = []
    ts = int(time.time() * 1000) - 60_000
    try:
        for i in range(300):
            writer.submit([f"rack_environment,rack=r{i},position={p} temperature=21.5 {ts + i}" for p in ("top", "bottom")],
                          lambda i=i: confirmed.append(i))
            if i == 0:
                wait_until(lambda: calls, what="the first pass under way")
        release.set()
        wait_until(lambda: len(confirmed) == 300, what="every message confirmed")
    finally:
        release.set()
        writer.stop(timeout=5)
    assert sorted(confirmed) == list(range(300))
    assert len(calls) == 2, [len(c) for c in calls]  # the first message, then the other 299 in one pass
    items = calls[1]
    assert len(items) == -(-598 // influx_sink.MAX_LINES_PER_ITEM)
    assert all(item.count(b"\n") < influx_sink.MAX_LINES_PER_ITEM for item in items)
    assert len(influxd.rows("SELECT temperature FROM rack_environment", influx_db)) == 600


def test_failed_update_is_not_lost_to_an_older_reading_that_arrived_meanwhile(bridge_environ, monkeypatch, ditto):
    """A newer reading whose request fails while an older one queues behind it: the twin still ends newest."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.metrics import Metrics
    from bridge.sinks.ditto import DittoUpdater

    updater = DittoUpdater(load_settings(), Metrics())
    updater.start()
    loc = RackLocation("site1", "room1", "row1", "rack-r")
    now = int(time.time() * 1000)
    confirmed = []
    try:
        updater.submit(SensorReading(loc, "top", "rack-r", now - 60_000, 20.0, 40.0), lambda: confirmed.append("t0"))
        wait_until(lambda: confirmed == ["t0"], what="twin created")
        ditto.inject(status=503, count=1, delay=0.5)  # the next request is in flight for 0.5 s, then fails
        updater.submit(SensorReading(loc, "top", "rack-r", now - 1_000, 25.0, 41.0), lambda: confirmed.append("new"))
        time.sleep(0.2)
        updater.submit(SensorReading(loc, "top", "rack-r", now - 30_000, 22.0, None), lambda: confirmed.append("old"))
        wait_until(lambda: len(confirmed) == 3, timeout=20, what="both readings confirmed")
        assert props(ditto, "dc.test:rack-r")["tsTop"] == iso_ms(now - 1_000)
        assert props(ditto, "dc.test:rack-r")["tempTop"] == 25.0
    finally:
        updater.stop(timeout=2)


def test_a_reading_sent_as_two_messages_with_one_timestamp_reaches_the_twin_whole(bridge_environ, ditto):
    """Temperature and humidity in two messages with the same ts (a device posting them apart, or ThingsBoard
    stamping both in one millisecond): the twin gets both, whether the second arrives while the first is still
    pending or after it reached Ditto; a copy of either changes nothing."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.metrics import Metrics
    from bridge.sinks.ditto import DittoUpdater

    updater = DittoUpdater(load_settings(), Metrics())
    updater.start()
    ts = int(time.time() * 1000) - 5_000
    confirmed: list[str] = []
    try:
        loc = RackLocation("site1", "room1", "row1", "rack-split")
        updater.submit(SensorReading(loc, "top", "dev", ts, 23.5, None), lambda: confirmed.append("temp"))
        wait_until(lambda: confirmed == ["temp"], what="the temperature half confirmed")
        updater.submit(SensorReading(loc, "top", "dev", ts, None, 44.0), lambda: confirmed.append("rh"))
        updater.submit(SensorReading(loc, "top", "dev", ts, None, 44.0), lambda: confirmed.append("copy"))
        wait_until(lambda: len(confirmed) == 3, what="both halves and the copy confirmed")
        top = props(ditto, "dc.test:rack-split")
        assert (top["tempTop"], top["humidityTop"], top["tsTop"]) == (23.5, 44.0, iso_ms(ts))
        assert "dewPointTop" in top
    finally:
        updater.stop(timeout=2)


def test_an_unexpected_error_in_a_twin_update_is_retried_then_given_up_and_never_kills_a_worker(
        bridge_environ, monkeypatch, ditto):
    """A bug, or a twin we cannot read, raising out of an update: the workers live on, the rack's readings are
    retried with the twin read afresh, and a rack that keeps failing is given up (its messages acknowledged:
    the readings are in InfluxDB) instead of stranding them and, once the receive window fills, the bridge."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks import ditto as ditto_sink

    failing = {"rack-flaky": 2, "rack-broken": 10**6}

    def error_for(rack: str) -> Exception | None:
        if failing.get(rack, 0) > 0:
            failing[rack] -= 1
            return KeyError("a bug")
        return None

    patch_things_failing(monkeypatch, error_for)
    updater, metrics = started_updater(ditto_concurrency=2)
    now = int(time.time() * 1000)
    confirmed: list[str] = []
    try:
        for rack in ("rack-flaky", "rack-broken", "rack-fine"):
            loc = RackLocation("site1", "room1", "row1", rack)
            updater.submit(SensorReading(loc, "top", rack, now, 21.5, 40.0), lambda r=rack: confirmed.append(r))
        wait_until(lambda: len(confirmed) == 3, timeout=20, what="every rack's message released")
        assert all(worker.is_alive() for worker in updater._workers)
        assert props(ditto, "dc.test:rack-flaky")["tempTop"] == 21.5  # retried until it went through
        assert props(ditto, "dc.test:rack-fine")["tempTop"] == 21.5
        assert "tempTop" not in props(ditto, "dc.test:rack-broken")  # given up (created empty, never patched)
        assert metrics.internal_errors._value.get() == 2 + ditto_sink.MAX_UNEXPECTED_FAILURES
        assert metrics.ditto_updates.labels("error")._value.get() == 1
        assert updater.healthy  # one rack's bug says nothing about Ditto
    finally:
        updater.stop(timeout=2)


def test_a_confirmation_that_raises_strands_neither_its_rack_nor_the_others(bridge_environ, ditto, influxd,
                                                                           influx_db):
    """A confirmation callback raising (a bug downstream of the sinks) is logged and counted: the other
    confirmations of that update or batch still run, and the Ditto worker lives on to send the rack's next
    reading. Before, it died with the rack marked scheduled but queued nowhere: never updated again, its messages
    never acknowledged, and once the receive window filled, the bridge stopped."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink
    from bridge.sinks.ditto import DittoUpdater

    def boom() -> None:
        raise RuntimeError("a bug in a confirmation")

    metrics = Metrics()
    updater = DittoUpdater(load_settings(ditto_concurrency=1), metrics)  # one worker: its death would stop all
    updater.start()
    writer = influx_sink.InfluxWriter(load_settings(), metrics)  # not started: the three land in one batch
    now = int(time.time() * 1000)
    confirmed: list[str] = []
    try:
        loc = RackLocation("site1", "room1", "row1", "rack-cb")
        updater.submit(SensorReading(loc, "top", "d", now - 2_000, 21.0, 40.0), boom)
        updater.submit(SensorReading(loc, "top", "d", now - 2_000, 21.0, 40.0), lambda: confirmed.append("same"))
        wait_until(lambda: confirmed == ["same"], what="the other confirmation of that update")
        updater.submit(SensorReading(loc, "top", "d", now - 1_000, 22.0, 40.0), lambda: confirmed.append("next"))
        updater.submit(SensorReading(RackLocation("site1", "room1", "row1", "rack-other"), "top", "d", now, 23.0,
                                     40.0), lambda: confirmed.append("other"))
        wait_until(lambda: len(confirmed) == 3, timeout=20, what="the rack's next reading and another rack's")
        assert props(ditto, "dc.test:rack-cb")["tempTop"] == 22.0

        for i, callback in enumerate((lambda: confirmed.append("p0"), boom, lambda: confirmed.append("p2"))):
            writer.submit([f"rack_environment,rack=cb{i},position=top temperature=21.5 {now}"], callback)
        writer.start()
        wait_until(lambda: {"p0", "p2"} <= set(confirmed), what="the batch's other confirmations")
        assert metrics.internal_errors._value.get() == 2
    finally:
        updater.stop(timeout=2)
        writer.stop(timeout=5)
    assert len(influxd.rows("SELECT temperature FROM rack_environment", influx_db)) == 3


def test_tag_values_with_separators_and_control_characters_reach_influxdb_intact(influxd, influx_db):
    """Config-supplied room/row names and pattern-matched device names may hold any of these; each point must
    still parse, and read back with its tags (control characters as spaces)."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    names = {"hall 1": "hall 1", "a,b=c": "a,b=c", "tab\there": "tab here", "line\nbreak": "line break",
             "cr\rx": "cr x", "ends\\": "ends "}  # a trailing backslash cannot survive: it would escape the separator
    ts = int(time.time() * 1000) - 60_000
    lines = [reading_line(SensorReading(RackLocation("site1", name, "row1", f"rack-{i}"), "top", f"dev {i}",
                                        ts, 21.0 + i, 40.0)) for i, name in enumerate(names)]
    influxd.write(lines, influx_db, timeout=5)
    rows = influxd.rows("SELECT temperature, room, device FROM rack_environment", influx_db)
    assert sorted((r["room"], r["temperature"]) for r in rows) == sorted(
        (stored, 21.0 + i) for i, stored in enumerate(names.values()))


def test_readiness_reports_influxdb_only_once_it_answered(bridge_environ, monkeypatch, influx_adapter):
    """An idle bridge must not claim InfluxDB is reachable before it ever was: it asks /ping itself."""
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink
    from tests.harness.services import free_port

    monkeypatch.setattr(influx_sink, "PROBE_INTERVAL_S", 0.2)
    monkeypatch.setenv("RACKTWIN_INFLUX_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("RACKTWIN_INFLUX_TIMEOUT_S", "1")
    nowhere = influx_sink.InfluxWriter(load_settings(), Metrics())
    assert not nowhere.healthy
    nowhere.start()
    time.sleep(1.0)
    assert not nowhere.healthy and "ping" in (nowhere.last_error or "")
    nowhere.stop(timeout=2)

    monkeypatch.setenv("RACKTWIN_INFLUX_URL", influx_adapter.url)
    there = influx_sink.InfluxWriter(load_settings(), Metrics())
    there.start()
    wait_until(lambda: there.healthy, timeout=5, what="InfluxDB reached without any write")
    there.stop(timeout=2)


def test_a_refused_message_costs_only_its_own_points(bridge_environ, monkeypatch, influxd, influx_db):
    """InfluxDB refuses a whole write for one bad line: the writer narrows the refusal down to that message,
    writes and confirms the others of the batch, and counts only the bad message's points as refused."""
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink

    metrics = Metrics()
    writer = influx_sink.InfluxWriter(load_settings(), metrics)  # not started: the five land in one batch
    ts = int(time.time() * 1000) - 60_000
    confirmed = []
    for i in range(5):
        line = (f"rack_environment,rack=r{i},position=top temperature=21.5 {ts}" if i != 3 else
                f"rack_environment,rack=r{i},position=top temperature=\"hot\" {ts}")  # a string: type conflict
        writer.submit([line], lambda i=i: confirmed.append(i))
    writer.submit([f"rack_environment,rack=r9,position=top temperature=22.0 {ts}"], lambda: confirmed.append(9))
    writer.start()
    wait_until(lambda: len(confirmed) == 6, what="every message confirmed")
    writer.stop(timeout=5)
    rows = influxd.rows("SELECT temperature, rack FROM rack_environment", influx_db)
    assert sorted(r["rack"] for r in rows) == ["r0", "r1", "r2", "r4", "r9"]
    assert metrics.value("racktwin_influx_points_refused_total") == 1
    assert metrics.value("racktwin_influx_points_written_total", {"kind": "reading"}) == 5


@pytest.mark.parametrize("fault", [503, 401])
def test_batches_the_client_gives_up_on_are_handed_back_until_written(fault, bridge_environ, monkeypatch, influxd,
                                                                     influx_db):
    """influxdb-client gives up on a batch after a short round of retries on 503, and at once on 401 (a token the
    bootstrap has not created yet): the writer hands the batch back until InfluxDB takes it. A message spread over
    two batches is confirmed once, after all of its points are written."""
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink
    from tests.conftest import INFLUX_TOKEN
    from tests.harness.services import InfluxV2Adapter

    monkeypatch.setattr(influx_sink, "RESUBMIT_BACKOFF_S", (0.1, 0.5))
    adapter = InfluxV2Adapter(influxd.url, token=INFLUX_TOKEN).start()
    monkeypatch.setenv("RACKTWIN_INFLUX_URL", adapter.url)
    monkeypatch.setenv("RACKTWIN_INFLUX_BATCH_SIZE", "3")  # 3-point messages straddle these batches
    metrics = Metrics()
    writer = influx_sink.InfluxWriter(load_settings(), metrics)
    ts = int(time.time() * 1000) - 60_000
    confirmed: list[int] = []
    points_at_confirmation: list[int] = []

    def confirm(i: int) -> None:  # on the writer's thread, as the pipeline's callback would run
        rows = influxd.rows(f"SELECT count(temperature) FROM rack_environment WHERE rack = 'r{i}'", influx_db)
        points_at_confirmation.append(rows[0]["count"] if rows else 0)
        confirmed.append(i)

    try:
        adapter.fail_status = fault
        writer.start()
        for i in range(10):
            writer.submit([f"rack_environment,rack=r{i},position=top temperature={20 + i}.5 {ts}",
                           f"rack_environment,rack=r{i},position=bottom temperature={18 + i}.5 {ts}",
                           f"rack_environment,rack=r{i},position=middle temperature={19 + i}.5 {ts}"],
                          lambda i=i: confirm(i))
        wait_until(lambda: metrics.value("racktwin_influx_write_errors_total", {"kind": "http"}) >= 6,
                   timeout=30, what="batches failing and handed back")
        assert confirmed == [] and not writer.healthy and str(fault) in (writer.last_error or "")
        adapter.fail_status = None
        wait_until(lambda: len(confirmed) == 10, timeout=30, what="every message confirmed after recovery")
        time.sleep(0.5)
        assert sorted(confirmed) == list(range(10))  # each exactly once
        assert points_at_confirmation == [3] * 10  # and only once all three of its points were in InfluxDB
        assert writer.healthy
    finally:
        writer.stop(timeout=5)
        adapter.stop()
    rows = influxd.rows("SELECT temperature, rack, position FROM rack_environment", influx_db)
    assert sorted((r["rack"], r["position"], r["temperature"]) for r in rows) == sorted(
        (f"r{i}", pos, base + i + 0.5) for i in range(10) for pos, base in (("top", 20), ("bottom", 18), ("middle", 19)))
    assert metrics.value("racktwin_influx_points_written_total", {"kind": "reading"}) == 30


def test_stopping_while_influxdb_is_down_returns_in_time_and_confirms_nothing_unwritten(bridge_environ, monkeypatch):
    """SIGTERM during an outage: stop() gives up after its timeout (the broker keeps the unacknowledged messages)
    instead of hanging in the client's retries, and no message is confirmed that InfluxDB never took."""
    from bridge.metrics import Metrics
    from bridge.sinks import influx as influx_sink
    from tests.harness.services import free_port

    monkeypatch.setenv("RACKTWIN_INFLUX_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    writer = influx_sink.InfluxWriter(load_settings(), Metrics())
    writer.start()
    confirmed = []
    ts = int(time.time() * 1000) - 60_000
    for i in range(5):
        writer.submit([f"rack_environment,rack=r{i},position=top temperature=21.5 {ts}"], lambda: confirmed.append(1))
    time.sleep(1.0)
    started = time.monotonic()
    writer.stop(timeout=1.0)
    assert time.monotonic() - started < 5.0
    assert confirmed == [] and not writer.healthy


def test_influx_writer_feeder_survives_a_client_that_raises(bridge_environ, influxd, influx_db):
    """An exception out of the client's write() is logged and retried; it must not kill the feeder, which would
    leave every later reading unwritten (and its message unacknowledged) without a word."""
    from bridge.metrics import Metrics

    failures = [RuntimeError("client bug")]

    def flaky(client_write):
        def write(**kwargs):
            if failures:
                raise failures.pop()
            return client_write(**kwargs)
        return write

    metrics = Metrics()
    writer = _writer_with_client_write(metrics, flaky)
    confirmed = []
    ts = int(time.time() * 1000) - 60_000
    try:
        for i in range(3):
            writer.submit([f"rack_environment,rack=r{i},position=top temperature=21.5 {ts + i}"],
                          lambda i=i: confirmed.append(i))
            wait_until(lambda: len(confirmed) == i + 1, what=f"message {i} written")
    finally:
        writer.stop(timeout=5)
    assert confirmed == [0, 1, 2] and metrics.value("racktwin_internal_errors_total") == 1
    assert len(influxd.rows("SELECT temperature FROM rack_environment", influx_db)) == 3


def test_a_reconnect_while_a_sink_is_down_does_not_take_in_the_redelivered_window_again(mosquitto):
    """Messages in flight when the connection drops come again on the next one (their packet ids died with it).
    Taken in as new, every reconnect during an outage would add another receive window to what the bridge holds;
    instead each copy's packet id goes to the message already in flight, which acks it once confirmed."""
    import socket as socket_module

    from bridge.metrics import Metrics
    from bridge.source_mqtt import MqttSource

    window = 20
    settings = load_settings(mqtt_host="127.0.0.1", mqtt_port=mosquitto.port, mqtt_receive_maximum=window,
                             mqtt_topic="redeliver/#", mqtt_client_id=f"redeliver-{time.monotonic_ns()}")
    held: list[tuple[bytes, object]] = []  # a sink that confirms nothing until we say so
    metrics = Metrics()
    source = MqttSource(settings, metrics, lambda topic, payload, ack: held.append((payload, ack)))
    source.start()
    publisher = Publisher(mosquitto.port)
    try:
        assert source.connected.wait(10)
        publisher.publish_all([("redeliver/x", f"m{i}".encode()) for i in range(100)])
        wait_until(lambda: len(held) == window, what="one receive window in flight")
        for reconnect in range(1, 4):
            source.client.socket().shutdown(socket_module.SHUT_RDWR)  # a network blip or broker restart
            wait_until(lambda r=reconnect: metrics.redelivered_in_flight._value.get() == window * r, timeout=20,
                       what=f"the window redelivered after reconnect {reconnect}")
            assert len(held) == window  # nothing taken in twice
        for _, ack in list(held):
            ack()  # the sink recovers: each ack goes out on the current connection
        wait_until(lambda: len(held) == 100, timeout=20, what="the rest delivered once the window was acked")
        assert sorted(int(p[1:]) for p, _ in held) == list(range(100))
        for _, ack in held[window:]:
            ack()
    finally:
        source.stop()
        publisher.close()


def test_a_twin_dated_ahead_of_the_clock_is_named_once_while_it_holds_readings_back(bridge_environ, ditto, caplog):
    """A device clock running fast (mapping accepts up to max_future_s ahead) dates the twin ahead: readings older
    than that are stale until real time catches up. The stale counter alone would leave ops guessing; one warning
    per twin names it, and comes again only after a write went through."""
    from bridge.mapping import RackLocation, SensorReading

    updater, metrics = started_updater()
    loc = RackLocation("site1", "room1", "row1", "rack-fast-clock")
    tid = "dc.test:rack-fast-clock"
    now = int(time.time() * 1000)
    confirmed: list[int] = []

    def submit(ts_ms: int, temp: float) -> None:
        updater.submit(SensorReading(loc, "top", "d", ts_ms, temp, 45.0), lambda: confirmed.append(ts_ms))
        wait_until(lambda: ts_ms in confirmed, what=f"reading {ts_ms} confirmed")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "ahead of this bridge's clock" in r.getMessage()]

    try:
        with caplog.at_level(logging.WARNING, logger="bridge.sinks.ditto"):
            submit(now - 5_000, 21.0)
            submit(now - 6_000, 21.5)  # stale, but the twin is not dated ahead: an ordinary duplicate
            assert warnings() == [] and metrics.value("racktwin_ditto_stale_total") == 1
            submit(now + 200_000, 22.0)  # the device's clock jumps 200 s ahead
            submit(now + 1_000, 23.0)
            submit(now + 2_000, 23.5)
            assert props(ditto, tid)["tempTop"] == 22.0
            assert len(warnings()) == 1, warnings()
            ahead_s = float(re.search(r"dated (\d+) s ahead", warnings()[0]).group(1))
            assert tid in warnings()[0] and "its top reading" in warnings()[0] and 190 <= ahead_s <= 200
            submit(now + 210_000, 24.0)  # a write goes through: the next hold-back is news again
            submit(now + 3_000, 24.5)
            assert len(warnings()) == 2 and metrics.value("racktwin_ditto_stale_total") == 4
    finally:
        updater.stop(timeout=2)
