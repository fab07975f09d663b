"""A data hall's rack-inlet climate as a pure, deterministic function of (seed, time, scenarios).

Physics, kept simple but shaped like real rooms (domain.md):
- each room's cooling supplies cold-aisle air near 20-21 °C; a rack's bottom inlet sees supply plus a
  small rack-specific offset;
- the top inlet is warmer than the bottom by a rack-specific amount (~0.5-3 °C): hot exhaust recirculating
  over the top of the rack; the gap grows with IT load. A healthy hall keeps headroom: its hottest top
  inlet stays near 24 °C at the daily peak, about 3 °C under the recommended 27 °C. That headroom is
  what a failure eats before the limit, so it decides how much warning any forecast can give
  (``bridge.forecast.evaluate``);
- load follows a slow daily curve (peak mid-afternoon UTC): supply and top-bottom gap drift with it;
- the room air holds a fixed amount of water (its dew point, ~9.0-9.6 °C), so relative humidity follows
  from temperature: ~45-50 % at the bottom and a few percent less at the warmer top;
- sensor noise is Gaussian, drawn from a generator seeded by (seed, device, time), so the same inputs
  always give the same readings.

Scenarios are pure functions of the time since they started (see ``SCENARIOS``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

MAGNUS_BETA = 17.62
MAGNUS_LAMBDA = 243.12
DAY_S = 86400.0

SCENARIOS = {
    "cooling_failure": "a room loses part of its cooling (one CRAH of several): supply air warms at RATE °C/h "
                       "(default 6), levelling off RISE °C above normal (default 10); rate=30 is a total loss",
    "hotspot": "recirculation builds up at one rack: its top inlet warms at RATE °C/h (default 8), levelling off "
               "RISE °C above normal (default 8, +5 after an hour); the bottom barely moves",
    "silent": "one rack's device (or one position, target rack/top) stops reporting",
    "stuck": "one rack's top sensor (or target rack/bottom) repeats the value it had when the fault began",
    "humidity_excursion": "a room's humidifier runs away: dew point climbs at RATE °C/h (default 36) up to RISE °C "
                          "above normal (default 10)",
}
# Default (initial rate °C/h, final rise °C) of the scenarios that take ``rate=``/``rise=``.
# Rises follow a first-order approach ``rise·(1 − e^(−t·rate/rise))``: a room or a rack inlet settles
# at a new heat balance, so it starts at ``rate`` and slows down as it nears ``rise``.
RAMP_DEFAULTS = {
    "cooling_failure": (6.0, 10.0),
    "hotspot": (8.0, 8.0),
    "humidity_excursion": (36.0, 10.0),
}
ROOM_SCENARIOS = {"cooling_failure", "humidity_excursion"}


def rh_from_dew_point(temperature: float, dew_point: float) -> float:
    """Relative humidity (%) of air at ``temperature`` holding water for ``dew_point`` (Magnus)."""
    gamma_d = MAGNUS_BETA * dew_point / (MAGNUS_LAMBDA + dew_point)
    gamma_t = MAGNUS_BETA * temperature / (MAGNUS_LAMBDA + temperature)
    return min(100.0, 100.0 * math.exp(gamma_d - gamma_t))


def room_name(index: int) -> str:
    return f"hall{index + 1}"


def row_name(index: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[index]


def device_name(room: str, row: str, position_in_row: int) -> str:
    """Rack device name: ``hall1-a01``; rack name = device name (mapping pattern in README)."""
    return f"{room}-{row}{position_in_row:02d}"


# The bridge's mapping for these names (the demo's RACKTWIN_CONFIG uses exactly this).
DEVICE_PATTERN = r"(?P<rack>(?P<room>hall\d+)-(?P<row>[a-z])\d{2,})"


@dataclass(frozen=True)
class Rack:
    name: str  # device name = rack name
    room: str
    row: str
    position_in_row: int
    bottom_offset: float  # °C above room supply at the bottom inlet
    top_gap: float  # °C top above bottom at average load
    noise: float  # sensor noise sigma, °C


@dataclass(frozen=True)
class Room:
    name: str
    supply_c: float  # cold-aisle supply at average load
    dew_point_c: float


@dataclass(frozen=True)
class Scenario:
    kind: str
    target: str  # room name, rack name, or rack/position
    start_ts: float  # epoch seconds
    rate_c_per_h: float | None = None  # initial rise per hour (RAMP_DEFAULTS kinds only)
    rise_c: float | None = None  # where the rise levels off

    def label(self) -> str:
        """Identity on the control endpoint: one scenario per kind and target."""
        return f"{self.kind}:{self.target}"

    def spec(self) -> str:
        """The label with its options, as ``parse_scenario`` reads it (without the delay)."""
        if self.rate_c_per_h is None:
            return self.label()
        return f"{self.label()},rate={self.rate_c_per_h:g},rise={self.rise_c:g}"

    def offset(self, ts: float) -> float:
        """The scenario's rise at ``ts`` (°C): 0 before it starts, then ``rise·(1 − e^(−t·rate/rise))``."""
        elapsed = ts - self.start_ts
        if elapsed <= 0 or not self.rate_c_per_h or not self.rise_c:
            return 0.0
        return self.rise_c * -math.expm1(-elapsed * self.rate_c_per_h / 3600.0 / self.rise_c)


