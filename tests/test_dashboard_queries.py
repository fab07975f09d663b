"""Every InfluxQL query of every dashboard panel, template variable and alert rule is executed against the real
InfluxDB holding data the bridge wrote, with Grafana's macros and variables expanded as Grafana does; every
Infinity request is executed against the Ditto double (OpenAPI-validated) as the read-only user grafana."""

from __future__ import annotations

import re
import time

import pytest
import requests

from dashboards.rack import OPTIONAL_TWIN_SELECTORS
from dashboards.thresholds import Thresholds
from tests.conftest import DITTO_USERS
from tests.dashboard_data import (DASHBOARDS, DATASOURCES, DS_MIN_INTERVAL, RACKS, RISING_FAST, RISING_SLOW,
                                 RULE_GROUPS, feed_through_bridge)
from tests.grafana_sim import (Variable, field_display_name, gjson_get, influx_rule_queries, interpolate,
                               parse_duration_ms, stat_fields, target_query, unresolved_variables, variables_for)

RULES = [r for g in RULE_GROUPS for r in g["rules"]]

HALL2 = sorted(r for r, (room, _) in RACKS.items() if room == "hall-2")
# Selections a wall user can make: everything (All), one room, and a multi-value pick.
SELECTIONS = {
    "all": ({"room": [], "row": []}, set(RACKS)),
    "hall-2": ({"room": ["hall-2"], "row": ["B"]}, set(HALL2)),
    "both rows": ({"room": ["hall-1", "hall-2"], "row": ["A", "B"]}, set(RACKS)),
}

# The wall's summary stats for the crafted data (tests/dashboard_data.py) with everything selected.
WALL_VALUES = {
    "Hottest inlet now": 33.0,               # rack-a04 top
    "Racks outside recommended": 4,          # a02 (29 °C), a04 (33 °C), b01 (RH 85 %), b02 (14 °C, dew point < -9)
    "Racks outside A1": 3,                   # a04 (> 32 °C), b01 (RH > 80 %), b02 (< 15 °C, RH < 8 %)
    "Sensors silent": 2,                     # rack-a03 top and bottom
    "Sensors stuck": 2,                      # rack-b05 top and bottom
    "Largest top − bottom": 12.0,            # rack-a04: 33 - 21
}
# Rack positions the wall's "Heading for trouble" table lists (forecast crossing of the recommended limit),
# soonest first, and the rack whose forecast panels the rack detail test looks at.
HEADING = [RISING_FAST, RISING_SLOW]
RECIRCULATING = {"rack-a02", "rack-a04", "rack-b02"}  # top − bottom above the limit (as the recirculation rule)
FORECAST_RACK = RISING_FAST[0]


# ------------------------------------------------------------------------------- query text analysis

def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch in "'\"":
            i = text.index(ch, i + 1)
        elif depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def expected_shape(query: str) -> tuple[list[str], set[str]]:
    """Columns of the outermost SELECT and the tags of its GROUP BY (what each result series must carry)."""
    select, _, rest = _split_top(query, " FROM ")[0], None, " FROM ".join(_split_top(query, " FROM ")[1:])
    columns = []
    for item in _split_top(select.removeprefix("SELECT "), ", "):
        m = re.search(r' AS "([^"]+)"$', item)
        columns.append(m.group(1) if m else item.split("(")[0].strip('"'))  # a bare "field" comes back unquoted
    tags: set[str] = set()
    group = _split_top(rest, " GROUP BY ")
    if len(group) > 1:
        for part in _split_top(group[-1].split(" fill(")[0], ", "):
            part = part.strip()
            if part.startswith('"'):
                tags.add(part.strip('"'))
    return columns, tags


def test_expected_shape_parser():
    cols, tags = expected_shape('SELECT max("a") - max("b") AS "delta" FROM (SELECT x FROM y GROUP BY "z"), '
                                '(SELECT w FROM y) GROUP BY time(1m), "rack", "room" fill(none)')
    assert cols == ["delta"] and tags == {"rack", "room"}
    assert expected_shape('SELECT mean("t") FROM "m" WHERE $timeFilter') == (["mean"], set())


def test_fields_the_panels_name_are_fields_their_queries_return():
    """Overrides, organize and sort name fields by their InfluxDB column or tag: a renamed alias in a query must
    not leave a panel formatting, hiding or sorting a field that no longer exists (Grafana would say nothing)."""
    checked = 0
    for uid, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            targets = [t for t in panel.get("targets", []) if t.get("datasource", {}).get("uid") == "influxdb"]
            named = {o["matcher"]["options"] for o in panel.get("fieldConfig", {}).get("overrides", [])
                     if o["matcher"]["id"] == "byName"}
            for step in panel.get("transformations", []):
                options = step.get("options", {})
                for key in ("excludeByName", "indexByName", "renameByName"):
                    named |= set(options.get(key, {}))
                named |= {sort["field"] for sort in options.get("sort", [])}
            named |= {sort["displayName"] for sort in (panel.get("options", {}).get("sortBy") or [])}
            if not targets or not named:
                continue
            returned = {"Time"}
            for target in targets:
                columns, tags = expected_shape(target["query"])
                returned |= set(columns) | tags
            assert named <= returned, f"{uid} / {panel['title']}: {sorted(named - returned)} not returned"
            checked += 1
    assert checked >= 1  # the wall's forecast table at least


