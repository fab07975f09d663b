"""Proof of the forecast on the simulator's scenarios: lead time, false alerts, stuck/silent sensors, cost.

``make evaluate`` (``python -m bridge.forecast.evaluate``). Everything runs in simulated time (10 s
steps, no sleeping), far faster than real time. The readings come from ``bridge.simulator.hall``, the
same pure, seeded model that feeds the demo wall, with its noise, daily load drift and scenarios
(``cooling_failure:ROOM,rate=R``, ``hotspot:RACK,rate=R``, ``stuck``, ``silent``). They pass through
the real ``ForecastTracker``; forecasts are computed on the publisher's schedule
(``forecast_publish_interval_s``). The Grafana forecast rule is then replayed exactly: every
``ALERT_INTERVAL_S`` its query takes ``last("minutes_to_recommended")`` over the last
``ALERT_QUERY_RANGE_S``, i.e. the newest point that has the field (or "no crossing" for a position
with forecasts but none that has it), and the instance fires once that value has been within
(0, ``ALERT_HORIZON_MIN``) at every evaluation for ``ALERT_FOR_S``; it keeps firing until the
condition has been false for ``ALERT_KEEP_FIRING_S``, or the series (no forecast of the position
in the range) has been missing from ``ALERT_MISSING_EVALS_TO_RESOLVE`` evaluations (``AlertReplay``). The table counts refires: a
series that resolved and fired again, two more notifications for one event.

Runs (PASS/FAIL comes from these):
- cooling_failure: one room loses part of its cooling, warming at 3-12 °C/h (a CRAH of several, or a
  chilled-water valve, failing while the other units carry some of the load), each seed at another
  time of day (so another load and headroom);
- hotspot: recirculation builds up at one rack's top inlet at 4-12 °C/h, row ends included;
- normal_week: 40 racks, 7 days, the simulator's noise and daily drift, no scenario (false alerts),
  with spikes and lost messages added to the readings (``Glitches``; the simulator has neither);
- stuck_silent: a room's cooling fails at ``FAULT_ROOM_RATE`` °C/h and minutes later sensors in it
  freeze (top or bottom; at their own value, or after jumping 2-4 °C up) or go silent (devices or
  single positions). The healthy sensors of the room must fire and the faulty ones must not. A silent
  sensor's last trend still points up and a jump reads as a steep rise, so only the hold-back keeps
  them quiet: with it switched off the same runs alert on faulty sensors. (One frozen at its own
  value reads low in a warming room and stays quiet either way.)
For information, not held to the 10 min target: steep rises at 15-30 °C/h (``rate=30``: a total
cooling loss, a blanking panel pulled). The fastest of those sensors pass 27 °C 7 minutes after the onset,
and no forecast can warn 10 minutes ahead of a breach that comes sooner than that plus the time it takes
to see the rise: the forecast alert fires 3-4 minutes after the onset at 30 °C/h, 4-6 at 15 °C/h (three
rising one-minute buckets for the fast fit, 30 s publishing, the rule's 10 s evaluation and 30 s pending
period). The table shows how much warning is left, and up to which onset-to-breach time the short warnings
reach.

"Real breach" = the simulator's noise-free inlet temperature reaching the recommended maximum.
Lead = breach time minus the start of that series' alert episode still firing at the breach (an alert
that fired after the onset but resolved before the breach gave no warning that counts: no lead, missed).

The previous minimal hall generator (``HallModel``: rows as cooling zones with a random walk,
first-order inlet lag, spikes and lost messages) stays as an informational second opinion.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..config import Settings
from ..mapping import RackLocation, SensorReading
from ..simulator import hall as sim
from .limits import (
    ALERT_FOR_S,
    ALERT_HORIZON_MIN,
    ALERT_INTERVAL_S,
    ALERT_KEEP_FIRING_S,
    ALERT_MISSING_EVALS_TO_RESOLVE,
    ALERT_QUERY_RANGE_S,
    ForecastLimits,
    heading_for_limit,
)
from .tracker import Forecast, ForecastTracker, WindowSettings, writes_forecast_point

STEP_S = 10.0
START_S = 1_764_000_000.0  # a Monday, 16:00 UTC; any fixed epoch will do
DAY_S = 86400.0
MAGNUS_B, MAGNUS_L = 17.62, 243.12
RESULTS = Path("bench/results/forecast.json")
LEAD_TARGET_MIN = 10.0
FALSE_ALERT_TARGET = 1.0  # per 40 racks per week
TRUE_WITHIN_S = 2 * 3600.0  # an alert followed by that series' real breach within this was an early warning
WARMUP_S = 60 * 60.0  # the window fills before anything happens
AFTER_ONSET_S = 2.5 * 3600.0  # simulated after a scenario starts

# Rates (°C/h at the start) held to the 10 min target, and the steep ones shown for information.
COOLING_RATES = (3.0, 4.5, 6.0, 8.0, 10.0, 12.0)
HOTSPOT_RATES = (4.0, 6.0, 8.0, 10.0, 12.0)
STEEP_RATES = (15.0, 20.0, 25.0, 30.0)
WEEK_SEED = 101
SENSOR_FAULTS = {"stuck", "silent"}
# stuck_silent: the faulty sensors' room warms at this rate, and the faults begin this long after it started:
# late enough that the trend has picked the rise up (a silent sensor's last trend would carry it on), early
# enough that no healthy sensor of the room fires yet (so an alert on a faulty one cannot be a leftover).
FAULT_ROOM_RATE = 8.0
FAULT_DELAY_S = (240.0, 420.0)
# stuck_jump: the sensor jumps this far up and freezes there. A sensor frozen at its own value reads low in a
# warming room and never heads for the limit, with or without the stuck check; the jump is what the check is for.
FAULT_JUMP_C = (2.0, 4.0)
FAULT_KINDS = ("stuck", "stuck:/bottom", "silent", "silent:/top", "silent:/bottom",
               "stuck_jump", "stuck_jump:/bottom", "silent:/top")


# -- the alert rule, replayed -------------------------------------------------------------------


@dataclass
class AlertReplay:
    """Grafana's state machine for one alert instance per (rack, position): pending, firing, recovering.

    As Grafana's state manager does it: the condition must hold at every evaluation for ``for_s`` to fire;
    a firing instance whose condition turns false keeps firing (Recovering) until it has been false for
    ``keep_firing_for_s`` counted from that first false evaluation, and fires on if it comes back; a series
    missing from the query's result (no forecast of the position in the range, not just no crossing) is left
    as it is, and resolved once it has been missing from ``missing_evals_to_resolve`` evaluations.
    """

    horizon_min: float = ALERT_HORIZON_MIN
    for_s: float = ALERT_FOR_S
    query_range_s: float = ALERT_QUERY_RANGE_S
    keep_firing_for_s: float = ALERT_KEEP_FIRING_S
    missing_evals_to_resolve: int = ALERT_MISSING_EVALS_TO_RESOLVE
    # Per series the newest point that has minutes_to_recommended: what last("minutes_to_recommended") returns
    # when it lies within the query range (every older point with the field is older still).
    latest: dict[tuple[str, str], Forecast] = field(default_factory=dict)
    # Per series the time (s) of its newest forecast of any kind: within the range, a series without a crossing
    # still has a row, NO_CROSSING (dashboards/alerts.py: minutes_to_recommended_per_series), judged not heading.
    forecast_at: dict[tuple[str, str], float] = field(default_factory=dict)
    pending_since: dict[tuple[str, str], float] = field(default_factory=dict)
    recovering_since: dict[tuple[str, str], float] = field(default_factory=dict)
    missing: dict[tuple[str, str], int] = field(default_factory=dict)
    firing: set[tuple[str, str]] = field(default_factory=set)
    fired: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rack, position)
    resolved: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rack, position) a firing ended

    def publish(self, forecasts: list[Forecast]) -> None:
        for f in forecasts:
            # A held-back position writes no point, one with no crossing a point without the field: either
            # way last() still returns the older value, for as long as it lies within the query range.
            if writes_forecast_point(f):
                self.forecast_at[(f.rack, f.position)] = f.computed_at_ms / 1000
            if f.status == "ok" and f.minutes_to_recommended is not None:
                self.latest[(f.rack, f.position)] = f

    def _resolve(self, key: tuple[str, str], t: float) -> None:
        self.pending_since.pop(key, None)
        self.recovering_since.pop(key, None)
        if key in self.firing:
            self.firing.discard(key)
            self.resolved.append((t, key[0], key[1]))

    def evaluate(self, t: float) -> None:
        for key, f in self.latest.items():
            if t - self.forecast_at.get(key, -math.inf) > self.query_range_s:  # no forecast at all: no series
                self.missing[key] = self.missing.get(key, 0) + 1
                if self.missing[key] >= self.missing_evals_to_resolve:
                    self._resolve(key, t)
                continue
            self.missing[key] = 0
            # The value as written (forecast_line rounds it to 3 decimals), or none without a crossing in the range.
            crossing = t - f.computed_at_ms / 1000 <= self.query_range_s
            minutes = round(f.minutes_to_recommended, 3) if crossing else None
            if not heading_for_limit(minutes, self.horizon_min):
                if key in self.firing and self.keep_firing_for_s > 0:
                    since = self.recovering_since.setdefault(key, t)
                    if t - since < self.keep_firing_for_s:
                        continue
                self._resolve(key, t)
                continue
            self.recovering_since.pop(key, None)
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
    rates: dict[str, float] = field(default_factory=dict)  # "rack/position" -> scenario rate (°C/h)
    resolved: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rack, position) a firing ended
    faults: dict[str, float] = field(default_factory=dict)  # "rack/position" -> start of its stuck/silent fault
    fault_kinds: dict[str, str] = field(default_factory=dict)  # "rack/position" -> stuck, stuck_jump or silent
    spikes: int = 0  # readings the run's Glitches spiked
    lost: int = 0  # reports the run's Glitches dropped


@dataclass(frozen=True)
class Glitches:
    """Spikes and lost messages for the simulator's readings, which have neither.

    ``spike_share`` of the readings come ``spike_c`` too high for that one sample (a bad conversion, a
    puff of exhaust air), and ``lost_share`` of a device's reports (both positions) never arrive. Each
    rack draws from its own seeded stream, so a run gives the same glitches however racks are split
    over processes.
    """

    spike_share: float = 0.001
    spike_c: float = 3.0
    lost_share: float = 0.005

    def streams(self, seed: int, racks: Iterable[str]) -> dict[str, random.Random]:
        return {name: random.Random(f"{seed}:{name}:glitches") for name in racks}

    def apply(self, values: dict[str, float], rng: random.Random) -> tuple[dict[str, float], int]:
        """(the report as received, spiked readings in it); an empty report was lost."""
        if rng.random() < self.lost_share:
            return {}, 0
        out = dict(values)
        spiked = 0
        for key in ("tempTop", "tempBottom"):
            if key in out and rng.random() < self.spike_share:
                out[key] += self.spike_c
                spiked += 1
        return out, spiked


WEEK_GLITCHES = Glitches()  # the normal week's: 0.1 % of readings +3 °C for one sample, 0.5 % of reports lost


# -- runs on the simulator (bridge.simulator.hall) ---------------------------------------------------


def affected_series(s: sim.Scenario, hall: sim.Hall) -> list[str]:
    """The "rack/position" series a scenario acts on."""
    if s.kind in sim.ROOM_SCENARIOS:
        return [f"{r.name}/{p}" for r in hall.racks if r.room == s.target for p in ("top", "bottom")]
    rack, position = s.target.partition("/")[::2]
    default = ("top",) if s.kind == "stuck" else ("top", "bottom")  # stuck:RACK freezes the top
    return [f"{rack}/{p}" for p in ((position,) if position else default)]


def simulate_simulator(
    hall: sim.Hall,
    specs: list[tuple[str, float]],
    start_s: float,
    duration_s: float,
    settings: Settings,
    limits: ForecastLimits = ForecastLimits(),
    scenario: str = "",
    racks: Iterable[str] | None = None,
    glitches: Glitches | None = None,
    stuck_jumps: dict[str, float] | None = None,
) -> RunResult:
    """Replay ``racks`` (default all) of the simulator's ``hall`` from ``start_s`` for ``duration_s``.

    ``specs`` are scenario specs (``cooling_failure:hall1,rate=6``) with their start times (epoch s);
    ``glitches`` adds spikes and lost messages to the readings. ``stuck_jumps`` ("rack/position" -> °C)
    shifts a stuck sensor's frozen value: the simulator freezes a sensor at the value it had, this makes
    one jump to a wrong value and freeze there (a step the trend could read as a steep rise).
    """
    started = time.perf_counter()
    scenarios = [sim.parse_scenario(spec, hall, at) for spec, at in specs]
    names = [r.name for r in hall.racks] if racks is None else list(racks)
    tracker = ForecastTracker(WindowSettings.from_settings(settings), limits)
    replay = AlertReplay(horizon_min=settings.forecast_horizon_min)
    locations = {r.name: RackLocation(hall.site, r.room, r.row, r.name) for r in hall.racks}
    publish_every = round(settings.forecast_publish_interval_s / STEP_S)
    evaluate_every = round(ALERT_INTERVAL_S / STEP_S)
    glitch_streams = glitches.streams(hall.seed, names) if glitches else {}
    stuck_jumps = stuck_jumps or {}
    jumps = {key: (s.start_ts, stuck_jumps[key]) for s in scenarios if s.kind == "stuck"
             for key in affected_series(s, hall) if key in stuck_jumps}
    breaches: dict[str, float] = {}
    readings = spikes = lost = 0
    steps = int(duration_s / STEP_S)
    for k in range(1, steps + 1):
        t = start_s + k * STEP_S
        for name in names:
            true = sim.true_values(hall, hall.rack(name), t, scenarios)
            values = sim.reading(hall, name, t, scenarios) or {}
            if glitches and values:
                values, spiked = glitches.apply(values, glitch_streams[name])
                spikes += spiked
                lost += not values
            for position, sfx in (("top", "Top"), ("bottom", "Bottom")):
                key = f"{name}/{position}"
                if true[f"temp{sfx}"] >= limits.recommended_max_c:
                    breaches.setdefault(key, t)
                temp = values.get(f"temp{sfx}")
                if temp is None:
                    continue
                if key in jumps and t >= jumps[key][0]:
                    temp = round(temp + jumps[key][1], 2)
                # Without humidity: the alert reads only the temperature forecast, and the dew-point
                # fits would double the run time without changing a single firing.
                tracker.observe(SensorReading(locations[name], position, name, round(t * 1000), temp, None))
                readings += 1
        if k % publish_every == 0:
            replay.publish(tracker.forecasts(t + STEP_S))  # published just after the step's reports arrived
        if k % evaluate_every == 0:
            replay.evaluate(t + STEP_S)
    onsets: dict[str, float] = {}
    rates: dict[str, float] = {}
    faults: dict[str, float] = {}
    fault_kinds: dict[str, str] = {}
    for s in scenarios:
        for key in affected_series(s, hall):
            if s.kind in SENSOR_FAULTS:  # a fault of the sensor, not the air: the event's onset stays
                faults[key] = s.start_ts
                fault_kinds[key] = "stuck_jump" if key in jumps else s.kind
                continue
            onsets[key] = s.start_ts
            if s.rate_c_per_h is not None:
                rates[key] = s.rate_c_per_h
    end = start_s + steps * STEP_S + STEP_S
    statuses = {f"{f.rack}/{f.position}": f.status for f in tracker.forecasts(end)}
    return RunResult(scenario, hall.seed, len(names), duration_s / 3600, readings, breaches, replay.fired,
                     onsets, statuses, time.perf_counter() - started, rates, replay.resolved, faults, fault_kinds,
                     spikes, lost)


def _onset(seed: int, salt: str) -> float:
    """A scenario start at a seeded time of day (another load, so another headroom, per run)."""
    rng = random.Random(f"{seed}:{salt}")
    return START_S + WARMUP_S + round(rng.uniform(0, DAY_S) / STEP_S) * STEP_S


def cooling_failure_run(seed: int, rate: float, settings: Settings) -> RunResult:
    """One room of the demo hall (40 racks, 2 rooms) loses cooling at ``rate`` °C/h."""
    hall = sim.build_hall(racks=40, rooms=2, rows=4, seed=seed)
    room = hall.rooms[seed % len(hall.rooms)].name
    onset = _onset(seed, f"cooling:{rate}")
    racks = [r.name for r in hall.racks if r.room == room]  # the other room is the normal week's business
    return simulate_simulator(hall, [(f"cooling_failure:{room},rate={rate:g}", onset)], onset - WARMUP_S,
                              WARMUP_S + AFTER_ONSET_S, settings, scenario="cooling_failure", racks=racks)


def hotspot_run(seed: int, rates: Iterable[float], settings: Settings) -> RunResult:
    """Hot spots at several racks of the demo hall, one per rate; row ends (the hottest tops) included."""
    hall = sim.build_hall(racks=40, rooms=2, rows=4, seed=seed)
    rates = list(rates)
    rng = random.Random(f"{seed}:hotspot")
    ends = [r.name for r in hall.racks if r.position_in_row == 1]
    others = [r.name for r in hall.racks if r.name not in ends]
    targets = [rng.choice(ends)] + rng.sample(others, len(rates) - 1)
    onset = _onset(seed, "hotspot")
    specs = [(f"hotspot:{rack},rate={rate:g}", onset + n * 600) for n, (rack, rate) in enumerate(zip(targets, rates))]
    return simulate_simulator(hall, specs, onset - WARMUP_S, WARMUP_S + AFTER_ONSET_S, settings,
                              scenario="hotspot", racks=targets)


def stuck_silent_run(seed: int, settings: Settings) -> RunResult:
    """A room's cooling fails; minutes later sensors in it freeze or go silent, one fault per rack.

    All racks of the room are replayed: the healthy sensors (the other position of a rack with one
    faulty position, and the racks without a fault) must fire, the faulty ones must not.
    """
    hall = sim.build_hall(racks=40, rooms=2, rows=4, seed=seed)
    room = hall.rooms[seed % len(hall.rooms)].name
    racks = [r.name for r in hall.racks if r.room == room]
    rng = random.Random(f"{seed}:faults")
    start = START_S - 10 * 3600 + seed * 1800  # ~06:00 UTC: the daily load (and inlet) rise
    cooling_at = start + WARMUP_S
    specs = [(f"cooling_failure:{room},rate={FAULT_ROOM_RATE:g}", cooling_at)]
    jumps: dict[str, float] = {}
    for kind, rack in zip(FAULT_KINDS, rng.sample(racks, len(FAULT_KINDS))):
        name, _, position = kind.partition(":")
        at = cooling_at + rng.uniform(*FAULT_DELAY_S)
        if name == "stuck_jump":  # the simulator freezes the sensor, simulate_simulator adds the jump
            name = "stuck"
            jumps[f"{rack}{position or '/top'}"] = round(rng.uniform(*FAULT_JUMP_C), 1)
        specs.append((f"{name}:{rack}{position}", at))
    return simulate_simulator(hall, specs, start, WARMUP_S + AFTER_ONSET_S, settings, scenario="stuck_silent",
                              racks=racks, stuck_jumps=jumps)


def _sim_week_chunk(args: tuple[int, list[str], dict]) -> RunResult:
    seed, racks, overrides = args
    hall = sim.build_hall(racks=40, rooms=2, rows=4, seed=seed)
    return simulate_simulator(hall, [], START_S, 7 * DAY_S, Settings(**overrides), scenario="normal_week",
                              racks=racks, glitches=WEEK_GLITCHES)


# -- the own minimal generator (informational) ------------------------------------------------------


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


def simulate_generator(
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
                     replay.fired, onsets, statuses, time.perf_counter() - started, resolved=replay.resolved)


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


def stuck_silent_hall(seed: int) -> Hall:  # (kept for the generator; not in the report)
    rng = random.Random(seed)
    racks = rng.sample(range(40), 12)
    faults = []
    for n, rack in enumerate(racks):
        kind = ("stuck", "stuck_jump", "silent")[n % 3]
        jump = rng.uniform(2.0, 4.0) if kind == "stuck_jump" else 0.0
        faults.append(SensorFault(rack, rng.choice(("top", "bottom")), START_S + WARMUP_S + rng.uniform(0, 3600), kind, jump))
    return Hall(rows=4, racks_per_row=10, seed=seed, faults=faults)


# -- lead times and false alerts ------------------------------------------------------------------


def firing_episodes(run: RunResult) -> dict[str, list[tuple[float, float]]]:
    """Per series, (start, end) of each firing of its alert; end is inf while it still fires at the run's end."""
    starts: dict[str, list[float]] = {}
    ends: dict[str, list[float]] = {}
    for t, rack, position in sorted(run.fired):
        starts.setdefault(f"{rack}/{position}", []).append(t)
    for t, rack, position in sorted(run.resolved):
        ends.setdefault(f"{rack}/{position}", []).append(t)
    out = {}
    for key, begun in starts.items():
        # A series' firings and resolutions alternate: the n-th resolution ends the n-th firing.
        ended = ends.get(key, [])
        out[key] = list(zip(begun, ended + [math.inf] * (len(begun) - len(ended))))
    return out


