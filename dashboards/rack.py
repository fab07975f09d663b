"""Rack detail (variable ``rack``): history from InfluxDB with the envelope as thresholds, the twin's current
values and last-seen times from Ditto, links to the twin (Ditto UI) and the device (ThingsBoard)."""

from __future__ import annotations

from grafanalib.core import Dashboard

from .common import (DITTO, FORECAST_MEASUREMENT, INFLUX, MEASUREMENT, PROJECTION_MEASUREMENT, RACK_UID, WALL_PATH, Site,
                     column, constant_variable, data_link, field_defaults, infinity_target, influx_target,
                     namespace_variable, render, tag_variable, templating, time_range)
from .panels import dashboard_link, grid, stat, timeseries
from .thresholds import Thresholds
from .wall import FORECAST_RANGE, minutes_steps, num

RACK_FILTER = "\"rack\" = '$rack'"

TWIN_COLUMNS = [
    column("attributes.rack", "rack", "string"),
    column("attributes.tbDevices.top", "deviceTop", "string"),
    column("attributes.tbDevices.bottom", "deviceBottom", "string"),
    column("features.environment.properties.tempTop", "tempTop"),
    column("features.environment.properties.tempBottom", "tempBottom"),
    column("features.environment.properties.humidityTop", "humidityTop"),
    column("features.environment.properties.humidityBottom", "humidityBottom"),
    column("features.environment.properties.dewPointTop", "dewPointTop"),
    column("features.environment.properties.dewPointBottom", "dewPointBottom"),
    column("features.environment.properties.deltaT", "deltaT"),
    column("features.environment.properties.tsTop", "tsTop", "timestamp"),
    column("features.environment.properties.tsBottom", "tsBottom", "timestamp"),
    column("attributes.tbDeviceIds.top", "deviceIdTop", "string"),
    column("attributes.tbDeviceIds.bottom", "deviceIdBottom", "string"),
]
# Written by `racktwin sync` (it knows ThingsBoard's device ids); a twin only the live bridge wrote lacks them,
# and the device links then fall back to ThingsBoard's device list.
OPTIONAL_TWIN_SELECTORS = frozenset({"attributes.tbDeviceIds.top", "attributes.tbDeviceIds.bottom"})
TWIN_PARAMS = [("fields", "thingId,attributes,features/environment/properties")]


# The thing's path; the rack name percent-encoded, because rack names may hold # ? & (bridge/mapping.py).
TWIN_PATH = "/api/2/things/${namespace}:${rack:percentencode}"
# The Ditto UI's `filter` URL parameter (RQL, undocumented: added with its SSO support, eclipse-ditto/ditto #2032,
# Ditto 3.6), percent-encoded whole: eq(thingId,"<namespace>:<rack>").
DITTO_UI_FILTER = "&filter=eq%28thingId%2C%22${namespace:percentencode}%3A${rack:percentencode}%22%29"


def history(field: str) -> str:
    return (f'SELECT mean("{field}") FROM "{MEASUREMENT}" WHERE $timeFilter AND {RACK_FILTER} '
            'GROUP BY time($__interval), "position" fill(null)')


def delta_history() -> str:
    sub = ('SELECT mean("temperature") AS "{alias}" FROM "' + MEASUREMENT + '" WHERE $timeFilter AND '
           + RACK_FILTER + ' AND "position" = \'{alias}\' GROUP BY time($__interval)')
    return (f'SELECT mean("top") - mean("bottom") AS "top − bottom" FROM ({sub.format(alias="top")}), '
            f'({sub.format(alias="bottom")}) WHERE $timeFilter GROUP BY time($__interval) fill(none)')


def projected_history() -> str:
    """The 30-minute projections at the time they project to: up to 30 min ahead of now."""
    return (f'SELECT mean("projected_temp") FROM "{PROJECTION_MEASUREMENT}" WHERE $timeFilter AND {RACK_FILTER} '
            'GROUP BY time($__interval), "position" fill(null)')


def newest_forecast(field: str, position: str) -> str:
    return (f'SELECT last("{field}") AS "{field}" FROM "{FORECAST_MEASUREMENT}" WHERE $timeFilter AND {RACK_FILTER} '
            f"AND \"position\" = '{position}'")


def forecast_stat(title: str, pos, field: str, position: str, defaults: dict, description: str):
    # "—" when the newest forecast has no crossing (absent field) or the position is held back.
    return stat(title, pos, [influx_target(newest_forecast(field, position))], dict(defaults, noValue="—"),
                datasource=INFLUX, time_from=FORECAST_RANGE, description=description,
                options={"textMode": "value"})


# The projection is drawn dashed: it is a forecast, not a measurement.
DASHED = {"matcher": {"id": "byRegexp", "options": "/projected/"}, "properties": [
    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
    {"id": "custom.lineWidth", "value": 1},
    {"id": "custom.spanNulls", "value": 90_000}]}  # ms: bridge the 30 s publish grid, not a held-back forecast


# A link's ${__data.fields.x} is field x's display text, formatted with the panel's unit: a device id under the last-
# seen stats' dateTimeFromNow read "NaN". Text fields keep their text.
TEXT_AS_IS = {"matcher": {"id": "byType", "options": "string"}, "properties": [{"id": "unit", "value": "string"}]}


def twin_stat(title: str, pos, field: str, defaults: dict, links: list | None = None):
    # values=True: the twin's one row as it is, so data links can use its other fields (${__data.fields.x}).
    return stat(title, pos, [infinity_target(TWIN_PATH, TWIN_PARAMS, TWIN_COLUMNS)],
                defaults, datasource=DITTO, links=links, overrides=[TEXT_AS_IS] if links else [],
                options={"reduceOptions": {"calcs": ["lastNotNull"], "fields": f"/^{field}$/", "values": True},
                         "textMode": "value"})