# ------------------------------------------------------------------------------- helpers

def run_influxql(influxd, db: str, query: str) -> dict:
    resp = requests.post(influxd.url + "/query", params={"q": query, "db": db, "epoch": "ms"}, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    for result in body.get("results", []):
        assert "error" not in result, f"InfluxQL error {result['error']!r} for {query}"
    return body


def series_of(body: dict) -> list[dict]:
    return [s for r in body.get("results", []) for s in (r.get("series") or [])]


def influx_panel_targets():
    for uid, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("uid") == "influxdb":
                    yield uid, dash, panel, target


def infinity_panel_targets():
    for uid, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                if target.get("datasource", {}).get("uid") == "ditto":
                    yield uid, dash, panel, target


# ------------------------------------------------------------------------------- the test

@pytest.fixture
def fed(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto):
    # Rates are derivatives between buckets of the datasource's 10 s minimum interval.
    return feed_through_bridge(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto,
                               stats_bucket_ms=parse_duration_ms(DS_MIN_INTERVAL))


def test_every_query_and_request_returns_what_the_panels_expect(fed, influxd, influx_db, ditto):
    now_ms = int(time.time() * 1000)
    checked_influx = checked_infinity = 0
    wall_checked: set[str] = set()

    # Template variable queries first: their results are the options "All" expands to.
    options: dict[str, list[str]] = {}
    for dash in DASHBOARDS.values():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                query = interpolate(var["query"], {"room": Variable("room", [], True, True, ["hall-1", "hall-2"], True)})
                values = [row["value"] for row in influxd.rows(query, influx_db)]
                options[var["name"]] = values
                checked_influx += 1
    assert options["room"] == ["hall-1", "hall-2"] and options["row"] == ["A", "B"]
    assert options["rack"] == sorted(RACKS)
    hall1_rows = influxd.rows(interpolate('SHOW TAG VALUES FROM "rack_environment" WITH KEY = "row" '
                                          'WHERE "room" =~ /^$room$/',
                                          {"room": Variable("room", ["hall-1"], True, True, options["room"])}),
                              influx_db)
    assert [r["value"] for r in hall1_rows] == ["A"]

    heading_checked = 0
    delta_checked = False
    for uid, dash, panel, target in influx_panel_targets():
        forecast = '"rack_forecast"' in target["query"] or '"rack_projection"' in target["query"]
        rack = FORECAST_RACK if forecast else "rack-a02"  # a rack that has data for this query
        selections = SELECTIONS.items() if "$room" in target["query"] else [("rack", ({"rack": [rack]}, None))]
        for label, (selection, racks) in selections:
            if "$rack" not in target["query"] and "$room" not in target["query"]:
                label, racks = "-", None
            if forecast and racks is not None:
                racks = {r for r, _ in HEADING} & racks  # only racks heading for trouble are listed
            variables = variables_for(dash, dict(selection, rack=[rack]), fed.namespace, options)
            query = target_query(dash, panel, target, variables, now_ms, DS_MIN_INTERVAL)
            assert not unresolved_variables(query), query  # every variable and macro expanded
            series = series_of(run_influxql(influxd, influx_db, query))
            where = f"{uid} / {panel['title']} / {label}"
            if not series and "noValue" in panel["fieldConfig"]["defaults"] and label != "all":
                checked_influx += 1  # a count of nothing: the panel shows its noValue ("0")
                continue
            assert series, f"{where}: no series for {query}"
            if label == "all" and panel["title"] in WALL_VALUES:
                assert series[0]["values"][-1][1] == pytest.approx(WALL_VALUES[panel["title"]]), where
                wall_checked.add(panel["title"])
            columns, tags = expected_shape(query)
            alias_tags = set(re.findall(r"\$tag_(\w+)", target.get("alias", "")))
            assert alias_tags <= tags, f"{where}: alias uses tags {alias_tags - tags} the query does not group by"
            for s in series:
                assert s["columns"] == ["time", *columns], f"{where}: columns {s['columns']}"
                assert set((s.get("tags") or {})) == tags, f"{where}: tags {s.get('tags')}"
                assert any(v is not None for row in s["values"] for v in row[1:]), f"{where}: only nulls"
            if racks is not None and "rack" in tags:
                seen = {s["tags"]["rack"] for s in series}
                assert seen == racks - {"rack-a03"} or seen == racks, f"{where}: racks {seen} for {selection}"
            if label == "all" and panel["title"] == "Top − bottom °C per rack":
                # The recirculation grid: the racks whose top runs hotter than the limit, at their last bucket.
                last = {s["tags"]["rack"]: s["values"][-1][1] for s in series}
                assert last["rack-a04"] == pytest.approx(12.0), where
                assert {r for r, v in last.items() if v > Thresholds().delta_t_limit_c} == RECIRCULATING, last
                delta_checked = True
            if panel["title"] == "Heading for trouble":
                # merged, sorted by the first column (minutes to the recommended limit) as the panel does
                rows = sorted(((s["tags"]["rack"], s["tags"]["position"]), s["values"][0][1]) for s in series)
                listed = [key for key, minutes in sorted(rows, key=lambda r: r[1])]
                assert listed == [k for k in HEADING if k[0] in racks], f"{where}: {rows}"
                assert all(0 <= minutes for _, minutes in rows)
                heading_checked += 1
            checked_influx += 1
        if "$rack" in target["query"]:
            # The rack filter really narrows to one rack: compare with the unfiltered count.
            assert all(s.get("tags", {}).get("rack", rack) == rack for s in series)

    for rule in RULES:
        for query in influx_rule_queries(rule, now_ms):
            body = run_influxql(influxd, influx_db, query)
            columns, tags = expected_shape(query)
            assert series_of(body), f"{rule['uid']}: no series, so its shape went unchecked"
            for s in series_of(body):
                assert s["columns"] == ["time", *columns] and set(s.get("tags") or {}) == tags, rule["uid"]
            checked_influx += 1

    # Infinity: URL + params as the plugin sends them, to the double, as the read-only user.
    auth = ("grafana", DITTO_USERS["grafana"])
    for uid, dash, panel, target in infinity_panel_targets():
        for label, (selection, racks) in SELECTIONS.items():
            variables = variables_for(dash, dict(selection, rack=["rack-a02"]), fed.namespace, options)
            url = interpolate(target["url"], variables, default_format="raw")
            assert url.startswith(DATASOURCES["ditto"]["url"] + "/"), url
            assert any(url.startswith(h) for h in DATASOURCES["ditto"]["jsonData"]["allowedHosts"])
            params = {p["key"]: interpolate(p["value"], variables, default_format="raw")
                      for p in target["url_options"]["params"]}
            assert not any(unresolved_variables(v) for v in params.values()), params
            resp = requests.get(ditto.url + url.removeprefix(DATASOURCES["ditto"]["url"]), params=params,
                                auth=auth, timeout=10)
            where = f"{uid} / {panel['title']} / {label}"
            assert resp.status_code == 200, f"{where}: {resp.status_code} {resp.text[:300]}"
            body = resp.json()
            rows = body[target["root_selector"]] if target["root_selector"] else [body]
            assert rows, f"{where}: empty response"
            for row in rows:
                for col in target["columns"]:
                    found, value = gjson_get(row, col["selector"])
                    if not found and col["selector"] in OPTIONAL_TWIN_SELECTORS:
                        continue  # only `racktwin sync` writes them; Infinity gives null, the links fall back
                    assert found, f"{where}: column {col['selector']} missing in {row}"
                    if col["type"] == "number":
                        assert isinstance(value, (int, float)), (where, col, value)
            if "filter" in params:
                assert {r["attributes"]["rack"] for r in rows} == racks, f"{where}: filter {params['filter']}"
            field_names = [c["text"] for c in target["columns"]]
            for tr in panel.get("transformations", []):
                if tr["id"] == "calculateField":
                    assert set(tr["options"]["reduce"]["include"]) <= set(field_names)
                    field_names.append(tr["options"]["alias"])
            # Grafana picks the fields by a regex on their display names (which a displayName sets).
            shown = stat_fields(panel, field_names)
            assert shown, f"{where}: {panel['options']['reduceOptions']['fields']} selects no field"
            for n in re.findall(r"__cell_(\d+)", "".join(field_display_name(panel, name) for name in shown)):
                assert int(n) < len(target["columns"])
            for link in panel["fieldConfig"]["defaults"].get("links", []):
                for name in re.findall(r"__data\.fields\.(\w+)", link["url"]):
                    assert name in field_names, f"{where}: link uses unknown field {name}"
            checked_infinity += 1
            if "filter" not in params:
                break  # requests that do not depend on the selection need one run

    assert wall_checked == set(WALL_VALUES) and delta_checked
    assert heading_checked == len(SELECTIONS)
    assert checked_influx >= 30 and checked_infinity >= 4
