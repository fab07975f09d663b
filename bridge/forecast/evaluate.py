"""Proof of the forecast: lead time, false alerts, stuck/silent sensors, cost. ``make evaluate``.

Everything runs in simulated time (10 s steps, no sleeping). Readings pass through the real
``ForecastTracker``, and forecasts are computed on the publisher's schedule
(``forecast_publish_interval_s``). The Grafana forecast rule is then replayed exactly:
every ``ALERT_INTERVAL_S`` it checks whether the newest forecast (at most ``ALERT_QUERY_RANGE_S``
old) has ``minutes_to_recommended < ALERT_HORIZON_MIN``, and it fires once that has held for
``ALERT_FOR_S``.

The hall model (own, minimal, seeded): each row is a cooling zone. Its supply air has a base
temperature, a daily swing and a slow random walk (Ornstein–Uhlenbeck). Each rack inlet adds a
recirculation offset (top more than bottom) and a daily load swing, and follows its target with
a first-order lag. Sensors add Gaussian noise, 0.1 °C resolution, rare single spikes and lost
messages. Room dew point is near 9 °C, and RH follows from it (Magnus).

Scenarios:
- cooling_failure: a row's supply air rises as ``A·(1 − e^(−t/τ))``, with an initial rate of
  3–10 °C/h (partial loss: a CRAH or chilled-water valve failing while other units carry some
  load);
- hot_spot: one rack's top inlet gains ``A·(1 − e^(−t/τ))`` from recirculation, initially 3–9 °C/h;
- abrupt_failure (for information, not held to the 10 min target): a total loss at 20–30 °C/h.
  It breaches within minutes, so no forecast can warn 10 min ahead; the table shows how much of
  the physically available time the forecast recovers;
- normal_week: 40 racks, 7 days, noise and daily drift, no events (false alerts);
- stuck_silent: normal operation in which sensors freeze, jump to a wrong value and freeze, or go
  silent.

"Real breach" = the noise-free inlet temperature reaching the recommended maximum.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import Settings
from ..mapping import RackLocation, SensorReading
from .limits import (
    ALERT_FOR_S,
    ALERT_HORIZON_MIN,
    ALERT_INTERVAL_S,
    ALERT_QUERY_RANGE_S,
    ForecastLimits,
)
from .tracker import Forecast, ForecastTracker, WindowSettings

STEP_S = 10.0
START_S = 1_764_000_000.0  # a Monday, 16:00 UTC; any fixed epoch will do
MAGNUS_B, MAGNUS_L = 17.62, 243.12
RESULTS = Path("bench/results/forecast.json")
LEAD_TARGET_MIN = 10.0
FALSE_ALERT_TARGET = 1.0  # per 40 racks per week
TRUE_WITHIN_S = 2 * 3600.0  # an alert followed by that series' real breach within this was an early warning


# -- the hall model -----------------------------------------------------------------------------


@dataclass
class Event:
    """A rise ``amplitude·(1 − e^(−(t−onset)/tau))`` added to a row's supply air, or to one rack position."""

    kind: str  # "zone" or "rack"
    onset_s: float
    amplitude_c: float
    tau_s: float
    row: int = 0
    rack: int = -1
    position: str = "top"

    def value(self, t: float) -> float:
        if t <= self.onset_s:
            return 0.0
        return self.amplitude_c * (1.0 - math.exp(-(t - self.onset_s) / self.tau_s))

    @property
    def initial_rate_c_per_h(self) -> float:
        return self.amplitude_c / self.tau_s * 3600.0


@dataclass
class SensorFault:
    rack: int
    position: str
    onset_s: float
    kind: str  # "stuck" (repeat the last value), "stuck_jump" (jump then freeze), "silent"
    jump_c: float = 0.0


@dataclass
class Hall:
    rows: int
    racks_per_row: int
    seed: int
    events: list[Event] = field(default_factory=list)
    faults: list[SensorFault] = field(default_factory=list)
    max_top_c: float = 25.5  # hottest normal top inlet (noise-free), keeps a normal hall in spec

    @property
    def racks(self) -> int:
        return self.rows * self.racks_per_row


