"""Data hall wall: the NOC screen. Summary stats, one tile per rack from Ditto's current state, a
rack × position heat grid of the last hours from InfluxDB, and the rack positions the bridge's forecast
sees heading for the recommended limit. Fits a 1080p screen in kiosk mode without
scrolling (27 grid units of height) for a hall of 40 racks."""

from __future__ import annotations

import re

from grafanalib.core import Dashboard

from bridge.thresholds import ENVELOPE_STATES, FORECAST_ALERT_QUERY_RANGE_S

from .common import (DITTO, FORECAST_MEASUREMENT, INFLUX, MEASUREMENT, RACK_PATH, ROOM_ROW_FILTER, WALL_UID, Site,
                     column, data_link, field_defaults, infinity_target, influx_target, namespace_variable, render,
                     tag_variable, templating, thresholds, time_range)
from .panels import alert_count, grid, stat, state_timeline, table
from .thresholds import COLORS, ENVELOPE_COLORS, STUCK_MIN_READINGS, Thresholds

# Newest forecasts only: three 30 s publish intervals, the range the forecast alert rule looks at too.
FORECAST_RANGE = f"{FORECAST_ALERT_QUERY_RANGE_S}s"
HEADING_ROWS = 6  # rows of about 36 px (cell height sm) under the header fit 9 grid rows with room to spare
RACK_LINK = RACK_PATH + "?var-rack=${__data.fields.rack:percentencode}&${__url_time_range}"  # Grafana undoes it for & # + (README)


def num(value: float) -> str:
    """A limit as InfluxQL literal: 27.0 -> 27, 27.5 -> 27.5."""
    return f"{value:g}"


def and_(where: str) -> str:
    return f" AND {where}" if where else ""


def latest_per_sensor(where: str = ROOM_ROW_FILTER) -> str:
    return (f'SELECT last("temperature") AS "t", last("dew_point") AS "dp", last("humidity") AS "rh" '
            f'FROM "{MEASUREMENT}" WHERE $timeFilter{and_(where)} GROUP BY "rack", "position"')


def racks_outside(conditions: str) -> str:
    """Number of racks with at least one sensor position whose latest reading meets ``conditions``."""
    return (f'SELECT count("n") AS "racks" FROM (SELECT count("t") AS "n" FROM ({latest_per_sensor()}) '
            f'WHERE {conditions} GROUP BY "rack")')


def recommended_violation(t: Thresholds) -> str:
    (tmin, tmax), (dmin, dmax) = t.temp_recommended, t.dew_point_recommended
    return (f'"t" < {num(tmin)} OR "t" > {num(tmax)} OR "dp" < {num(dmin)} OR "dp" > {num(dmax)} '
            f'OR "rh" > {num(t.rh_cap)}')


def allowable_violation(t: Thresholds) -> str:
    (tmin, tmax), (dmin, dmax), (rmin, rmax) = t.temp_allowable, t.dew_point_allowable, t.rh_allowable
    return (f'"t" < {num(tmin)} OR "t" > {num(tmax)} OR "dp" < {num(dmin)} OR "dp" > {num(dmax)} '
            f'OR "rh" < {num(rmin)} OR "rh" > {num(rmax)}')


def _top_and_bottom(where: str, aggregate: str, group_by: str) -> str:
    """Two subqueries for one FROM, the top inlet as "top" and the bottom as "bottom": InfluxQL cannot join
    positions, but aggregates over both share the outer GROUP BY buckets, which pairs them per rack."""
    sub = (f'SELECT {aggregate}("temperature") AS "{{alias}}" FROM "{MEASUREMENT}" WHERE $timeFilter{and_(where)}'
           f' AND "position" = \'{{pos}}\' GROUP BY {group_by}')
    return f'({sub.format(alias="top", pos="top")}), ({sub.format(alias="bottom", pos="bottom")})'


def delta_per_rack(where: str, group_by: str = '"rack"') -> str:
    """Latest top − bottom inlet difference per rack."""
    return f'SELECT max("top") - max("bottom") AS "delta" FROM {_top_and_bottom(where, "last", group_by)} GROUP BY {group_by}'


def delta_history_per_rack(where: str) -> str:
    """Top − bottom inlet difference per rack over time (the heat grid's recirculation row per rack)."""
    by = 'time($__interval), "rack"'
    return (f'SELECT mean("top") - mean("bottom") AS "delta" FROM {_top_and_bottom(where, "mean", by)} '
            f'WHERE $timeFilter GROUP BY {by} fill(none)')


