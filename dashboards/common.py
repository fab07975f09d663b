"""Shared pieces of the generated dashboards: datasource refs, query targets, links and the post-processing
that turns grafanalib's legacy JSON (schemaVersion 12, ``rows``, nulls) into a current dashboard model."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, Template, Templating, Time
from grafanalib.influxdb import InfluxDBTarget

from bridge.config import DITTO_NAMESPACE_PATTERN

INFLUX_UID = "influxdb"
DITTO_UID = "ditto"
INFLUX = {"type": "influxdb", "uid": INFLUX_UID}
DITTO = {"type": "yesoreyeram-infinity-datasource", "uid": DITTO_UID}
# Where Grafana reaches Ditto's nginx inside the compose network (the Infinity datasource's allowed host).
DITTO_BASE_URL = "http://ditto-nginx:80"
DEFAULT_NAMESPACE = "dc.site1"


@dataclass(frozen=True)
class Site:
    """Generation-time facts about the installation that the dashboards link to or look up.

    ``namespace``: the Ditto namespace of the rack things (the bridge's RACKTWIN_DITTO_NAMESPACE); ``ditto_ui``
    and ``thingsboard_ui``: where a browser reaches Ditto's nginx and ThingsBoard (the rack detail's links).
    """

    namespace: str = DEFAULT_NAMESPACE
    ditto_ui: str = "http://localhost:8090"  # compose publishes Ditto's nginx on DITTO_HTTP_PORT=8090
    thingsboard_ui: str = "http://localhost:8080"  # and ThingsBoard on TB_HTTP_PORT=8080

    def __post_init__(self) -> None:
        if not re.fullmatch(DITTO_NAMESPACE_PATTERN, self.namespace):
            raise ValueError(f"RACKTWIN_DITTO_NAMESPACE must be a Ditto namespace such as dc.site1, "
                             f"not {self.namespace!r}")
        for name, url in (("RACKTWIN_DITTO_UI_URL", self.ditto_ui), ("RACKTWIN_THINGSBOARD_UI_URL",
                                                                     self.thingsboard_ui)):
            if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
                raise ValueError(f"{name} must be an http(s) URL such as http://localhost:8090, not {url!r}")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Site":
        env = os.environ if env is None else env
        default = cls()
        return cls(namespace=env.get("RACKTWIN_DITTO_NAMESPACE") or default.namespace,
                   ditto_ui=(env.get("RACKTWIN_DITTO_UI_URL") or default.ditto_ui).rstrip("/"),
                   thingsboard_ui=(env.get("RACKTWIN_THINGSBOARD_UI_URL") or default.thingsboard_ui).rstrip("/"))

WALL_UID, RACK_UID, BRIDGE_UID = "racktwin-wall", "racktwin-rack", "racktwin-bridge"
WALL_PATH = f"/d/{WALL_UID}/data-hall-wall"
RACK_PATH = f"/d/{RACK_UID}/rack-detail"
BRIDGE_PATH = f"/d/{BRIDGE_UID}/bridge-health"

MEASUREMENT = "rack_environment"
FORECAST_MEASUREMENT = "rack_forecast"  # bridge/forecast/tracker.py, one point per rack position every 30 s
PROJECTION_MEASUREMENT = "rack_projection"  # the same, its 30-min projection stamped 30 min ahead
SCHEMA_VERSION = 39

# Filters by the wall's room/row variables; multi-value variables expand to (a|b), so a regex match.
ROOM_ROW_FILTER = '"room" =~ /^$room$/ AND "row" =~ /^$row$/'


def influx_target(query: str, ref_id: str = "A", alias: str = "", fmt: str = "time_series") -> InfluxDBTarget:
    return InfluxDBTarget(query=" ".join(query.split()), alias=alias, format=fmt, datasource=INFLUX,
                          rawQuery=True, refId=ref_id)


def infinity_target(path: str, params: list[tuple[str, str]], columns: list[dict], ref_id: str = "A",
                    root_selector: str = "") -> dict:
    """An Infinity JSON query with the backend parser (gjson column selectors), as the Infinity editor saves it."""
    return {
        "refId": ref_id,
        "datasource": DITTO,
        "type": "json",
        "source": "url",
        "format": "table",
        "parser": "backend",
        "url": DITTO_BASE_URL + path,
        "url_options": {"method": "GET", "data": "", "params": [{"key": k, "value": v} for k, v in params]},
        "root_selector": root_selector,
        "columns": columns,
        "filters": [],
    }


def data_link(title: str, url: str) -> dict:
    """A field data link. Grafana reads title/url/targetBlank; the other keys are what the dashboard JSON
    schema (which types field links like dashboard links) requires, and Grafana ignores them."""
    return {"title": title, "url": url, "targetBlank": False, "type": "link", "icon": "external link",
            "tooltip": "", "tags": [], "asDropdown": False, "includeVars": False, "keepTime": False}


def column(selector: str, text: str, kind: str = "number") -> dict:
    return {"selector": selector, "text": text, "type": kind}


def namespace_variable(site: Site) -> Template:
    return constant_variable("namespace", site.namespace, "Ditto namespace")


def constant_variable(name: str, value: str, label: str) -> Template:
    return Template(name=name, label=label, type="constant", query=value, default=value, hide=2)


def tag_variable(name: str, label: str, where: str = "", multi: bool = True) -> Template:
    """A query variable over a tag of the readings, re-queried on every (auto-)refresh (refresh 2, "on time range
    change"): with 1 ("on load") a kiosk that was opened before the first reading, or before a room or row was
    added, would keep its empty or old list ("All" expands to what was known then) until somebody reloads it."""
    query = f'SHOW TAG VALUES FROM "{MEASUREMENT}" WITH KEY = "{name}"' + (f" WHERE {where}" if where else "")
    return Template(name=name, label=label, query=query, dataSource=INFLUX, type="query",
                    multi=multi, includeAll=multi, default="$__all" if multi else "", refresh=2, sort=1)


def thresholds(steps: list[dict]) -> dict:
    return {"mode": "absolute", "steps": steps}


def field_defaults(unit: str, steps: list[dict] | None = None, decimals: int | None = 1, **extra: Any) -> dict:
    defaults: dict[str, Any] = {"unit": unit, "mappings": [], "color": {"mode": "thresholds"}}
    if steps is not None:
        defaults["thresholds"] = thresholds(steps)
    if decimals is not None:
        defaults["decimals"] = decimals
    defaults.update(extra)
    return defaults


def render(dashboard: Dashboard, extra: dict | None = None) -> dict:
    """grafanalib -> plain dict in today's dashboard model (what Grafana saves), deterministic."""
    data = json.loads(json.dumps(dashboard.to_json_data(), cls=DashboardEncoder))
    data = _drop_nulls(data)
    for legacy in ("__inputs", "rows", "style", "hideControls", "sharedCrosshair", "gnetId", "id"):
        data.pop(legacy, None)
    data["schemaVersion"] = SCHEMA_VERSION
    data["timepicker"] = {"refresh_intervals": ["10s", "30s", "1m", "5m", "15m"]}
    data["panels"] = [_modern_panel(p) for p in data.get("panels", [])]
    data["templating"]["list"] = [_modern_variable(v) for v in data["templating"]["list"]]
    data["annotations"] = {"list": [{
        "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}]}
    data.update(extra or {})
    return data


_PANEL_KEYS = {"type", "id", "targets", "title", "description", "transparent", "datasource", "gridPos", "links",
               "repeat", "repeatDirection", "maxPerRow", "maxDataPoints", "transformations", "interval",
               "timeFrom", "timeShift", "hideTimeOverride", "options", "fieldConfig", "pluginVersion"}


def _modern_panel(panel: dict) -> dict:
    # grafanalib emits legacy keys (span, height, error, editable...) that today's model does not have.
    out = {k: v for k, v in panel.items() if k in _PANEL_KEYS}
    for key in ("description", "interval", "timeFrom", "timeShift", "repeatDirection"):
        if out.get(key) in ("", None):
            out.pop(key, None)
    if out.get("hideTimeOverride") is False:
        out.pop("hideTimeOverride")
    if out.get("transparent") is False:
        out.pop("transparent")
    defaults = out.get("fieldConfig", {}).get("defaults", {})
    if defaults.get("thresholds", {}).get("steps") == "":
        defaults["thresholds"]["steps"] = [{"color": "green", "value": None}]
    if defaults.get("noValue") == "none":
        defaults.pop("noValue")
    for target in out.get("targets", []):
        if target.get("measurement") == "":
            target.pop("measurement")
        if target.get("alias") == "":
            target.pop("alias")
    return out


_VARIABLE_KEYS = {"type", "name", "label", "hide", "skipUrlSync", "description", "query", "datasource", "current",
                  "multi", "options", "refresh", "sort", "includeAll", "allValue", "regex", "definition"}


def _modern_variable(var: dict) -> dict:
    out = {k: v for k, v in var.items() if k in _VARIABLE_KEYS and v is not None}
    if out.get("type") == "constant":
        for key in ("datasource", "multi", "includeAll", "refresh", "sort", "regex", "allValue"):
            out.pop(key, None)
        out["options"] = [{"selected": True, "text": out["query"], "value": out["query"]}]
        out["current"] = {"selected": True, "text": out["query"], "value": out["query"]}
    else:
        out["definition"] = out["query"]
        out["options"] = []
        if out.get("includeAll"):
            out["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
        else:
            out["current"] = {"selected": False, "text": "", "value": ""}
        for key in ("allValue", "regex"):
            if not out.get(key):
                out.pop(key, None)
    return out


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        # A threshold step's null value means "from minus infinity" and must stay.
        keep_value = "color" in value and "value" in value
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or (keep_value and k == "value")}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def time_range(frm: str, to: str = "now") -> Time:
    return Time(frm, to)


def templating(*variables: Template) -> Templating:
    return Templating(list=list(variables))