class HallModel:
    """Seeded, stepwise hall: ``step(t)`` advances to ``t`` and yields each rack's report."""

    INLET_TAU_S = 180.0
    OU_TAU_S = 3 * 3600.0
    OU_SIGMA_C = 0.3

    def __init__(self, hall: Hall, rack_subset: Iterable[int] | None = None):
        self.hall = hall
        rng = random.Random(hall.seed)
        self.rng_zone = random.Random(hall.seed * 7919 + 1)
        self.supply_base = [rng.uniform(17.5, 19.0) for _ in range(hall.rows)]
        self.supply_daily = [rng.uniform(0.3, 1.0) for _ in range(hall.rows)]
        self.supply_phase = [rng.uniform(0, 2 * math.pi) for _ in range(hall.rows)]
        self.ou = [0.0] * hall.rows
        self.locations = []
        self.params = []
        for i in range(hall.racks):
            row = i // hall.racks_per_row
            self.locations.append(RackLocation("sim", "hall-1", f"row-{row + 1}", f"rack-{row + 1}-{i % hall.racks_per_row + 1:02d}"))
            top = rng.uniform(1.5, 5.0)
            p = {
                "row": row,
                "top": top,
                "bottom": rng.uniform(0.3, 1.5),
                "load_amp": rng.uniform(0.2, 0.8),
                "load_phase": rng.uniform(-0.5, 0.5),
                "noise": rng.uniform(0.08, 0.2),
                "offset_s": rng.uniform(0, STEP_S),
                "rng": random.Random(hall.seed * 100_003 + i),
            }
            self.params.append(p)
        # Cap the hottest normal inlet so the "normal" hall is in spec (a design choice, not physics).
        for p in self.params:
            worst = max(self.supply_base) + 1.0 + 3 * self.OU_SIGMA_C + p["top"] + p["load_amp"]
            if worst > hall.max_top_c:
                p["top"] -= worst - hall.max_top_c
        self.subset = list(range(hall.racks)) if rack_subset is None else list(rack_subset)
        self.state: dict[tuple[int, str], float] = {}
        self.frozen: dict[tuple[int, str], float] = {}
        self.zone_events = [e for e in hall.events if e.kind == "zone"]
        self.rack_events = {(e.rack, e.position): e for e in hall.events if e.kind == "rack"}
        self.faults = {(f.rack, f.position): f for f in hall.faults}

    def supply(self, row: int, t: float) -> float:
        day = 2 * math.pi * (t % 86400) / 86400
        value = self.supply_base[row] + self.supply_daily[row] * math.sin(day + self.supply_phase[row]) + self.ou[row]
        return value + sum(e.value(t) for e in self.zone_events if e.row == row)

    def target(self, i: int, position: str, t: float) -> float:
        p = self.params[i]
        day = 2 * math.pi * ((t % 86400) / 86400 - 0.25 + p["load_phase"] / 24)
        load = p["load_amp"] * math.sin(day) * (1.0 if position == "top" else 0.5)
        value = self.supply(p["row"], t) + p[position] + load
        event = self.rack_events.get((i, position))
        return value + (event.value(t) if event else 0.0)

    def advance_zones(self) -> None:
        a = math.exp(-STEP_S / self.OU_TAU_S)
        s = self.OU_SIGMA_C * math.sqrt(1 - a * a)
        self.ou = [a * x + s * self.rng_zone.gauss(0, 1) for x in self.ou]

    def true_temperature(self, i: int, position: str, t: float) -> float:
        key = (i, position)
        target = self.target(i, position, t)
        current = self.state.get(key)
        if current is None:
            current = target
        else:
            current += (target - current) * (1 - math.exp(-STEP_S / self.INLET_TAU_S))
        self.state[key] = current
        return current

    def room_dew_point(self, t: float) -> float:
        return 9.0 + 0.8 * math.sin(2 * math.pi * (t % 86400) / 86400)

    def step(self, t: float) -> list[tuple[int, float, dict[str, tuple[float, float | None, float | None]]]]:
        """Advance to ``t``; per rack in the subset: (rack, report ts, {position: (true, measured temp, RH)})."""
        self.advance_zones()
        out = []
        dp = self.room_dew_point(t)
        for i in self.subset:
            p = self.params[i]
            rng: random.Random = p["rng"]
            values = {}
            lost = rng.random() < 0.002
            for position in ("top", "bottom"):
                true = self.true_temperature(i, position, t)
                temp: float | None = round(true + rng.gauss(0, p["noise"]), 1)
                if rng.random() < 0.001:  # a single spike
                    temp = round(temp + rng.choice((-1, 1)) * rng.uniform(3, 10), 1)
                rh: float | None = round(
                    100 * math.exp(MAGNUS_B * dp / (MAGNUS_L + dp) - MAGNUS_B * true / (MAGNUS_L + true))
                    + rng.gauss(0, 0.8), 1)
                fault = self.faults.get((i, position))
                if fault is not None and t >= fault.onset_s:
                    if fault.kind == "silent":
                        temp = rh = None
                    else:
                        key = (i, position)
                        if key not in self.frozen:
                            self.frozen[key] = round(temp + fault.jump_c, 1)
                        temp = self.frozen[key]
                        rh = 45.0
                values[position] = (true, temp, rh)
            if not lost:
                out.append((i, t + p["offset_s"], values))
        return out