def silent_sensors_per_series(t: Thresholds, where: str = ROOM_ROW_FILTER,
                              group_by: str = '"rack", "position"') -> str:
    """Per sensor position seen in the range: readings in the last 3 reporting intervals (0 = silent), counted
    for temperature and for humidity apart, the fewer of the two; humidity only where the sensor reported it in
    the range (a position without a humidity sensor is judged on its temperature).

    Per quantity two subqueries, one row per sensor each: the readings counted since ``now() - 3 intervals``, and
    every sensor of the range with 0, so that one gone quiet still has a row. (Counting per interval over the
    whole range with fill(0) said the same, but took 6.9 s instead of 11 ms for 40 racks over 24 h on InfluxDB
    1.6.7.) Humidity apart: a sensor whose humidity stops while its temperature still arrives leaves the RH and
    dew-point rules without a series (their alerts neither fire nor resolve), and counting temperature alone
    called it healthy."""
    def counted(quantity: str) -> str:
        recent = (f'SELECT count("{quantity}") AS "n" FROM "{MEASUREMENT}" '
                  f'WHERE time > now() - {t.silent_after_s}s{and_(where)} GROUP BY {group_by}')
        known = (f'SELECT count("{quantity}") * 0 AS "n" FROM "{MEASUREMENT}" '
                 f'WHERE $timeFilter{and_(where)} GROUP BY {group_by}')
        return f'SELECT sum("n") AS "n" FROM ({recent}), ({known}) GROUP BY {group_by}'
    return f'SELECT min("n") AS "recent" FROM ({counted("temperature")}), ({counted("humidity")}) GROUP BY {group_by}'


# A real sensor's readings wander by at least its noise; identical values for 15 min mean a stuck one.
SENSOR_TAGS = '"site", "room", "row", "rack", "position"'


def stuck_sensors_per_series(where: str = "") -> str:
    """Per sensor position: spread of temperature plus humidity over the window, for positions with enough
    readings. 0 means every reading was identical.

    Summed from one subquery per quantity rather than as "st" + "sh": a position without a humidity sensor has
    no humidity spread, the sum of a number and null was null, and Grafana takes that for firing, so every such
    position paged "stuck" however its temperature varied. A missing quantity now adds nothing."""
    temperature = (f'SELECT spread("temperature") AS "s", count("temperature") AS "n" FROM "{MEASUREMENT}" '
                   f'WHERE $timeFilter{and_(where)} GROUP BY {SENSOR_TAGS}')
    humidity = (f'SELECT spread("humidity") AS "s" FROM "{MEASUREMENT}" '
                f'WHERE $timeFilter{and_(where)} GROUP BY {SENSOR_TAGS}')
    both = f'SELECT sum("s") AS "spread", sum("n") AS "n" FROM ({temperature}), ({humidity}) GROUP BY {SENSOR_TAGS}'
    return f'SELECT "spread" FROM ({both}) WHERE "n" >= {STUCK_MIN_READINGS} GROUP BY {SENSOR_TAGS}'


