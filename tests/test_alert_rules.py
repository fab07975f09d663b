"""Alert rules evaluated as Grafana would (query -> reduce -> threshold) on data the real bridge wrote:
crafted readings make exactly the expected racks and positions fire."""

from __future__ import annotations

import requests
import pytest

from bridge.config import Settings
from bridge.metrics import Metrics
from bridge.stats import stats_lines
from dashboards.thresholds import Thresholds
from dashboards import alerts
from tests.dashboard_data import (FLAT, FORECAST_POSITIONS, RACKS, RISING_FAST, RISING_SLOW, RULE_GROUPS,
                                 feed_through_bridge)
from tests.grafana_sim import at_time, evaluate_rule, influx_frames, rule_query

RULES = {r["uid"]: r for g in RULE_GROUPS for r in g["rules"]}

EXPECTED = {
    # hot tops and a cold bottom: both ends of each band
    "racktwin-inlet-recommended": {("rack-a02", "top"), ("rack-a04", "top"), ("rack-b02", "bottom")},
    "racktwin-inlet-allowable": {("rack-a04", "top"), ("rack-b02", "bottom")},
    "racktwin-dewpoint-recommended": {("rack-b01", "top")},
    "racktwin-dewpoint-allowable": {("rack-b01", "top")},
    "racktwin-humidity-recommended": {("rack-b01", "top")},
    "racktwin-humidity-allowable": {("rack-b01", "top")},
    "racktwin-dry-dewpoint-recommended": {("rack-b02", "bottom")},
    "racktwin-dry-dewpoint-allowable": {("rack-b02", "bottom")},
    "racktwin-dry-humidity-allowable": {("rack-b02", "bottom")},
    "racktwin-recirculation": {("rack-a02", None), ("rack-a04", None), ("rack-b02", None)},
    "racktwin-rate-of-change": {("rack-b03", "top")},
    "racktwin-sensor-silent": {("rack-a03", "top"), ("rack-a03", "bottom")},
    "racktwin-sensor-stuck": {("rack-b05", "top"), ("rack-b05", "bottom")},
    # about 26 min to 27 °C; the slow riser (about 130 min) and the flat bottoms must not fire
    "racktwin-forecast-recommended": {RISING_FAST},
}
# Rules on the bridge's forecast are evaluated just after it published (the others at the feed's "now").
FORECAST_RULES = {"racktwin-forecast-recommended"}


def make_runner(influxd, db: str, now_ms: int):
    def run(model: dict, rel: dict):
        query = at_time(rule_query(model, rel, now_ms), now_ms)
        resp = requests.post(influxd.url + "/query", params={"q": query, "db": db, "epoch": "ms"}, timeout=30)
        resp.raise_for_status()
        return influx_frames(resp.json())
    return run


def firing_set(result) -> set[tuple[str, str | None]]:
    return {(dict(k).get("rack"), dict(k).get("position")) for k in result.firing}


@pytest.fixture
def fed(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto):
    return feed_through_bridge(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto)


def test_expectations_cover_every_rack_rule():
    rack_rules = {s.uid for s in alerts.rule_specs(Thresholds()) if s.group in alerts.RACK_GROUPS}
    assert rack_rules == set(EXPECTED)


def test_a_sensor_silent_for_hours_keeps_firing(fed, influxd, influx_db):
    """Two hours after the last reading every sensor is still reported silent: the rule's lookback must outlast
    the outage, or Grafana would resolve the alert while the sensor is dead."""
    rule = RULES["racktwin-sensor-silent"]
    every_series = set(evaluate_rule(rule, make_runner(influxd, influx_db, fed.now_ms)).values)
    later = evaluate_rule(rule, make_runner(influxd, influx_db, fed.now_ms + 2 * 3600 * 1000))
    assert later.state == "Evaluated" and len(every_series) > 2
    assert set(later.firing) == every_series