def lead_times(run: RunResult) -> list[dict]:
    """Per real breach: minutes from the start of the alert still firing at the breach to the breach.

    Only an alert that began after the event's onset counts. One that fired and resolved before the
    breach gave no warning anybody still saw: with none firing at the breach the lead is None (missed).
    A faulty sensor's series is left out: it cannot warn, and the fault rules report it.
    """
    episodes = firing_episodes(run)
    rows = []
    for key, t_breach in sorted(run.breaches.items()):
        onset = run.onsets.get(key)
        if onset is None or key in run.faults:
            continue
        active = [start for start, end in episodes.get(key, []) if onset <= start <= t_breach < end]
        lead = (t_breach - active[0]) / 60 if active else None
        rows.append({"series": key, "onset_to_breach_min": (t_breach - onset) / 60, "lead_min": lead})
    return rows


def alerts_on_faulty(run: RunResult) -> list[dict]:
    """Alerts of faulty sensors firing at or after the start of their fault: each one an alert on bad readings."""
    episodes = firing_episodes(run)
    return [{"seed": run.seed, "series": key, "kind": run.fault_kinds.get(key), "fault_at": at, "fired_at": start,
             "resolved_at": None if end == math.inf else end}
            for key, at in sorted(run.faults.items()) for start, end in episodes.get(key, []) if end > at]


