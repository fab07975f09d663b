"""Structure of the generated Grafana provisioning: byte-identical regeneration, ids and uids, grid layout,
datasource uids, links, variables, the dashboard JSON schema, and what Grafana's alert file loader requires."""

from __future__ import annotations

import json
import re
import urllib.parse

import jsonschema
import pytest
import yaml

from dashboards import alerts, generate
from dashboards.thresholds import Thresholds, from_env
from tests.dashboard_data import DASHBOARDS, DATASOURCES, PROVISIONING, RULE_GROUPS

ENV_VARS = {"INFLUX_BUCKET", "GRAFANA_INFLUX_TOKEN", "DITTO_GRAFANA_PASSWORD", "ALERT_WEBHOOK_URL", "ALERT_EMAIL_TO"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w))+$")
GRID_COLUMNS = 24
WALL_MAX_HEIGHT = 27  # grid units visible on a 1080p screen in kiosk mode (30 px rows + 8 px gaps)


def load(rel: str):
    text = (PROVISIONING / rel).read_text()
    return json.loads(text) if rel.endswith(".json") else yaml.safe_load(text)


DATASOURCE_UIDS = set(DATASOURCES)
RULES = [r for g in RULE_GROUPS for r in g["rules"]]


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def walk(node, path=()):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


# ------------------------------------------------------------------------------------ regeneration