# -- the alert rule, replayed -------------------------------------------------------------------


@dataclass
class AlertReplay:
    """Grafana's pending → firing state machine for one alert instance per (rack, position)."""

    horizon_min: float = ALERT_HORIZON_MIN
    for_s: float = ALERT_FOR_S
    query_range_s: float = ALERT_QUERY_RANGE_S
    latest: dict[tuple[str, str], Forecast] = field(default_factory=dict)
    pending_since: dict[tuple[str, str], float] = field(default_factory=dict)
    firing: set[tuple[str, str]] = field(default_factory=set)
    fired: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rack, position)

    def publish(self, forecasts: list[Forecast]) -> None:
        for f in forecasts:
            # The bridge writes no point for a held-back position; the query then sees the older one.
            if f.status == "ok":
                self.latest[(f.rack, f.position)] = f

    def evaluate(self, t: float) -> None:
        for key, f in self.latest.items():
            fresh = t - f.computed_at_ms / 1000 <= self.query_range_s
            condition = fresh and f.minutes_to_recommended is not None and f.minutes_to_recommended < self.horizon_min
            if not condition:
                self.pending_since.pop(key, None)
                self.firing.discard(key)
                continue
            since = self.pending_since.setdefault(key, t)
            if key not in self.firing and t - since >= self.for_s:
                self.firing.add(key)
                self.fired.append((t, key[0], key[1]))


@dataclass
class RunResult:
    scenario: str
    seed: int
    racks: int
    simulated_h: float
    readings: int
    breaches: dict[str, float]  # "rack/position" -> time of the real breach (s)
    fired: list[tuple[float, str, str]]
    onsets: dict[str, float]  # "rack/position" -> onset of the event affecting it
    statuses: dict[str, str]
    wall_s: float