# Ditto search columns (gjson paths into each item); order matters for the tile title's ${__cell_N}.
TILE_COLUMNS = [
    column("attributes.rack", "rack", "string"),
    column("attributes.room", "room", "string"),
    column("attributes.row", "row", "string"),
    column("features.environment.properties.tempTop", "tempTop"),
    column("features.environment.properties.tempBottom", "tempBottom"),
    column("features.environment.properties.humidityTop", "humidityTop"),
    column("features.environment.properties.humidityBottom", "humidityBottom"),
    column("features.environment.properties.deltaT", "deltaT"),
    column("features.environment.properties.tsTop", "tsTop", "timestamp"),
    column("features.environment.properties.tsBottom", "tsBottom", "timestamp"),
    column("features.environment.properties.envelope", "envelope", "string"),
]
# Title: rack, ▲top/▼bottom °C and RH top/bottom; the tile value is the rack's envelope state (worst of
# temperature, humidity and dew point over both positions, computed by the bridge), coloured by band.
# Grafana 13 turns ${__cell_N} into ${__data.fields[N]}: column N's display text (its field config applies; with
# unit "none" and no decimals set, the twin's tenths show as stored, 24.0 as "24"; a missing value as
# MISSING_CELL). tests/test_grafana_frontend.py runs this through Grafana's own code. The title is the envelope
# field's display name, set by an override on that field alone: the stat panel picks its fields by a regex on
# display names, so a title in the defaults would rename every field and the regex would match none ("no twin"
# for the whole hall).
MISSING_CELL = "–"
TILE_TITLE = "${__cell_0}  ▲${__cell_3}° ▼${__cell_4}°  ${__cell_5}/${__cell_6}\u00a0%RH"  # no break before %RH
# The envelope field's display name is that template, uninterpolated (the cells are filled per tile, later); its own
# name too, should a Grafana ever match on that.
TILE_FIELDS = "/^(?:envelope|" + re.sub(r"[\\^$.|?*+()\[\]{}/]", lambda m: "\\" + m.group(0), TILE_TITLE) + ")$/"
# Fixed text sizes (Grafana's automatic ones follow the longest title): at 1080p, 40 tiles in 14 columns of about
# 108 px text width, the title wraps into rack / temperatures / humidity and the state word takes up to two lines
# (VERY HUMID); tests/test_wall_layout.py checks that it all fits on 1080p and 4K screens.
TILE_TEXT = {"titleSize": 14, "valueSize": 24}
TILES_Y, TILES_H = 4, 14
HISTORY_H = 9  # the heat grids and the forecast table below the tiles: 27 grid rows in all fit 1080p
HEAT_GRID_W = 5  # top, bottom and top − bottom side by side, the forecast table in the remaining 9 columns


def envelope_mappings() -> list[dict]:
    return [{"type": "value", "options": {
        state: {"text": state, "color": COLORS[ENVELOPE_COLORS[state]], "index": i}
        for i, state in enumerate(ENVELOPE_STATES)}}]

# Ditto's search pages at most 200 things (ditto.md: size(n) max 200); Infinity cannot follow Ditto's cursor, which
# goes inside the option parameter, so the tiles show one page: the first 200 racks by room, row and rack.
TILE_LIMIT = 200
SEARCH_PARAMS = [
    ("namespaces", "${namespace}"),
    ("fields", "thingId,attributes,features/environment/properties"),
    # Grafana's doublequote format renders a multi-value/All selection as "a","b": RQL in(...) takes it as is.
    ("filter", "and(in(attributes/room,${room:doublequote}),in(attributes/row,${row:doublequote}))"),
    ("option", f"size({TILE_LIMIT}),sort(+attributes/room,+attributes/row,+attributes/rack)"),
]


def forecast_columns(t: Thresholds) -> dict[str, str]:
    """Forecast field -> table header, headed with the class's real limits."""
    return {"minutes_to_recommended": f"min to {num(t.temp_recommended[1])} °C", "trend_c_per_h": "trend °C/h",
            "level_c": "now °C", "minutes_to_allowable": f"min to {num(t.temp_allowable[1])} °C"}


def heading_for_trouble(t: Thresholds, where: str = ROOM_ROW_FILTER) -> str:
    """Rack positions with a forecast crossing of the recommended limit. "No crossing" is an absent field,
    so the field condition drops them; the newest forecast per position is ``last`` within the panel's range."""
    selects = ", ".join(f'last("{f}") AS "{h}"' for f, h in forecast_columns(t).items())
    return (f'SELECT {selects} FROM "{FORECAST_MEASUREMENT}" WHERE $timeFilter AND "minutes_to_recommended" >= 0'
            f'{and_(where)} GROUP BY "room", "row", "rack", "position"')


def minutes_steps(t: Thresholds) -> list[dict]:
    """Red below half the forecast horizon, orange below the horizon (when the forecast alert fires)."""
    return [{"color": "red", "value": None}, {"color": "orange", "value": t.forecast_horizon_min / 2},
            {"color": "transparent", "value": t.forecast_horizon_min}]