def healthy_fired(run: RunResult) -> tuple[int, int]:
    """(healthy series the run's event affects, those whose alert fired after the event's onset)."""
    episodes = firing_episodes(run)
    healthy = [(key, onset) for key, onset in run.onsets.items() if key not in run.faults]
    return len(healthy), sum(any(start >= onset for start, _ in episodes.get(key, [])) for key, onset in healthy)


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


# The scenarios whose breaches are judged by lead time, in the order the report lists them; the table's lead-by-rate
# part puts each steep variant under its own scenario.
LEAD_SCENARIOS = ("cooling_failure", "hotspot", "steep_cooling_failure", "steep_hotspot")
BY_RATE_ORDER = ("cooling_failure", "steep_cooling_failure", "hotspot", "steep_hotspot")
TABLE_ORDER = LEAD_SCENARIOS + ("stuck_silent", "generator_cooling_failure", "generator_hot_spot")


def lead_values(rows: list[dict]) -> list[float]:
    """Each breach's lead in minutes; a breach never warned of counts as -inf (worse than any lead)."""
    return [row["lead_min"] if row["lead_min"] is not None else -math.inf for row in rows]


def summarize(runs: list[RunResult]) -> dict:
    """Lead times over every series that really breached after its scenario started."""
    leads = [row | {"seed": r.seed, "rate_c_per_h": r.rates.get(row["series"])} for r in runs for row in lead_times(r)]
    values = lead_values(leads)
    episodes_per_run = [firing_episodes(r) for r in runs]
    return {
        "runs": len(runs),
        "breaching_series": len(leads),
        "lead_median_min": statistics.median(values) if values else None,
        "lead_worst_min": min(values) if values else None,
        "leads_ge_target": sum(v >= LEAD_TARGET_MIN for v in values),
        "onset_to_breach_min_range": [min(r["onset_to_breach_min"] for r in leads),
                                      max(r["onset_to_breach_min"] for r in leads)] if leads else None,
        "false_alerts": sum(len(false_alerts(r)) for r in runs),
        # Firings after a series' first: each one a resolve and a fire again, two notifications for one event.
        "refires": sum(len(eps) - 1 for episodes in episodes_per_run for eps in episodes.values()),
        "alerted_series": sum(len(episodes) for episodes in episodes_per_run),
        "wall_s": sum(r.wall_s for r in runs),
        "simulated_h": sum(r.simulated_h for r in runs),
        "series": leads,
    }


