"""`racktwin verify`: ThingsBoard latest telemetry vs the Ditto twin vs the newest InfluxDB point.

For every device of the configured profile and every sensor position and quantity (temperature,
humidity) one row: the three values, their source timestamps, and a status:
- ``ok``        all present, same timestamp, values within the tolerance;
- ``mismatch``  same source timestamp but values differ beyond the tolerance (the pipeline changed a value);
- ``stale``     the twin or InfluxDB is older than ThingsBoard by more than ``verify_max_lag_s``;
- ``missing``   the twin or InfluxDB has no value at all;
- ``lagging``   older than ThingsBoard but within the allowed lag (readings in flight), not an error.
A sink *newer* than our ThingsBoard read is a race between the reads, counted as ``ok``.
End-to-end delay per rack: the twin's ``_modified`` minus the newest source timestamp it holds.
Exit status 1 when any row is mismatch, stale or missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import requests

from ..config import Settings, load_settings
from ..decode import Rejected
from ..mapping import POSITIONS, Mapper, Position
from .. import twin
from ..sinks.ditto import DittoClient
from .rest import ThingsBoard
from .sync import PlacedMapper, groups_from_timeseries, latest_states, placement_from_attributes

log = logging.getLogger(__name__)

BAD = {"mismatch", "stale", "missing"}
QUANTITIES = ("temperature", "humidity")


@dataclass(frozen=True)
class Sample:
    ts_ms: int
    value: float


@dataclass
class Row:
    rack: str
    device: str
    position: str
    quantity: str
    thingsboard: float | None
    twin: float | None
    influx: float | None
    tb_ts: int | None
    twin_lag_s: float | None
    influx_lag_s: float | None
    status: str
    detail: str = ""


FLOAT_SLACK = 1e-9  # a difference of exactly the tolerance is within it


def judge(tb: Sample | None, sink: Sample | None, tolerance: float, max_lag_s: float) -> tuple[str, float | None]:
    """(status, lag seconds) of one sink's value against ThingsBoard's. Pure."""
    if tb is None:
        return "ok", None  # nothing to compare with (the device never sent this value)
    if sink is None:
        return "missing", None
    lag = (tb.ts_ms - sink.ts_ms) / 1000
    if lag > max_lag_s:
        return "stale", lag
    if lag > 0:
        return "lagging", lag
    # The twin holds tenths: 23.25 comes back as 23.2, 0.05000000000000071 apart in binary floating point.
    if lag == 0 and abs(tb.value - sink.value) > tolerance + FLOAT_SLACK:
        return "mismatch", 0.0
    return "ok", lag


def worst(*statuses: str) -> str:
    order = ["mismatch", "missing", "stale", "lagging", "ok"]
    return min(statuses, key=order.index)


def influx_latest(settings: Settings) -> dict[tuple[str, str], dict[str, Sample]]:
    """Newest point per (rack, position) from InfluxQL /query (InfluxDB 1.8+ and 2.x with DBRP)."""
    db, _, rp = settings.influx_bucket.partition("/")
    token = settings.influx_token.get_secret_value() if settings.influx_token else ""
    params = {"db": db, "epoch": "ms",
              "q": "SELECT temperature, humidity FROM rack_environment GROUP BY rack, position "
                   "ORDER BY time DESC LIMIT 1"}
    if rp:
        params["rp"] = rp
    resp = requests.get(settings.influx_url + "/query", params=params, timeout=settings.influx_timeout_s,
                        headers={"Authorization": f"Token {token}"} if token else {})
    resp.raise_for_status()
    out: dict[tuple[str, str], dict[str, Sample]] = {}
    for result in resp.json().get("results", []):
        if result.get("error"):
            raise RuntimeError(f"InfluxDB: {result['error']}")
        for series in result.get("series", []) or []:
            tags = series.get("tags", {})
            cols = series["columns"]
            for values in series.get("values", []):
                row = dict(zip(cols, values))
                out[(tags.get("rack", ""), tags.get("position", ""))] = {
                    q: Sample(int(row["time"]), float(row[q])) for q in QUANTITIES if row.get(q) is not None
                }
    return out


def _twin(ditto: DittoClient, settings: Settings, rack: str) -> tuple[dict[Position, twin.PositionState], int | None]:
    resp = ditto.request("GET", twin.thing_path(twin.thing_id(settings.ditto_namespace, rack)),
                         params={"fields": f"thingId,attributes,{twin.PROPS_PATH},_modified"})
    if resp.status_code == 404:
        return {}, None
    resp.raise_for_status()
    thing = resp.json()
    modified = twin.parse_iso_ms(thing["_modified"]) if isinstance(thing.get("_modified"), str) else None
    return twin.known_from_thing(thing), modified


def _sample(state: twin.PositionState | None, quantity: str) -> Sample | None:
    value = getattr(state, quantity, None) if state else None
    return Sample(state.ts_ms, value) if value is not None else None


def verify(settings: Settings, tolerance: float | None = None, tb: ThingsBoard | None = None) -> dict[str, Any]:
    tolerance = settings.verify_tolerance if tolerance is None else tolerance
    own = tb is None
    tb = tb or ThingsBoard.from_settings(settings)
    ditto = DittoClient(settings)
    rows: list[Row] = []
    delays: dict[str, float] = {}
    skipped: list[str] = []
    try:
        influx = influx_latest(settings)
        mapper = Mapper(settings)
        keys = sorted(mapper.key_index)
        now_ms = int(time.time() * 1000)
        for device in tb.devices(settings.tb_device_profile, settings.sync_page_size):
            try:
                placement = placement_from_attributes(mapper, device, tb.server_attributes(device["id"]["id"]))
            except Rejected as exc:
                skipped.append(f"{device['name']}: {exc.detail}")
                continue
            placed = PlacedMapper(settings, {placement.device: placement})
            readings = []
            for group in groups_from_timeseries(placement.device, placement.device_type,
                                                tb.latest_timeseries(placement.device_id, keys)):
                try:
                    readings += placed.map_group(group, now_ms)
                except Rejected as exc:
                    skipped.append(f"{placement.device}: {exc.detail}")
            tb_states = latest_states(readings)
            rack = placement.location.rack
            twin_states, modified = _twin(ditto, settings, rack)
            newest = max((s.ts_ms for s in twin_states.values()), default=None)
            if modified is not None and newest is not None:
                delays[rack] = round((modified - newest) / 1000, 3)
            for position in [placement.position] if placement.position else list(POSITIONS):
                for quantity in QUANTITIES:
                    tb_s = _sample(tb_states.get(position), quantity)
                    twin_s = _sample(twin_states.get(position), quantity)
                    influx_s = influx.get((rack, position), {}).get(quantity)
                    if tb_s is None and twin_s is None and influx_s is None:
                        continue
                    twin_status, twin_lag = judge(tb_s, twin_s, tolerance, settings.verify_max_lag_s)
                    influx_status, influx_lag = judge(tb_s, influx_s, tolerance, settings.verify_max_lag_s)
                    detail = ", ".join(f"{name} {status}" for name, status in
                                       (("twin", twin_status), ("influx", influx_status)) if status != "ok")
                    rows.append(Row(rack, placement.device, position, quantity,
                                    tb_s.value if tb_s else None, twin_s.value if twin_s else None,
                                    influx_s.value if influx_s else None, tb_s.ts_ms if tb_s else None,
                                    twin_lag, influx_lag, worst(twin_status, influx_status), detail))
    finally:
        ditto.close()
        if own:
            tb.close()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    ordered = sorted(delays.values())
    return {
        "ok": not any(r.status in BAD for r in rows),
        "tolerance": tolerance,
        "max_lag_s": settings.verify_max_lag_s,
        "counts": counts,
        "delay_s": {"p50": _pct(ordered, 0.5), "max": ordered[-1] if ordered else None, "per_rack": delays},
        "skipped": skipped,
        "rows": [asdict(r) for r in rows],
    }


def _pct(ordered: list[float], q: float) -> float | None:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _fmt(value: Any, width: int) -> str:
    text = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    return text[:width].rjust(width)


def render_table(report: dict[str, Any], only_problems: bool = False) -> str:
    head = (f"{'rack':<16} {'pos':<6} {'qty':<11} {'TB':>8} {'twin':>8} {'influx':>8} "
            f"{'twin lag':>8} {'infl lag':>8}  status")
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        if only_problems and r["status"] == "ok":
            continue
        status = r["status"] + (f" ({r['detail']})" if r["detail"] else "")
        lines.append(f"{r['rack'][:16]:<16} {r['position']:<6} {r['quantity']:<11} {_fmt(r['thingsboard'], 8)} "
                     f"{_fmt(r['twin'], 8)} {_fmt(r['influx'], 8)} {_fmt(r['twin_lag_s'], 8)} "
                     f"{_fmt(r['influx_lag_s'], 8)}  {status}")
    delay = report["delay_s"]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(report["counts"].items())) or "no rows"
    lines.append("")
    lines.append(f"{counts}; tolerance {report['tolerance']}, max lag {report['max_lag_s']} s; "
                 f"end-to-end delay to twin p50 {delay['p50']} s, max {delay['max']} s")
    for line in report["skipped"]:
        lines.append(f"skipped {line}")
    lines.append("RESULT: " + ("OK" if report["ok"] else "DISAGREEMENT"))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    parser.add_argument("--tolerance", type=float, help="allowed difference (default RACKTWIN_VERIFY_TOLERANCE)")
    parser.add_argument("--problems", action="store_true", help="table: show only rows that are not ok")


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    logging.basicConfig(level=logging.WARNING)
    report = verify(settings, args.tolerance)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render_table(report, args.problems))
    return 0 if report["ok"] else 1