def test_regeneration_gives_the_committed_bytes():
    files = generate.build_all(from_env({}))
    on_disk = {str(p.relative_to(PROVISIONING)) for p in PROVISIONING.rglob("*") if p.is_file()}
    assert on_disk == set(files), "generated file set differs from provisioning/grafana (run make dashboards)"
    for rel, text in files.items():
        assert (PROVISIONING / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: run make dashboards"
        assert text.endswith("\n")


def test_writing_removes_files_an_older_version_generated_and_nothing_else(tmp_path):
    (tmp_path / "dashboards/json").mkdir(parents=True)
    (tmp_path / "dashboards/json/racktwin-old-wall.json").write_text("{}")
    (tmp_path / "alerting").mkdir()
    (tmp_path / "alerting/old-rules.yaml").write_text("apiVersion: 1\n")
    (tmp_path / "NOTES.txt").write_text("kept")
    generate.write_all(tmp_path, Thresholds())
    on_disk = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert on_disk == set(generate.build_all(Thresholds())) | {"NOTES.txt"}


def test_generation_is_deterministic_and_thresholds_drive_colours_and_rules():
    default = generate.build_all(Thresholds())
    assert default == generate.build_all(Thresholds())
    other = generate.build_all(from_env({"RACKTWIN_ASHRAE_CLASS": "a2", "RACKTWIN_RH_CAP": "50"}))
    rules = {r["uid"]: r for g in yaml.safe_load(other["alerting/rules.yaml"])["groups"] for r in g["rules"]}
    params = {uid: r["data"][2]["model"]["conditions"][0]["evaluator"]["params"] for uid, r in rules.items()}
    assert params["racktwin-inlet-allowable"] == [10.0, 35.0]
    assert params["racktwin-humidity-recommended"] == [50.0]
    assert params["racktwin-dewpoint-allowable"] == [21.0]
    wall = json.loads(other["dashboards/wall/racktwin-wall.json"])
    steps = [s["value"] for s in wall["panels"][0]["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 10.0, 18.0, 27.0, 35.0]
    with pytest.raises(ValueError):
        Thresholds(ashrae_class="B9")
    with pytest.raises(ValueError):
        Thresholds(rh_cap=60)


# ------------------------------------------------------------------------------------ dashboards

def test_dashboard_uids_titles_and_panel_ids_are_unique():
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert sorted(uids) == ["racktwin-bridge", "racktwin-rack", "racktwin-wall"]
    assert len({d["title"] for d in DASHBOARDS.values()}) == len(DASHBOARDS)
    for name, dash in DASHBOARDS.items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) and i > 0 for i in ids), name


def test_grid_positions_do_not_overlap_and_the_wall_fits_one_screen():
    for name, dash in DASHBOARDS.items():
        cells: dict[tuple[int, int], str] = {}
        for panel in dash["panels"]:
            g = panel["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= GRID_COLUMNS, (name, panel["title"])
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {panel['title']} overlaps {cells[(x, y)]}"
                    cells[(x, y)] = panel["title"]
    wall = DASHBOARDS["racktwin-wall"]
    assert max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in wall["panels"]) <= WALL_MAX_HEIGHT
    assert wall["refresh"] and wall["editable"] is False


def test_every_datasource_reference_is_provisioned():
    allowed = DATASOURCE_UIDS | {"-- Grafana --"}
    count = 0
    for name, dash in DASHBOARDS.items():
        for path, node in walk(dash):
            if path and path[-1] == "datasource" and isinstance(node, dict):
                assert node["uid"] in allowed, f"{name} {path}: {node}"
                count += 1
            assert not (path and path[-1] == "datasource" and isinstance(node, str)), f"{name} {path}: legacy name"
    assert count > 20
    assert DATASOURCE_UIDS == {"influxdb", "ditto"}


def test_every_link_resolves_to_a_provisioned_dashboard():
    by_uid = {d["uid"]: d for d in DASHBOARDS.values()}
    links = 0
    for name, dash in DASHBOARDS.items():
        for path, node in walk(dash):
            if path and path[-1] == "url" and isinstance(node, str):
                if node.startswith("/"):
                    m = re.match(r"^/d/([^/?]+)/([^/?]+)", node)
                    assert m and m.group(1) in by_uid, f"{name}: {node}"
                    assert m.group(2) == slug(by_uid[m.group(1)]["title"]), f"{name}: slug of {node}"
                    for var in re.findall(r"var-(\w+)=", node):
                        assert var in {v["name"] for v in by_uid[m.group(1)]["templating"]["list"]}, node
                    links += 1
                elif not node.startswith("http://" + "ditto-nginx"):
                    # external links come from constant variables of the dashboard, never hard-coded hosts
                    assert node.startswith("${"), f"{name}: absolute link {node}"
    assert links >= 3


def test_query_variables_are_re_queried_by_the_auto_refresh():
    """A kiosk is never reloaded: a variable queried only on load would keep the rooms and racks of that moment
    (none at all on a wall opened before the first reading), with "All" meaning only those."""
    checked = 0
    for name, dash in DASHBOARDS.items():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                assert dash.get("refresh") and var["refresh"] == 2, f"{name}: {var['name']}"
                checked += 1
    assert checked >= 3


def odd_rack_variables() -> dict:
    """Namespace and a rack name with the characters that cut a URL (bridge/mapping.py accepts them)."""
    from tests.grafana_sim import Variable

    return {"namespace": Variable("namespace", ["dc.fra1"]), "rack": Variable("rack", ["a#1?b&c d"])}


def test_links_carrying_a_rack_name_encode_it():
    """Rack names may hold & # + (bridge/mapping.py accepts them); raw in a query string they would cut the link."""
    found = []
    for path in sorted(PROVISIONING.rglob("*")):
        if path.suffix in (".json", ".yaml"):
            found += re.findall(r"var-rack=(\{\{.*?\}\}|[^\"&\n]*)", path.read_text())
    assert found and set(found) == {"${__data.fields.rack:percentencode}", "{{ urlquery $labels.rack }}"}, found
    # The rack detail's Ditto requests and its link to the twin put the name into the path.
    urls = [node for dash in DASHBOARDS.values() for path, node in walk(dash)
            if path and path[-1] == "url" and isinstance(node, str) and "${rack" in node]
    in_paths = [u for u in urls if "var-rack=" not in u]
    assert len(in_paths) >= 5 and all("${rack:percentencode}" in u and "${rack}" not in u for u in in_paths), in_paths
    from tests.grafana_sim import interpolate

    odd = interpolate(in_paths[0], odd_rack_variables(), default_format="raw")
    split = urllib.parse.urlsplit(odd)
    assert split.query == split.fragment == "" and urllib.parse.unquote(split.path).endswith("dc.fra1:a#1?b&c d"), odd


def test_the_ditto_ui_link_searches_for_this_rack_alone():
    from tests.grafana_sim import Variable, interpolate

    rack = next(d for d in DASHBOARDS.values() if d["title"] == "Rack detail")
    link = next(x for x in rack["links"] if x["title"] == "Ditto UI")
    url = interpolate(link["url"], {**odd_rack_variables(), "ditto": Variable("ditto", ["http://dc:8090"])},
                      default_format="raw")
    split = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(split.query)
    assert split.path == "/ui/" and split.fragment == "", url
    assert query == {"primaryEnvironmentName": ["racktwin"], "environmentsURL": ["/ui/racktwin-environments.json"],
                     "filter": ['eq(thingId,"dc.fra1:a#1?b&c d")']}, query


def test_every_variable_used_is_defined():
    builtin = {"timeFilter", "__interval", "interval", "__interval_ms", "__data", "__url_time_range", "__cell_0",
               "__cell_3", "__cell_4", "__cell_5", "__cell_6", "tag_rack", "tag_position", "tag_instance",
               "tag_reason", "col"}
    for name, dash in DASHBOARDS.items():
        defined = {v["name"] for v in dash["templating"]["list"]}
        for path, node in walk(dash):
            if isinstance(node, str) and path and path[-1] in ("query", "url", "value", "alias", "displayName"):
                used = {m.group(1) or m.group(2) for m in re.finditer(r"\$\{(\w+)[^}]*\}|\$(\w+)", node)}
                assert used <= defined | builtin, f"{name} {path}: {used - defined - builtin}"


def test_dashboards_validate_against_the_dashboard_json_schema():
    from tests.doubles.contracts import find_contract

    schema_file = find_contract("grafana-dashboard.jsonschema.json")  # missing contract = a failure, not a skip
    schema = json.loads(schema_file.read_text())
    # The generator of this schema renders Grafana's `any` (MatcherConfig.options, DynamicConfigValue.value)
    # as "object"; Grafana itself stores a field name string for byName and numbers/strings as override values.
    # Only those two slots are loosened, and only to what the CUE type allows: anything but a missing key.
    schema["definitions"]["MatcherConfig"]["properties"]["options"] = {}
    schema["definitions"]["DynamicConfigValue"]["properties"]["value"] = {}
    validator = jsonschema.Draft7Validator(schema)
    for name, dash in DASHBOARDS.items():
        errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(dash)]
        assert not errors, f"{name}: {errors[:5]}"


