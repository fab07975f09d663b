"""Map decoded telemetry groups to rack sensor readings and validate them. Pure functions.

A message is accepted whole or rejected whole: if any value in it is bad, nothing of it is
written, so a sink never holds half of a device's report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from .config import MappingConfig, Settings
from .decode import Rejected, TelemetryGroup

Position = Literal["top", "bottom"]
POSITIONS: tuple[Position, Position] = ("top", "bottom")

# Ditto thing names: anything but '/' and the control ranges \x00-\x1F, \x7F-\xFF (ditto.md §2).
_DITTO_NAME = re.compile(r"^[^\x00-\x1F\x7F-\xFF/]+$")
MAX_THING_ID = 256


@dataclass(frozen=True, slots=True)
class RackLocation:
    site: str
    room: str
    row: str
    rack: str


@dataclass(frozen=True, slots=True)
class SensorReading:
    """One validated reading of one sensor position of one rack."""

    location: RackLocation
    position: Position
    device: str
    ts_ms: int
    temperature: float | None
    humidity: float | None

    @property
    def rack(self) -> str:
        return self.location.rack


class Mapper:
    """Holds the compiled mapping; ``map_group`` is the pure per-message function."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.mapping: MappingConfig = settings.mapping
        self.pattern = re.compile(self.mapping.device_pattern)
        self.device_types = frozenset(self.mapping.device_types)
        # alias -> (position or None, quantity)
        self.key_index: dict[str, tuple[Position | None, str]] = {}
        if self.mapping.mode == "per_rack":
            for field, aliases in self.mapping.rack_keys.items():
                quantity = "temperature" if field.startswith("temp") else "humidity"
                position: Position = "top" if field.endswith("Top") else "bottom"
                for alias in aliases:
                    self.key_index[alias] = (position, quantity)
        else:
            for quantity, aliases in self.mapping.sensor_keys.items():
                for alias in aliases:
                    self.key_index[alias] = (None, quantity)
        self.max_name = MAX_THING_ID - len(settings.ditto_namespace) - 1
        # device -> where ThingsBoard's server attributes put it (racktwin sync); checked before the pattern.
        self.placements: dict[str, tuple[RackLocation, Position | None]] = {}

    def replace_mapping(self, mapping: MappingConfig) -> None:
        """Swap in rack metadata learnt at run time (ThingsBoard sync); one attribute store, so thread-safe."""
        self.mapping = mapping

    def replace_placements(self, placements: dict[str, tuple[RackLocation, Position | None]]) -> None:
        """Swap in the devices ThingsBoard's attributes place (rack, and top/bottom of per-sensor devices), so live
        readings land where `racktwin sync` put the twins; one attribute store, so thread-safe."""
        self.placements = placements

    def _check_rack(self, rack: str) -> None:
        if not rack or not _DITTO_NAME.match(rack) or len(rack) > self.max_name:
            raise Rejected("invalid_rack_name", f"rack {rack[:80]!r} is not a legal Ditto thing name")

    @cached_property
    def _ranges(self) -> dict[str, tuple[float, float]]:
        s = self.settings
        return {"temperature": (s.temp_min_c, s.temp_max_c), "humidity": (s.humidity_min_pct, s.humidity_max_pct)}

    def locate(self, device: str) -> tuple[RackLocation, Position | None]:
        placed = self.placements.get(device)
        if placed is not None:
            location, position = placed
            self._check_rack(location.rack)
            return location, position if self.mapping.mode == "per_sensor" else None
        match = self.pattern.fullmatch(device)
        if not match:
            raise Rejected("unknown_device", f"device {device[:80]!r} does not match device_pattern")
        groups = match.groupdict()
        rack = groups.get("rack") or ""
        self._check_rack(rack)
        meta = self.mapping.racks.get(rack)
        if meta is None and self.mapping.only_listed_racks:
            raise Rejected("unknown_device", f"rack {rack!r} is not listed in the mapping")
        position = groups.get("position")
        if self.mapping.mode == "per_sensor" and position not in POSITIONS:
            raise Rejected("unknown_device", f"device {device[:80]!r}: position {position!r} is not top or bottom")

        def pick(name: str, default: str) -> str:
            from_meta = getattr(meta, name, None) if meta else None
            return from_meta or groups.get(name) or default

        location = RackLocation(
            site=pick("site", self.mapping.default_site),
            room=pick("room", self.mapping.default_room),
            row=pick("row", self.mapping.default_row),
            rack=rack,
        )
        return location, position  # type: ignore[return-value]

    def map_group(self, group: TelemetryGroup, now_ms: int) -> list[SensorReading]:
        if self.device_types and group.device_type is not None and group.device_type not in self.device_types:
            raise Rejected("unknown_device", f"device type {group.device_type[:60]!r} is not configured")
        location, device_position = self.locate(group.device)
        s = self.settings
        if group.ts_ms > now_ms + s.max_future_s * 1000:
            raise Rejected("ts_future", f"ts {group.ts_ms} is {(group.ts_ms - now_ms) / 1000:.0f} s in the future")
        if group.ts_ms < now_ms - s.max_age_s * 1000:
            seconds = " (in seconds? ThingsBoard's ts is in milliseconds)" if 0 < group.ts_ms < 10**11 else ""
            raise Rejected("ts_too_old", f"ts {group.ts_ms} is older than {s.max_age_s:.0f} s{seconds}")

        values: dict[Position, dict[str, float]] = {}
        for key, raw in group.values.items():
            target = self.key_index.get(key)
            if target is None:
                continue  # other telemetry of the device (battery, rssi...) is not ours to judge
            position = target[0] or device_position
            quantity = target[1]
            number = to_number(key, raw)
            low, high = self._ranges[quantity]
            if not low <= number <= high:
                raise Rejected("out_of_range", f"{key}={number} outside {low}..{high}")
            slot = values.setdefault(position, {})  # type: ignore[arg-type]
            if quantity in slot:
                raise Rejected("not_object", f"{quantity} of {position} given twice (key {key!r})")
            slot[quantity] = number
        if not values:
            raise Rejected("no_readings", f"no known keys among {sorted(group.values)[:6]}")
        return [
            SensorReading(location, pos, group.device, group.ts_ms, q.get("temperature"), q.get("humidity"))
            for pos, q in sorted(values.items())
        ]


def to_number(key: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise Rejected("non_numeric", f"{key} is a boolean")
    if isinstance(raw, str):
        try:
            number = float(raw.strip())
        except ValueError:
            raise Rejected("non_numeric", f"{key}={raw[:40]!r} is not a number") from None
    elif isinstance(raw, (int, float)):
        try:
            number = float(raw)
        except OverflowError:
            raise Rejected("not_finite", f"{key} is too large") from None
    else:
        raise Rejected("non_numeric", f"{key} has type {type(raw).__name__}")
    if not math.isfinite(number):
        raise Rejected("not_finite", f"{key}={raw!r} is not finite")
    return number