def heading_table(t: Thresholds, pos) -> dict:
    cols = forecast_columns(t)
    rec, trend, now, allow = cols.values()

    def override(name: str, **props) -> dict:
        return {"matcher": {"id": "byName", "options": name},
                "properties": [{"id": k.replace("__", "."), "value": v} for k, v in props.items()]}

    return table(
        "Heading for trouble", pos, [influx_target(heading_for_trouble(t), fmt="table")],
        field_defaults("none", [{"color": "text", "value": None}], 1, noValue="No rack heading for trouble",
                       links=[data_link("Rack detail", RACK_LINK)], custom={"align": "auto", "filterable": False}),
        datasource=INFLUX, time_from=FORECAST_RANGE, hide_time_override=True,
        overrides=[
            override(rec, unit="m", decimals=0, thresholds=thresholds(minutes_steps(t)),
                     custom__cellOptions={"type": "color-background", "mode": "basic"}),
            override(allow, unit="m", decimals=0),
            override(now, unit="celsius", thresholds=thresholds(t.temperature_steps()),
                     custom__cellOptions={"type": "color-text"}),
            override(trend, unit="none"),
        ],
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {
                "excludeByName": {"Time": True, "room": True},
                "indexByName": {name: i for i, name in enumerate(["rack", "position", rec, trend, now, allow, "row"])},
                "renameByName": {}}},
            {"id": "sortBy", "options": {"fields": {}, "sort": [{"field": rec, "desc": False}]}},
            {"id": "limit", "options": {"limitField": HEADING_ROWS}},
        ],
        sort_by=[{"displayName": rec, "desc": False}],
        description=f"Rack positions whose inlet trend is forecast to reach {num(t.temp_recommended[1])} °C "
                    f"(bridge forecast, newest within {FORECAST_RANGE}), at most {HEADING_ROWS}, soonest first; "
                    f"red under "
                    f"{num(t.forecast_horizon_min / 2)} min, orange under {num(t.forecast_horizon_min)} min (the "
                    "forecast alert). Stable or falling positions are not listed. Click for rack detail.")


