"""Decode MQTT payloads into telemetry groups. Pure functions, no I/O.

Accepted forms (see README "Input"):
- the rule-engine envelope ``{"deviceName", "deviceType", "ts", "values": {...}}``;
- ThingsBoard device-API forms published straight to the broker: a flat object, ``{"ts", "values"}``,
  or a list of either; the device name is then the topic's last segment and ``ts`` defaults to
  the receive time;
- the gateway-API form ``{"<device>": [{"ts", "values"}, ...], ...}`` is *not* guessed from shape,
  because a flat object with string keys looks the same; it is accepted on topics ending in
  ``/gateway`` only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


class Rejected(Exception):
    """A message that can never succeed. ``reason`` is a short stable label used in metrics."""

    def __init__(self, reason: str, detail: str, device: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device = device  # when known: the log line's rate limit is per device


@dataclass(frozen=True, slots=True)
class TelemetryGroup:
    """One device's values at one timestamp, before mapping to racks."""

    device: str
    device_type: str | None
    ts_ms: int
    values: dict[str, Any]


MAX_DEPTH = 32  # deeper JSON is hostile, not telemetry


def parse_json(payload: bytes, max_bytes: int) -> Any:
    if len(payload) > max_bytes:
        raise Rejected("payload_too_large", f"{len(payload)} bytes > {max_bytes}")
    if _nesting_depth(payload) > MAX_DEPTH:
        raise Rejected("invalid_json", f"nested deeper than {MAX_DEPTH} levels")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_json", f"not UTF-8 at byte {exc.start}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants)
    except Rejected:
        raise
    except (ValueError, RecursionError) as exc:
        raise Rejected("invalid_json", str(exc)[:120]) from None


def _nesting_depth(payload: bytes) -> int:
    # A cheap upper bound that ignores brackets inside strings only loosely: enough to refuse
    # pathological nesting before json.loads recurses into it.
    openers = payload.count(b"{") + payload.count(b"[")
    if openers <= MAX_DEPTH:
        return openers  # cannot nest deeper than it opens (the common case: skips the byte loop)
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Rejected("invalid_json", f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise Rejected("not_finite", f"{name} is not a number")


def device_from_topic(topic: str) -> str:
    segment = topic.rsplit("/", 1)[-1]
    if not segment:
        raise Rejected("unknown_device", f"topic {topic!r} has an empty last segment and no deviceName")
    return segment


def parse_ts(value: Any) -> int:
    """Epoch milliseconds from an int, a float or a numeric string."""
    if isinstance(value, bool):
        raise Rejected("ts_invalid", "ts is a boolean")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise Rejected("ts_invalid", f"ts {value[:40]!r} is not a number") from None
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise Rejected("ts_invalid", "ts is not finite")
        if not 0 <= value < 1e14:
            raise Rejected("ts_invalid", f"ts {value} is not epoch milliseconds")
        return int(value)
    raise Rejected("ts_invalid", f"ts has type {type(value).__name__}")


def decode(topic: str, payload: bytes, received_ms: int, max_bytes: int) -> list[TelemetryGroup]:
    """Turn one MQTT message into telemetry groups, or raise Rejected."""
    doc = parse_json(payload, max_bytes)
    if topic.endswith("/gateway") and isinstance(doc, dict) and "values" not in doc:
        return _decode_gateway(doc, received_ms)
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise Rejected("no_readings", "empty list")
    groups = []
    for item in items:
        if not isinstance(item, dict):
            raise Rejected("not_object", f"expected a JSON object, got {type(item).__name__}")
        groups.append(_decode_object(item, topic, received_ms))
    return groups


def _decode_object(item: dict[str, Any], topic: str, received_ms: int) -> TelemetryGroup:
    if "values" in item:
        values = item["values"]
        if not isinstance(values, dict):
            raise Rejected("not_object", "values is not an object")
        extra = set(item) - {"values", "ts", "deviceName", "deviceType"}
        if extra:
            raise Rejected("not_object", f"unexpected envelope keys {sorted(extra)[:5]}")
        device = item.get("deviceName")
        if device is None:
            device = device_from_topic(topic)
        elif not isinstance(device, str) or not device:
            raise Rejected("unknown_device", "deviceName is not a non-empty string")
        device_type = item.get("deviceType")
        if device_type is not None and not isinstance(device_type, str):
            raise Rejected("not_object", "deviceType is not a string")
        ts = parse_ts(item["ts"]) if item.get("ts") is not None else received_ms
        return TelemetryGroup(device, device_type, ts, values)
    # Flat device-API object: every key is a telemetry key.
    if "ts" in item:
        raise Rejected("not_object", "ts without values")
    return TelemetryGroup(device_from_topic(topic), None, received_ms, item)


def _decode_gateway(doc: dict[str, Any], received_ms: int) -> list[TelemetryGroup]:
    groups = []
    for device, entries in doc.items():
        if not device:
            raise Rejected("unknown_device", "empty device name in gateway payload")
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                raise Rejected("not_object", f"gateway entry for {device!r} is not an object")
            if "values" in entry:
                if not isinstance(entry["values"], dict):
                    raise Rejected("not_object", "values is not an object")
                ts = parse_ts(entry["ts"]) if entry.get("ts") is not None else received_ms
                groups.append(TelemetryGroup(device, None, ts, entry["values"]))
            else:
                groups.append(TelemetryGroup(device, None, received_ms, entry))
    if not groups:
        raise Rejected("no_readings", "empty gateway payload")
    return groups
