"""Bridge health from what the bridge writes to InfluxDB itself (measurements racktwin_bridge and
racktwin_rejects, cumulative counters every RACKTWIN_INFLUX_STATS_INTERVAL_S): no Prometheus server to run,
and the "bridge down / lagging" alerts use the same datasource as everything else."""

from __future__ import annotations

from grafanalib.core import Dashboard

from .common import BRIDGE_UID, INFLUX, WALL_PATH, field_defaults, influx_target, render, templating, time_range
from .panels import dashboard_link, grid, stat, timeseries
from .thresholds import Thresholds

BRIDGE = "racktwin_bridge"
REJECTS = "racktwin_rejects"
STATS_INTERVAL = "10s"  # the bridge's default stats period; buckets smaller than it would be empty


def rate(fields: list[str], per: str = "1s") -> str:
    selects = ", ".join(f'non_negative_derivative(last("{f}"), {per}) AS "{f}"' for f in fields)
    return (f'SELECT {selects} FROM "{BRIDGE}" WHERE $timeFilter '
            'GROUP BY time($__interval), "instance" fill(none)')


def build(t: Thresholds) -> dict:
    lag_fields = [f"lag_{sink}_{q}" for sink in ("influx", "ditto") for q in ("p50", "p95", "p99")]
    lag_steps = [{"color": "green", "value": None}, {"color": "orange", "value": t.bridge_lag_limit_s}]
    panels = [
        stat("Bridge ready", grid(0, 0, 4, 4), [influx_target(
            f'SELECT last("ready") AS "ready" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"',
            alias="$tag_instance")],
            field_defaults("none", [{"color": "red", "value": None}, {"color": "green", "value": 1}], 0,
                           mappings=[{"type": "value", "options": {"0": {"text": "NOT READY"}, "1": {"text": "READY"}}}],
                           noValue="NO STATS"), datasource=INFLUX, time_from="1m",
            description="No stats in the last minute means the bridge is down."),
        stat("Messages in flight", grid(4, 0, 4, 4), [influx_target(
            f'SELECT last("in_flight") AS "in_flight" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"',
            alias="$tag_instance")],
            field_defaults("none", [{"color": "green", "value": None}], 0), datasource=INFLUX, time_from="5m"),
        stat("Influx lag p95 (now)", grid(8, 0, 4, 4), [influx_target(
            f'SELECT last("lag_influx_p95") AS "lag_influx_p95" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"',
            alias="$tag_instance")], field_defaults("s", lag_steps, 2), datasource=INFLUX, time_from="5m"),
        stat("Ditto lag p95 (now)", grid(12, 0, 4, 4), [influx_target(
            f'SELECT last("lag_ditto_p95") AS "lag_ditto_p95" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"',
            alias="$tag_instance")], field_defaults("s", lag_steps, 2), datasource=INFLUX, time_from="5m"),
        stat("Rejected (range)", grid(16, 0, 4, 4), [influx_target(
            f'SELECT spread("rejected") AS "rejected" FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"',
            alias="$tag_instance")],
            field_defaults("none", [{"color": "green", "value": None}, {"color": "orange", "value": 1}], 0),
            datasource=INFLUX, description="Messages rejected within the dashboard time range (counter increase)."),
        stat("Influx / Ditto errors (range)", grid(20, 0, 4, 4), [influx_target(
            f'SELECT spread("influx_errors") AS "influx_errors", spread("ditto_errors") AS "ditto_errors" '
            f'FROM "{BRIDGE}" WHERE $timeFilter GROUP BY "instance"')],
            field_defaults("none", [{"color": "green", "value": None}, {"color": "red", "value": 1}], 0),
            datasource=INFLUX),
        timeseries("Throughput (per second)", grid(0, 4, 12, 9), [influx_target(
            rate(["received", "accepted", "rejected", "readings", "influx_points", "ditto_ok", "coalesced"]),
            alias="$col $tag_instance")], field_defaults("ops", None, 1), datasource=INFLUX, interval=STATS_INTERVAL,
            max_data_points=1000),
        timeseries("Rejects by reason (per minute)", grid(12, 4, 12, 9), [influx_target(
            f'SELECT non_negative_derivative(last("count"), 1m) AS "rejects" FROM "{REJECTS}" WHERE $timeFilter '
            # Per instance too: with two replicas, last() over both would mix their counters.
            'GROUP BY time($__interval), "reason", "instance" fill(none)', alias="$tag_reason $tag_instance")],
            field_defaults("none", None, 1), datasource=INFLUX, interval=STATS_INTERVAL, max_data_points=1000,
            custom={"drawStyle": "bars", "fillOpacity": 80, "stacking": {"mode": "normal", "group": "A"}}),
        # ditto_released: readings acknowledged while Ditto was stalled, their twin update still to come.
        timeseries("Sink errors, stale and released twin updates (per minute)", grid(0, 13, 12, 9), [influx_target(
            rate(["influx_errors", "ditto_errors", "ditto_stale", "ditto_released"], per="1m"),
            alias="$col $tag_instance")],
            field_defaults("none", None, 1), datasource=INFLUX, interval=STATS_INTERVAL, max_data_points=1000),
        timeseries("End-to-end lag (source timestamp → written)", grid(12, 13, 12, 9), [influx_target(
            f'SELECT {", ".join(f"max({chr(34)}{f}{chr(34)}) AS {chr(34)}{f}{chr(34)}" for f in lag_fields)} '
            f'FROM "{BRIDGE}" WHERE $timeFilter GROUP BY time($__interval), "instance" fill(none)',
            alias="$col $tag_instance")],
            field_defaults("s", lag_steps, 2), datasource=INFLUX, interval=STATS_INTERVAL, max_data_points=1000,
            custom={"thresholdsStyle": {"mode": "line"}}),
    ]
    dashboard = Dashboard(
        title="Bridge health", uid=BRIDGE_UID, tags=["racktwin"], timezone="browser", refresh="30s",
        time=time_range("now-3h"), editable=False, panels=panels, templating=templating(),
    ).auto_panel_ids()
    return render(dashboard, {"links": [dashboard_link("Data hall wall", WALL_PATH, keep_time=True)],
                              "description": "Throughput, rejects, sink errors and lag of the RackTwin bridge."})