def simulate(
    hall: Hall,
    duration_s: float,
    settings: Settings,
    limits: ForecastLimits = ForecastLimits(),
    scenario: str = "",
    rack_subset: Iterable[int] | None = None,
) -> RunResult:
    started = time.perf_counter()
    model = HallModel(hall, rack_subset)
    tracker = ForecastTracker(WindowSettings.from_settings(settings), limits)
    replay = AlertReplay(horizon_min=settings.forecast_horizon_min)
    publish_every = round(settings.forecast_publish_interval_s / STEP_S)
    evaluate_every = round(ALERT_INTERVAL_S / STEP_S)
    breaches: dict[str, float] = {}
    readings = 0
    steps = int(duration_s / STEP_S)
    for k in range(1, steps + 1):
        t = START_S + k * STEP_S
        for i, ts, values in model.step(t):
            loc = model.locations[i]
            for position, (true, temp, rh) in values.items():
                if true >= limits.recommended_max_c:
                    breaches.setdefault(f"{loc.rack}/{position}", t)
                if temp is None:
                    continue
                tracker.observe(SensorReading(loc, position, f"{loc.rack}-dev", round(ts * 1000), temp, rh))
                readings += 1
        if k % publish_every == 0:
            replay.publish(tracker.forecasts(t + STEP_S))  # published just after the step's reports arrived
        if k % evaluate_every == 0:
            replay.evaluate(t + STEP_S)
    onsets = {}
    for e in hall.events:
        if e.kind == "zone":
            for i in range(e.row * hall.racks_per_row, (e.row + 1) * hall.racks_per_row):
                for position in ("top", "bottom"):
                    onsets[f"{model.locations[i].rack}/{position}"] = e.onset_s
        else:
            onsets[f"{model.locations[e.rack].rack}/{e.position}"] = e.onset_s
    end = START_S + steps * STEP_S + STEP_S
    statuses = {f"{f.rack}/{f.position}": f.status for f in tracker.forecasts(end)}
    return RunResult(scenario, hall.seed, len(model.subset), duration_s / 3600, readings, breaches,
                     replay.fired, onsets, statuses, time.perf_counter() - started)


def simulate_simulator_hall(kind: str, seed: int, duration_s: float, settings: Settings,
                            limits: ForecastLimits = ForecastLimits()) -> RunResult | None:
    """The same replay on ``bridge.simulator.hall`` (the demo's hall model) with one of its scenarios.

    Informational: its cooling failure is a 15 °C/h step and its hot spot adds 8 °C with a 5 min
    time constant. Many racks breach in less time than any forecast needs, so the table shows the
    onset-to-breach time next to the lead. None when the simulator package is not there.
    """
    try:
        from ..simulator import hall as sim
    except ImportError:
        return None
    started = time.perf_counter()
    hall = sim.build_hall(racks=20, rooms=1, rows=2, seed=seed)
    scenario = sim.parse_scenario(kind, hall, START_S + WARMUP_S)
    tracker = ForecastTracker(WindowSettings.from_settings(settings), limits)
    replay = AlertReplay(horizon_min=settings.forecast_horizon_min)
    locations = {r.name: RackLocation(hall.site, r.room, r.row, r.name) for r in hall.racks}
    publish_every = round(settings.forecast_publish_interval_s / STEP_S)
    evaluate_every = round(ALERT_INTERVAL_S / STEP_S)
    breaches: dict[str, float] = {}
    readings = 0
    steps = int(duration_s / STEP_S)
    for k in range(1, steps + 1):
        t = START_S + k * STEP_S
        for rack in hall.racks:
            # Noise-free truth for the breach time: the model's own pure function (private, read-only use).
            true = sim._true_values(hall, rack, t, [scenario])
            values = sim.reading(hall, rack.name, t, [scenario]) or {}
            for position, sfx in (("top", "Top"), ("bottom", "Bottom")):
                if true[f"temp{sfx}"] >= limits.recommended_max_c:
                    breaches.setdefault(f"{rack.name}/{position}", t)
                temp = values.get(f"temp{sfx}")
                if temp is None:
                    continue
                tracker.observe(SensorReading(locations[rack.name], position, rack.name, round(t * 1000), temp,
                                              values.get(f"humidity{sfx}")))
                readings += 1
        if k % publish_every == 0:
            replay.publish(tracker.forecasts(t + STEP_S))
        if k % evaluate_every == 0:
            replay.evaluate(t + STEP_S)
    if scenario.kind in sim.ROOM_SCENARIOS:
        affected = [r.name for r in hall.racks if r.room == scenario.target]
    else:
        affected = [scenario.target.partition("/")[0]]
    onsets = {f"{name}/{p}": scenario.start_ts for name in affected for p in ("top", "bottom")}
    return RunResult(f"simulator:{kind}", seed, len(hall.racks), duration_s / 3600, readings, breaches,
                     replay.fired, onsets, {}, time.perf_counter() - started)