def test_exactly_the_expected_racks_fire(fed, influxd, influx_db):
    run = make_runner(influxd, influx_db, fed.now_ms)
    run_forecast = make_runner(influxd, influx_db, fed.forecast_ms + 1000)
    mismatches = {}
    for uid, expected in EXPECTED.items():
        result = evaluate_rule(RULES[uid], run_forecast if uid in FORECAST_RULES else run)
        assert result.state == "Evaluated", f"{uid}: no data"
        # every instance carries the labels routing and the summary need
        for labels in result.values:
            assert {"rack", "room", "row", "site"} <= dict(labels).keys(), (uid, labels)
        if firing_set(result) != expected:
            mismatches[uid] = (sorted(map(str, firing_set(result))), sorted(map(str, expected)))
    assert not mismatches, mismatches
    # the recirculation rule saw every rack and got the right signed difference for rack-a02 (29 - 21)
    result = evaluate_rule(RULES["racktwin-recirculation"], run)
    deltas = {dict(k)["rack"]: v for k, v in result.values.items()}
    assert deltas["rack-a02"] == pytest.approx(8.0) and deltas["rack-a01"] == pytest.approx(3.0)


def test_forecast_rule_fires_for_the_fast_riser_only(fed, influxd, influx_db):
    rule = RULES["racktwin-forecast-recommended"]
    result = evaluate_rule(rule, make_runner(influxd, influx_db, fed.forecast_ms + 1000))
    minutes = {(dict(k)["rack"], dict(k)["position"]): v for k, v in result.values.items()}
    # Every forecast position has a series, so its alert ends judged when its rise levels off: a crossing's minutes,
    # or NO_CROSSING for the rest (the flat bottoms among them), whose forecasts carry no minutes_to_recommended.
    assert set(minutes) == set(FORECAST_POSITIONS)
    assert 20 <= minutes[RISING_FAST] < 30 and minutes[RISING_SLOW] > 60
    others = set(FORECAST_POSITIONS) - {RISING_FAST, RISING_SLOW}
    assert set(FLAT) <= others and {minutes[p] for p in others} == {alerts.NO_CROSSING}
    assert firing_set(result) == {RISING_FAST}
    # The flat positions do have forecasts (a level, trend about 0): silent about a crossing, not missing.
    rows = influxd.rows('SELECT last("trend_c_per_h") AS "trend" FROM "rack_forecast" GROUP BY "rack", "position"',
                        influx_db)
    trends = {(r["rack"], r["position"]): r["trend"] for r in rows}
    assert set(trends) == set(FORECAST_POSITIONS) and all(abs(trends[p]) < 0.5 for p in FLAT)
    # Once the newest forecast is older than the query range (no publisher), nothing fires: no data counts as OK.
    later = evaluate_rule(rule, make_runner(influxd, influx_db, fed.forecast_ms + 1000 * (rule["data"][0][
        "relativeTimeRange"]["from"] + 60)))
    assert later.state == "NoData" and rule["noDataState"] == "OK"
    # The threshold is the forecast horizon the bridge uses for "heading for trouble", above 0 (0 = already over).
    assert rule["data"][2]["model"]["conditions"][0]["evaluator"]["params"] == [0, Settings.model_fields[
        "forecast_horizon_min"].default]


def _replica_stats(instance: str, ready: bool, oldest_in_flight_s: float, now_ms: int) -> list[str]:
    """Stats lines as another bridge replica writes them (bridge/stats.py), with nothing delivered yet."""
    metrics = Metrics()
    metrics.oldest_in_flight.set(oldest_in_flight_s)
    return stats_lines(metrics, instance, ready, {}, now_ms)


