"""The rack twin model: what a Ditto thing holds and how readings become merge patches. Pure.

Thing ``<namespace>:<rack>``::

    attributes: {site, room, row, rack, tbDevices: {top: <device>, bottom: <device>}}
    features.environment.properties:
        tempTop, tempBottom, humidityTop, humidityBottom   (our users' field names)
        dewPointTop, dewPointBottom                         (Magnus, °C)
        deltaT                                              (tempTop - tempBottom)
        tsTop, tsBottom                                     (source time, ISO 8601 UTC, ms)
        envelope                                            (the rack's state: rack_state, e.g. OK, WARM, SILENT)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from .mapping import POSITIONS, Position, RackLocation, SensorReading
from .thresholds import DEFAULT_CLASS, DEFAULT_RH_CAP, ENVELOPE_CRITICAL, SILENT, envelope_state, worst_state

FEATURE = "environment"
PROPS_PATH = f"features/{FEATURE}/properties"

# Magnus constants over liquid water, valid -45..60 °C (Sensirion, Sonntag 1990; domain.md).
MAGNUS_BETA = 17.62
MAGNUS_LAMBDA = 243.12

SUFFIX: dict[Position, str] = {"top": "Top", "bottom": "Bottom"}


def dew_point(temperature: float, humidity: float) -> float | None:
    """Dew point in °C by the Magnus formula; None where it is undefined (RH 0)."""
    if humidity <= 0 or temperature == -MAGNUS_LAMBDA:
        return None
    gamma = math.log(humidity / 100.0) + MAGNUS_BETA * temperature / (MAGNUS_LAMBDA + temperature)
    if gamma == MAGNUS_BETA:  # only for values no sensor sends (a twin edited by hand): undefined, not a crash
        return None
    return round(MAGNUS_LAMBDA * gamma / (MAGNUS_BETA - gamma), 2)


def iso_ms(ts_ms: int) -> str:
    """Fixed-width ISO 8601 UTC, so Ditto's string comparison orders timestamps correctly."""
    secs, ms = divmod(ts_ms, 1000)
    t = time.gmtime(secs)  # half the cost of datetime + strftime, on every twin update twice
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, ms)


def parse_iso_ms(text: str) -> int | None:
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return round(dt.timestamp() * 1000)


def thing_id(namespace: str, rack: str) -> str:
    return f"{namespace}:{rack}"


def thing_path(tid: str) -> str:
    """URL path of a thing; the name part may hold spaces and other characters that need escaping."""
    return "/api/2/things/" + quote(tid, safe=":")


@dataclass(frozen=True, slots=True)
class PositionState:
    """Newest values of one sensor position as the bridge knows them (as sent, unrounded)."""

    ts_ms: int
    temperature: float | None = None
    humidity: float | None = None
    device: str | None = None
    # The timestamp as the twin holds it, where read from one: Ditto compares the strings, and one written by
    # hand or another tool ("…:00Z", "+00:00") need not be ours (iso_ms) for the same instant.
    ts_text: str | None = field(default=None, compare=False)


# The twin holds temperature and RH to a tenth (°C, %), what such sensors resolve and finer than they are accurate
# (InfluxDB keeps what was sent): Grafana shows a wall tile's numbers as the raw text of the twin's values, with
# no decimals setting of its own, and the tile has room for no more. Only the written values are rounded: the
# envelope state, dew point and top − bottom difference come from the values as sent, as the alert rules' do
# from InfluxDB, so a tile does not read OK while a rule fires on 27.04 °C (but a position known only from the
# twin, read back after a restart, has its tenths until its next reading).
TEMPERATURE_DECIMALS, HUMIDITY_DECIMALS = 1, 1


def _rounded(value: float | None, decimals: int) -> float | None:
    return None if value is None else float(round(value, decimals))


def merge_reading(state: PositionState | None, reading: SensorReading) -> PositionState:
    """Fold a newer reading into a position; fields it lacks keep their value (as a merge-PATCH would)."""
    fresh = PositionState(reading.ts_ms, reading.temperature, reading.humidity, reading.device)
    return fresh if state is None else newest_of(fresh, state)


def newest_of(a: PositionState, b: PositionState) -> PositionState:
    """The newer of two states of one position; fields it lacks come from the older (as a merge-PATCH would)."""
    newer, older = (a, b) if a.ts_ms >= b.ts_ms else (b, a)
    return PositionState(
        ts_ms=newer.ts_ms,
        temperature=newer.temperature if newer.temperature is not None else older.temperature,
        humidity=newer.humidity if newer.humidity is not None else older.humidity,
        device=newer.device or older.device,
        ts_text=newer.ts_text or (older.ts_text if older.ts_ms == newer.ts_ms else None),
    )


