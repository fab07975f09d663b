"""The wall's rack tiles as Grafana 13.2.2's own frontend code makes them: the Infinity search's answer from the
Ditto double (holding what the bridge wrote) goes through @grafana/data's field config and stat-panel display
values and @grafana/scenes' variable interpolation (tests/grafana_js/panel_values.cjs, run by Node.js), and the
tests check what each tile would say: its title, state word, colour and rack-detail link.

The tile panel is also drawn in Chromium by Grafana's own stat components (VizRepeater, BigValue). Not covered:
the app's StatPanel glue and panel chrome (modelled), and the parsing of an answer into frames by the Infinity
plugin and Grafana's InfluxQL backend, which is Go and is modelled here (``infinity_frame``,
``influxql_table_frame``)."""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pytest
import requests

from dashboards.common import RACK_PATH
from dashboards.thresholds import COLORS, ENVELOPE_COLORS, Thresholds
from dashboards.wall import HEADING_ROWS, MISSING_CELL, forecast_columns
from tests.conftest import DITTO_USERS
from tests.dashboard_data import (
    DASHBOARDS,
    DATASOURCES,
    DS_MIN_INTERVAL,
    RACKS,
    RISING_FAST,
    RISING_SLOW,
    feed_through_bridge,
)
from tests.grafana_sim import (
    gjson_get,
    interpolate,
    parse_duration_ms,
    target_query,
    variables_for,
)

GRAFANA_JS = Path(__file__).resolve().parent / "grafana_js"
WALL = next(d for d in DASHBOARDS.values() if d["uid"] == "racktwin-wall")
TILES = next(p for p in WALL["panels"] if p["title"].startswith("Racks (current twin state)"))
WALL_TIME = {"from": "now-6h", "to": "now"}
NUMBER = r"-?\d+(?:\.\d+)?"
TITLE = re.compile(rf"(?P<rack>.+)  ▲(?P<tempTop>{NUMBER}|{MISSING_CELL})° ▼(?P<tempBottom>{NUMBER}|{MISSING_CELL})°  "
                   rf"(?P<humidityTop>{NUMBER}|{MISSING_CELL})/(?P<humidityBottom>{NUMBER}|{MISSING_CELL})\u00a0%RH")