def stuck_silent_report(runs: list[RunResult]) -> dict:
    """Alerts on faulty sensors (must be none) and the healthy sensors of the same failing room (must all fire)."""
    healthy = [healthy_fired(r) for r in runs]
    alerts = [a for r in runs for a in alerts_on_faulty(r)]
    alerted = {(a["seed"], a["series"]): a["kind"] for a in alerts}  # a series may alert more than once
    report = summarize(runs)  # leads and no-breach alerts of the healthy series (lead_times leaves faulty ones out)
    report.update({
        "room_rate_c_per_h": FAULT_ROOM_RATE,
        "faults_after_room_onset_min": [d / 60 for d in FAULT_DELAY_S],
        "faulty_series": sum(len(r.faults) for r in runs),
        "faulty_series_by_kind": dict(Counter(kind for r in runs for kind in r.fault_kinds.values())),
        "alerts_on_faulty_series": len(alerted),
        "alerted_faulty_series_by_kind": dict(Counter(alerted.values())),
        "faulty_alerts": alerts,
        "healthy_series": sum(n for n, _ in healthy),
        "healthy_series_fired": sum(fired for _, fired in healthy),
        "final_status_of_faulty": sorted({r.statuses.get(key, "forgotten") for r in runs for key in r.faults}),
    })
    return report


