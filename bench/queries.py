"""`make bench-queries`: how long each InfluxQL query of the dashboards and alert rules takes on a large site.

Fills a real InfluxDB (Debian's 1.6.7) with a day of readings for many racks (default 1,000 racks, 2,000
sensors, one reading a minute: 2.9 million points), the bridge's forecasts of the last hour and its own
statistics of the last three hours, all in the line protocol the bridge itself writes. Then it sends every
query a Grafana would send, expanded as Grafana expands it (tests/grafana_sim.py): each dashboard panel with
everything selected ("All" rooms and rows) and with one room of 40 racks, and each alert rule as it evaluates.
Each query runs three times; the table gives the median and the series it returned, and the sums a wall
refresh and a rule evaluation cost, beside the refresh and evaluation intervals they must fit in.

Timings are of InfluxDB 1.6.7 on this machine; InfluxDB 2.x runs InfluxQL through its own engine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import requests

from bench.run import machine, report
from bridge.forecast.tracker import Forecast, forecast_line, projection_line
from bridge.mapping import RackLocation, SensorReading
from bridge.metrics import Metrics
from bridge.sinks.influx import reading_line
from bridge.stats import stats_lines
from tests.dashboard_data import DASHBOARDS, DS_MIN_INTERVAL, RULE_GROUPS
from tests.grafana_sim import Variable, at_time, influx_panel_queries, influx_rule_queries, interpolate, variables_for
from tests.harness.services import InfluxD

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "queries.json"
DB = "racktwin"
RACKS_PER_ROOM, RACKS_PER_ROW = 40, 10
FULL = {"racks": 1000, "history_h": 24, "step_s": 60, "runs": 3}
QUICK = {"racks": 80, "history_h": 2, "step_s": 60, "runs": 1}


def site_layout(racks: int) -> list[RackLocation]:
    """Rooms of 40 racks in rows of 10: hall-01/A/hall-01-a01 ..."""
    out = []
    for i in range(racks):
        room = f"hall-{i // RACKS_PER_ROOM + 1:02d}"
        row = "ABCD"[i % RACKS_PER_ROOM // RACKS_PER_ROW]
        rack = f"{room}-{row.lower()}{i % RACKS_PER_ROW + 1:02d}"
        out.append(RackLocation(site="site-1", room=room, row=row, rack=rack))
    return out


def reading_lines(layout: list[RackLocation], end_ms: int, hours: float, step_s: int, rng: random.Random):
    """Batches of line protocol: every sensor every ``step_s`` over ``hours`` up to ``end_ms``, oldest first."""
    steps = int(hours * 3600 // step_s)
    batch: list[str] = []
    for k in range(steps, -1, -1):
        ts = end_ms - k * step_s * 1000
        for loc in layout:
            for position, base in (("top", 24.0), ("bottom", 21.0)):
                reading = SensorReading(location=loc, position=position, device=loc.rack, ts_ms=ts,
                                        temperature=round(base + rng.gauss(0, 0.3), 2),
                                        humidity=round(45.0 + rng.gauss(0, 1.0), 1))
                batch.append(reading_line(reading))
        if len(batch) >= 20_000:
            yield batch
            batch = []
    if batch:
        yield batch


def forecast_lines(layout: list[RackLocation], end_ms: int, rng: random.Random) -> list[str]:
    """The bridge's forecasts of the last hour (every 30 s); one sensor in a hundred heading for trouble."""
    lines = []
    for k in range(120, -1, -1):
        ts = end_ms - k * 30_000
        for loc in layout:
            for position in ("top", "bottom"):
                rising = rng.random() < 0.01
                f = Forecast(location=loc, position=position, status="ok", computed_at_ms=ts,
                             trend_c_per_h=6.0 if rising else round(rng.gauss(0, 0.2), 3), level_c=24.0,
                             projected_temp_30m=27.0 if rising else 24.0,
                             minutes_to_recommended=30.0 if rising else None,
                             minutes_to_allowable=80.0 if rising else None)
                lines += [line for line in (forecast_line(f), projection_line(f)) if line]
    return lines