def device_link(position: str) -> dict:
    return data_link(f"{position.capitalize()} sensor in ThingsBoard",
                     "${thingsboard}/entities/devices/${__data.fields.deviceId" + position.capitalize() + "}")


def forecast_stats(t: Thresholds, y: int) -> list:
    rec = num(t.temp_recommended[1])
    minutes = field_defaults("m", minutes_steps(t), 0)
    trend = field_defaults("none", [{"color": "text", "value": None},
                                    {"color": "orange", "value": t.rate_limit_c_per_h}], 1)
    out = []
    for x, position in ((0, "top"), (12, "bottom")):
        name = position.capitalize()
        out.append(forecast_stat(f"{name}: minutes to {rec} °C", grid(x, y, 6, 3), "minutes_to_recommended",
                                 position, minutes,
                                 f"Forecast minutes until the {position} inlet reaches {rec} °C; — = no crossing "
                                 "forecast (stable, falling, or no forecast yet)."))
        out.append(forecast_stat(f"{name}: trend °C/h", grid(x + 6, y, 6, 3), "trend_c_per_h", position, trend,
                                 f"Robust {position} inlet trend over the forecast window; — = no forecast "
                                 "(warming up, stuck or silent sensor)."))
    return out


def build(t: Thresholds, site: Site = Site()) -> dict:
    band = {"thresholdsStyle": {"mode": "line+area"}}
    temp = field_defaults("celsius", t.temperature_steps())
    rh = field_defaults("percent", t.humidity_steps())
    dp = field_defaults("celsius", t.dew_point_steps())
    panels = [
        twin_stat("Twin: top °C", grid(0, 0, 3, 4), "tempTop", temp),
        twin_stat("Twin: bottom °C", grid(3, 0, 3, 4), "tempBottom", temp),
        twin_stat("Twin: top RH", grid(6, 0, 2, 4), "humidityTop", rh),
        twin_stat("Twin: bottom RH", grid(8, 0, 2, 4), "humidityBottom", rh),
        twin_stat("Twin: top dew point", grid(10, 0, 3, 4), "dewPointTop", dp),
        twin_stat("Twin: bottom dew point", grid(13, 0, 3, 4), "dewPointBottom", dp),
        twin_stat("Twin: top − bottom", grid(16, 0, 2, 4), "deltaT",
                  field_defaults("celsius", t.delta_t_steps())),
        twin_stat("Top last seen", grid(18, 0, 3, 4), "tsTop",
                  field_defaults("dateTimeFromNow", [{"color": "blue", "value": None}], None), [device_link("top")]),
        twin_stat("Bottom last seen", grid(21, 0, 3, 4), "tsBottom",
                  field_defaults("dateTimeFromNow", [{"color": "blue", "value": None}], None),
                  [device_link("bottom")]),
        *forecast_stats(t, 4),
        timeseries("Inlet temperature: top vs bottom", grid(0, 7, 12, 9),
                   [influx_target(history("temperature"), alias="$tag_position"),
                    influx_target(projected_history(), "B", alias="$tag_position projected +30 min")],
                   temp, datasource=INFLUX, custom=band, overrides=[DASHED],
                   description=f"Envelope: recommended band green (to {num(t.temp_recommended[1])} °C), allowable "
                               f"{t.ashrae_class} orange/red (to {num(t.temp_allowable[1])} °C). Dashed: where the "
                               "forecast trend puts each inlet 30 min after that moment."),
        timeseries("Relative humidity", grid(12, 7, 12, 9),
                   [influx_target(history("humidity"), alias="$tag_position")], rh, datasource=INFLUX, custom=band),
        timeseries("Dew point", grid(0, 16, 12, 9),
                   [influx_target(history("dew_point"), alias="$tag_position")], dp, datasource=INFLUX, custom=band),
        timeseries("Top − bottom difference", grid(12, 16, 12, 9), [influx_target(delta_history())],
                   field_defaults("celsius", t.delta_t_steps()), datasource=INFLUX, custom=band,
                   description=f"Above {t.delta_t_limit_c:g} °C for {t.delta_t_for} raises the recirculation alert."),
    ]
    dashboard = Dashboard(
        title="Rack detail", uid=RACK_UID, tags=["racktwin"], timezone="browser", refresh="1m",
        time=time_range("now-24h", "now+30m"), editable=False, panels=panels,  # room for the projection
        templating=templating(
            tag_variable("rack", "Rack", multi=False),
            namespace_variable(site),
            constant_variable("ditto", site.ditto_ui, "Ditto"),
            constant_variable("thingsboard", site.thingsboard_ui, "ThingsBoard"),
        ),
    ).auto_panel_ids()
    links = [
        dashboard_link("Data hall wall", WALL_PATH, "Back to the NOC wall", keep_time=True),
        dashboard_link("Twin in Ditto", "${ditto}" + TWIN_PATH,
                       "Thing ${namespace}:${rack} as Ditto stores it (JSON; Ditto login)", target_blank=True),
        # Our nginx serves the UI an environment pointing at its own /api (compose/ditto/nginx.conf). `filter` runs
        # that search on load (the UI has no link to one thing's page): the list then holds this rack's twin alone.
        dashboard_link("Ditto UI", "${ditto}/ui/?primaryEnvironmentName=racktwin"
                       "&environmentsURL=/ui/racktwin-environments.json" + DITTO_UI_FILTER,
                       "This rack's twin in Ditto's web UI: click its row (Ditto login)", target_blank=True),
        dashboard_link("Devices in ThingsBoard", "${thingsboard}/entities/devices", "ThingsBoard device list",
                       target_blank=True),
    ]
    return render(dashboard, {"links": links, "description": "History and current twin state of one rack."})