def by_rate(summary: dict) -> dict[str, dict]:
    """Per scenario rate: breaching series, median and worst lead, fastest onset-to-breach, and the short leads.

    ``short_leads`` counts the series warned less than ``LEAD_TARGET_MIN`` ahead (or not at all);
    ``short_within_min`` is the slowest onset-to-breach among them: every series that took longer to
    breach got the full warning.
    """
    out: dict[str, dict] = {}
    for rate in sorted({row["rate_c_per_h"] for row in summary["series"] if row["rate_c_per_h"] is not None}):
        rows = [row for row in summary["series"] if row["rate_c_per_h"] == rate]
        values = lead_values(rows)
        short = [row["onset_to_breach_min"] for row, v in zip(rows, values) if v < LEAD_TARGET_MIN]
        out[f"{rate:g}"] = {"series": len(rows), "lead_median_min": statistics.median(values),
                            "lead_worst_min": min(values),
                            "fastest_onset_to_breach_min": min(row["onset_to_breach_min"] for row in rows),
                            "meets_target": min(values) >= LEAD_TARGET_MIN,
                            "short_leads": len(short), "short_within_min": max(short) if short else None}
    return out


def run_all(seeds: int = 4, week: bool = True, cost_racks: int = 10_000, workers: int = 2,
            generator_seeds: int = 2) -> dict:
    settings = Settings()
    report: dict = {"settings": {k: v for k, v in settings.model_dump().items() if k.startswith("forecast_")},
                    "alert": {"horizon_min": settings.forecast_horizon_min, "for_s": ALERT_FOR_S,
                              "keep_firing_for_s": ALERT_KEEP_FIRING_S,
                              "missing_evals_to_resolve": ALERT_MISSING_EVALS_TO_RESOLVE,
                              "interval_s": ALERT_INTERVAL_S, "query_range_s": ALERT_QUERY_RANGE_S},
                    "source": "bridge.simulator.hall",
                    "scenarios": {}}
    seed_range = range(1, seeds + 1)
    jobs = {
        "cooling_failure": [("cooling", seed, rate) for seed in seed_range for rate in COOLING_RATES],
        "hotspot": [("hotspot", seed, HOTSPOT_RATES) for seed in range(1, 2 * seeds + 1)],
        "steep_cooling_failure": [("cooling", seed, rate) for seed in seed_range for rate in STEEP_RATES],
        "steep_hotspot": [("hotspot", seed, STEEP_RATES) for seed in seed_range],
        "stuck_silent": [("faults", seed, None) for seed in seed_range],
    }
    flat = [(name, job) for name, js in jobs.items() for job in js]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_event_job, [job for _, job in flat])
        week_chunks = pool.map(_sim_week_chunk, [(WEEK_SEED, [r.name for r in hall.racks][c::workers * 2], {})
                                                 for hall in [sim.build_hall(40, 2, 4, WEEK_SEED)]
                                                 for c in range(workers * 2)]) if week else []
    runs = {name: [r for (n, _), r in zip(flat, results) if n == name] for name in jobs}
    for name in LEAD_SCENARIOS:
        report["scenarios"][name] = summarize(runs[name])
        report["scenarios"][name]["by_rate"] = by_rate(report["scenarios"][name])
    report["scenarios"]["stuck_silent"] = stuck_silent_report(runs["stuck_silent"])
    if week:
        fired = [a for c in week_chunks for a in false_alerts(c)]
        racks = sum(c.racks for c in week_chunks)
        report["scenarios"]["normal_week"] = {
            "racks": racks,
            "simulated_days": 7,
            "readings": sum(c.readings for c in week_chunks),
            "glitches": {"spike_share": WEEK_GLITCHES.spike_share, "spike_c": WEEK_GLITCHES.spike_c,
                         "lost_share": WEEK_GLITCHES.lost_share},
            "spiked_readings": sum(c.spikes for c in week_chunks),
            "lost_reports": sum(c.lost for c in week_chunks),
            "real_breaches": sum(len(c.breaches) for c in week_chunks),
            "false_alerts": len(fired),
            "false_alerts_per_40_racks_per_week": len(fired) * 40 / racks,
            "false_alert_times": [{"t": t, "rack": r, "position": p} for t, r, p in fired],
            "wall_s": sum(c.wall_s for c in week_chunks),
        }
    if generator_seeds:
        for name, make in (("generator_cooling_failure", cooling_failure_hall), ("generator_hot_spot", hot_spot_hall)):
            gen_runs = [simulate_generator(make(seed), WARMUP_S + 3 * 3600, settings, scenario=name)
                        for seed in range(1, generator_seeds + 1)]
            report["scenarios"][name] = summarize(gen_runs)
    if cost_racks:
        report["cost"] = measure_cost(cost_racks, settings)
    return report