# -- scenarios ----------------------------------------------------------------------------------

WARMUP_S = 60 * 60.0  # the window fills before anything happens


def cooling_failure_hall(seed: int, abrupt: bool = False) -> Hall:
    rng = random.Random(seed)
    rate = rng.uniform(20, 30) if abrupt else rng.uniform(3, 10)  # initial °C/h
    amplitude = rng.uniform(8, 14)  # where the row's supply air settles, above normal
    event = Event("zone", START_S + WARMUP_S + rng.uniform(0, 600), amplitude, amplitude / rate * 3600, row=0)
    return Hall(rows=2, racks_per_row=10, seed=seed, events=[event])


def hot_spot_hall(seed: int) -> Hall:
    rng = random.Random(seed)
    events = []
    for rack in rng.sample(range(20), 2):
        rate = rng.uniform(3, 9)  # initial °C/h
        amplitude = rng.uniform(6, 10)
        events.append(Event("rack", START_S + WARMUP_S + rng.uniform(0, 1800), amplitude, amplitude / rate * 3600,
                            rack=rack, position="top"))
    return Hall(rows=2, racks_per_row=10, seed=seed, events=events)


def stuck_silent_hall(seed: int) -> Hall:
    rng = random.Random(seed)
    racks = rng.sample(range(40), 12)
    faults = []
    for n, rack in enumerate(racks):
        kind = ("stuck", "stuck_jump", "silent")[n % 3]
        jump = rng.uniform(2.0, 4.0) if kind == "stuck_jump" else 0.0
        faults.append(SensorFault(rack, rng.choice(("top", "bottom")), START_S + WARMUP_S + rng.uniform(0, 3600), kind, jump))
    return Hall(rows=4, racks_per_row=10, seed=seed, faults=faults)


def lead_times(run: RunResult) -> list[dict]:
    """Per real breach: minutes between the first firing since the event's onset and the breach."""
    rows = []
    for key, t_breach in sorted(run.breaches.items()):
        onset = run.onsets.get(key)
        if onset is None:
            continue
        rack, position = key.split("/")
        fires = [t for t, r, p in run.fired if r == rack and p == position and onset <= t <= t_breach]
        lead = (t_breach - fires[0]) / 60 if fires else None
        rows.append({"series": key, "onset_to_breach_min": (t_breach - onset) / 60, "lead_min": lead})
    return rows


def false_alerts(run: RunResult) -> list[tuple[float, str, str]]:
    """Firings of a series that is not in breach and does not breach within ``TRUE_WITHIN_S``.

    In the event scenarios these are mostly racks whose rise levelled off just below the limit
    (a straight-line forecast cannot know that it will). In the normal week every firing is false.
    """
    out = []
    for t, rack, position in run.fired:
        t_breach = run.breaches.get(f"{rack}/{position}")
        if t_breach is None or t_breach > t + TRUE_WITHIN_S:
            out.append((t, rack, position))
    return out


def _week_chunk(args: tuple[int, list[int], dict]) -> RunResult:
    seed, subset, overrides = args
    return simulate(Hall(rows=4, racks_per_row=10, seed=seed), 7 * 86400.0, Settings(**overrides),
                    scenario="normal_week", rack_subset=subset)


# -- cost ---------------------------------------------------------------------------------------