def test_bridge_rules(fed, influxd, influx_db):
    # Two more replicas: one not ready (a sink unreachable), one ready whose oldest message has waited 2 min for a
    # sink that hangs: it confirms nothing, so it writes no lag, and only the waiting message shows it.
    # And one that died an hour ago, ready to its last: beside live replicas the rule still has data, so only a
    # row of its own tells of it (without one, Grafana dropped its series, Normal, without a page).
    lines = (_replica_stats("replica-not-ready", False, 0.0, fed.now_ms)
             + _replica_stats("replica-stalled", True, 120.0, fed.now_ms)
             + _replica_stats("replica-died", True, 0.0, fed.now_ms - 3_600_000))
    influxd.write(lines, influx_db)
    run = make_runner(influxd, influx_db, fed.now_ms + 5000)
    down = evaluate_rule(RULES["racktwin-bridge-down"], run)
    assert down.state == "Evaluated" and len(down.values) == 4
    by_instance = {dict(k)["instance"]: v for k, v in down.values.items()}
    assert by_instance == {fed.instance: 1.0, "replica-stalled": 1.0, "replica-not-ready": 0.0, "replica-died": -1.0}
    assert {dict(k)["instance"] for k in down.firing} == {"replica-not-ready", "replica-died"}, \
        "a running, ready bridge must not fire"
    # The crafted history was published up to 19 min after its source timestamps: that is real lag.
    lag = evaluate_rule(RULES["racktwin-bridge-lagging"], run)
    assert {dict(k)["instance"] for k in lag.firing} == {fed.instance, "replica-stalled"}
    assert {dict(k)["instance"]: v for k, v in lag.values.items()}["replica-not-ready"] == 0.0
    # Ten minutes later with no stats (every bridge stopped): each fires by name, as silent.
    later = evaluate_rule(RULES["racktwin-bridge-down"], make_runner(influxd, influx_db, fed.now_ms + 600_000))
    assert {dict(k)["instance"]: v for k, v in later.values.items()} == dict.fromkeys(by_instance, -1.0)
    assert {dict(k)["instance"] for k in later.firing} == set(by_instance)
    # A day and more without stats (or a fresh stack): no data, which this rule treats as firing.
    gone = evaluate_rule(RULES["racktwin-bridge-down"], make_runner(influxd, influx_db, fed.now_ms + 25 * 3_600_000))
    assert gone.state == "NoData" and RULES["racktwin-bridge-down"]["noDataState"] == "Alerting"


def test_a_rack_with_one_position_silent_is_not_judged_for_recirculation(fed, influxd, influx_db):
    """Its top still reports, its bottom went quiet: there is no top − bottom to judge. Reduced to NaN it would
    fire (Grafana takes a NaN condition for firing); counted as 0 it resolved a firing alert by evaluation, and
    the engineer read "rack top − bottom 0.0 °C, back at or below 5 °C", a difference nobody measured. The rack
    has no series instead: a firing alert stays firing as a missing series (the limit rules' day), none starts."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    loc = RackLocation("site1", "hall-1", "A", "rack-half")
    lines = [reading_line(SensorReading(loc, "bottom", "b", fed.now_ms - 20 * 60_000, 21.0, 45.0))]
    lines += [reading_line(SensorReading(loc, "top", "t", fed.now_ms - m * 60_000, 24.0, 45.0)) for m in range(4)]
    influxd.write(lines, influx_db)
    rule = RULES["racktwin-recirculation"]
    result = evaluate_rule(rule, make_runner(influxd, influx_db, fed.now_ms))
    assert result.state == "Evaluated"
    assert not {k for k in result.values if dict(k)["rack"] == "rack-half"}, result.values
    assert firing_set(result) == EXPECTED["racktwin-recirculation"]
    assert rule["missing_series_evals_to_resolve"] * 60 >= alerts.SILENT_LOOKBACK_S


def test_when_all_telemetry_stops_the_silent_sensors_and_the_bridge_page_and_nothing_else(fed, influxd, influx_db):
    """Half an hour after the last reading and the last bridge stats: every rule on readings finds no series,
    which Grafana turns into a DatasourceNoData alert unless the rule says OK. The absence is one cause, told by
    the silent-sensor rule (each sensor, by name) and bridge-down; a dozen NoData pages beside them are noise."""
    run = make_runner(influxd, influx_db, fed.now_ms + 30 * 60_000)
    paging = {}
    for uid, rule in RULES.items():
        result = evaluate_rule(rule, run)
        if result.firing:
            paging[uid] = firing_set(result)
        elif result.state == "NoData" and rule["noDataState"] in ("Alerting", "NoData"):
            paging[uid] = "no data"
    assert set(paging) == {"racktwin-sensor-silent", "racktwin-bridge-down"}, paging
    assert paging["racktwin-sensor-silent"] == {(rack, pos) for rack in RACKS for pos in ("top", "bottom")}
    # A day without any reading at all leaves the silent rule nothing to name: then it says "no data".
    assert RULES["racktwin-sensor-silent"]["noDataState"] == "NoData"
    # And what fired before keeps firing: Grafana applies the no-data state to every alert of a rule, and a rack
    # at 29 °C is no cooler for its readings stopping (OK would resolve them all).
    limit_rules = [r for r in RULES.values() if r.get("missing_series_evals_to_resolve")]
    assert limit_rules and all(r["noDataState"] == "KeepLast" for r in limit_rules)


def test_the_watchdog_fires_with_the_bridge_s_stats_and_without_them(fed, influxd, influx_db):
    """The watchdog (generated where WATCHDOG_URL is set) fires as one alert, not one per bridge, and keeps firing
    when its query finds nothing or fails: those are bridge-down's to report; it stops only with Grafana."""
    (watchdog,) = [r for g in alerts.rules_file(Thresholds(), watchdog=True)["groups"] for r in g["rules"]
                   if r["labels"].get("component") == "watchdog"]
    now = evaluate_rule(watchdog, make_runner(influxd, influx_db, fed.now_ms + 5000))
    assert now.state == "Evaluated" and len(now.firing) == 1 and list(now.firing.values())[0] >= 1
    later = evaluate_rule(watchdog, make_runner(influxd, influx_db, fed.now_ms + 30 * 60_000))
    assert later.state == "NoData" and watchdog["noDataState"] == "Alerting"
    assert watchdog["execErrState"] == "Alerting"