@dataclass(frozen=True)
class Hall:
    seed: int
    rooms: tuple[Room, ...]
    racks: tuple[Rack, ...]
    site: str = "site1"
    by_name: dict[str, Rack] = field(default_factory=dict, compare=False, repr=False)

    def rack(self, name: str) -> Rack:
        return self.by_name[name]

    def room(self, name: str) -> Room:
        return next(r for r in self.rooms if r.name == name)


def build_hall(racks: int = 40, rooms: int = 2, rows: int = 4, seed: int = 1, site: str = "site1") -> Hall:
    """Spread ``racks`` over rooms x rows as evenly as possible (row-major: hall1-a, hall1-b, ...)."""
    cells = [(room_name(r), row_name(w)) for r in range(rooms) for w in range(rows)]
    counts = [racks // len(cells) + (1 if i < racks % len(cells) else 0) for i in range(len(cells))]
    room_list = []
    for r in range(rooms):
        rng = random.Random(f"{seed}:room:{r}")
        room_list.append(Room(room_name(r), supply_c=round(rng.uniform(19.8, 20.8), 2),
                              dew_point_c=round(rng.uniform(9.0, 9.6), 2)))
    rack_list = []
    for (room, row), count in zip(cells, counts):
        for n in range(1, count + 1):
            name = device_name(room, row, n)
            rng = random.Random(f"{seed}:rack:{name}")
            # Racks at the ends of a row recirculate more (air wraps around the row end).
            end_of_row = n in (1, count)
            rack_list.append(Rack(name, room, row, n, bottom_offset=round(rng.uniform(-0.3, 0.5), 2),
                                  top_gap=round(rng.uniform(0.6, 1.6) + (0.8 if end_of_row else 0.0), 2),
                                  noise=round(rng.uniform(0.05, 0.12), 3)))
    hall = Hall(seed, tuple(room_list), tuple(rack_list), site)
    hall.by_name.update({r.name: r for r in rack_list})
    return hall


def load_factor(ts: float) -> float:
    """IT load 0..1 over the day: lowest ~04:00 UTC, highest ~16:00 UTC."""
    phase = ((ts % DAY_S) / DAY_S - 4 / 24) * 2 * math.pi
    return 0.5 - 0.5 * math.cos(phase)


def _active(scenarios: list[Scenario], ts: float) -> list[Scenario]:
    return [s for s in scenarios if s.start_ts <= ts]


def _target_rack_position(target: str) -> tuple[str, str | None]:
    rack, _, position = target.partition("/")
    return rack, position or None


def room_state(hall: Hall, room: Room, ts: float, scenarios: list[Scenario]) -> tuple[float, float]:
    """(supply °C, dew point °C) of a room at ``ts``."""
    load = load_factor(ts)
    supply = room.supply_c + 0.6 * (load - 0.5)
    dew = room.dew_point_c
    for s in _active(scenarios, ts):
        if s.target != room.name:
            continue
        if s.kind == "cooling_failure":
            supply += s.offset(ts)
        elif s.kind == "humidity_excursion":
            dew += s.offset(ts)
    return supply, dew


def true_values(hall: Hall, rack: Rack, ts: float, scenarios: list[Scenario]) -> dict[str, float]:
    """Noise-free values at the rack's sensors (what ``reading`` adds noise and faults to)."""
    room = hall.room(rack.room)
    supply, dew = room_state(hall, room, ts, scenarios)
    bottom = supply + rack.bottom_offset
    gap = rack.top_gap * (0.7 + 0.6 * load_factor(ts))
    for s in _active(scenarios, ts):
        if s.kind == "hotspot" and _target_rack_position(s.target)[0] == rack.name:  # the top, whatever /position
            rise = s.offset(ts)
            gap += rise
            bottom += rise / 16.0  # a little of the warm air reaches the bottom too
    top = bottom + gap
    return {"tempTop": top, "tempBottom": bottom, "humidityTop": rh_from_dew_point(top, dew),
            "humidityBottom": rh_from_dew_point(bottom, dew)}


def _noisy(hall: Hall, rack: Rack, ts: float, values: dict[str, float]) -> dict[str, float]:
    rng = random.Random(f"{hall.seed}:{rack.name}:{round(ts * 1000)}")
    out = {}
    for key in ("tempTop", "tempBottom", "humidityTop", "humidityBottom"):
        sigma = rack.noise if key.startswith("temp") else rack.noise * 3
        out[key] = round(values[key] + rng.gauss(0.0, sigma), 2)
    return out


def reading(hall: Hall, rack_name: str, ts: float, scenarios: list[Scenario] = ()) -> dict[str, float] | None:
    """The values the rack's device reports at ``ts``; keys may be missing, None if the device is silent."""
    scenarios = list(scenarios)
    rack = hall.rack(rack_name)
    values = _noisy(hall, rack, ts, true_values(hall, rack, ts, scenarios))
    for s in _active(scenarios, ts):
        target, position = _target_rack_position(s.target)
        if target != rack.name:
            continue
        suffix = "Bottom" if position == "bottom" else "Top"
        if s.kind == "stuck":
            frozen = _noisy(hall, rack, s.start_ts, true_values(hall, rack, s.start_ts, scenarios))
            values[f"temp{suffix}"] = frozen[f"temp{suffix}"]
            values[f"humidity{suffix}"] = frozen[f"humidity{suffix}"]
        elif s.kind == "silent":
            if position is None:
                return None
            values.pop(f"temp{suffix}", None)
            values.pop(f"humidity{suffix}", None)
    return values


def sample(hall: Hall, ts: float, scenarios: list[Scenario] = ()) -> dict[str, dict[str, float]]:
    """Every reporting device's values at ``ts``."""
    out = {}
    for rack in hall.racks:
        values = reading(hall, rack.name, ts, scenarios)
        if values:
            out[rack.name] = values
    return out


class ScenarioError(ValueError):
    pass


SCENARIO_SYNTAX = "KIND[:TARGET][,rate=C_PER_H][,rise=C][@DELAY_S]"


def parse_scenario(spec: str, hall: Hall, now: float) -> Scenario:
    """``KIND[:TARGET][,rate=R][,rise=D][@DELAY_S]``, starting DELAY_S seconds after ``now`` (default 0,
    negative = already running). Default targets: the first room, or the third rack of the first row
    (a rack in the middle, away from row-end effects). ``rate`` (°C/h at the start) and ``rise`` (°C
    where it levels off) apply to the kinds in ``RAMP_DEFAULTS``; e.g. ``cooling_failure:hall1,rate=3``
    is a slow partial loss, ``cooling_failure:hall1,rate=30`` a total one."""
    text, _, start = spec.strip().partition("@")
    start, *late_options = start.split(",")  # also accept KIND:TARGET@DELAY,rate=...
    head, *options = text.split(",")
    options += late_options
    kind, _, target = head.partition(":")
    kind = kind.strip().replace("-", "_")
    if kind not in SCENARIOS:
        raise ScenarioError(f"unknown scenario {kind!r}; known: {', '.join(sorted(SCENARIOS))}")
    try:
        offset = float(start) if start.strip() else 0.0
    except ValueError:
        raise ScenarioError(f"{spec!r}: start after '@' must be seconds") from None
    rate = rise = None
    if kind in RAMP_DEFAULTS:
        rate, rise = RAMP_DEFAULTS[kind]
    for option in (o.strip() for o in options):
        key, _, value = option.partition("=")
        key = key.strip()
        if rate is None or key not in ("rate", "rise"):
            allowed = "rate=, rise=" if rate is not None else "no options"
            raise ScenarioError(f"{spec!r}: unknown option {option!r} for {kind} ({allowed})")
        try:
            number = float(value)
        except ValueError:
            raise ScenarioError(f"{spec!r}: {key} must be a number") from None
        if not 0 < number <= 1000:
            raise ScenarioError(f"{spec!r}: {key} must be above 0 and at most 1000")
        rate, rise = (number, rise) if key == "rate" else (rate, number)
    target = target.strip()
    if kind in ROOM_SCENARIOS:
        target = target or hall.rooms[0].name
        if target not in {r.name for r in hall.rooms}:
            raise ScenarioError(f"{spec!r}: no room {target!r}")
    else:
        target = target or hall.racks[min(2, len(hall.racks) - 1)].name
        rack, position = _target_rack_position(target)
        if rack not in hall.by_name or position not in (None, "top", "bottom"):
            raise ScenarioError(f"{spec!r}: no rack {target!r} (rack or rack/top or rack/bottom)")
    return Scenario(kind, target, now + offset, rate, rise)
