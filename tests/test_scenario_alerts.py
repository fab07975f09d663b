"""Every simulator scenario fires its matching alert rule and changes the wall's summary stats; a healthy hall
fires none.

The simulator's readings (bridge.simulator.hall, seeded) go through the bridge's own decode, mapping and
line-protocol functions into the real InfluxDB; then each provisioned rule's query -> reduce -> threshold
chain is evaluated as Grafana would (tests/grafana_sim.py).
"""

from __future__ import annotations

import pytest

from bridge.config import MappingConfig, Settings
from bridge.decode import decode
from bridge.mapping import Mapper
from bridge.simulator.hall import build_hall, parse_scenario, sample
from bridge.sinks.influx import reading_line
from tests.dashboard_data import DASHBOARDS, DS_MIN_INTERVAL
from tests.grafana_sim import at_time, evaluate_rule, influx_panel_queries, variables_for
from tests.test_alert_rules import RULES, firing_set, make_runner
from tests.test_dashboard_queries import run_influxql, series_of

PATTERN = r"(?P<rack>(?P<room>hall[0-9]+)-(?P<row>[a-z])[0-9]{2,})"
HISTORY_S = 2 * 3600
STEP_S = 60  # the reporting interval the generated rules assume

HALL = build_hall(racks=8, rooms=1, rows=2, seed=3)
# A fixed afternoon (2026-09-21 14:13 UTC): the simulated load drifts over the day, so "now" would make the
# margins depend on when the tests run. InfluxDB takes the old timestamps; the rules are evaluated at NOW.
NOW = 1_790_000_000.0
HOT, QUIET, FROZEN = "hall1-a02", "hall1-b03", "hall1-b01"

# scenario spec -> {rule uid: rack positions that must fire (None = the rack rule has no position)}
CASES = {
    "cooling_failure:hall1@-7200": {"racktwin-inlet-recommended": {(HOT, "top")}},
    f"hotspot:{HOT}@-5400": {"racktwin-inlet-recommended": {(HOT, "top")}, "racktwin-recirculation": {(HOT, None)}},
    "humidity_excursion:hall1@-3600": {"racktwin-humidity-recommended": {(HOT, "top"), (HOT, "bottom")},
                                       "racktwin-dewpoint-recommended": {(HOT, "top"), (HOT, "bottom")}},
    f"silent:{QUIET}@-900": {"racktwin-sensor-silent": {(QUIET, "top"), (QUIET, "bottom")}},
    f"stuck:{FROZEN}/bottom@-1800": {"racktwin-sensor-stuck": {(FROZEN, "bottom")}},
}
RACK_RULES = [uid for uid, rule in RULES.items() if "rack_environment" in str(rule["data"][0]["model"]["query"])]


def write_history(influxd, db: str, specs: list[str], now_s: float) -> None:
    settings = Settings(mapping=MappingConfig(device_pattern=PATTERN))
    mapper = Mapper(settings)
    scenarios = [parse_scenario(spec, HALL, now_s) for spec in specs]
    lines = []
    for k in range(HISTORY_S // STEP_S, -1, -1):
        ts = now_s - k * STEP_S
        for device, values in sample(HALL, ts, scenarios).items():
            payload = ('{"ts": %d, "values": %s}' % (int(ts * 1000), str(values).replace("'", '"'))).encode()
            for group in decode(f"racktwin/telemetry/{device}", payload, int(now_s * 1000), 65536):
                lines += [line for r in mapper.map_group(group, int(now_s * 1000)) if (line := reading_line(r))]
    influxd.write(lines, db)


def fired(influxd, db: str, now_s: float) -> dict[str, set]:
    run = make_runner(influxd, db, int(now_s * 1000))
    return {uid: firing_set(evaluate_rule(RULES[uid], run)) for uid in RACK_RULES}


def test_a_healthy_hall_fires_no_rack_rule(influxd, influx_db):
    now = NOW
    write_history(influxd, influx_db, [], now)
    assert {uid: racks for uid, racks in fired(influxd, influx_db, now).items() if racks} == {}


@pytest.mark.parametrize("spec", sorted(CASES))
def test_each_scenario_fires_its_rule(spec, influxd, influx_db):
    now = NOW
    write_history(influxd, influx_db, [spec], now)
    result = fired(influxd, influx_db, now)
    for uid, must in CASES[spec].items():
        assert must <= result[uid], f"{spec}: {uid} fired for {sorted(map(str, result[uid]))}"
    # nothing unrelated fires: only the rules this scenario is about (and their allowable / rate siblings)
    related = set(CASES[spec]) | {"racktwin-inlet-allowable", "racktwin-rate-of-change", "racktwin-recirculation",
                                  "racktwin-dewpoint-allowable", "racktwin-humidity-allowable"}
    assert {uid for uid, racks in result.items() if racks} <= related, result


# scenario -> wall stat panels whose value must rise above the healthy hall's
WALL_CHANGES = {
    "cooling_failure:hall1@-7200": {"Hottest inlet now", "Racks outside recommended"},
    f"hotspot:{HOT}@-5400": {"Hottest inlet now", "Largest top − bottom"},
    "humidity_excursion:hall1@-3600": {"Racks outside recommended"},
    f"silent:{QUIET}@-900": {"Sensors silent"},
    f"stuck:{FROZEN}/bottom@-1800": {"Sensors stuck"},
}


def wall_stats(influxd, db: str, now_s: float) -> dict[str, float]:
    """The wall's InfluxDB stat panels as Grafana would query them (all rooms and rows), at ``now_s``."""
    wall = DASHBOARDS["racktwin-wall"]
    options = {"room": sorted({r.room for r in HALL.racks}), "row": sorted({r.row for r in HALL.racks})}
    variables = variables_for(wall, {}, "dc.test", options)
    out = {}
    for panel, query in influx_panel_queries(wall, variables, int(now_s * 1000), DS_MIN_INTERVAL):
        if panel["type"] != "stat":
            continue
        values = [row[1] for s in series_of(run_influxql(influxd, db, at_time(query, int(now_s * 1000))))
                  for row in s["values"] if row[1] is not None]
        out[panel["title"]] = values[-1] if values else 0.0  # a count over nothing shows 0 on the stat
    return out


def test_each_scenario_changes_the_wall(influxd, influx_db):
    write_history(influxd, influx_db, [], NOW)
    healthy = wall_stats(influxd, influx_db, NOW)
    assert set(healthy) >= {t for titles in WALL_CHANGES.values() for t in titles}
    assert healthy["Sensors silent"] == healthy["Sensors stuck"] == healthy["Racks outside recommended"] == 0
    for i, (spec, titles) in enumerate(WALL_CHANGES.items()):
        db = f"{influx_db}_s{i}"  # each scenario on its own hall
        influxd.create_db(db)
        write_history(influxd, db, [spec], NOW)
        shown = wall_stats(influxd, db, NOW)
        for title in titles:
            assert shown[title] > healthy[title], f"{spec}: {title} shows {shown[title]}, healthy {healthy[title]}"