def test_when_influxdb_cannot_be_queried_one_rule_reports_it():
    """Query errors say nothing about the racks: every rule keeps its instances' last state, and bridge-down
    (which reads InfluxDB too) alone turns the error into an alert, so the NOC hears once that it is blind."""
    errors = {uid: rule["execErrState"] for uid, rule in RULES.items()}
    assert {uid for uid, state in errors.items() if state != "KeepLast"} == {"racktwin-bridge-down"}
    assert errors["racktwin-bridge-down"] == "Error"
    assert RULES["racktwin-bridge-down"]["labels"]["severity"] == "critical"


def test_wall_tile_states_agree_with_the_envelope_rules(fed, ditto):
    """The bridge's envelope state on each twin (the wall tiles' value and colour) and the Grafana rules judge
    the same readings alike: critical where an allowable-class rule fires, SILENT where the silent-sensor rule
    does (and nothing critical), a warning state where only recommended-envelope rules fire, OK elsewhere."""
    from bridge.thresholds import ENVELOPE_CRITICAL, SILENT

    envelope_rules = {uid for uid in EXPECTED if any(k in uid for k in ("inlet", "dewpoint", "humidity"))}
    critical = {rack for uid in envelope_rules if uid.endswith("allowable") for rack, _ in EXPECTED[uid]}
    warning = {rack for uid in envelope_rules if uid.endswith("recommended") for rack, _ in EXPECTED[uid]} - critical
    states = {t["attributes"]["rack"]: t["features"]["environment"]["properties"]["envelope"]
              for t in ditto.things.values()}
    assert critical and warning
    silent = {rack for rack, _ in EXPECTED["racktwin-sensor-silent"]} - critical
    assert {r for r, s in states.items() if s in ENVELOPE_CRITICAL} == critical, states
    assert silent and {r for r, s in states.items() if s == SILENT} == silent, states
    assert {r for r, s in states.items() if s not in ENVELOPE_CRITICAL | {SILENT, "OK"}} == warning - silent, states