def build(t: Thresholds, site: Site = Site()) -> dict:
    temp = field_defaults("celsius", t.temperature_steps())
    count_steps = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
    panels = [
        stat("Hottest inlet now", grid(0, 0, 4, 4), [influx_target(
            f'SELECT max("t") AS "hottest" FROM ({latest_per_sensor()})')], temp, datasource=INFLUX,
            time_from="15m", description="Highest latest inlet temperature of any rack position (last 15 min)."),
        stat("Racks outside recommended", grid(4, 0, 4, 4), [influx_target(racks_outside(recommended_violation(t)))],
             field_defaults("none", [{"color": "green", "value": None}, {"color": "orange", "value": 1}], 0,
                            noValue="0"), datasource=INFLUX, time_from="15m",
             description=f"Racks with a position outside {num(t.temp_recommended[0])}–{num(t.temp_recommended[1])} °C, "
                         f"dew point {num(t.dew_point_recommended[0])}–{num(t.dew_point_recommended[1])} °C or "
                         f"above {num(t.rh_cap)} % RH."),
        stat(f"Racks outside {t.ashrae_class}", grid(8, 0, 4, 4),
             [influx_target(racks_outside(allowable_violation(t)))],
             field_defaults("none", count_steps, 0, noValue="0"), datasource=INFLUX, time_from="15m",
             description=f"Racks with a position outside the ASHRAE {t.ashrae_class} allowable envelope."),
        stat("Sensors silent", grid(12, 0, 2, 4), [influx_target(
            f'SELECT count("recent") AS "silent" FROM ({silent_sensors_per_series(t)}) WHERE "recent" = 0')],
            field_defaults("none", count_steps, 0, noValue="0"), datasource=INFLUX, time_from="24h",
            description=f"Rack positions with no reading for {t.silent_after_s} s (3 reporting intervals) "
                        "that reported in the last 24 hours."),
        stat("Sensors stuck", grid(14, 0, 2, 4), [influx_target(
            f'SELECT count("spread") AS "stuck" FROM ({stuck_sensors_per_series(ROOM_ROW_FILTER)}) '
            'WHERE "spread" < 0.001')],
            field_defaults("none", count_steps, 0, noValue="0"), datasource=INFLUX,
            time_from=f"{t.stuck_window_s // 60}m",
            description=f"Rack positions that reported identical temperature and humidity for {t.stuck_window_s // 60} "
                        f"min (at least {STUCK_MIN_READINGS} readings): a stuck sensor, not a steady room."),
        stat("Largest top − bottom", grid(16, 0, 4, 4), [influx_target(
            f'SELECT max("delta") AS "delta" FROM ({delta_per_rack(ROOM_ROW_FILTER)})')],
            field_defaults("celsius", t.delta_t_steps()), datasource=INFLUX, time_from="15m",
            description=f"Largest top minus bottom inlet difference; above {num(t.delta_t_limit_c)} °C "
                        "suggests recirculation."),
        alert_count("Alert rules firing", grid(20, 0, 4, 4),
                    description="How many RackTwin alert rules are firing. Grafana's alert list counts rules, not "
                                "their instances: ten racks over the same limit count once; the counts to the left "
                                "and the tiles say which racks."),
        stat("Racks (current twin state)", grid(0, TILES_Y, 24, TILES_H), [infinity_target(
            "/api/2/search/things", SEARCH_PARAMS, TILE_COLUMNS, root_selector="items")],
            field_defaults("none", [{"color": COLORS["unknown"], "value": None}], None,
                           noValue="no twin", mappings=envelope_mappings()),
            datasource=DITTO, max_data_points=500,
            options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": TILE_FIELDS, "values": True,
                                       "limit": TILE_LIMIT},
                     "textMode": "value_and_name", "text": TILE_TEXT},
            overrides=[{"matcher": {"id": "byName", "options": "envelope"},
                        "properties": [{"id": "displayName", "value": TILE_TITLE}]},
                       # A title's cells are those fields' display texts: a position that never reported would
                       # read "▲no twin°" with the panel's own noValue.
                       {"matcher": {"id": "byType", "options": "number"},
                        "properties": [{"id": "noValue", "value": MISSING_CELL}]}],
            links=[data_link("Rack detail", RACK_LINK)],
            description="One tile per rack from Ditto's current twin state (one search request): title = rack, "
                        "top/bottom °C, top/bottom RH; value and colour = the worst ASHRAE band of temperature, "
                        "humidity and dew point at either position (OK, WARM/COOL/HUMID/DRY outside the recommended "
                        f"envelope, HOT/COLD/VERY HUMID/VERY DRY outside {t.ashrae_class}); SILENT, uncoloured, "
                        f"where a position sent nothing for {t.silent_after_s} s (3 reporting intervals) and its "
                        "last values are not outside the class. Click for detail. "
                        f"At most {TILE_LIMIT} racks (one page of Ditto's search): on a larger site pick a room."),
    ]
    for x, position in ((0, "top"), (HEAT_GRID_W, "bottom")):
        panels.append(state_timeline(
            f"{position.capitalize()} inlet °C per rack", grid(x, TILES_Y + TILES_H, HEAT_GRID_W, HISTORY_H),
            [influx_target(
                f'SELECT mean("temperature") FROM "{MEASUREMENT}" WHERE $timeFilter AND "position" = \'{position}\' '
                f'AND {ROOM_ROW_FILTER} GROUP BY time($__interval), "rack" fill(none)', alias="$tag_rack")],
            field_defaults("celsius", t.temperature_steps()), datasource=INFLUX, hide_row_names=True,
            description=f"{position.capitalize()} inlet temperature history per rack, coloured by ASHRAE band, "
                        "one row per rack in name order (hover a row for its rack; a hall's 40 rows are too thin "
                        "for names). Hot spots show here; recirculation inside the band in the next grid."))
    # The bands colour 26 °C over 20 °C green twice: recirculation shows only in the difference.
    panels.append(state_timeline(
        "Top − bottom °C per rack", grid(2 * HEAT_GRID_W, TILES_Y + TILES_H, HEAT_GRID_W, HISTORY_H),
        [influx_target(delta_history_per_rack(ROOM_ROW_FILTER), alias="$tag_rack")],
        field_defaults("celsius", t.delta_t_steps()), datasource=INFLUX, hide_row_names=True,
        description=f"Top minus bottom inlet temperature per rack over time, one row per rack in name order: "
                    f"above {num(t.delta_t_limit_c)} °C (orange) hot exhaust is reaching the top of the rack's "
                    "inlet (recirculation), even while both inlets are inside the envelope."))
    panels.append(heading_table(t, grid(3 * HEAT_GRID_W, TILES_Y + TILES_H, 24 - 3 * HEAT_GRID_W, HISTORY_H)))
    dashboard = Dashboard(
        title="Data hall wall", uid=WALL_UID, tags=["racktwin"], timezone="browser", refresh="30s",
        time=time_range("now-6h"), editable=False, panels=panels,
        templating=templating(
            namespace_variable(site),
            tag_variable("room", "Room"),
            tag_variable("row", "Row", where='"room" =~ /^$room$/'),
        ),
    ).auto_panel_ids()
    return render(dashboard, {"description": "RackTwin NOC wall: open with ?kiosk&theme=dark on the wall screen.",
                              "graphTooltip": 0, "liveNow": False})