def bridge_stat_lines(end_ms: int, hours: float = 3.0, every_s: int = 10) -> list[str]:
    """The bridge's own statistics (measurements racktwin_bridge, racktwin_rejects) as it writes them."""
    metrics, previous, lines = Metrics(), {}, []
    for k in range(int(hours * 3600 // every_s), -1, -1):
        metrics.received.inc(100)
        for sink in ("influx", "ditto"):
            metrics.lag.labels(sink=sink).observe(0.2)
        lines += stats_lines(metrics, "bridge-1", True, previous, end_ms - k * every_s * 1000)
    return lines


def write(influxd: InfluxD, lines: list[str], chunk: int = 20_000) -> None:
    for i in range(0, len(lines), chunk):  # InfluxDB 1.6.7 refuses bodies over 25 MB by default
        resp = requests.post(f"{influxd.url}/write", params={"db": DB, "precision": "ms"},
                             data="\n".join(lines[i:i + chunk]), timeout=120)
        if resp.status_code != 204:
            raise RuntimeError(f"InfluxDB refused the bench data: {resp.status_code} {resp.text[:300]}")


def run_query(influxd: InfluxD, query: str) -> tuple[float, int]:
    """Seconds the query took and the series it returned; an InfluxQL error is a bench failure."""
    started = time.perf_counter()
    body = influxd.query(query, DB, timeout=300)
    elapsed = time.perf_counter() - started
    return elapsed, sum(len(result.get("series") or []) for result in body.get("results", []))


def timed(influxd: InfluxD, query: str, runs: int) -> dict[str, Any]:
    samples = [run_query(influxd, query) for _ in range(runs)]
    return {"ms": statistics.median(s for s, _ in samples) * 1000, "series": samples[0][1]}


def run(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "config": cfg}
    layout = site_layout(cfg["racks"])
    rng = random.Random(1)
    now_ms = int(time.time() * 1000) // 60_000 * 60_000
    with tempfile.TemporaryDirectory(prefix="racktwin-bench-queries-") as tmp:
        influxd = InfluxD(Path(tmp) / "influxd").start()
        try:
            influxd.create_db(DB)
            points = 0
            t0 = time.monotonic()
            log(f"writing {cfg['history_h']} h of readings for {len(layout):,} racks")
            for batch in reading_lines(layout, now_ms, cfg["history_h"], cfg["step_s"], rng):
                write(influxd, batch)
                points += len(batch)
            for lines in (forecast_lines(layout, now_ms, rng), bridge_stat_lines(now_ms)):
                write(influxd, lines)
                points += len(lines)
            result["data"] = {"points": points, "write_s": time.monotonic() - t0, "sensors": 2 * len(layout)}
            log(f"{points:,} points in {result['data']['write_s']:.0f} s; running the queries")

            # "All" expands to the values the template variable queries return, as in Grafana.
            options: dict[str, list[str]] = {}
            for dash in DASHBOARDS.values():
                for var in dash["templating"]["list"]:
                    if var["type"] == "query":  # in order: a later one may filter on an earlier one ("All")
                        query = interpolate(var["query"], {n: Variable(n, [], True, True, v, True)
                                                           for n, v in options.items()})
                        options[var["name"]] = [row[1] for s in influxd.query(query, DB)["results"][0]["series"]
                                                for row in s["values"]]
            one_room = layout[0].room
            room_options = dict(options, room=[one_room], row=sorted({r.row for r in layout if r.room == one_room}))
            rows = []
            for uid, dash in DASHBOARDS.items():
                has_room = any(v["name"] == "room" for v in dash["templating"]["list"])
                for label, picked, opts in (("all", {}, options), ("one room", {"room": [one_room]}, room_options)):
                    if label == "one room" and not has_room:
                        continue
                    variables = variables_for(dash, dict(picked, rack=[layout[0].rack]), "dc.bench", opts)
                    for panel, query in influx_panel_queries(dash, variables, now_ms, DS_MIN_INTERVAL):
                        rows.append({"where": f"{uid} / {panel['title']}", "selection": label,
                                     "refresh": dash.get("refresh"), "query": query,
                                     **timed(influxd, at_time(query, now_ms), cfg["runs"])})
            for group in RULE_GROUPS:
                for rule in group["rules"]:
                    for query in influx_rule_queries(rule, now_ms):
                        rows.append({"where": f"rule / {rule['title']}", "selection": "-",
                                     "refresh": group["interval"], "query": query,
                                     **timed(influxd, at_time(query, now_ms), cfg["runs"])})
            result["queries"] = rows
        finally:
            influxd.stop()
    result["summary"] = summary(result["queries"])
    result["duration_s"] = time.monotonic() - started
    return result


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per dashboard (and selection) and for the rules: the sum of its queries' times and the slowest."""
    out: dict[str, Any] = {}
    for row in rows:
        if row["selection"] == "-":
            key = "alert rules"
        else:
            key = f"{row['where'].split(' / ')[0]} ({row['selection']})"
        entry = out.setdefault(key, {"queries": 0, "total_ms": 0.0, "slowest_ms": 0.0, "slowest": "",
                                     "interval": row["refresh"]})
        entry["queries"] += 1
        entry["total_ms"] += row["ms"]
        if row["ms"] > entry["slowest_ms"]:
            entry["slowest_ms"], entry["slowest"] = row["ms"], row["where"].split(" / ", 1)[1]
    return out


def table(result: dict[str, Any]) -> str:
    cfg, data = result["config"], result["data"]
    lines = [f"InfluxQL of every panel and rule: {cfg['racks']:,} racks ({data['sensors']:,} sensors), "
             f"{cfg['history_h']} h at {cfg['step_s']} s, {data['points']:,} points; median of {cfg['runs']}",
             "", f"{'query':<70} {'selection':<9} {'ms':>9} {'series':>7}"]
    for row in result["queries"]:
        lines.append(f"{row['where'][:70]:<70} {row['selection']:<9} {row['ms']:>9.1f} {row['series']:>7}")
    lines += ["", f"{'dashboard / rules':<40} {'queries':>7} {'sum ms':>9} {'every':>6}  slowest"]
    for key, e in result["summary"].items():
        lines.append(f"{key:<40} {e['queries']:>7} {e['total_ms']:>9.0f} {e['interval'] or '-':>6}  "
                     f"{e['slowest']} ({e['slowest_ms']:.0f} ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small site for a smoke test (seconds)")
    parser.add_argument("--racks", type=int, help="racks on the site (default 1,000)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    if args.racks:
        cfg["racks"] = args.racks
    result = run(cfg, lambda msg: print(f"[bench-queries] {msg}", file=sys.stderr, flush=True))
    report(result, args.output, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
