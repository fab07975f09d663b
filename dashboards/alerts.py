"""Grafana-managed alert rules, contact points, notification templates and policy as plain data (provisioning files).

grafanalib's alert classes emit the ruler-API shape, ``mode: strict`` reducers and no threshold expression,
none of which Grafana's file loader accepts, so the rules are built here as dicts: each rule is one InfluxQL
query (A) -> reduce (B) -> threshold (C), multi-dimensional by the query's GROUP BY tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bridge.thresholds import (FORECAST_ALERT_FOR_S, FORECAST_ALERT_INTERVAL_S, FORECAST_ALERT_KEEP_FIRING_S,
                               FORECAST_ALERT_QUERY_RANGE_S)

from .common import BRIDGE_UID, FORECAST_MEASUREMENT, INFLUX_UID, MEASUREMENT, RACK_PATH, RACK_UID, WALL_PATH
from .datasources import WALL_FOLDER
from .thresholds import STUCK_MIN_READINGS, Thresholds
from .wall import SENSOR_TAGS, delta_per_rack, num, silent_sensors_per_series, stuck_sensors_per_series

FOLDER = WALL_FOLDER  # beside the wall, whose anonymous viewers must read the rules for its alert count
RACK_GROUP = "rack-environment"
FORECAST_GROUP = "rack-forecast"  # evaluated more often than the rest (bridge/thresholds.py says why)
RACK_GROUPS = (RACK_GROUP, FORECAST_GROUP)  # rules per rack and position: their annotations link the rack detail
GROUP_INTERVAL_S = 60
GROUP_INTERVALS_S = {FORECAST_GROUP: FORECAST_ALERT_INTERVAL_S}  # bridge.forecast.evaluate replays the forecast's
RACK_TAGS = '"site", "room", "row", "rack"'
RECEIVER = "racktwin-noc"
# The watchdog: a rule that always fires, whose notifications go to a dead man's switch (WATCHDOG_URL) that pages
# when they stop, i.e. when Grafana, its host or its way out is down, which no rule inside Grafana can report.
# Its own folder: the wall counts the firing rules of its folder, and this one is no news.
WATCHDOG_RECEIVER = "racktwin-watchdog"
WATCHDOG_GROUP = "watchdog"
WATCHDOG_FOLDER = f"{WALL_FOLDER} watchdog"
WATCHDOG_REPEAT = "5m"  # how often the switch hears from a healthy Grafana
# Rack names may hold & # +. A "no data" or "error" alert carries only the rule's labels, no rack: it links the
# wall (unguarded, Grafana's missing key reaches urlquery as nil, and the link read ?var-rack=%3Cnil%3E).
# The address is Grafana's own root_url (GF_SERVER_ROOT_URL, from GRAFANA_ROOT_URL), which annotation templates
# get as externalURL, always ending in "/" (pkg/setting parseAppUrlAndSubUrl). Not ${GRAFANA_ROOT_URL}: which
# file provisioning expands depends on the release (rules_types.go: one stored version takes annotations raw,
# Annotations.Raw, a later one expands braced variables only, ValueWithBracedVars), so that might reach the
# notification literally; externalURL works either way.
RACK_LINK = ("{{ if $labels.rack }}{{ externalURL }}" + RACK_PATH.lstrip("/")
             + "?var-rack={{ urlquery $labels.rack }}{{ else }}{{ externalURL }}" + WALL_PATH.lstrip("/") + "{{ end }}")
WHERE_SENSOR = "{{ $labels.rack }} {{ $labels.position }}"


@dataclass(frozen=True)
class RuleSpec:
    uid: str
    title: str
    query: str
    range_s: int
    reducer: str
    evaluator: str
    params: tuple[float, ...]
    severity: str
    summary: str
    for_: str = "0s"
    # No series at all: for a rule on readings that means no reading in its window, which is what the
    # silent-sensor rule (per sensor, 24 h back) and bridge-down report; a NoData alert from each of a dozen
    # rules on top of those would page twelve times for one cause, and fire on a fresh stack before data.
    no_data: str = "OK"
    # A query error (InfluxDB unreachable) says nothing about the racks: keep each instance's last state rather
    # than resolve or fire it; the bridge-down rule alone reports the error, so a blind wall pages once.
    exec_err: str = "KeepLast"
    labels: dict[str, str] = field(default_factory=dict)
    group: str = RACK_GROUP
    # How long an alert stays firing after its condition cleared: a reading hovering at a limit would otherwise
    # resolve and fire again with every bit of sensor noise, a pair of notifications each time.
    keep_firing_for: str | None = None
    dashboard_uid: str = RACK_UID
    # Evaluations a firing alert whose series has gone from the result (its sensor went silent) stays firing;
    # Grafana's default is 2.
    missing_series_evals: int | None = None
    reduce_settings: dict[str, Any] = field(default_factory=lambda: {"mode": "dropNN"})


def latest(field_name: str) -> str:
    return (f'SELECT last("{field_name}") AS "{field_name}" FROM "{MEASUREMENT}" WHERE $timeFilter '
            f"GROUP BY {SENSOR_TAGS}")


# How far back the silent-sensor rule looks for sensors that used to report. A sensor silent for longer drops
# out of the result and its alert resolves, so this is a day, not an hour: the engineer paged at 3 a.m. must not
# see it "resolve" at 4 while the sensor is still dead. (Cost: one count per sensor over the lookback.)
SILENT_LOOKBACK_S = 24 * 3600
SILENT_TITLE = "Sensor stopped reporting"


# Bridge-down's window: an instance whose newest stats are older than this is down (stats come every 10 s).
BRIDGE_RECENT_S = 120


def bridge_ready_per_instance() -> str:
    """Per bridge instance that wrote stats in the range: its newest ``ready`` of the last 2 min (1 ready, 0 not),
    or -1 when it wrote none in that time. Every instance of the range gets a row from the second subquery, the
    silent-sensor rule's way: with only the recent stats, a replica that died beside a live one left the result
    (no "no data" either, the live one is there) and Grafana dropped its alert without a page."""
    recent = (f'SELECT last("ready") + 1 AS "r" FROM "racktwin_bridge" WHERE time > now() - {BRIDGE_RECENT_S}s '
              'GROUP BY "instance"')
    known = 'SELECT last("ready") * 0 - 1 AS "r" FROM "racktwin_bridge" WHERE $timeFilter GROUP BY "instance"'
    return f'SELECT sum("r") AS "ready" FROM ({recent}), ({known}) GROUP BY "instance"'


VALUE = '{{ printf "%.1f" $values.B.Value }}'
MINUTES = COUNT = '{{ printf "%.0f" $values.B.Value }}'


RESOLVED_READY = "in a resolved notification: ready again"


def breach(firing: str, back: str, no_data: str | None = None) -> str:
    """A summary that says what the condition's value says. Grafana renders annotations on every evaluation
    from that evaluation's values, so the text of an alert held by keepFiringFor, and of its "resolved"
    notification, comes from an evaluation where the condition no longer holds: that one reads ``back``.
    C is the threshold (1 breached, 0 not); a NaN C, which Grafana takes for firing, reads ``firing``.
    ``no_data``: the text for no values at all (a rule whose no-data state raises an alert of its own);
    without it such a rule would print the template half-expanded."""
    text = f"{{{{ if and $values (lt $values.C.Value 0.5) }}}}{back}"
    if no_data is None:
        return text + f"{{{{ else }}}}{firing}{{{{ end }}}}"
    return text + f"{{{{ else if $values }}}}{firing}{{{{ else }}}}{no_data}{{{{ end }}}}"


def duration(seconds: int) -> str:
    """Seconds as a Grafana duration: 60 -> "1m", 90 -> "90s"."""
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


# The forecast rule's value for a position forecast (trend known) with no crossing ahead: below the threshold's
# range, so it reads as judged and resolves as such.
NO_CROSSING = -1


def minutes_to_recommended_per_series() -> str:
    """Per rack position with a forecast in the range: the newest minutes to the recommended limit, or
    ``NO_CROSSING`` where no forecast of the range has one (the field is absent when none is forecast,
    bridge/forecast/tracker.py). Every forecast carries its trend, so the second subquery gives each forecast
    position a row: with the crossing forecasts alone, a rack whose rise levelled off left the result, and Grafana
    ended its alert as a missing series ("no longer reported"), or, the only one, as no data at all."""
    crossing = (f'SELECT last("minutes_to_recommended") AS "m" FROM "{FORECAST_MEASUREMENT}" WHERE $timeFilter '
                f"GROUP BY {SENSOR_TAGS}")
    forecast = (f'SELECT last("trend_c_per_h") * 0 + {NO_CROSSING} AS "m" FROM "{FORECAST_MEASUREMENT}" '
                f"WHERE $timeFilter GROUP BY {SENSOR_TAGS}")
    return f'SELECT max("m") AS "minutes_to_recommended" FROM ({crossing}), ({forecast}) GROUP BY {SENSOR_TAGS}'


def forecast_rule(t: Thresholds) -> RuleSpec:
    """Fires per rack position whose newest forecast (bridge/forecast, measurement rack_forecast) reaches the
    recommended limit within the horizon. A position forecast to cross no limit reads ``NO_CROSSING`` (judged OK);
    one with no forecast at all (held back: silent, stuck, warming up) has no series."""
    limit = t.temp_recommended[1]
    return RuleSpec(
        "racktwin-forecast-recommended", "Rack heading for the recommended temperature limit",
        minutes_to_recommended_per_series(),
        # Within (0, horizon): 0 means the line is already above the limit, which the inlet rule reports; counted
        # in, the alert would fire and resolve after the breach as the trend of a rack at its peak wavers.
        FORECAST_ALERT_QUERY_RANGE_S, "last", "within_range", (0, t.forecast_horizon_min), "warning",
        breach(f"{WHERE_SENSOR} forecast to pass {num(limit)} °C in {MINUTES} min",
               f"{{{{ if gt $values.B.Value 0.0 }}}}{WHERE_SENSOR} no longer forecast to pass {num(limit)} °C "
               f"within {num(t.forecast_horizon_min)} min (in {MINUTES} min){{{{ else if lt $values.B.Value 0.0 }}}}"
               f"{WHERE_SENSOR} no longer heading for {num(limit)} °C (its trend forecasts no crossing)"
               f"{{{{ else }}}}{WHERE_SENSOR} forecast already at or above {num(limit)} °C (the inlet rule reports "
               "it){{ end }}"),
        for_=duration(FORECAST_ALERT_FOR_S), labels={"kind": "forecast"}, group=FORECAST_GROUP,
        keep_firing_for=duration(FORECAST_ALERT_KEEP_FIRING_S))


# How long a rule on a single reading against an ASHRAE limit keeps firing after it cleared (the silent, stuck,
# rate and bridge rules judge a window, not a single reading, and do without; the forecast keeps firing too,
# bridge/thresholds.py says why).
ENVELOPE_KEEP_FIRING = "10m"


# A limit alert whose sensor goes silent would resolve some 12 min after its last reading (its window runs empty,
# and Grafana resolves a missing series after 2 evaluations): a "resolved" for a rack nobody knows the state of.
# It stays firing for as long as the silent-sensor rule names the sensor, so both speak until someone looks.
LIMIT_MISSING_SERIES_EVALS = SILENT_LOOKBACK_S // GROUP_INTERVAL_S


def measured_delta_per_rack() -> str:
    """Top − bottom per rack where both positions have a reading in the range. One position silent leaves the rack's
    row with a null delta: reduced to NaN it fired (Grafana takes a NaN condition for firing), counted as 0 it
    resolved a firing alert by evaluation, "top − bottom 0.0 °C, back at or below 5 °C", a difference nobody
    measured. ``last`` over the rows drops the null, so such a rack has no series: a firing alert stays firing as a
    missing series (LIMIT_MISSING_SERIES_EVALS), none starts, and the silent-sensor rule names the position."""
    return f'SELECT last("delta") AS "delta" FROM ({delta_per_rack("", RACK_TAGS)}) GROUP BY {RACK_TAGS}'


def spread_of_reporting_sensors(t: Thresholds) -> str:
    """Per sensor position with a reading in the last 3 reporting intervals: max − min temperature over the range.
    A sensor that stopped mid-rise kept its last readings in the window as it slid on, the spread of what was left
    shrank, and the rule resolved it by evaluation ("changed 4.5 °C within 15 min, back within the limit") with
    nothing measured for minutes. Silent (the silent-sensor rule's definition), it has no series: Grafana ends its
    alert as no longer reported."""
    spread = (f'SELECT spread("temperature") AS "s" FROM "{MEASUREMENT}" WHERE $timeFilter '
              f"GROUP BY {SENSOR_TAGS}")
    recent = (f'SELECT count("temperature") AS "n" FROM "{MEASUREMENT}" WHERE time > now() - {t.silent_after_s}s '
              f"GROUP BY {SENSOR_TAGS}")
    # The recent count first, as in the silent-sensor query: after the spread's subquery InfluxDB 1.6.7 summed it
    # to null (tests/test_alert_rules.py runs this on it).
    both = f'SELECT sum("n") AS "n", sum("s") AS "spread" FROM ({recent}), ({spread}) GROUP BY {SENSOR_TAGS}'
    # "spread" >= 0 drops a row without one (a reading counted as recent but older than the range): null is firing.
    return f'SELECT "spread" FROM ({both}) WHERE "n" > 0 AND "spread" >= 0 GROUP BY {SENSOR_TAGS}'


def limit_rule(*args: Any, **kwargs: Any) -> RuleSpec:
    """A rule on the last reading against an ASHRAE (or top − bottom) limit: it flaps at the threshold, and its
    sensor going silent says nothing about the rack. Nor does every sensor going silent (bridge or broker down):
    Grafana applies the no-data state to every alert of the rule, so that is KeepLast, not OK, which would resolve
    them all some 20 minutes on (no "no data" alert either way: silent-sensor and bridge-down report that)."""
    return RuleSpec(*args, keep_firing_for=ENVELOPE_KEEP_FIRING, missing_series_evals=LIMIT_MISSING_SERIES_EVALS,
                    no_data="KeepLast", **kwargs)


def rule_specs(t: Thresholds) -> list[RuleSpec]:
    (t_rec_lo, t_rec_hi), (t_all_lo, t_all_hi) = t.temp_recommended, t.temp_allowable
    (dp_rec_lo, dp_rec_hi), (dp_all_lo, dp_all_hi) = t.dew_point_recommended, t.dew_point_allowable
    rh_lo, rh_hi = t.rh_allowable
    cls = t.ashrae_class
    between_readings = "" if t.rate_span_s == t.rate_window_s else " between readings"  # the window grew (thresholds)
    return [
        limit_rule("racktwin-inlet-recommended", "Inlet temperature outside recommended envelope",
                   latest("temperature"), 600, "last", "outside_range", (t_rec_lo, t_rec_hi), "warning",
                   breach(f"{WHERE_SENSOR} inlet {VALUE} °C outside recommended {num(t_rec_lo)}–{num(t_rec_hi)} °C",
                          f"{WHERE_SENSOR} inlet {VALUE} °C, back inside recommended "
                          f"{num(t_rec_lo)}–{num(t_rec_hi)} °C"),
                   for_="5m"),
        limit_rule("racktwin-inlet-allowable", f"Inlet temperature outside {cls} allowable", latest("temperature"),
                   600, "last", "outside_range", (t_all_lo, t_all_hi), "critical",
                   breach(f"{WHERE_SENSOR} inlet {VALUE} °C outside {cls} allowable "
                          f"{num(t_all_lo)}–{num(t_all_hi)} °C",
                          f"{WHERE_SENSOR} inlet {VALUE} °C, back inside {cls} allowable "
                          f"{num(t_all_lo)}–{num(t_all_hi)} °C"),
                   for_="1m"),
        limit_rule("racktwin-dewpoint-recommended", "Dew point above recommended", latest("dew_point"),
                   600, "last", "gt", (dp_rec_hi,), "warning",
                   breach(f"{WHERE_SENSOR} dew point {VALUE} °C above recommended {num(dp_rec_hi)} °C",
                          f"{WHERE_SENSOR} dew point {VALUE} °C, back at or below recommended {num(dp_rec_hi)} °C"),
                   for_="5m"),
        limit_rule("racktwin-dewpoint-allowable", f"Dew point above {cls} allowable", latest("dew_point"),
                   600, "last", "gt", (dp_all_hi,), "critical",
                   breach(f"{WHERE_SENSOR} dew point {VALUE} °C above {cls} allowable {num(dp_all_hi)} °C",
                          f"{WHERE_SENSOR} dew point {VALUE} °C, back at or below {cls} allowable "
                          f"{num(dp_all_hi)} °C"),
                   for_="1m"),
        limit_rule("racktwin-humidity-recommended", "Relative humidity above recommended cap", latest("humidity"),
                   600, "last", "gt", (t.rh_cap,), "warning",
                   breach(f"{WHERE_SENSOR} RH {VALUE} % above recommended {num(t.rh_cap)} %",
                          f"{WHERE_SENSOR} RH {VALUE} %, back at or below recommended {num(t.rh_cap)} %"), for_="5m"),
        limit_rule("racktwin-humidity-allowable", f"Relative humidity above {cls} allowable", latest("humidity"),
                   600, "last", "gt", (rh_hi,), "critical",
                   breach(f"{WHERE_SENSOR} RH {VALUE} % above {cls} allowable {num(rh_hi)} %",
                          f"{WHERE_SENSOR} RH {VALUE} %, back at or below {cls} allowable {num(rh_hi)} %"), for_="1m"),
        limit_rule("racktwin-dry-dewpoint-recommended", "Dry air: dew point below recommended", latest("dew_point"),
                   600, "last", "lt", (dp_rec_lo,), "warning",
                   breach(f"{WHERE_SENSOR} dew point {VALUE} °C below recommended {num(dp_rec_lo)} °C",
                          f"{WHERE_SENSOR} dew point {VALUE} °C, back at or above recommended {num(dp_rec_lo)} °C"),
                   for_="5m"),
        limit_rule("racktwin-dry-dewpoint-allowable", "Dry air: dew point below allowable", latest("dew_point"),
                   600, "last", "lt", (dp_all_lo,), "critical",
                   breach(f"{WHERE_SENSOR} dew point {VALUE} °C below allowable {num(dp_all_lo)} °C",
                          f"{WHERE_SENSOR} dew point {VALUE} °C, back at or above allowable {num(dp_all_lo)} °C"),
                   for_="1m"),
        limit_rule("racktwin-dry-humidity-allowable", "Dry air: RH below allowable", latest("humidity"),
                   600, "last", "lt", (rh_lo,), "critical",
                   breach(f"{WHERE_SENSOR} RH {VALUE} % below allowable {num(rh_lo)} %",
                          f"{WHERE_SENSOR} RH {VALUE} %, back at or above allowable {num(rh_lo)} %"), for_="1m"),
        limit_rule("racktwin-recirculation", "Top − bottom inlet difference (recirculation)",
                   # The window holds a reading of each live position: 5 min, or 3 reporting intervals if longer
                   # (a rack with a position without one in it has no series, and would restart the 10-minute "for").
                   measured_delta_per_rack(), max(300, t.silent_after_s), "last", "gt", (t.delta_t_limit_c,),
                   "warning",
                   breach(f"{{{{ $labels.rack }}}} top − bottom {VALUE} °C above {num(t.delta_t_limit_c)} °C "
                          f"for {t.delta_t_for} (recirculation?)",
                          f"{{{{ $labels.rack }}}} top − bottom {VALUE} °C, back at or below "
                          f"{num(t.delta_t_limit_c)} °C"),
                   for_=t.delta_t_for, labels={"position": "top-bottom"}),
        RuleSpec("racktwin-rate-of-change", "Inlet temperature changing too fast",
                 spread_of_reporting_sensors(t), t.rate_window_s, "last", "gt", (t.rate_limit_c,), "warning",
                 breach(f"{WHERE_SENSOR} inlet changed {VALUE} °C within {t.rate_window_s // 60} min "
                        f"(limit {num(t.rate_limit_c_per_h)} °C/h)",
                        f"{WHERE_SENSOR} inlet changed {VALUE} °C within {t.rate_window_s // 60} min, back within "
                        f"the limit of {num(t.rate_limit_c)} °C{between_readings} "
                        f"({num(t.rate_limit_c_per_h)} °C/h)")),
        RuleSpec("racktwin-sensor-silent", SILENT_TITLE,
                 silent_sensors_per_series(t, "", SENSOR_TAGS), SILENT_LOOKBACK_S, "last", "lt", (0.001,), "warning",
                 breach(f"{WHERE_SENSOR} sent no reading (or no humidity) for more than {t.silent_after_s} s "
                        f"({COUNT} readings in {t.silent_after_s // t.reading_interval_s} intervals of "
                        f"{t.reading_interval_s} s)",
                        f"{WHERE_SENSOR} reporting again ({COUNT} readings in the last {t.silent_after_s} s)",
                        no_data=f"No rack sensor has reported in the last {SILENT_LOOKBACK_S // 3600} h (on a new "
                                "install: none yet): is ThingsBoard's rule chain forwarding telemetry?"),
                 # no sensor reported all day: say so. The 5 min give a fresh stack time for its first reading
                 # (a window of no data at all also waits out "for") and a sensor a minute's hiccup.
                 for_="5m", no_data="NoData"),
        RuleSpec("racktwin-sensor-stuck", "Sensor stuck (reports the same values)",
                 stuck_sensors_per_series(), t.stuck_window_s, "last", "lt", (0.001,), "warning",
                 breach(f"{WHERE_SENSOR} reported identical temperature and humidity for "
                        f"{t.stuck_window_s // 60} min (spread {VALUE}, at least {STUCK_MIN_READINGS} readings)",
                        f"{WHERE_SENSOR} readings vary again (spread {VALUE} over {t.stuck_window_s // 60} min)")),
        forecast_rule(t),
        RuleSpec("racktwin-bridge-down", "Bridge down or not ready",
                 bridge_ready_per_instance(), SILENT_LOOKBACK_S, "last", "lt", (1,), "critical",
                 # A bridge silent for 2 min has B = -1 (bridge_ready_per_instance) and fires by name. No data
                 # (no bridge wrote stats for a day) with an alert of the bridge already there: Grafana copies it
                 # to the no-data state without rendering its annotations again (state manager,
                 # setNextStateForAll), so it fires with the text rendered at its last evaluation, maybe while the
                 # bridge was ready (B >= 1). That text therefore tells of the silence; it is also the text of the
                 # "resolved" once the bridge is ready again. No alert there yet: a new one without values (last
                 # branch), as is one with NaN for B.
                 "{{ if and $values (ge $values.B.Value 1.0) }}No stats from bridge {{ $labels.instance }} in "
                 f"InfluxDB for 2 min (its last said ready; {RESOLVED_READY}): the bridge is down or cut off from "
                 "InfluxDB, or Grafana cannot query InfluxDB"
                 "{{ else if and $values (ge $values.B.Value 0.0) }}Bridge {{ $labels.instance }} is not ready "
                 "(ready = {{ $values.B.Value }}): MQTT, Ditto or InfluxDB unreachable, see its /readyz"
                 "{{ else if and $values $labels.instance (lt $values.B.Value 0.0) }}Bridge {{ $labels.instance }} "
                 f"sent no stats to InfluxDB for {BRIDGE_RECENT_S // 60} min (it did in the last "
                 f"{SILENT_LOOKBACK_S // 3600} h): it is down or cut off from InfluxDB{{{{ else }}}}"
                 "No bridge stats in InfluxDB for 2 min: the bridge is down or cut off from InfluxDB, or Grafana "
                 "cannot query InfluxDB{{ end }}",
                 for_="1m", no_data="Alerting", exec_err="Error", labels={"component": "bridge"}, group="bridge",
                 dashboard_uid=BRIDGE_UID),
        RuleSpec("racktwin-bridge-lagging", "Bridge lagging",
                 'SELECT max("lag") AS "lag" FROM '
                 '(SELECT last("lag_influx_p95") AS "lag" FROM "racktwin_bridge" WHERE $timeFilter GROUP BY "instance"), '
                 '(SELECT last("lag_ditto_p95") AS "lag" FROM "racktwin_bridge" WHERE $timeFilter GROUP BY "instance"), '
                 # A hung InfluxDB confirms nothing, so writes no lag: the oldest unconfirmed message shows it.
                 '(SELECT last("oldest_in_flight_s") AS "lag" FROM "racktwin_bridge" WHERE $timeFilter '
                 'GROUP BY "instance") GROUP BY "instance"',
                 300, "last", "gt", (t.bridge_lag_limit_s,), "warning",
                 breach(f"Bridge {{{{ $labels.instance }}}} lags {VALUE} s behind (p95 to a sink, or its oldest "
                        f"unconfirmed message), more than {num(t.bridge_lag_limit_s)} s",
                        f"Bridge {{{{ $labels.instance }}}} lag {VALUE} s, back at or below "
                        f"{num(t.bridge_lag_limit_s)} s"),
                 # KeepLast, not OK: without stats (bridge-down reports that) OK would resolve a firing lag alert
                 # from a copy of its firing state, annotations not rendered again: a "resolved" that still reads
                 # "lags 45 s behind" while nobody knows. Its next stats judge it.
                 for_="5m", no_data="KeepLast", labels={"component": "bridge"}, group="bridge",
                 dashboard_uid=BRIDGE_UID),
    ]


def watchdog_rule() -> RuleSpec:
    """Fires whatever the query gives (no data and errors included: the bridge-down rule reports those), so its
    notifications stop only when Grafana stops evaluating or notifying. The query is one cheap InfluxQL count:
    a Grafana rule needs a data query to evaluate."""
    return RuleSpec(
        "racktwin-watchdog", "Watchdog (always firing)",
        'SELECT count("ready") AS "stats" FROM "racktwin_bridge" WHERE $timeFilter', 300, "last", "gt", (-1,),
        "info",
        "RackTwin watchdog: Grafana evaluates the alert rules and sends notifications. It always fires; its "
        f"notifications go to WATCHDOG_URL alone, every {WATCHDOG_REPEAT}, and when they stop that service pages",
        no_data="Alerting", exec_err="Alerting", labels={"component": "watchdog"}, group=WATCHDOG_GROUP,
        dashboard_uid=BRIDGE_UID)


def rule(spec: RuleSpec) -> dict:
    expr_ds = {"type": "__expr__", "uid": "__expr__"}
    annotations = {"summary": spec.summary}
    if spec.group in RACK_GROUPS:
        annotations["rack_detail_url"] = RACK_LINK
    return {
        "uid": spec.uid,
        "title": spec.title,
        "condition": "C",
        "data": [
            {"refId": "A", "queryType": "", "relativeTimeRange": {"from": spec.range_s, "to": 0},
             "datasourceUid": INFLUX_UID,
             "model": {"refId": "A", "rawQuery": True, "resultFormat": "time_series", "query": spec.query,
                       "intervalMs": 1000, "maxDataPoints": 43200,
                       "datasource": {"type": "influxdb", "uid": INFLUX_UID}}},
            {"refId": "B", "queryType": "", "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
             "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": spec.reducer,
                       "settings": spec.reduce_settings, "datasource": expr_ds}},
            {"refId": "C", "queryType": "", "relativeTimeRange": {"from": 0, "to": 0}, "datasourceUid": "__expr__",
             "model": {"refId": "C", "type": "threshold", "expression": "B",
                       "conditions": [{"evaluator": {"type": spec.evaluator, "params": list(spec.params)}}],
                       "datasource": expr_ds}},
        ],
        "dashboardUid": spec.dashboard_uid,
        "noDataState": spec.no_data,
        "execErrState": spec.exec_err,
        "for": spec.for_,
        **({"keepFiringFor": spec.keep_firing_for} if spec.keep_firing_for else {}),
        **({"missing_series_evals_to_resolve": spec.missing_series_evals} if spec.missing_series_evals else {}),
        "isPaused": False,
        "labels": {"severity": spec.severity, **spec.labels},
        "annotations": annotations,
    }


def rules_file(t: Thresholds, watchdog: bool = False) -> dict:
    """``watchdog``: add the watchdog rule (only where a WATCHDOG_URL takes its notifications). Without it, the
    file deletes the rule: Grafana keeps a provisioned rule a file no longer lists, and with its route gone (the
    policy file replaces the whole tree) an always-firing rule would reach the NOC."""
    groups: dict[str, list[dict]] = {}
    for spec in rule_specs(t) + ([watchdog_rule()] if watchdog else []):
        groups.setdefault(spec.group, []).append(rule(spec))
    out: dict[str, Any] = {"apiVersion": 1, "groups": [
        {"orgId": 1, "name": name, "folder": WATCHDOG_FOLDER if name == WATCHDOG_GROUP else FOLDER,
         "interval": duration(GROUP_INTERVALS_S.get(name, GROUP_INTERVAL_S)), "rules": rules}
        for name, rules in groups.items()]}
    if not watchdog:
        out["deleteRules"] = [{"orgId": 1, "uid": watchdog_rule().uid}]
    return out


# --- notifications --------------------------------------------------------------------------------------------
# Grafana's default message prints each alert's annotations as they are. An alert that resolves without an
# evaluation of its own keeps the text it was last rendered with, its firing text: the state manager resolves a
# series gone from the result for missing_series_evals_to_resolve evaluations as stale (processMissingSeriesStates:
# State Normal, StateReason "MissingSeries", annotations untouched), and a rule whose query finds nothing at all
# with noDataState OK (setNextStateForAll copies each alert, reason "NoData"). StateToPostableAlert hands the reason
# on as the annotation grafana_state_reason, which the template data keeps (removePrivateItems drops only __x__).
# So "resolved: rack-07 top inlet 29.0 °C outside recommended 18–27 °C" went out for a rack that merely stopped
# reporting. The template below prints the summary of an alert resolved by an evaluation (it says "back inside"),
# and for one resolved without says so. A "no data" or "error" alert (alertname DatasourceNoData/DatasourceError,
# the rule's title in rulename) resolves as MissingSeries once its rule answers with series: that one did end.
TEMPLATE_GROUP = "racktwin"
TITLE_TEMPLATE = "racktwin.title"
MESSAGE_TEMPLATE = "racktwin.message"
STATE_REASON = ".Annotations.grafana_state_reason"
MISSING_SERIES = f'(match "MissingSeries" {STATE_REASON})'
KEPT_LAST = f'(match "KeepLast" {STATE_REASON})'
DATASOURCE_ALERT = '(or (eq .Labels.alertname "DatasourceNoData") (eq .Labels.alertname "DatasourceError"))'
# An alert of the rule as a whole: a "no data" or "error" alert, or one a no-data state of Alerting raised
# (bridge-down without any stats), which keeps the rule's title as alertname but carries no series label (every
# rack rule's series has a rack, every bridge rule's an instance). Resolved as a missing series, it did end: its
# rule answers with series again.
RULE_WIDE = f"(or {DATASOURCE_ALERT} (and (not .Labels.rack) (not .Labels.instance)))"
JUDGED = f"or (not {STATE_REASON}) (and {MISSING_SERIES} {RULE_WIDE})"  # a resolved alert that did end


def template_call(name: str) -> str:
    return f'{{{{ template "{name}" . }}}}'


def notification_templates() -> str:
    """The template group: racktwin.title (email subject, webhook title) and racktwin.message, one entry per alert:
    its state, its text, the rule and the labels a reader needs, the rack detail (else the rule's dashboard)."""
    silent = f'(eq .Labels.alertname "{SILENT_TITLE}")'
    lookback = f"{SILENT_LOOKBACK_S // 3600} h"
    where = ("{{ if .Labels.rack }}{{ .Labels.rack }}{{ if .Labels.position }} {{ .Labels.position }}{{ end }}"
             "{{ else if .Labels.instance }}Bridge {{ .Labels.instance }}"
             "{{ else if .Labels.rulename }}{{ .Labels.rulename }}{{ else }}{{ .Labels.alertname }}{{ end }}")
    text = (
        '{{ if eq .Status "firing" }}FIRING: {{ .Annotations.summary }}'
        # Held by KeepLast (no data, or a query error): the state manager keeps it firing with reason
        # "NoData, KeepLast" / "Error, KeepLast" and the text of its last evaluation, which may be hours old.
        f'{{{{ if {KEPT_LAST} }}}} (held as last judged: its query {{{{ if match "^Error" {STATE_REASON} }}}}fails'
        "{{ else }}finds no data{{ end }}){{ end }}"
        f"{{{{ else if {JUDGED} }}}}RESOLVED: {{{{ if {RULE_WIDE} }}}}"
        "{{ if .Labels.rulename }}{{ .Labels.rulename }}{{ else }}{{ .Labels.alertname }}{{ end }}: "
        '{{ if eq .Labels.alertname "DatasourceError" }}its query works again{{ else }}its query finds series again'
        "{{ end }} (was: {{ .Annotations.summary }}){{ else }}{{ .Annotations.summary }}{{ end }}"
        f'{{{{ else if {MISSING_SERIES} }}}}NO LONGER REPORTED: {{{{ template "racktwin.where" . }}}}: '
        f"{{{{ if {silent} }}}}silent for more than {lookback}, or removed: past this rule's {lookback} look-back, "
        "it ends without a reading{{ else }}no longer reported, so this alert can no longer be judged{{ end }} "
        f"(last: {{{{ .Annotations.summary }}}}){{{{ if and .Labels.rack (not {silent}) }}}}; "
        f'see "{SILENT_TITLE}"{{{{ end }}}}'
        '{{ else }}ENDED UNJUDGED: {{ template "racktwin.where" . }}: ended without a new judgement '
        f'({{{{ if eq {STATE_REASON} "NoData" }}}}its query found no data at all'
        f'{{{{ else if eq {STATE_REASON} "Error" }}}}its query failed'
        f"{{{{ else }}}}Grafana's reason: {{{{ {STATE_REASON} }}}}{{{{ end }}}}; last: {{{{ .Annotations.summary }}}})"
        "{{ end }}\n")
    labels = ("  {{ if .Labels.rulename }}{{ .Labels.rulename }} ({{ .Labels.alertname }}){{ else }}"
              "{{ .Labels.alertname }}{{ end }}{{ if .Labels.severity }} | {{ .Labels.severity }}{{ end }}"
              "{{ if .Labels.room }} | room {{ .Labels.room }}{{ end }}"
              "{{ if .Labels.rack }} | rack {{ .Labels.rack }}{{ if .Labels.position }} {{ .Labels.position }}{{ end }}"
              "{{ end }}{{ if .Labels.instance }} | instance {{ .Labels.instance }}{{ end }}\n")
    link = ("{{ if .Annotations.rack_detail_url }}  {{ .Annotations.rack_detail_url }}\n"
            "{{ else if .DashboardURL }}  {{ .DashboardURL }}\n{{ end }}")
    # The title's states: FIRING with its count; RESOLVED, NO LONGER REPORTED and ENDED UNJUDGED where one is.
    title = (
        "{{ $resolved := false }}{{ $gone := false }}{{ $unjudged := false }}{{ range .Alerts.Resolved }}"
        f"{{{{ if {JUDGED} }}}}{{{{ $resolved = true }}}}{{{{ else if {MISSING_SERIES} }}}}{{{{ $gone = true }}}}"
        "{{ else }}{{ $unjudged = true }}{{ end }}{{ end }}"
        '[{{ $sep := "" }}{{ if .Alerts.Firing }}FIRING:{{ len .Alerts.Firing }}{{ $sep = ", " }}{{ end }}'
        '{{ if $resolved }}{{ $sep }}RESOLVED{{ $sep = ", " }}{{ end }}'
        '{{ if $gone }}{{ $sep }}NO LONGER REPORTED{{ $sep = ", " }}{{ end }}'
        "{{ if $unjudged }}{{ $sep }}ENDED UNJUDGED{{ end }}] "
        "{{ if .CommonLabels.rulename }}{{ .CommonLabels.rulename }} ({{ .CommonLabels.alertname }})"
        "{{ else if .CommonLabels.alertname }}{{ .CommonLabels.alertname }}{{ else }}{{ len .Alerts }} alerts{{ end }}"
        "{{ if .GroupLabels.room }} | {{ .GroupLabels.room }}"
        "{{ if .GroupLabels.site }} ({{ .GroupLabels.site }}){{ end }}{{ end }}")
    message = ('{{ range .Alerts.Firing }}{{ template "racktwin.alert" . }}{{ end }}'
               '{{ range .Alerts.Resolved }}{{ template "racktwin.alert" . }}{{ end }}')
    defines = {"racktwin.where": where, "racktwin.alert": text + labels + link, TITLE_TEMPLATE: title,
               MESSAGE_TEMPLATE: message}
    return "".join(f'{{{{ define "{name}" }}}}{body}{{{{ end }}}}\n' for name, body in defines.items())


def templates_file() -> dict:
    """Notification templates; their content is not env-expanded by file provisioning (Grafana's docs), so
    the $ of template variables needs no escaping there (the contact points' settings are expanded)."""
    return {"apiVersion": 1, "templates": [{"orgId": 1, "name": TEMPLATE_GROUP, "template": notification_templates()}]}


def contact_points_file(watchdog: bool = False) -> dict:
    title, message = template_call(TITLE_TEMPLATE), template_call(MESSAGE_TEMPLATE)
    points = [{"orgId": 1, "name": RECEIVER, "receivers": [
        {"uid": "racktwin-webhook", "type": "webhook", "disableResolveMessage": False,
         "settings": {"url": "${ALERT_WEBHOOK_URL}", "httpMethod": "POST", "title": title, "message": message}},
        {"uid": "racktwin-email", "type": "email", "disableResolveMessage": False,
         "settings": {"addresses": "${ALERT_EMAIL_TO}", "singleEmail": True, "subject": title, "message": message}},
    ]}]
    if watchdog:  # no resolve message: the switch would take it for one more sign of life
        points.append({"orgId": 1, "name": WATCHDOG_RECEIVER, "receivers": [
            {"uid": "racktwin-watchdog-webhook", "type": "webhook", "disableResolveMessage": True,
             "settings": {"url": "${WATCHDOG_URL}", "httpMethod": "POST"}}]})
    return {"apiVersion": 1, "contactPoints": points}


def policies_file(watchdog: bool = False) -> dict:
    routes = [{"receiver": RECEIVER, "object_matchers": [["severity", "=", "critical"]],
               "group_by": ["site", "room"], "group_wait": "10s", "group_interval": "1m", "repeat_interval": "1h"}]
    if watchdog:  # first, and not continued: the NOC never hears of it
        routes.insert(0, {"receiver": WATCHDOG_RECEIVER, "object_matchers": [["component", "=", "watchdog"]],
                          "group_by": ["alertname"], "group_wait": "0s", "group_interval": "1m",
                          "repeat_interval": WATCHDOG_REPEAT})
    return {"apiVersion": 1, "policies": [{
        # By site and room: two sites may both have a "hall1". A critical in a room already paged goes out
        # within a minute, not with the warnings' 5.
        "orgId": 1, "receiver": RECEIVER, "group_by": ["site", "room"],
        "group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h", "routes": routes,
    }]}