def measure_cost(racks: int = 10_000, settings: Settings | None = None, fill_minutes: int = 30,
                 measure_minutes: int = 3) -> dict:
    """µs per reading of the tracker at ``racks`` × 2 positions, with full windows, vs decode+map."""
    from ..decode import decode
    from ..mapping import Mapper

    settings = settings or Settings()
    tracker = ForecastTracker.from_settings(settings)
    rng = random.Random(1)
    locations = [RackLocation("s", "r", "w", f"rack-{i:05d}") for i in range(racks)]
    base = [rng.uniform(20, 25) for _ in range(racks)]

    def feed(t0: float, steps: int) -> tuple[int, float, float]:
        n = 0
        observe_s = publish_s = 0.0
        for k in range(steps):
            t = t0 + k * STEP_S
            batch = [
                SensorReading(loc, pos, "d", round(t * 1000), round(base[i] + (1.5 if pos == "top" else 0) + rng.gauss(0, 0.15), 1), 45.0)
                for i, loc in enumerate(locations) for pos in ("top", "bottom")
            ]
            started = time.perf_counter()
            for r in batch:
                tracker.observe(r)
            observe_s += time.perf_counter() - started
            n += len(batch)
            if round(t) % settings.forecast_publish_interval_s == 0:
                started = time.perf_counter()
                tracker.forecasts(t + 1)
                publish_s += time.perf_counter() - started
        return n, observe_s, publish_s

    fill_steps = int(fill_minutes * 60 / STEP_S)
    feed(START_S, fill_steps)
    n, observe_s, publish_s = feed(START_S + fill_steps * STEP_S, int(measure_minutes * 60 / STEP_S))

    settings_map = Mapper(settings)
    payload = json.dumps({"deviceName": "rack-00001", "deviceType": "rack", "ts": int(START_S * 1000),
                          "values": {"tempTop": 24.1, "tempBottom": 21.3, "humidityTop": 41.2, "humidityBottom": 47.9}}).encode()
    loops = 20_000
    started = time.perf_counter()
    for _ in range(loops):
        for g in decode("racktwin/telemetry/rack-00001", payload, int(START_S * 1000), 65536):
            settings_map.map_group(g, int(START_S * 1000))
    decode_map_us = (time.perf_counter() - started) / loops * 1e6 / 2  # 2 readings per message
    tracker_us = (observe_s + publish_s) / n * 1e6
    return {
        "racks": racks,
        "positions": racks * 2,
        "readings_measured": n,
        "observe_us_per_reading": observe_s / n * 1e6,
        "forecast_us_per_reading": publish_s / n * 1e6,
        "tracker_us_per_reading": tracker_us,
        "decode_map_us_per_reading": decode_map_us,
        "ratio_tracker_to_decode_map": tracker_us / decode_map_us,
        "cpu_share_at_10s_interval": tracker_us * 1e-6 * racks * 2 / STEP_S,
        "publish_s_per_round": publish_s / max(1, int(measure_minutes * 60 / settings.forecast_publish_interval_s)),
    }


# -- the report ---------------------------------------------------------------------------------