def test_influx_targets_are_raw_influxql_with_time_filter():
    for name, dash in DASHBOARDS.items():
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                if t["datasource"]["uid"] == "influxdb":
                    # tables take InfluxDB's table format (tags as columns); everything else time series
                    assert t["rawQuery"] is True
                    assert t["resultFormat"] == ("table" if panel["type"] == "table" else "time_series"), panel["title"]
                    assert "$timeFilter" in t["query"] and "$__timeFilter" not in t["query"], (name, panel["title"])
                    assert t["refId"]


def test_wall_reads_ditto_with_one_search_request():
    wall = DASHBOARDS["racktwin-wall"]
    ditto_targets = [t for p in wall["panels"] for t in p.get("targets", []) if t["datasource"]["uid"] == "ditto"]
    assert len(ditto_targets) == 1
    t = ditto_targets[0]
    assert t["url"].endswith("/api/2/search/things") and t["parser"] == "backend" and t["root_selector"] == "items"
    params = {p["key"]: p["value"] for p in t["url_options"]["params"]}
    assert "size(200)" in params["option"] and params["namespaces"] == "${namespace}"
    # Each tile shows the twin's envelope state, and every state the bridge can write has its band colour.
    from bridge.thresholds import ENVELOPE_CRITICAL, ENVELOPE_STATES

    tiles = next(p for p in wall["panels"] if p.get("targets") and p["targets"][0] is t)
    # Grafana picks the shown fields by a regex on display names: the envelope field, titled by its override (a
    # title in the defaults would rename every field, so the regex would match none and the hall show "no twin").
    from tests.grafana_sim import field_display_name, stat_fields

    columns = [c["text"] for c in t["columns"]]
    assert stat_fields(tiles, columns) == ["envelope"]
    assert "__cell_0" in field_display_name(tiles, "envelope") and "displayName" not in tiles["fieldConfig"]["defaults"]
    # One page of Ditto's search (200 at most) and as many tiles, sorted so a room's racks stay together;
    # the panel says so, for the site with more racks than that.
    assert tiles["options"]["reduceOptions"]["limit"] == 200
    assert params["option"].startswith("size(200),sort(+attributes/room,")
    assert "At most 200 racks" in tiles["description"]
    assert {c["text"] for c in t["columns"]} >= {"envelope", "rack"}
    mapped = tiles["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert set(mapped) == set(ENVELOPE_STATES) and mapped["OK"]["color"] == "green"
    assert {s for s, m in mapped.items() if m["color"] in ("red", "blue")} == ENVELOPE_CRITICAL


def test_forecast_panels_use_the_class_limits_and_the_horizon():
    from bridge.forecast.tracker import MEASUREMENT as FORECAST_MEASUREMENT

    files = generate.build_all(from_env({"RACKTWIN_ASHRAE_CLASS": "A3", "RACKTWIN_FORECAST_HORIZON_MIN": "20"}))
    wall = json.loads(files["dashboards/wall/racktwin-wall.json"])
    table = next(p for p in wall["panels"] if p["title"] == "Heading for trouble")
    query = table["targets"][0]["query"]
    assert f'FROM "{FORECAST_MEASUREMENT}"' in query
    assert '"min to 27 °C"' in query and '"min to 40 °C"' in query and "32" not in query  # A3 allowable: 40 °C
    assert '"room" =~ /^$room$/' in query and '"row" =~ /^$row$/' in query
    minutes = next(o for o in table["fieldConfig"]["overrides"] if o["matcher"]["options"] == "min to 27 °C")
    steps = next(p["value"]["steps"] for p in minutes["properties"] if p["id"] == "thresholds")
    assert [(s["color"], s["value"]) for s in steps][:2] == [("red", None), ("orange", 10.0)]
    sort = next(t for t in table["transformations"] if t["id"] == "sortBy")["options"]["sort"]
    assert sort == [{"field": "min to 27 °C", "desc": False}]
    assert table["fieldConfig"]["defaults"]["links"][0]["url"].startswith("/d/racktwin-rack/rack-detail?var-rack=")
    rules = {r["uid"]: r for g in yaml.safe_load(files["alerting/rules.yaml"])["groups"] for r in g["rules"]}
    forecast = rules["racktwin-forecast-recommended"]
    assert forecast["data"][2]["model"]["conditions"][0]["evaluator"] == {"type": "within_range", "params": [0, 20.0]}
    assert f'FROM "{FORECAST_MEASUREMENT}"' in forecast["data"][0]["model"]["query"]
    assert forecast["noDataState"] == "OK" and forecast["labels"] == {"severity": "warning", "kind": "forecast"}
    # The timing bridge.forecast.evaluate replays to measure lead time: its own group every 10 s, pending 30 s,
    # the newest forecast of the last 90 s; the other rack rules keep their 1-minute group.
    from bridge.forecast.limits import (ALERT_FOR_S, ALERT_INTERVAL_S, ALERT_KEEP_FIRING_S,
                                        ALERT_MISSING_EVALS_TO_RESOLVE, ALERT_QUERY_RANGE_S)

    groups = {g["name"]: g for g in yaml.safe_load(files["alerting/rules.yaml"])["groups"]}
    home = next(g for g in groups.values() if forecast in g["rules"])
    assert [r["uid"] for r in home["rules"]] == ["racktwin-forecast-recommended"]
    assert (home["interval"], forecast["for"]) == ("10s", "30s") == (f"{ALERT_INTERVAL_S:.0f}s", f"{ALERT_FOR_S:.0f}s")
    assert forecast["keepFiringFor"] == "10m" and ALERT_KEEP_FIRING_S == 600
    # Grafana's default; the file format's key has been spelt both ways
    assert not {"missing_series_evals_to_resolve", "missingSeriesEvalsToResolve"} & set(forecast)
    assert ALERT_MISSING_EVALS_TO_RESOLVE == 2
    assert forecast["data"][0]["relativeTimeRange"] == {"from": ALERT_QUERY_RANGE_S, "to": 0}
    assert groups["rack-environment"]["interval"] == "1m"
    rack = json.loads(files["dashboards/operations/racktwin-rack.json"])
    inlet = next(p for p in rack["panels"] if p["title"].startswith("Inlet temperature"))
    assert [s["value"] for s in inlet["fieldConfig"]["defaults"]["thresholds"]["steps"]][-2:] == [27.0, 40.0]
    from bridge.forecast.tracker import PROJECTION_MEASUREMENT

    projected = next(t for t in inlet["targets"] if f'FROM "{PROJECTION_MEASUREMENT}"' in t["query"])
    assert rack["time"] == {"from": "now-24h", "to": "now+30m"}  # the projection is drawn ahead of now
    dashed = [o for o in inlet["fieldConfig"]["overrides"] if o["matcher"]["id"] == "byRegexp"]
    assert re.search(dashed[0]["matcher"]["options"].strip("/"), projected["alias"])
    assert {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}} in dashed[0]["properties"]
    stats = [p for p in rack["panels"] if any("rack_forecast" in t.get("query", "") for t in p.get("targets", []))
             and p["type"] == "stat"]
    assert sorted(p["title"] for p in stats) == ["Bottom: minutes to 27 °C", "Bottom: trend °C/h",
                                                  "Top: minutes to 27 °C", "Top: trend °C/h"]
    assert all(p["fieldConfig"]["defaults"]["noValue"] == "—" for p in stats)