def attributes_for(location: RackLocation, devices: dict[Position, str]) -> dict[str, Any]:
    return {
        "site": location.site,
        "room": location.room,
        "row": location.row,
        "rack": location.rack,
        "tbDevices": dict(sorted(devices.items())),
    }


def position_properties(position: Position, state: PositionState) -> dict[str, Any]:
    sfx = SUFFIX[position]
    props: dict[str, Any] = {f"ts{sfx}": iso_ms(state.ts_ms)}
    if state.temperature is not None:
        props[f"temp{sfx}"] = _rounded(state.temperature, TEMPERATURE_DECIMALS)
    if state.humidity is not None:
        props[f"humidity{sfx}"] = _rounded(state.humidity, HUMIDITY_DECIMALS)
    if state.temperature is not None and state.humidity is not None:
        dp = dew_point(state.temperature, state.humidity)
        if dp is not None:
            props[f"dewPoint{sfx}"] = dp
    return props


def delta_t(known: dict[Position, PositionState]) -> float | None:
    top, bottom = known.get("top"), known.get("bottom")
    if top is None or bottom is None or top.temperature is None or bottom.temperature is None:
        return None
    return round(top.temperature - bottom.temperature, 2)


def envelope(known: dict[Position, PositionState], ashrae_class: str, rh_cap: float) -> str:
    """The rack's worst envelope state over both positions (bridge/thresholds.py), e.g. "OK", "HUMID", "HOT"."""
    states = []
    for state in known.values():
        t, rh = state.temperature, state.humidity
        dp = dew_point(t, rh) if t is not None and rh is not None else None
        states.append(envelope_state(t, rh, dp, ashrae_class, rh_cap))
    return worst_state(states)


def rack_state(known: dict[Position, PositionState], ashrae_class: str, rh_cap: float,
               silent_since_ms: int | None = None) -> str:
    """The rack tile's state: its envelope, or SILENT where a position's newest reading is older than
    ``silent_since_ms`` (epoch ms; None: not judged) and the envelope is not outside the allowable class."""
    state = envelope(known, ashrae_class, rh_cap)
    if silent_since_ms is not None and state not in ENVELOPE_CRITICAL and any(
            s.ts_ms < silent_since_ms for s in known.values()):
        return SILENT
    return state


def silent_patch() -> dict[str, Any]:
    return {"features": {FEATURE: {"properties": {"envelope": SILENT}}}}


def nothing_newer(known: dict[Position, PositionState], positions: tuple[Position, ...] | list[Position]) -> list[str]:
    """RQL parts that hold only while the twin has no newer reading at ``positions`` than ``known`` (none at all
    where ``known`` has none): written by another replica, it would make a SILENT judged from ``known`` wrong."""
    parts = []
    for position in positions:
        path = f"{PROPS_PATH}/ts{SUFFIX[position]}"
        if position in known:
            state = known[position]
            parts.append(f'le({path},"{state.ts_text or iso_ms(state.ts_ms)}")')
        else:
            parts.append(f"not(exists({path}))")
    return parts