def run_all(seeds: int = 8, week: bool = True, cost_racks: int = 10_000, workers: int = 2) -> dict:
    settings = Settings()
    horizon = settings.forecast_horizon_min
    report: dict = {"settings": {k: v for k, v in settings.model_dump().items() if k.startswith("forecast_")},
                    "alert": {"horizon_min": horizon, "for_s": ALERT_FOR_S, "interval_s": ALERT_INTERVAL_S,
                              "query_range_s": ALERT_QUERY_RANGE_S},
                    "scenarios": {}}
    for name, make in (("cooling_failure", cooling_failure_hall), ("hot_spot", hot_spot_hall),
                       ("abrupt_failure", lambda s: cooling_failure_hall(s, abrupt=True))):
        runs = [simulate(make(seed), WARMUP_S + 4 * 3600, settings, scenario=name) for seed in range(1, seeds + 1)]
        leads = [row | {"seed": r.seed} for r in runs for row in lead_times(r)]
        values = [row["lead_min"] if row["lead_min"] is not None else -math.inf for row in leads]
        report["scenarios"][name] = {
            "runs": len(runs),
            "breaching_series": len(leads),
            "lead_median_min": statistics.median(values) if values else None,
            "lead_worst_min": min(values) if values else None,
            "onset_to_breach_min_range": [min(r["onset_to_breach_min"] for r in leads),
                                          max(r["onset_to_breach_min"] for r in leads)] if leads else None,
            "false_alerts": sum(len(false_alerts(r)) for r in runs),
            "wall_s": sum(r.wall_s for r in runs),
            "simulated_h": sum(r.simulated_h for r in runs),
            "series": leads,
        }
    for kind in ("cooling_failure", "hotspot"):
        sim_runs = [simulate_simulator_hall(kind, seed, WARMUP_S + 2 * 3600, settings) for seed in range(1, 4)]
        if None in sim_runs:
            break
        leads = [row | {"seed": r.seed} for r in sim_runs for row in lead_times(r)]
        values = [row["lead_min"] if row["lead_min"] is not None else -math.inf for row in leads]
        report["scenarios"][f"simulator_{kind}"] = {
            "runs": len(sim_runs),
            "breaching_series": len(leads),
            "lead_median_min": statistics.median(values) if values else None,
            "lead_worst_min": min(values) if values else None,
            "onset_to_breach_min_range": [min(r["onset_to_breach_min"] for r in leads),
                                          max(r["onset_to_breach_min"] for r in leads)] if leads else None,
            "leads_ge_target_where_onset_to_breach_ge_20_min": [
                r["lead_min"] is not None and r["lead_min"] >= LEAD_TARGET_MIN
                for r in leads if r["onset_to_breach_min"] >= 20].count(True),
            "series_with_onset_to_breach_ge_20_min": sum(1 for r in leads if r["onset_to_breach_min"] >= 20),
            "false_alerts": sum(len(false_alerts(r)) for r in sim_runs),
            "wall_s": sum(r.wall_s for r in sim_runs),
            "series": leads,
        }
    runs = [simulate(stuck_silent_hall(seed), WARMUP_S + 4 * 3600, settings, scenario="stuck_silent")
            for seed in range(1, max(2, seeds // 2) + 1)]
    faulty = {(r.seed, f"{HallModel(stuck_silent_hall(r.seed)).locations[f.rack].rack}/{f.position}", f.kind)
              for r in runs for f in stuck_silent_hall(r.seed).faults}
    fault_alerts = [(r.seed, key, t) for r in runs for (t, rack, pos) in r.fired
                    for (s, key, _k) in faulty if s == r.seed and key == f"{rack}/{pos}"]
    report["scenarios"]["stuck_silent"] = {
        "runs": len(runs),
        "faulty_series": len(faulty),
        "alerts_on_faulty_series": len(fault_alerts),
        "all_alerts": sum(len(r.fired) for r in runs),
        "final_status_of_faulty": sorted({f"{kind}->{r.statuses.get(key, 'forgotten')}" for r in runs
                                          for (s, key, kind) in faulty if s == r.seed}),
        "wall_s": sum(r.wall_s for r in runs),
    }
    if week:
        subsets = [list(range(c, 40, 4)) for c in range(4)]
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_week_chunk, [(101, s, {}) for s in subsets])
        fired = [a for c in chunks for a in false_alerts(c)]
        report["scenarios"]["normal_week"] = {
            "racks": sum(c.racks for c in chunks),
            "simulated_days": 7,
            "readings": sum(c.readings for c in chunks),
            "real_breaches": sum(len(c.breaches) for c in chunks),
            "false_alerts": len(fired),
            "false_alerts_per_40_racks_per_week": len(fired) * 40 / sum(c.racks for c in chunks),
            "false_alert_times": [{"t": t, "rack": r, "position": p} for t, r, p in fired],
            "wall_s": sum(c.wall_s for c in chunks),
        }
    if cost_racks:
        report["cost"] = measure_cost(cost_racks, settings)
    return report


def verdicts(report: dict) -> dict[str, bool]:
    sc = report["scenarios"]
    out = {}
    for name in ("cooling_failure", "hot_spot"):
        worst = sc[name]["lead_worst_min"]
        out[f"{name}: every lead >= {LEAD_TARGET_MIN:.0f} min"] = worst is not None and worst >= LEAD_TARGET_MIN
    if "normal_week" in sc:
        out[f"normal_week: < {FALSE_ALERT_TARGET:.0f} false alert per 40 racks per week"] = (
            sc["normal_week"]["false_alerts_per_40_racks_per_week"] < FALSE_ALERT_TARGET)
    out["stuck/silent: no forecast alert"] = sc["stuck_silent"]["alerts_on_faulty_series"] == 0
    return out


def format_table(report: dict) -> str:
    def m(v):
        return "-" if v is None else ("missed" if v == -math.inf else f"{v:.1f}")

    sc = report["scenarios"]
    lines = ["forecast evaluation (simulated time; alert: minutes_to_recommended < "
             f"{report['alert']['horizon_min']:.0f} for {report['alert']['for_s']:.0f} s)", "",
             f"{'scenario':<27}{'runs':>5}{'breaches':>9}{'onset→breach min':>18}{'lead median':>12}{'lead worst':>11}"
             f"{'no-breach alerts':>17}{'wall s':>8}"]
    for name in ("cooling_failure", "hot_spot", "abrupt_failure", "simulator_cooling_failure", "simulator_hotspot"):
        if name not in sc:
            continue
        s = sc[name]
        rng = s["onset_to_breach_min_range"]
        span = f"{rng[0]:.0f}–{rng[1]:.0f}" if rng else "-"
        note = "  (info: faster than any warning)" if name == "abrupt_failure" else ""
        if name.startswith("simulator_"):
            note = (f"  (info: bridge.simulator.hall; lead >= {LEAD_TARGET_MIN:.0f} min in "
                    f"{s['leads_ge_target_where_onset_to_breach_ge_20_min']}/{s['series_with_onset_to_breach_ge_20_min']}"
                    " series that take >= 20 min to breach)")
        lines.append(f"{name:<27}{s['runs']:>5}{s['breaching_series']:>9}{span:>18}{m(s['lead_median_min']):>12}"
                     f"{m(s['lead_worst_min']):>11}{s['false_alerts']:>17}{s['wall_s']:>8.1f}{note}")
    s = sc["stuck_silent"]
    lines.append(f"{'stuck_silent':<27}{s['runs']:>5}{'':>9}{'':>18}{'':>12}{'':>11}{s['alerts_on_faulty_series']:>17}"
                 f"{s['wall_s']:>8.1f}  ({s['faulty_series']} faulty series; {', '.join(s['final_status_of_faulty'])})")
    if "normal_week" in sc:
        w = sc["normal_week"]
        lines.append(f"{'normal_week':<27}{1:>5}{w['real_breaches']:>9}{'':>18}{'':>12}{'':>11}{w['false_alerts']:>17}"
                     f"{w['wall_s']:>8.1f}  ({w['racks']} racks × 7 days: {w['false_alerts_per_40_racks_per_week']:.2f} "
                     "false alerts per 40 racks per week)")
    if "cost" in report:
        c = report["cost"]
        lines += ["", f"cost at {c['racks']:,} racks × 2 positions, full windows: "
                  f"tracker {c['tracker_us_per_reading']:.2f} µs/reading (observe {c['observe_us_per_reading']:.2f} + "
                  f"forecast/fit {c['forecast_us_per_reading']:.2f}); decode+map {c['decode_map_us_per_reading']:.2f} "
                  f"µs/reading; ratio {c['ratio_tracker_to_decode_map']:.2f}; "
                  f"{c['cpu_share_at_10s_interval'] * 100:.1f} % of one core at a 10 s interval"]
    lines += [""] + [f"{'PASS' if ok else 'FAIL'}  {text}" for text, ok in verdicts(report).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridge.forecast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="runs per scenario")
    parser.add_argument("--no-week", action="store_true", help="skip the 7-day normal-operation run")
    parser.add_argument("--cost-racks", type=int, default=10_000, help="racks in the cost measurement (0 = skip)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    report = run_all(args.seeds, week=not args.no_week, cost_racks=args.cost_racks)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwritten {args.out}")
    return 0 if all(verdicts(report).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