def _event_job(job: tuple[str, int, object]) -> RunResult:
    kind, seed, rate = job
    settings = Settings()
    if kind == "cooling":
        return cooling_failure_run(seed, rate, settings)  # type: ignore[arg-type]
    if kind == "hotspot":
        return hotspot_run(seed, rate, settings)  # type: ignore[arg-type]
    return stuck_silent_run(seed, settings)


def verdicts(report: dict) -> dict[str, bool]:
    sc = report["scenarios"]
    out = {}
    for name, rates in (("cooling_failure", COOLING_RATES), ("hotspot", HOTSPOT_RATES)):
        s = sc[name]
        worst = s["lead_worst_min"]
        out[f"simulator {name} at {min(rates):g}-{max(rates):g} °C/h: every lead >= {LEAD_TARGET_MIN:.0f} min "
            f"({s['breaching_series']} breaches)"] = (s["breaching_series"] > 0 and worst is not None
                                                      and worst >= LEAD_TARGET_MIN)
    if "normal_week" in sc:
        out[f"simulator normal_week: < {FALSE_ALERT_TARGET:.0f} false alert per 40 racks per week"] = (
            sc["normal_week"]["false_alerts_per_40_racks_per_week"] < FALSE_ALERT_TARGET)
    s = sc["stuck_silent"]
    out[f"simulator stuck/silent in a room failing at {s['room_rate_c_per_h']:g} °C/h: no alert on the "
        f"{s['faulty_series']} faulty sensors, all {s['healthy_series']} healthy ones fire"] = (
        s["faulty_series"] > 0 and s["alerts_on_faulty_series"] == 0
        and s["healthy_series"] > 0 and s["healthy_series_fired"] == s["healthy_series"])
    return out