def all_of(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"and({','.join(parts)})"


def unchanged_condition(known: dict[Position, PositionState]) -> str:
    """RQL that holds only while the twin's positions are no newer than ``known`` (no reading written since, by
    this bridge or another replica): a rack marked silent must really have had none."""
    return all_of(nothing_newer(known, POSITIONS))


def envelope_of(thing: dict[str, Any]) -> str | None:
    """The envelope state a thing JSON holds, if any."""
    value = _properties(thing).get("envelope")
    return value if isinstance(value, str) else None


def _properties(thing: Any) -> dict[str, Any]:
    """features.environment.properties of a thing JSON; {} where anyone with WRITE made it another shape."""
    return _object(_object(_object(_object(thing).get("features")).get(FEATURE)).get("properties"))


def build_patch(
    pending: dict[Position, PositionState],
    known: dict[Position, PositionState],
    attributes: dict[str, Any] | None,
    limits: tuple[str, float] = (DEFAULT_CLASS, DEFAULT_RH_CAP),
    silent_since_ms: int | None = None,
) -> dict[str, Any]:
    """Merge-patch body for the pending positions; ``known`` already includes them. ``limits`` = (ASHRAE class,
    recommended RH cap) and ``silent_since_ms`` (rack_state) for the rack's state."""
    props: dict[str, Any] = {}
    for position in POSITIONS:
        if position in pending:
            props.update(position_properties(position, pending[position]))
    dt = delta_t(known)
    if dt is not None and any(pending[p].temperature is not None for p in pending):
        props["deltaT"] = dt
    if pending:
        props["envelope"] = rack_state(known, *limits, silent_since_ms)
    patch: dict[str, Any] = {"features": {FEATURE: {"properties": props}}}
    if attributes is not None:
        patch["attributes"] = attributes
    return patch


def newer_than_condition(pending: dict[Position, PositionState]) -> str:
    """RQL that holds only where no pending position is older than the twin's (or the twin has none). Equal
    is allowed: a device may send temperature and humidity as two messages with one timestamp, and the second
    must still reach the twin (``drop_stale`` has merged it with what the twin holds)."""
    parts = []
    for position in POSITIONS:
        if position in pending:
            path = f"{PROPS_PATH}/ts{SUFFIX[position]}"
            parts.append(f'or(not(exists({path})),le({path},"{iso_ms(pending[position].ts_ms)}"))')
    return all_of(parts)


def older_than_filter(since_ms: int) -> str:
    """RQL for the search: twins with a position whose timestamp is older than ``since_ms`` (text compared, as
    Ditto compares the twin's strings; our ISO form sorts as time)."""
    return "or(" + ",".join(f'lt({PROPS_PATH}/ts{SUFFIX[p]},"{iso_ms(since_ms)}")' for p in POSITIONS) + ")"


def known_from_thing(thing: dict[str, Any]) -> dict[Position, PositionState]:
    """Read the twin's per-position state back from a thing JSON (as GET returns it)."""
    # Anyone with WRITE on the twin may have edited it into another shape: read what fits, skip the rest.
    props = _properties(thing)
    devices = _object(_object(_object(thing).get("attributes")).get("tbDevices"))
    known: dict[Position, PositionState] = {}
    for position in POSITIONS:
        sfx = SUFFIX[position]
        text = props.get(f"ts{sfx}")
        ts = parse_iso_ms(text) if isinstance(text, str) else None
        if ts is None:
            continue
        known[position] = PositionState(
            ts_ms=ts,
            temperature=_num(props.get(f"temp{sfx}")),
            humidity=_num(props.get(f"humidity{sfx}")),
            device=devices.get(position) if isinstance(devices.get(position), str) else None,
            ts_text=text,
        )
    return known


def location_of(thing: dict[str, Any]) -> RackLocation:
    """The rack's place as a thing JSON's attributes hold it; "" for what is missing or not text."""
    attributes = _object(_object(thing).get("attributes"))
    return RackLocation(*(value if isinstance(value := attributes.get(key), str) else ""
                          for key in ("site", "room", "row", "rack")))


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def new_thing_body(policy_id: str, attributes: dict[str, Any]) -> dict[str, Any]:
    return {"policyId": policy_id, "attributes": attributes, "features": {FEATURE: {"properties": {}}}}


def policy_body(subjects: dict[str, list[str]]) -> dict[str, Any]:
    """The shared policy: admin manages policy and things, the bridge writes things, readers read."""
    grants = {
        "admin": {"policy:/": ["READ", "WRITE"], "thing:/": ["READ", "WRITE"]},
        # The bridge creates the policy when it is missing, so it must keep WRITE on it (Ditto refuses lock-out).
        "bridge": {"policy:/": ["READ", "WRITE"], "thing:/": ["READ", "WRITE"]},
        "reader": {"thing:/": ["READ"]},
    }
    entries = {}
    for label, resources in grants.items():
        subs = subjects.get(label, [])
        if not subs:
            continue
        entries[label] = {
            "subjects": {s: {"type": "racktwin"} for s in subs},
            "resources": {r: {"grant": g, "revoke": []} for r, g in resources.items()},
        }
    return {"entries": entries}


def drop_stale(
    pending: dict[Position, PositionState], twin: dict[Position, PositionState]
) -> tuple[dict[Position, PositionState], list[Position]]:
    """Split pending positions into those that still change the twin and those it already has or beats. At an
    equal timestamp a position changes the twin only if it brings a value the twin lacks or holds otherwise
    (the other half of a reading sent as two messages); it then goes merged with the twin's."""
    fresh: dict[Position, PositionState] = {}
    stale: list[Position] = []
    for position, state in pending.items():
        current = twin.get(position)
        if current is None or current.ts_ms < state.ts_ms:
            fresh[position] = state
        elif current.ts_ms == state.ts_ms and _adds_to(state, current):
            fresh[position] = newest_of(state, current)
        else:
            stale.append(position)
    return fresh, stale


def _adds_to(state: PositionState, current: PositionState) -> bool:
    # Compared as the twin holds them: the twin read back from Ditto has rounded values, ours may not be.
    return any(new is not None and _rounded(new, d) != _rounded(old, d) for new, old, d in
               ((state.temperature, current.temperature, TEMPERATURE_DECIMALS),
                (state.humidity, current.humidity, HUMIDITY_DECIMALS)))
