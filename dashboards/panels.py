"""Panel constructors on top of grafanalib: its classes give ids, grid positions, targets and datasources;
``extraJson`` supplies the options of today's panel plugins that grafanalib 0.7.1 does not model."""

from __future__ import annotations

from typing import Any

import attr
from grafanalib.core import GridPos, Panel, Stat, StateTimeline, TimeSeries

from .datasources import WALL_FOLDER


@attr.s
class RawPanel(Panel):
    """A panel type grafanalib lacks (alertlist in its unified-alerting form); everything comes from extraJson."""

    panelType = attr.ib(default="text")

    def to_json_data(self):
        return self.panel_json({"type": self.panelType})


def grid(x: int, y: int, w: int, h: int) -> GridPos:
    return GridPos(h=h, w=w, x=x, y=y)


def stat(title: str, pos: GridPos, targets: list, defaults: dict, *, datasource: dict, options: dict | None = None,
         transformations: list | None = None, links: list | None = None, description: str = "",
         time_from: str | None = None, max_data_points: int = 100, interval: str | None = None,
         overrides: list | None = None) -> Stat:
    opts = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background", "graphMode": "none", "justifyMode": "center", "orientation": "auto",
            "textMode": "value", "wideLayout": True, "showPercentChange": False}
    opts.update(options or {})
    return Stat(title=title, gridPos=pos, dataSource=datasource, targets=targets, description=description,
                timeFrom=time_from, maxDataPoints=max_data_points, interval=interval,
                transformations=transformations or [],
                extraJson={"options": opts, "fieldConfig": {"defaults": dict(defaults, links=links or []),
                                                            "overrides": overrides or []}})


def timeseries(title: str, pos: GridPos, targets: list, defaults: dict, *, datasource: dict, custom: dict | None = None,
               overrides: list | None = None, description: str = "", max_data_points: int = 500,
               interval: str | None = None, legend_calcs: list | None = None) -> TimeSeries:
    custom_cfg = {"drawStyle": "line", "lineWidth": 2, "fillOpacity": 0, "showPoints": "never", "spanNulls": False,
                  "thresholdsStyle": {"mode": "off"}}
    custom_cfg.update(custom or {})
    return TimeSeries(
        title=title, gridPos=pos, dataSource=datasource, targets=targets, description=description,
        maxDataPoints=max_data_points, interval=interval,
        extraJson={"options": {"legend": {"displayMode": "table", "placement": "right", "showLegend": True,
                                          "calcs": legend_calcs or ["lastNotNull", "max"]},
                               "tooltip": {"mode": "multi", "sort": "desc"}},
                   "fieldConfig": {"defaults": dict(defaults, custom=custom_cfg), "overrides": overrides or []}})


# Grafana draws every state-timeline row's name at 12 px whatever the row's height: with more rows than fit at
# that size the names overlap into a smear, so such panels hide them (hover still names the row).
ROW_NAME_PX = 12


def state_timeline(title: str, pos: GridPos, targets: list, defaults: dict, *, datasource: dict,
                   description: str = "", max_data_points: int = 120, hide_row_names: bool = False) -> StateTimeline:
    # On the value fields only: in defaults it would hide the time axis too (it reads the time field's setting).
    overrides = [{"matcher": {"id": "byType", "options": "number"},
                  "properties": [{"id": "custom.axisPlacement", "value": "hidden"}]}] if hide_row_names else []
    return StateTimeline(
        title=title, gridPos=pos, dataSource=datasource, targets=targets, description=description,
        maxDataPoints=max_data_points,
        extraJson={"options": {"showValue": "never", "rowHeight": 0.95, "mergeValues": False, "alignValue": "center",
                               "legend": {"showLegend": False, "displayMode": "list", "placement": "bottom"},
                               "tooltip": {"mode": "single", "sort": "none"}},
                   "fieldConfig": {"defaults": dict(defaults, custom={"fillOpacity": 90, "lineWidth": 0}),
                                   "overrides": overrides}})


def alert_count(title: str, pos: GridPos, description: str = "") -> RawPanel:
    """Grafana's (unified) alert list in stat view: how many RackTwin alert rules are firing.

    The stat view shows the number of rules left after the filters (rules.length in UnifiedAlertList.tsx), not
    of their instances, and the folder filter compares the rules' folder title."""
    return RawPanel(panelType="alertlist", title=title, gridPos=pos, description=description, extraJson={
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"viewMode": "stat", "groupMode": "default", "groupBy": [], "maxItems": 50, "sortOrder": 1,
                    "dashboardAlerts": False, "alertName": "", "alertInstanceLabelFilter": "",
                    "folder": {"title": WALL_FOLDER},  # the alert rules' folder (dashboards/alerts.py)
                    "stateFilter": {"firing": True, "pending": False, "noData": True, "normal": False,
                                    "error": True},
                    "showInstances": True}})


def dashboard_link(title: str, url: str, tooltip: str = "", include_vars: bool = False, keep_time: bool = False,
                   target_blank: bool = False) -> dict[str, Any]:
    return {"title": title, "type": "link", "url": url, "icon": "dashboard", "tooltip": tooltip, "tags": [],
            "asDropdown": False, "targetBlank": target_blank, "includeVars": include_vars, "keepTime": keep_time}


def table(title: str, pos: GridPos, targets: list, defaults: dict, *, datasource: dict, overrides: list | None = None,
          transformations: list | None = None, sort_by: list | None = None, description: str = "",
          time_from: str | None = None, hide_time_override: bool = False) -> RawPanel:
    """Today's table panel (grafanalib 0.7.1's Table emits the old "table-old" model)."""
    return RawPanel(panelType="table", title=title, gridPos=pos, dataSource=datasource, targets=targets,
                    description=description, timeFrom=time_from, hideTimeOverride=hide_time_override,
                    transformations=transformations or [],
                    extraJson={"options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False},
                                           "sortBy": sort_by or []},
                               "fieldConfig": {"defaults": defaults, "overrides": overrides or []}})