def grafana_values(panel: dict, frames: list[dict], variables: dict[str, str], time_range: dict) -> dict:
    """Display values of ``panel`` for ``frames``, computed by Grafana's packages (see panel_values.cjs)."""
    if not (GRAFANA_JS / "node_modules" / "@grafana" / "data").is_dir():
        pytest.fail("Grafana's frontend packages are not installed: run `make grafana-js` (make test does)")
    request = {"panel": panel, "frames": frames, "variables": variables, "time": time_range,
               "colors": sorted(set(COLORS.values()))}
    proc = subprocess.run(["node", str(GRAFANA_JS / "panel_values.cjs")], input=json.dumps(request),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _epoch_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def infinity_frame(target: dict, rows: list[dict]) -> dict:
    """The Infinity backend parser's table frame: one field per column, in column order, named by its text;
    gjson selectors per row, a missing value null, timestamps as epoch ms."""
    kinds = {"string": "string", "number": "number", "timestamp": "time"}
    fields = []
    for col in target["columns"]:
        values = []
        for row in rows:
            found, value = gjson_get(row, col["selector"])
            if found and col["type"] == "timestamp":
                value = _epoch_ms(value)
            values.append(value if found else None)
        fields.append({"name": col["text"], "type": kinds[col["type"]], "values": values})
    return {"fields": fields}


def _same_color(grafana: str, expected: str) -> bool:
    def transparent(c: str) -> bool:
        return c.replace(" ", "").lower() in ("transparent", "#00000000", "rgba(0,0,0,0)")
    return transparent(grafana) and transparent(expected) or grafana.lower() == expected.lower()


def _rack_of(href: str) -> tuple[str, dict[str, list[str]]]:
    parts = urllib.parse.urlsplit(href)
    return parts.path, urllib.parse.parse_qs(parts.query)


@pytest.fixture
def fed(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto):
    return feed_through_bridge(bridge_env, monkeypatch, mosquitto, influxd, influx_db, ditto,
                               stats_bucket_ms=parse_duration_ms(DATASOURCES["influxdb"]["jsonData"]["timeInterval"]))


def test_each_twin_gets_one_tile_saying_its_state_in_its_colour_with_its_values_and_link(fed, ditto):
    target = TILES["targets"][0]
    variables = variables_for(WALL, {"room": [], "row": []}, fed.namespace,
                              {"room": ["hall-1", "hall-2"], "row": ["A", "B"]})
    params = {p["key"]: interpolate(p["value"], variables, default_format="raw") for p in target["url_options"]["params"]}
    url = interpolate(target["url"], variables, default_format="raw").removeprefix(DATASOURCES["ditto"]["url"])
    resp = requests.get(ditto.url + url, params=params, auth=("grafana", DITTO_USERS["grafana"]), timeout=10)
    assert resp.status_code == 200, resp.text[:300]
    rows = resp.json()[target["root_selector"]]
    assert {r["attributes"]["rack"] for r in rows} == set(RACKS)

    out = grafana_values(TILES, [infinity_frame(target, rows)], {"namespace": fed.namespace}, WALL_TIME)
    tiles = out["values"]
    # One value per twin: the envelope field alone is picked, row by row, in the search's order.
    assert len(tiles) == len(rows)
    states = set()
    for row, tile in zip(rows, tiles):
        rack, env = row["attributes"]["rack"], row["features"]["environment"]["properties"]
        states.add(env["envelope"])
        assert tile["text"] == env["envelope"], (rack, tile)
        expected = out["colors"][COLORS[ENVELOPE_COLORS[env["envelope"]]]]
        assert _same_color(tile["color"], expected), (rack, env["envelope"], tile["color"], expected)
        title = TITLE.fullmatch(tile["title"])
        assert title, tile["title"]
        assert title["rack"] == rack
        for name in ("tempTop", "tempBottom", "humidityTop", "humidityBottom"):
            assert float(title[name]) == pytest.approx(env[name], abs=1e-9), (rack, name, tile["title"])
        [link] = tile["links"]
        path, query = _rack_of(link["href"])
        assert path == RACK_PATH and query["var-rack"] == [rack], link
        assert query["from"] == [WALL_TIME["from"]] and query["to"] == [WALL_TIME["to"]], link
    # The crafted hall covers every colour family the wall uses.
    assert {"OK", "WARM", "HOT", "VERY HUMID", "COLD"} <= states, states


def _tile_frame(rows: list[dict]) -> dict:
    target = TILES["targets"][0]
    twins = [{"attributes": {"rack": r["rack"], "room": "hall-1", "row": "A"},
              "features": {"environment": {"properties": {k: v for k, v in r.items() if k != "rack"}}}} for r in rows]
    return infinity_frame(target, twins)


def test_a_position_that_never_reported_shows_a_dash_not_the_panels_no_twin():
    frame = _tile_frame([{"rack": "rack-new", "tempBottom": 21.5, "humidityBottom": 45.0, "envelope": "SILENT",
                          "tsBottom": "2026-12-02T06:00:00.000Z"}])
    [tile] = grafana_values(TILES, [frame], {"namespace": "racktwin"}, WALL_TIME)["values"]
    assert tile["title"] == f"rack-new  ▲{MISSING_CELL}° ▼21.5°  {MISSING_CELL}/45\u00a0%RH", tile
    assert tile["text"] == "SILENT" and _same_color(tile["color"], "transparent")


def test_an_empty_search_says_no_twin():
    [tile] = grafana_values(TILES, [_tile_frame([])], {"namespace": "racktwin"}, WALL_TIME)["values"]
    assert tile["text"] == "no twin" and not tile.get("links")


# Grafana passes every data link through textUtil.sanitizeUrl (@braintree/sanitize-url 7.1, which decodes the
# percent-encoding; grafana/grafana #93072): a rack name's & # + reach the browser unencoded.
SAFE_NAMES = ["rack-a01", "Rack_A.01", "rack a01", "Gang-Ü-01"]
BROKEN_NAMES = {"r&d-01": "r", "rack#1": "rack", "a+b": "a b"}


def test_rack_links_survive_grafanas_link_sanitizer_for_plain_names_and_break_on_and_hash_plus():
    names = SAFE_NAMES + list(BROKEN_NAMES)
    frame = _tile_frame([{"rack": n, "tempTop": 24.0, "tempBottom": 21.0, "humidityTop": 40.0,
                          "humidityBottom": 45.0, "envelope": "OK"} for n in names])
    tiles = grafana_values(TILES, [frame], {"namespace": "racktwin"}, WALL_TIME)["values"]
    got = {}
    for name, tile in zip(names, tiles):
        [link] = tile["links"]
        # What the browser makes of the href: it percent-encodes spaces and non-ASCII, and a # ends the query.
        href = urllib.parse.quote(link["href"], safe="/?&=#%+:")
        got[name] = _rack_of(href.split("#")[0])[1].get("var-rack", [""])[0]
    assert {n: got[n] for n in SAFE_NAMES} == {n: n for n in SAFE_NAMES}
    assert {n: got[n] for n in BROKEN_NAMES} == BROKEN_NAMES


RACK = next(d for d in DASHBOARDS.values() if d["uid"] == "racktwin-rack")
TWIN_STATS = [p for p in RACK["panels"] if p["type"] == "stat" and p["targets"][0]["datasource"]["uid"] == "ditto"]
RACK_VARIABLES = {v["name"]: v["query"] for v in RACK["templating"]["list"] if v["type"] == "constant"}
UNIT_SUFFIX = {"celsius": "°C", "percent": "%"}


def test_the_rack_details_twin_stats_show_the_twins_values_and_link_to_the_sensors(fed, ditto):
    rack = "rack-a02"
    target = TWIN_STATS[0]["targets"][0]
    assert all(p["targets"][0] == target for p in TWIN_STATS)  # one request shape, one row: the twin
    variables = variables_for(RACK, {"rack": [rack]}, fed.namespace, {})
    url = interpolate(target["url"], variables, default_format="raw").removeprefix(DATASOURCES["ditto"]["url"])
    params = {p["key"]: interpolate(p["value"], variables, default_format="raw") for p in target["url_options"]["params"]}
    resp = requests.get(ditto.url + url, params=params, auth=("grafana", DITTO_USERS["grafana"]), timeout=10)
    assert resp.status_code == 200, resp.text[:300]
    twin = resp.json()
    env = twin["features"]["environment"]["properties"]
    frame = infinity_frame(target, [twin])
    names = dict(RACK_VARIABLES, namespace=fed.namespace, rack=rack)
    checked = 0
    for panel in TWIN_STATS:
        field = panel["options"]["reduceOptions"]["fields"].strip("/^$")
        [value] = grafana_values(panel, [frame], names, RACK["time"])["values"]
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if unit == "dateTimeFromNow":  # last seen: relative to now, and a link to the sensor's device
            assert value["text"].endswith("ago"), (panel["title"], value)
            [link] = value["links"]
            # The live bridge does not know ThingsBoard's device ids (racktwin sync writes them): the device list.
            assert link["href"] == RACK_VARIABLES["thingsboard"] + "/entities/devices/", link
        else:
            assert float(value["text"]) == pytest.approx(env[field], abs=0.05), (panel["title"], value)
            assert value["suffix"].strip() == UNIT_SUFFIX.get(unit, "°C"), (panel["title"], value)
        checked += 1
    assert checked == len(TWIN_STATS) == 9


def test_last_seen_links_open_the_sensors_device_once_sync_wrote_its_id():
    target = TWIN_STATS[0]["targets"][0]
    twin = {"attributes": {"rack": "rack-a01", "tbDeviceIds": {"top": "9f1c-top", "bottom": "9f1c-bottom"}},
            "features": {"environment": {"properties": {"tsTop": "2026-12-02T06:00:00.000Z",
                                                        "tsBottom": "2026-12-02T06:00:00.000Z"}}}}
    hrefs = {}
    for panel in TWIN_STATS:
        if panel["fieldConfig"]["defaults"]["unit"] == "dateTimeFromNow":
            [value] = grafana_values(panel, [infinity_frame(target, [twin])], RACK_VARIABLES, RACK["time"])["values"]
            hrefs[panel["title"]] = [link["href"] for link in value["links"]]
    base = RACK_VARIABLES["thingsboard"] + "/entities/devices/"
    assert hrefs == {"Top last seen": [base + "9f1c-top"], "Bottom last seen": [base + "9f1c-bottom"]}


def influxql_table_frame(body: dict) -> list[dict]:
    """Grafana's InfluxQL backend for a table-format query (pkg/tsdb/influxdb/influxql/buffered/response_parser.go,
    transformRowsForTable): one frame for all series: Time, the first series' tag keys (Go map order, here sorted),
    then the value columns, a row per series value."""
    series = [s for r in body.get("results", []) for s in (r.get("series") or [])]
    if not series:
        return []
    tags = sorted(series[0].get("tags") or {})
    columns = series[0]["columns"]
    rows = [(s.get("tags") or {}, v) for s in series for v in s["values"]]
    fields = [{"name": "Time", "type": "time", "values": [v[0] for _, v in rows]}]
    fields += [{"name": k, "type": "string", "values": [t.get(k) for t, _ in rows]} for k in tags]
    fields += [{"name": c, "type": "number", "values": [v[i] for _, v in rows]} for i, c in enumerate(columns) if i]
    return [{"fields": fields}]


def test_the_heading_for_trouble_table_lists_the_forecast_racks_soonest_first_with_their_links(fed, influxd,
                                                                                           influx_db):
    panel = next(p for p in WALL["panels"] if p["title"] == "Heading for trouble")
    [target] = panel["targets"]
    now_ms = int(time.time() * 1000)
    variables = variables_for(WALL, {"room": [], "row": []}, fed.namespace,
                              {"room": ["hall-1", "hall-2"], "row": ["A", "B"]})
    resp = requests.post(influxd.url + "/query", params={
        "q": target_query(WALL, panel, target, variables, now_ms, DS_MIN_INTERVAL), "db": influx_db,
        "epoch": "ms"}, timeout=30)
    resp.raise_for_status()
    frames = influxql_table_frame(resp.json())
    assert frames, resp.text[:300]
    out = grafana_values(panel, frames, {"namespace": fed.namespace}, WALL_TIME)
    fields = {f["displayName"]: f for f in out["fields"]}
    rec, trend, level, allowable = forecast_columns(Thresholds()).values()
    # organize: the columns in the panel's order, Time and room hidden
    assert [f["displayName"] for f in out["fields"]] == ["rack", "position", rec, trend, level, allowable, "row"]
    # sortBy then limit: the rack positions heading for the limit, soonest first
    listed = list(zip(fields["rack"]["texts"], fields["position"]["texts"]))
    assert listed == [RISING_FAST, RISING_SLOW] and len(listed) <= HEADING_ROWS, listed
    # Grafana's "m" unit: about 26 minutes, and 2 h 10 min with no decimals as "2 hours"
    assert re.fullmatch(r"2[0-9] min", fields[rec]["texts"][0]) and fields[rec]["texts"][1] == "2 hours", \
        fields[rec]["texts"]
    for rack, links in zip(fields["rack"]["texts"], fields["rack"]["links"]):
        [href] = links
        path, query = _rack_of(href)
        assert path == RACK_PATH and query["var-rack"] == [rack], href


# -------------------------------------------------------------------------- the tiles drawn by Grafana's components

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def bundle(tmp_path: Path) -> Path:
    """stat_tiles.jsx with Grafana's packages, bundled for the browser."""
    out = tmp_path / "stat_tiles.js"
    proc = subprocess.run(
        [str(GRAFANA_JS / "node_modules" / ".bin" / "esbuild"), str(GRAFANA_JS / "stat_tiles.jsx"), "--bundle",
         "--format=iife", f"--outfile={out}", "--loader:.css=empty", "--loader:.svg=empty", "--log-level=error",
         "--define:process.env.NODE_ENV=\"production\"", "--define:global=window",
         # imported by @grafana/runtime for the app's router; never run by these components
         "--external:react-router-dom-v5-compat"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def draw(tmp_path: Path, panels: list[dict]) -> dict:
    script = bundle(tmp_path)
    page = tmp_path / "tiles.html"
    page.write_text(
        '<!doctype html><html><head><meta charset="utf-8"></head><body><div id="styles"></div><div id="panels">'
        f'</div><pre id="out"></pre><script>window.RACKTWIN = {json.dumps(panels)};</script>'
        f'<script src="{script.as_uri()}"></script></body></html>', encoding="utf-8")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--window-size=2600,1500", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="out">([^<]*)</pre>', proc.stdout)
    assert found and found.group(1), f"Chromium gave no result: {proc.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (make deps-system installs it)")
def test_grafanas_own_stat_components_fit_every_tile_text_inside_its_tile(tmp_path):
    """40 tiles on the wall's panel, drawn by Grafana 13.2.2's VizRepeater and BigValue in Chromium, for both
    screens and both panel header heights: the longest titles the twin's values can make (the layout model's
    worst cases) with every state word, each tile's text inside its tile and every tile inside the panel."""
    from tests.grafana_layout import fit_tile, stat_content_px, text_width
    from tests.test_wall_layout import HEADERS_PX, SCREENS, state_texts, worst_titles
    from tests.test_wall_layout import RACKS as HALL_RACKS

    size = TILES["options"]["text"]["titleSize"]
    titles = sorted(worst_titles(), key=lambda t: -text_width(t, size))[:3]
    combos = [(title, state) for title in titles for state in state_texts()]
    assert HALL_RACKS >= len(combos)
    cases = [combos[i % len(combos)] for i in range(HALL_RACKS)]
    panels, where = [], []
    for screen in SCREENS:
        for header in HEADERS_PX:
            width, height = stat_content_px(TILES, screen, header)
            values = [{"display": {"text": state, "title": title, "color": "#FF9830", "numeric": 0},
                       "links": ["/d/racktwin-rack/rack-detail?var-rack=x"]} for title, state in cases]
            panels.append({"width": width, "height": height, "options": TILES["options"], "values": values})
            where.append((screen, header))
    result = draw(tmp_path, panels)
    assert result["inter"] and result["font"].startswith("Inter"), result["font"]
    text = TILES["options"]["text"]
    for (screen, header), panel in zip(where, result["panels"]):
        assert len(panel["tiles"]) == HALL_RACKS, (screen.name, header)
        for i, ((title, state), tile) in enumerate(zip(cases, panel["tiles"])):
            at = f"{screen.name}, {header} px header: {title!r} / {state!r} in {tile['width']:.0f} x {tile['height']:.0f}"
            assert tile["left"] + tile["width"] <= panel["width"] + 0.5, at
            assert tile["top"] + tile["height"] <= panel["height"] + 0.5, f"{at}: below the panel"
            assert {run["size"] for run in tile["runs"]} == {text["titleSize"], text["valueSize"]}, at
            for run in tile["runs"]:
                assert run["left"] >= -0.5 and run["right"] <= tile["width"] + 0.5, f"{at}: {run}"
                assert run["top"] >= -0.5 and run["bottom"] <= tile["height"] + 0.5, f"{at}: {run}"
            # The layout model, which the other wall tests use, never counts fewer lines than Grafana draws.
            fit = fit_tile(TILES, screen, header, HALL_RACKS, title, state)
            drawn = [sum(1 for r in tile["runs"] if r["size"] == s) for s in (text["titleSize"], text["valueSize"])]
            model = [math.inf if lines is None else len(lines) for lines in (fit.title_lines, fit.value_lines)]
            assert model[0] >= drawn[0] and model[1] >= drawn[1], f"{at}: model {model} lines, Grafana {drawn}"
            # The model's grid: its last row's tiles share that row's width.
            last_row = i >= (fit.grid.rows - 1) * fit.grid.columns
            model_w = fit.grid.last_row_w if last_row else fit.grid.tile_w
            assert model_w == pytest.approx(tile["width"], abs=1) and \
                fit.grid.tile_h == pytest.approx(tile["height"], abs=1), f"{at}: model {fit.grid}"


def test_the_heading_for_trouble_table_shows_the_soonest_rows_only():
    """More rack positions heading for the limit than the table has rows: the soonest HEADING_ROWS, in order."""
    panel = next(p for p in WALL["panels"] if p["title"] == "Heading for trouble")
    rec, trend, level, allowable = forecast_columns(Thresholds()).values()
    minutes = [44.0, 3.0, 25.0, 12.0, 7.0, 58.0, 1.0, 19.0]
    body = {"results": [{"series": [
        {"name": "rack_forecast", "tags": {"room": "hall-1", "row": "A", "rack": f"rack-{i}", "position": "top"},
         "columns": ["time", rec, trend, level, allowable], "values": [[0, m, 6.0, 24.0, m + 50]]}
        for i, m in enumerate(minutes)]}]}
    out = grafana_values(panel, influxql_table_frame(body), {"namespace": "racktwin"}, WALL_TIME)
    fields = {f["displayName"]: f for f in out["fields"]}
    soonest = sorted(range(len(minutes)), key=lambda i: minutes[i])[:HEADING_ROWS]
    assert fields["rack"]["texts"] == [f"rack-{i}" for i in soonest]
    assert [t.split()[0] for t in fields[rec]["texts"]] == [f"{minutes[i]:.0f}" for i in soonest]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (make deps-system installs it)")
def test_grafana_sizes_the_summary_numbers_to_be_read_from_across_the_room(tmp_path):
    """The top row's values (a hot inlet, a two-digit count), formatted by Grafana's field config and sized by its
    BigValue to each panel, on a 55-inch 1080p screen under both header heights: legible from 5 m or more, and
    the layout model's size (tests/test_wall_layout.py) within 10 % of Grafana's."""
    from tests.grafana_layout import single_stat_value_px, stat_content_px
    from tests.test_wall_layout import HEADERS_PX, SCREENS, legible_from_m

    screen = SCREENS[0]
    summary = [p for p in WALL["panels"] if p["type"] == "stat" and p["gridPos"]["y"] == 0]
    panels, cases = [], []
    for header in HEADERS_PX:
        for panel in summary:
            value = 33.0 if panel["fieldConfig"]["defaults"]["unit"] == "celsius" else 12.0
            frame = {"fields": [{"name": "Time", "type": "time", "values": [0]},
                                {"name": "value", "type": "number", "values": [value]}]}
            [shown] = grafana_values(panel, [frame], {"namespace": "racktwin"}, {"from": "now-15m", "to": "now"})["values"]
            width, height = stat_content_px(panel, screen, header)
            display = {k: shown[k] for k in ("text", "prefix", "suffix", "color")} | {"numeric": value}
            panels.append({"width": width, "height": height, "options": panel["options"],
                           "values": [{"display": display, "links": []}]})
            cases.append((header, panel, shown))
    result = draw(tmp_path, panels)
    for (header, panel, shown), drawn in zip(cases, result["panels"]):
        [tile] = drawn["tiles"]
        value_px = max(run["size"] for run in tile["runs"] if run["text"].strip() == shown["text"])
        at = f"{panel['title']} ({shown['text']}{shown['suffix']}), {header} px header"
        assert legible_from_m(value_px, screen) >= 5.0, f"{at}: {value_px} px"
        text = shown["text"] + shown["suffix"]
        assert single_stat_value_px(panel, screen, header, text) == pytest.approx(value_px, rel=0.1), at