def _m(v: float | None) -> str:
    return "-" if v is None else ("missed" if v == -math.inf else f"{v:.1f}")


def format_table(report: dict) -> str:
    sc = report["scenarios"]
    lines = ["forecast evaluation on bridge.simulator.hall (simulated time; alert: 0 < minutes_to_recommended < "
             f"{report['alert']['horizon_min']:.0f} for {report['alert']['for_s']:.0f} s, keeps firing "
             f"{report['alert']['keep_firing_for_s'] / 60:.0f} min)", "",
             f"{'scenario':<27}{'runs':>5}{'breaches':>9}{'onset→breach min':>18}{'lead median':>12}{'lead worst':>11}"
             f"{'no-breach alerts':>17}{'refires':>8}{'wall s':>8}"]
    steep = f"{min(STEEP_RATES):g}-{max(STEEP_RATES):g}"
    notes = {"steep_cooling_failure": f"  (info: rate={steep}; {max(STEEP_RATES):g} is a total loss)",
             "steep_hotspot": f"  (info: rate={steep})",
             "generator_cooling_failure": "  (info: own minimal generator)",
             "generator_hot_spot": "  (info: own minimal generator)"}
    if "stuck_silent" in sc:
        s = sc["stuck_silent"]
        # Its breaches, leads and no-breach alerts are the healthy sensors'; the faulty ones are counted apart.
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(s["faulty_series_by_kind"].items()))
        notes["stuck_silent"] = (f"  (healthy sensors of a room at {s['room_rate_c_per_h']:g} °C/h: "
                                 f"{s['healthy_series_fired']}/{s['healthy_series']} fired; {s['faulty_series']} "
                                 f"faulty ({kinds}): {s['alerts_on_faulty_series']} alerted, end status "
                                 f"{', '.join(s['final_status_of_faulty'])})")
    for name in TABLE_ORDER:
        if name not in sc:
            continue
        s = sc[name]
        rng = s["onset_to_breach_min_range"]
        span = f"{rng[0]:.0f}–{rng[1]:.0f}" if rng else "-"
        lines.append(f"{name:<27}{s['runs']:>5}{s['breaching_series']:>9}{span:>18}{_m(s['lead_median_min']):>12}"
                     f"{_m(s['lead_worst_min']):>11}{s['false_alerts']:>17}{s['refires']:>8}{s['wall_s']:>8.1f}"
                     f"{notes.get(name, '')}")
    if "normal_week" in sc:
        w = sc["normal_week"]
        g = w["glitches"]
        lines.append(f"{'normal_week':<27}{1:>5}{w['real_breaches']:>9}{'':>18}{'':>12}{'':>11}{w['false_alerts']:>17}"
                     f"{'':>8}{w['wall_s']:>8.1f}  ({w['racks']} racks × 7 days: {w['false_alerts_per_40_racks_per_week']:.2f} "
                     f"false alerts per 40 racks per week; {w['spiked_readings']:,} readings spiked "
                     f"+{g['spike_c']:g} °C, {w['lost_reports']:,} reports lost)")
    lines += ["", f"lead by rate (°C/h at onset): {'rate':>6}{'breaches':>9}{'median':>8}{'worst':>8}"
              f"{'fastest onset→breach':>22}   >= {LEAD_TARGET_MIN:.0f} min   shorter leads"]
    for name in BY_RATE_ORDER:
        for rate, row in sc.get(name, {}).get("by_rate", {}).items():
            short = (f"{row['short_leads']}, all breaching within {row['short_within_min']:.1f} min of the onset"
                     if row["short_leads"] else "-")
            lines.append(f"  {name:<28}{rate:>6}{row['series']:>9}{_m(row['lead_median_min']):>8}"
                         f"{_m(row['lead_worst_min']):>8}{row['fastest_onset_to_breach_min']:>22.1f}   "
                         f"{'yes' if row['meets_target'] else 'no ':<6}   {short}")
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
    parser.add_argument("--seeds", type=int, default=4, help="seeds per scenario and rate")
    parser.add_argument("--generator-seeds", type=int, default=2,
                        help="runs of the own minimal generator, for information (0 = skip)")
    parser.add_argument("--no-week", action="store_true", help="skip the 7-day normal-operation run")
    parser.add_argument("--cost-racks", type=int, default=10_000, help="racks in the cost measurement (0 = skip)")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    report = run_all(args.seeds, week=not args.no_week, cost_racks=args.cost_racks, workers=args.workers,
                     generator_seeds=args.generator_seeds)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwritten {args.out}")
    return 0 if all(verdicts(report).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
