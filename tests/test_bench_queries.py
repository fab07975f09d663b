"""Smoke test of `make bench-queries` on a small site: every dashboard and rule query runs and sees the site.

No timing assertions (the machine decides those): only that every query Grafana would send was sent, and that
the generated site is what the queries expect (one series per sensor or rack, one room of 40 racks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.queries import RACKS_PER_ROOM, site_layout
from tests.dashboard_data import DASHBOARDS, RULE_GROUPS
from tests.grafana_sim import unresolved_variables
from tests.harness.services import MissingService, _binary

REPO = Path(__file__).resolve().parent.parent
RACKS = 80


def test_site_layout_puts_40_racks_in_a_room_and_10_in_a_row():
    layout = site_layout(120)
    assert len({loc.rack for loc in layout}) == 120
    assert [sum(loc.room == room for loc in layout) for room in ("hall-01", "hall-02", "hall-03")] == [40] * 3
    assert {loc.row for loc in layout if loc.room == "hall-02"} == set("ABCD")
    assert layout[0].rack == "hall-01-a01" and layout[RACKS_PER_ROOM].rack == "hall-02-a01"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    try:
        _binary("influxd", "influxdb")
    except MissingService as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("bench") / "queries.json"
    proc = subprocess.run([sys.executable, "-m", "bench.queries", "--quick", "--racks", str(RACKS), "--output",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_every_panel_and_rule_query_is_timed(quick):
    result, stdout = quick
    rules = [r for g in RULE_GROUPS for r in g["rules"]]
    expected = 0
    for dash in DASHBOARDS.values():
        targets = sum(t.get("datasource", {}).get("uid") == "influxdb"
                      for p in dash["panels"] for t in p.get("targets", []))
        selections = 2 if any(v["name"] == "room" for v in dash["templating"]["list"]) else 1
        expected += targets * selections
    expected += sum(item["datasourceUid"] == "influxdb" for r in rules for item in r["data"])
    assert len(result["queries"]) == expected
    for row in result["queries"]:
        assert row["ms"] > 0 and not unresolved_variables(row["query"]), row  # variables and macros expanded
        assert f"{row['where'][:70]:<70} {row['selection']:<9}" in stdout
    assert set(result["summary"]) == {"racktwin-bridge (all)", "racktwin-rack (all)", "racktwin-wall (all)",
                                      "racktwin-wall (one room)", "alert rules"}
    assert result["summary"]["alert rules"]["queries"] == len([r for r in result["queries"] if r["selection"] == "-"])


def test_the_queries_see_the_whole_site(quick):
    result, _ = quick
    by = {(row["where"], row["selection"]): row["series"] for row in result["queries"]}
    # A rule's per-sensor query sees every sensor; the heat grid one series per rack, or per rack of the room.
    assert by[("rule / Inlet temperature outside recommended envelope", "-")] == 2 * RACKS
    assert by[("rule / Sensor stopped reporting", "-")] == 2 * RACKS
    assert by[("rule / Top − bottom inlet difference (recirculation)", "-")] == RACKS
    assert by[("racktwin-wall / Top inlet °C per rack", "all")] == RACKS
    assert by[("racktwin-wall / Top inlet °C per rack", "one room")] == RACKS_PER_ROOM
    assert by[("racktwin-rack / Relative humidity", "all")] == 2  # one rack: top and bottom
    assert by[("racktwin-bridge / Rejects by reason (per minute)", "all")] >= 1
    assert result["data"]["points"] > 2 * RACKS * result["config"]["history_h"] * 60