def test_one_ashrae_table_for_dashboards_and_forecast():
    from bridge.config import Settings
    from bridge.forecast.limits import ALERT_HORIZON_MIN, ForecastLimits

    for cls in ("A1", "A2", "A3", "A4"):
        t, limits = Thresholds(ashrae_class=cls), ForecastLimits.for_class(cls)
        assert (limits.recommended_max_c, limits.allowable_max_c) == (t.temp_recommended[1], t.temp_allowable[1])
        assert limits.dew_point_max_c == t.dew_point_recommended[1]
    assert ForecastLimits() == ForecastLimits.for_class(Thresholds().ashrae_class)
    settings = Settings(ashrae_class="a2", rh_cap=50)
    assert ForecastLimits.from_settings(settings).allowable_max_c == Thresholds(ashrae_class="A2").temp_allowable[1]
    horizon = Settings.model_fields["forecast_horizon_min"].default
    assert Thresholds().forecast_horizon_min == ALERT_HORIZON_MIN == horizon


# ------------------------------------------------------------------------------------ provisioning files

def test_no_secret_in_provisioning_files_only_documented_env_vars():
    used = set()
    for path in PROVISIONING.rglob("*.yaml"):
        text = path.read_text()
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    assert used == ENV_VARS
    sources = load("datasources/racktwin.yaml")["datasources"]
    for ds in sources:
        for key, value in ds.get("secureJsonData", {}).items():
            assert re.search(r"\$\{[A-Z_]+\}", value), f"{ds['name']}.{key} must come from the environment"
    ditto = next(d for d in sources if d["uid"] == "ditto")
    assert ditto["basicAuthUser"] == "grafana" and ditto["jsonData"]["allowedHosts"] == [ditto["url"]]
    influx = next(d for d in sources if d["uid"] == "influxdb")
    assert influx["jsonData"]["httpHeaderName1"] == "Authorization"
    assert influx["secureJsonData"]["httpHeaderValue1"] == "Token ${GRAFANA_INFLUX_TOKEN}"