def test_a_sensor_whose_humidity_stops_is_reported_silent(fed, influxd, influx_db):
    """Its temperature still arrives, its humidity stopped 20 min ago (at 75 %, above the RH cap): the RH and
    dew-point rules have no series for it, so they neither fire nor judge it, and a count of temperature alone
    called the sensor healthy: nothing paged while its humidity went unwatched. A position that never reported
    humidity (a rack with one humidity sensor, at the top) is judged on its temperature and stays quiet."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    loc = RackLocation("site1", "hall-1", "A", "rack-hum")
    lines = []
    for m in range(40, -1, -1):
        ts = fed.now_ms - m * 60_000
        lines.append(reading_line(SensorReading(loc, "top", "t", ts, 24.0 + m % 3 / 10, 75.0 if m >= 20 else None)))
        lines.append(reading_line(SensorReading(loc, "bottom", "b", ts, 21.0 + m % 2 / 10, None)))
    influxd.write(lines, influx_db)
    run = make_runner(influxd, influx_db, fed.now_ms)
    humidity = evaluate_rule(RULES["racktwin-humidity-recommended"], run)
    assert not {k for k in humidity.values if dict(k)["rack"] == "rack-hum"}, "no RH series left to judge"
    silent = evaluate_rule(RULES["racktwin-sensor-silent"], run)
    by_position = {dict(k)["position"]: v for k, v in silent.values.items() if dict(k)["rack"] == "rack-hum"}
    assert by_position == {"top": 0.0, "bottom": 3.0}
    assert firing_set(silent) == EXPECTED["racktwin-sensor-silent"] | {("rack-hum", "top")}


def test_a_position_without_a_humidity_sensor_is_judged_stuck_on_its_temperature(fed, influxd, influx_db):
    """A rack with one humidity sensor (at the top): the bottom's spread of humidity is null, and temperature +
    null was null, which Grafana takes for firing: every such position paged "stuck" while its readings varied.
    Its temperature alone now judges it: varying, quiet; identical for the window, stuck."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    lines = []
    for rack, varies in (("rack-nohum-ok", True), ("rack-nohum-stuck", False)):
        loc = RackLocation("site1", "hall-1", "A", rack)
        for m in range(20, -1, -1):
            ts = fed.now_ms - m * 60_000
            lines.append(reading_line(SensorReading(loc, "top", "t", ts, 24.0 + m % 3 / 10, 40.0 + m % 2)))
            lines.append(reading_line(SensorReading(loc, "bottom", "b", ts, 21.0 + (m % 2 / 10 if varies else 0),
                                                    None)))
    influxd.write(lines, influx_db)
    stuck = evaluate_rule(RULES["racktwin-sensor-stuck"], make_runner(influxd, influx_db, fed.now_ms))
    spread = {(dict(k)["rack"], dict(k)["position"]): v for k, v in stuck.values.items()
              if dict(k)["rack"].startswith("rack-nohum")}
    assert spread[("rack-nohum-ok", "bottom")] == pytest.approx(0.1)
    assert spread[("rack-nohum-stuck", "bottom")] == 0.0
    assert {k for k in firing_set(stuck) if k[0].startswith("rack-nohum")} == {("rack-nohum-stuck", "bottom")}
    assert firing_set(stuck) - {("rack-nohum-stuck", "bottom")} == EXPECTED["racktwin-sensor-stuck"]