def test_dashboard_providers_split_the_wall_from_what_needs_a_login():
    providers = load("dashboards/racktwin.yaml")["providers"]
    by_dir = {}
    for provider in providers:
        assert provider["type"] == "file" and provider["allowUiUpdates"] is False
        path = provider["options"]["path"]
        assert path.startswith("/etc/grafana/provisioning/")
        rel = path.removeprefix("/etc/grafana/provisioning/")
        by_dir[rel] = provider
    # Grafana's file provider walks its path recursively: no provider's directory may contain another's.
    for a in by_dir:
        for b in by_dir:
            assert a == b or not b.startswith(a + "/"), (a, b)
    uids = {rel: {json.loads((PROVISIONING / p).read_text())["uid"] for p in
                  (PROVISIONING / rel).glob("*.json")} for rel in by_dir}
    assert uids == {"dashboards/wall": {"racktwin-wall"}, "dashboards/operations": {"racktwin-rack", "racktwin-bridge"}}
    # The wall's folder is the alert rules' folder (the wall counts firing alerts, which needs read access);
    # the other folder has the fixed uid the Grafana entrypoint restricts.
    assert by_dir["dashboards/wall"]["folder"] == RULE_GROUPS[0]["folder"]
    assert {g["folder"] for g in RULE_GROUPS} == {by_dir["dashboards/wall"]["folder"]}
    operations = by_dir["dashboards/operations"]
    assert operations["folder"] != RULE_GROUPS[0]["folder"]
    entrypoint = (PROVISIONING.parent.parent / "compose" / "grafana" / "entrypoint.sh").read_text()
    assert f"GRAFANA_OPERATIONS_FOLDER_UID:-{operations['folderUid']}}}" in entrypoint
    assert "/api/folders/$operations_folder/permissions" in entrypoint


# ------------------------------------------------------------------------------------ alerting files

NO_DATA = {"Alerting", "NoData", "OK", "KeepLast"}
EXEC_ERR = {"Alerting", "Error", "OK", "KeepLast"}
REDUCERS = {"sum", "mean", "min", "max", "count", "last", "median"}
EVALUATORS = {"gt", "lt", "eq", "ne", "gte", "lte", "within_range", "outside_range", "within_range_included",
              "outside_range_included"}


def test_rule_groups_have_what_the_file_loader_requires():
    assert load("alerting/rules.yaml")["apiVersion"] == 1
    for group in RULE_GROUPS:
        assert group["name"] and group["folder"] and group["orgId"] == 1
        assert isinstance(group["interval"], str) and DURATION.match(group["interval"])
    uids = [r["uid"] for r in RULES]
    assert len(uids) == len(set(uids)) and all(len(u) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", u) for u in uids)


# The keys of a rule Grafana's file loader reads (AlertRuleV1 in pkg/services/provisioning/alerting/rules_types.go,
# with keepFiringFor and missing_series_evals_to_resolve from 12.1.2 on): any other key is silently ignored.
RULE_KEYS = {"uid", "title", "condition", "data", "dashboardUid", "panelId", "noDataState", "execErrState", "for",
             "keepFiringFor", "missing_series_evals_to_resolve", "annotations", "labels", "isPaused",
             "notification_settings", "record"}


def check_loader_fields(rule: dict) -> None:
    """What Grafana's file loader requires of a rule, and a query -> reduce -> threshold chain that holds."""
    assert set(rule) <= RULE_KEYS, set(rule) - RULE_KEYS
    assert rule["title"] and rule["condition"] and rule["data"]
    assert "grafana_alert" not in rule and "no_data_state" not in rule  # the ruler-API shape grafanalib emits
    assert rule["noDataState"] in NO_DATA and rule["execErrState"] in EXEC_ERR
    assert DURATION.match(rule["for"])
    refs = [d["refId"] for d in rule["data"]]
    assert len(refs) == len(set(refs)) and rule["condition"] in refs
    for item in rule["data"]:
        model = item["model"]
        assert model["refId"] == item["refId"]
        rel = item["relativeTimeRange"]
        assert isinstance(rel["from"], int) and isinstance(rel["to"], int) and rel["from"] >= rel["to"] >= 0
        if item["datasourceUid"] == "__expr__":
            assert model["expression"] in refs and refs.index(model["expression"]) < refs.index(item["refId"])
            if model["type"] == "reduce":
                assert model["reducer"] in REDUCERS and model["settings"]["mode"] in ("dropNN", "replaceNN")
            elif model["type"] == "threshold":
                ev = model["conditions"][0]["evaluator"]
                assert ev["type"] in EVALUATORS
                assert len(ev["params"]) == (2 if "range" in ev["type"] else 1)
                assert all(isinstance(p, (int, float)) for p in ev["params"])
            else:
                pytest.fail(f"unexpected expression type {model['type']}")
        else:
            assert item["datasourceUid"] in DATASOURCE_UIDS
            assert rel["from"] > 0
            assert model["rawQuery"] is True and "$timeFilter" in model["query"]


@pytest.mark.parametrize("rule", RULES, ids=[r["uid"] for r in RULES])
def test_rule_fields_and_expression_chain(rule):
    check_loader_fields(rule)
    assert rule["labels"]["severity"] in ("warning", "critical")
    summary = rule["annotations"]["summary"]
    assert "\n" not in summary
    assert "$values.B.Value" in summary
    # What the summaries say with and without values: rendered in tests/test_alert_texts.py.
    if rule["labels"].get("component") != "bridge":
        group_by = rule["data"][0]["model"]["query"].rsplit("GROUP BY", 1)[1]
        for label in ("room", "row", "rack"):
            assert f'"{label}"' in group_by, f"{rule['uid']}: not multi-dimensional by {label}"
        assert '"position"' in group_by or rule["labels"].get("position")
        assert rule["annotations"]["rack_detail_url"].startswith(
            "{{ if $labels.rack }}{{ externalURL }}d/racktwin-rack/rack-detail?")
        assert rule["dashboardUid"] in {d["uid"] for d in DASHBOARDS.values()}


def test_rules_on_a_single_reading_keep_firing_a_while_after_it_clears():
    """A reading hovering at a limit must not resolve and fire again with every bit of sensor noise."""
    envelope_rules = {
        "racktwin-inlet-recommended", "racktwin-inlet-allowable", "racktwin-dewpoint-recommended",
        "racktwin-dewpoint-allowable", "racktwin-humidity-recommended", "racktwin-humidity-allowable",
        "racktwin-dry-dewpoint-recommended", "racktwin-dry-dewpoint-allowable", "racktwin-dry-humidity-allowable",
        "racktwin-recirculation",
        "racktwin-forecast-recommended"}  # a forecast near the horizon moves above it and back with every fit
    assert envelope_rules <= {r["uid"] for r in RULES}
    for rule in RULES:
        if rule["uid"] in envelope_rules:
            assert DURATION.match(rule["keepFiringFor"]) and rule["keepFiringFor"] != "0s", rule["uid"]
        else:  # window rules (silent, stuck, rate, bridge) resolve when the window says so
            assert "keepFiringFor" not in rule, rule["uid"]


def test_a_limit_alert_outlives_its_sensor_going_silent_as_long_as_the_silent_rule_names_it():
    """A rack at 29 °C whose sensor dies must not get a "resolved" 12 minutes later: the limit rules keep a missing
    series firing for the silent-sensor rule's lookback (Grafana resolves it after 2 evaluations by default)."""
    groups = {g["name"]: g for g in RULE_GROUPS}
    silent = next(r for r in RULES if r["uid"] == "racktwin-sensor-silent")
    lookback_s = next(d for d in silent["data"] if d["datasourceUid"] != "__expr__")["relativeTimeRange"]["from"]
    limit_rules = {"racktwin-inlet-recommended", "racktwin-inlet-allowable", "racktwin-dewpoint-recommended",
                   "racktwin-dewpoint-allowable", "racktwin-humidity-recommended", "racktwin-humidity-allowable",
                   "racktwin-dry-dewpoint-recommended", "racktwin-dry-dewpoint-allowable",
                   "racktwin-dry-humidity-allowable", "racktwin-recirculation"}
    for group in RULE_GROUPS:
        value, unit = re.fullmatch(r"(\d+)([smh])", group["interval"]).groups()
        interval_s = int(value) * {"s": 1, "m": 60, "h": 3600}[unit]
        for rule in group["rules"]:
            evals = rule.get("missing_series_evals_to_resolve")
            if rule["uid"] in limit_rules:
                assert isinstance(evals, int) and evals * interval_s >= lookback_s, rule["uid"]
            else:  # window rules resolve when their window says so; the forecast when there is none
                assert evals is None, rule["uid"]
    assert limit_rules <= {r["uid"] for g in groups.values() for r in g["rules"]}


def test_the_recirculation_window_holds_a_reading_of_each_live_position():
    """A rack with a position with no reading in the window has no series, which restarts the 10-minute "for": at a
    long reporting interval the window must still hold one."""
    for interval, expected in ((60, 300), (300, 900)):
        rules = alerts.rules_file(from_env({"RACKTWIN_READING_INTERVAL_S": str(interval)}))
        rule = next(r for g in rules["groups"] for r in g["rules"] if r["uid"] == "racktwin-recirculation")
        assert rule["data"][0]["relativeTimeRange"]["from"] == expected, interval


def test_contact_points_and_policy_grouped_by_room():
    cps = load("alerting/contact-points.yaml")["contactPoints"]
    receivers = {r["type"]: r for cp in cps for r in cp["receivers"]}
    assert receivers["webhook"]["settings"]["url"] == "${ALERT_WEBHOOK_URL}"
    assert receivers["email"]["settings"]["addresses"] == "${ALERT_EMAIL_TO}"
    policy = load("alerting/policies.yaml")["policies"][0]
    # By room of a site (two sites may both have a hall1; every rack rule has both labels).
    assert policy["receiver"] in {cp["name"] for cp in cps} and policy["group_by"] == ["site", "room"]
    for route in policy.get("routes", []):
        assert route["receiver"] in {cp["name"] for cp in cps} and route["group_by"] == ["site", "room"]
    critical = next(r for r in policy["routes"] if ["severity", "=", "critical"] in r["object_matchers"])
    assert critical["group_interval"] == "1m"  # a second critical rack in a paged room: not 5 min later


def test_the_watchdog_only_with_a_url_and_its_notifications_go_there_alone():
    """Generated only where WATCHDOG_URL is set (the committed files are the default, without it). It always fires,
    so it must neither reach the NOC's receivers nor count on the wall, whose alert count reads its own folder."""
    default = generate.build_all(Thresholds())
    assert "watchdog" not in default["alerting/policies.yaml"] + default["alerting/contact-points.yaml"]
    rules_off = yaml.safe_load(default["alerting/rules.yaml"])
    assert all(r["uid"] != "racktwin-watchdog" for g in rules_off["groups"] for r in g["rules"])
    # Off after having been on: Grafana keeps a provisioned rule a file no longer lists, so the file deletes it
    # (its route is gone with the policy file, and an always-firing rule would reach the NOC every 4 h).
    assert rules_off["deleteRules"] == [{"orgId": 1, "uid": "racktwin-watchdog"}]
    with_it = generate.build_all(Thresholds(), watchdog=True)
    assert {k for k in default if default[k] != with_it[k]} == {
        "alerting/rules.yaml", "alerting/contact-points.yaml", "alerting/policies.yaml"}
    groups = {g["name"]: g for g in yaml.safe_load(with_it["alerting/rules.yaml"])["groups"]}
    assert [g for name, g in groups.items() if name != alerts.WATCHDOG_GROUP] == RULE_GROUPS  # the rest unchanged
    group = groups[alerts.WATCHDOG_GROUP]
    assert group["folder"] != RULE_GROUPS[0]["folder"] and DURATION.match(group["interval"])
    wall = json.loads(with_it["dashboards/wall/racktwin-wall.json"])
    counts = [p for p in wall["panels"] if p["type"] == "alertlist"]
    assert counts and all(p["options"]["folder"]["title"] == RULE_GROUPS[0]["folder"] for p in counts)
    (rule,) = group["rules"]
    check_loader_fields(rule)
    assert "deleteRules" not in yaml.safe_load(with_it["alerting/rules.yaml"])
    # Fires on any answer, on none and on an error alike: only a Grafana that stops evaluating stops it.
    assert rule["noDataState"] == "Alerting" and rule["execErrState"] == "Alerting"
    threshold = next(d["model"] for d in rule["data"] if d["model"].get("type") == "threshold")
    assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [-1]}
    assert "{{" not in rule["annotations"]["summary"]  # no values to print: no template to break on no data

    points = {cp["name"]: cp for cp in yaml.safe_load(with_it["alerting/contact-points.yaml"])["contactPoints"]}
    (receiver,) = points[alerts.WATCHDOG_RECEIVER]["receivers"]
    assert receiver["type"] == "webhook" and receiver["settings"]["url"] == "${WATCHDOG_URL}"
    assert receiver["disableResolveMessage"] is True  # a resolve POST would read as a sign of life
    policy = yaml.safe_load(with_it["alerting/policies.yaml"])["policies"][0]
    labels = rule["labels"]

    def matches(route: dict) -> bool:
        return all(labels.get(name) == value for name, op, value in route["object_matchers"] if op == "=")

    first = next(r for r in policy["routes"] if matches(r))
    assert first is policy["routes"][0] and first["receiver"] == alerts.WATCHDOG_RECEIVER
    assert not first.get("continue", False)  # routing stops there: the NOC's receivers never see it
    assert DURATION.match(first["repeat_interval"]) and first["repeat_interval"] == alerts.WATCHDOG_REPEAT
    # No rack or bridge rule matches the watchdog's route.
    assert not any(all(r["labels"].get(n) == v for n, _, v in first["object_matchers"]) for r in RULES)