@pytest.mark.parametrize("interval_s", [900, 1200])
def test_the_rate_rule_sees_a_fast_rise_of_a_sensor_reporting_every_15_min_or_more(fed, influxd, influx_db,
                                                                                    interval_s):
    """With readings 15 min or more apart a 15-min window holds one reading at most: the spread was always 0 and
    the rule could not fire, whatever the ramp. Its window grows to two intervals, its limit pro rata."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    t = Thresholds(reading_interval_s=interval_s)
    rule = next(r for g in alerts.rules_file(t)["groups"] for r in g["rules"] if r["uid"] == "racktwin-rate-of-change")
    window_s = rule["data"][0]["relativeTimeRange"]["from"]
    # The readings in the window are one interval apart: the limit is the hourly one for that interval.
    assert window_s == 2 * interval_s and rule["data"][2]["model"]["conditions"][0]["evaluator"]["params"] == [
        pytest.approx(t.rate_limit_c_per_h * interval_s / 3600, abs=1e-3)]
    assert "between readings (20 °C/h)" in rule["annotations"]["summary"]
    assert f"within {window_s // 60} min" in rule["annotations"]["summary"]
    lines = []
    for rack, c_per_h in ((f"rack-ramp-{interval_s}", 40.0), (f"rack-slow-{interval_s}", 10.0)):
        loc = RackLocation("site1", "hall-1", "A", rack)
        for i in range(6, -1, -1):
            ts = fed.now_ms - i * interval_s * 1000 - 30_000
            lines.append(reading_line(SensorReading(loc, "top", "t", ts, 20.0 - c_per_h * i * interval_s / 3600,
                                                    45.0)))
    influxd.write(lines, influx_db)
    result = evaluate_rule(rule, make_runner(influxd, influx_db, fed.now_ms))
    spread = {dict(k)["rack"]: v for k, v in result.values.items() if dict(k)["rack"].endswith(f"-{interval_s}")}
    assert spread[f"rack-ramp-{interval_s}"] == pytest.approx(40.0 * interval_s / 3600)
    assert spread[f"rack-slow-{interval_s}"] == pytest.approx(10.0 * interval_s / 3600)
    assert {k for k in firing_set(result) if k[0].endswith(f"-{interval_s}")} == {(f"rack-ramp-{interval_s}", "top")}


def test_a_rising_sensor_that_goes_silent_is_not_resolved_by_its_shrinking_window(influxd, influx_db):
    """A sensor rising 0.5 °C a minute fires (7 °C in 15 min), then stops. Its last readings stay in the 15-min
    window as it slides on, the spread of what is left shrinks, and five minutes on the rule judged 4.5 °C "back
    within the limit": a RESOLVED for a rack nobody measured since. A position without a reading in the silent
    rule's 3 intervals has no series instead (Grafana ends its alert as no longer reported, see the silent rule);
    one still reporting is judged on its window."""
    from bridge.mapping import RackLocation, SensorReading
    from bridge.sinks.influx import reading_line

    t = Thresholds()
    rule = RULES["racktwin-rate-of-change"]
    now_ms = 1_790_000_000_000
    lines = []
    for rack, stops_min in (("rack-dies", 0), ("rack-lives", 99)):
        loc = RackLocation("site1", "hall-1", "A", rack)
        for m in range(-30, 1):
            ts = now_ms + m * 60_000
            lines.append(reading_line(SensorReading(loc, "top", "t", ts, 27.0 + 0.5 * m, 45.0)))
        # the live one goes on rising; the dead one's last reading is at now_ms
        if stops_min:
            lines += [reading_line(SensorReading(loc, "top", "t", now_ms + m * 60_000, 27.0 + 0.5 * m, 45.0))
                      for m in range(1, 6)]
    influxd.write(lines, influx_db)
    at_death = evaluate_rule(rule, make_runner(influxd, influx_db, now_ms + 1000))
    assert firing_set(at_death) == {("rack-dies", "top"), ("rack-lives", "top")}
    later = evaluate_rule(rule, make_runner(influxd, influx_db, now_ms + 5 * 60_000 + 1000))
    spread = {dict(k)["rack"]: v for k, v in later.values.items()}
    assert "rack-dies" not in spread, spread
    assert spread["rack-lives"] == pytest.approx(7.0) and firing_set(later) == {("rack-lives", "top")}
    # Still silent for less than the silent rule's 3 intervals: judged on the readings it has.
    soon = evaluate_rule(rule, make_runner(influxd, influx_db, now_ms + t.silent_after_s * 1000 - 5000))
    assert {dict(k)["rack"] for k in soon.values} == {"rack-dies", "rack-lives"}