@pytest.mark.parametrize("name, value, message", [
    ("RACKTWIN_READING_INTERVAL_S", "sixty", "RACKTWIN_READING_INTERVAL_S must be a whole number"),
    ("RACKTWIN_READING_INTERVAL_S", "0", "positive number of seconds"),
    ("RACKTWIN_DELTA_T_LIMIT", "5C", "RACKTWIN_DELTA_T_LIMIT must be a number"),
])
def test_unusable_thresholds_from_the_environment_name_the_variable(name, value, message):
    with pytest.raises(ValueError, match=message):
        from_env({name: value})


@pytest.mark.parametrize("interval_s", [10, 60, 90, 120, 300, 600])
def test_the_stuck_sensor_window_holds_the_readings_its_rule_needs(interval_s):
    """At READING_INTERVAL_S 120 a 15-min window holds 7 readings, and the rule needs 10: it could never fire."""
    from dashboards.alerts import rules_file
    from dashboards.thresholds import STUCK_MIN_READINGS, Thresholds

    t = Thresholds(reading_interval_s=interval_s)
    stuck = next(r for g in rules_file(t)["groups"] for r in g["rules"] if r["uid"] == "racktwin-sensor-stuck")
    window_s = stuck["data"][0]["relativeTimeRange"]["from"]
    assert window_s >= 900 and window_s % 60 == 0
    assert window_s // interval_s >= STUCK_MIN_READINGS + 1
    assert f"for {window_s // 60} min" in stuck["annotations"]["summary"]
