"""`racktwin sync`: ThingsBoard devices -> Ditto twins (attributes + latest values) and InfluxDB history.

For every device of the configured profile (paged): its server attributes say where it stands
(``site``, ``room``, ``row``, ``positionInRow``; per-sensor devices also ``position`` top|bottom and
``rack``); anything missing comes from the mapping (device_pattern groups, racks:, defaults). Each rack
twin is created if missing, its attributes set, and its values back-filled with the latest telemetry;
the twin's newer-than condition keeps a value the bridge already wrote from being replaced by an older
one. With ``sync_backfill_hours`` > 0 the history is copied into InfluxDB too (idempotent: same points,
same timestamps).

The result's ``racks`` (rack -> RackMeta) is what the bridge merges into its mapping (``merged_mapping``),
so live readings carry the same site/room/row as the twin; ``SyncWorker`` re-runs sync periodically so
devices added later appear without a restart.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import MappingConfig, RackMeta, Settings, load_settings
from ..decode import Rejected, TelemetryGroup
from ..mapping import POSITIONS, Mapper, Position, RackLocation, SensorReading
from .. import twin
from ..sinks.ditto import MERGE_PATCH, DittoClient, DittoError
from .rest import ThingsBoard

log = logging.getLogger(__name__)

ATTRIBUTE_KEYS = {"site": "site", "room": "room", "row": "row", "positionInRow": "position_in_row",
                  "position_in_row": "position_in_row"}


@dataclass(frozen=True)
class DevicePlacement:
    device: str
    device_id: str
    device_type: str | None
    location: RackLocation
    position: Position | None  # per-sensor devices only
    position_in_row: int | None


BACKFILL_WINDOW_S = 6 * 3600  # one history request per device and window: 21,600 points per key at 1 Hz
HISTORY_LIMIT = 100_000  # points per key per request; at this, ThingsBoard may have left some out


@dataclass
class SyncResult:
    devices: int = 0
    skipped: list[str] = field(default_factory=list)
    things_created: int = 0
    things_updated: int = 0
    backfilled_points: int = 0
    racks: dict[str, RackMeta] = field(default_factory=dict)
    placements: dict[str, DevicePlacement] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


# -- pure parts --------------------------------------------------------------------------------------------


def placement_from_attributes(mapper: Mapper, device: dict[str, Any], attrs: dict[str, Any]) -> DevicePlacement:
    """Where a device's readings belong: server attributes first, then the mapping. Raises Rejected."""
    name = device["name"]
    position = attrs.get("position")
    if position is not None and position not in POSITIONS:
        raise Rejected("unknown_device", f"{name}: attribute position={position!r} is not top or bottom")
    rack_attr = attrs.get("rack")
    try:
        location, pattern_position = mapper.locate(name)
    except Rejected:
        if not rack_attr:
            raise
        location, pattern_position = RackLocation(mapper.mapping.default_site, mapper.mapping.default_room,
                                                  mapper.mapping.default_row, str(rack_attr)), None
    if rack_attr:
        location = RackLocation(location.site, location.room, location.row, str(rack_attr))
    updates = {k: str(attrs[k]) for k in ("site", "room", "row") if attrs.get(k) not in (None, "")}
    location = RackLocation(**{**_loc_dict(location), **updates})
    position_in_row = attrs.get("positionInRow", attrs.get("position_in_row"))
    try:
        position_in_row = int(position_in_row) if position_in_row is not None else None
    except (TypeError, ValueError):
        position_in_row = None
    final_position = position or pattern_position
    if mapper.mapping.mode == "per_sensor" and final_position is None:
        raise Rejected("unknown_device", f"{name}: per-sensor device without a position (attribute or pattern)")
    return DevicePlacement(name, device["id"]["id"], device.get("type"), location,
                           final_position if mapper.mapping.mode == "per_sensor" else None, position_in_row)


def _loc_dict(location: RackLocation) -> dict[str, str]:
    return {"site": location.site, "room": location.room, "row": location.row, "rack": location.rack}


def groups_from_timeseries(device: str, device_type: str | None,
                           series: dict[str, list[dict[str, Any]]]) -> list[TelemetryGroup]:
    """TB's {key: [{ts, value}]} regrouped into one TelemetryGroup per timestamp, oldest first."""
    by_ts: dict[int, dict[str, Any]] = {}
    for key, points in series.items():
        for point in points or []:
            by_ts.setdefault(int(point["ts"]), {})[key] = point.get("value")
    return [TelemetryGroup(device, device_type, ts, values) for ts, values in sorted(by_ts.items())]


def placement_index(placements: dict[str, DevicePlacement]) -> dict[str, tuple[RackLocation, Position | None]]:
    """What Mapper.replace_placements takes: device -> (location, position)."""
    return {name: (p.location, p.position) for name, p in placements.items()}


class PlacedMapper(Mapper):
    """The bridge's mapper, but devices are placed by their ThingsBoard attributes."""

    def __init__(self, settings: Settings, placements: dict[str, DevicePlacement]):
        super().__init__(settings)
        self.replace_placements(placement_index(placements))
        self.device_types = frozenset()  # listing by profile already chose the devices


def merged_mapping(mapping: MappingConfig, racks: dict[str, RackMeta]) -> MappingConfig:
    """The mapping with racks learnt from ThingsBoard added; racks listed in the config keep their values."""
    combined = dict(racks)
    for name, meta in mapping.racks.items():
        learnt = combined.get(name)
        combined[name] = meta if learnt is None else RackMeta(**{
            k: getattr(meta, k) if getattr(meta, k) is not None else getattr(learnt, k) for k in RackMeta.model_fields
        })
    return mapping.model_copy(update={"racks": combined})


def rack_attributes(location: RackLocation, devices: dict[Position, str], position_in_row: int | None,
                    device_ids: dict[Position, str] | None = None) -> dict:
    """The twin's attributes as ThingsBoard knows them; ``tbDeviceIds`` lets the rack detail link to each device."""
    attrs = twin.attributes_for(location, devices)
    if position_in_row is not None:
        attrs["positionInRow"] = position_in_row
    if device_ids:
        attrs["tbDeviceIds"] = dict(sorted(device_ids.items()))
    return attrs


def latest_states(readings: list[SensorReading]) -> dict[Position, twin.PositionState]:
    states: dict[Position, twin.PositionState] = {}
    for reading in sorted(readings, key=lambda r: r.ts_ms):
        states[reading.position] = twin.merge_reading(states.get(reading.position), reading)
    return states


# -- the run -----------------------------------------------------------------------------------------------


class Progress:
    """A bar on a terminal, a log line every 10 % otherwise."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_decile = -1

    def update(self, done: int, total: int | None) -> None:
        if self.tty:
            if total:
                filled = int(30 * done / total)
                self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
            else:
                self.stream.write(f"\r{self.label} {done}")
            self.stream.flush()
        elif total:
            decile = 10 * done // total
            if decile != self._last_decile:
                self._last_decile = decile
                log.info("%s: %d/%d devices", self.label, done, total)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_sync(settings: Settings, tb: ThingsBoard | None = None, progress: Progress | None = None,
             backfill_hours: float | None = None,
             on_placed: Callable[[SyncResult], None] | None = None) -> SyncResult:
    """``on_placed`` gets the result as soon as every device's placement is read (``placements`` and ``racks``
    filled), before the telemetry, history and twins, which take most of a sync's time: a bridge waiting for its
    first sync to place the racks need not wait for those."""
    own = tb is None
    tb = tb or ThingsBoard.from_settings(settings)
    ditto = DittoClient(settings)
    result = SyncResult()
    hours = settings.sync_backfill_hours if backfill_hours is None else backfill_hours
    # Before the try: its finally closes it, and a ThingsBoard that does not answer fails in the try's first line.
    history_writer = _HistoryWriter(settings)  # per device, so memory does not grow with the fleet
    try:
        devices = list(tb.devices(settings.tb_device_profile, settings.sync_page_size))
        mapper = Mapper(settings)
        progress = progress or Progress("sync", stream=_NullStream())
        keys = sorted(mapper.key_index)
        by_rack: dict[str, list[DevicePlacement]] = {}
        readings: dict[str, list[SensorReading]] = {}
        for device in devices:  # placements first: attributes only
            try:
                placement = placement_from_attributes(mapper, device, tb.server_attributes(device["id"]["id"]))
            except Rejected as exc:
                result.skipped.append(f"{device['name']}: {exc.detail}")
                continue
            result.placements[placement.device] = placement
            by_rack.setdefault(placement.location.rack, []).append(placement)
        for rack, placements in sorted(by_rack.items()):
            location = placements[0].location
            position_in_row = next((p.position_in_row for p in placements if p.position_in_row is not None), None)
            result.racks[rack] = RackMeta(site=location.site, room=location.room, row=location.row,
                                          position_in_row=position_in_row)
        if on_placed is not None:
            on_placed(result)
        now_ms = int(time.time() * 1000)
        for done, placement in enumerate(result.placements.values(), 1):
            placed = PlacedMapper(settings, {placement.device: placement})
            latest = tb.latest_timeseries(placement.device_id, keys)
            readings[placement.device] = _map_groups(placed, placement, latest, now_ms, result)
            if hours > 0:
                series = history_series(tb, placement.device_id, keys, now_ms - int(hours * 3600_000), now_ms)
                try:
                    history_writer.write(_map_groups(placed, placement, series, now_ms, result))
                except Exception as exc:  # noqa: BLE001 - InfluxDB trouble must not stop the twins' sync
                    result.errors.append(f"{placement.device}: history not written: {exc}")
                    log.warning("backfill of %s into InfluxDB failed: %s", placement.device, exc)
            progress.update(done, len(result.placements))
        progress.finish()
        result.devices = len(result.placements)
        ditto_policy_ready = False
        for rack, placements in sorted(by_rack.items()):
            location = placements[0].location
            position_in_row = result.racks[rack].position_in_row
            rack_readings = [r for p in placements for r in readings.get(p.device, [])]
            devices_by_position: dict[Position, str] = {}
            ids_by_position: dict[Position, str] = {}
            for p in placements:
                for pos in [p.position] if p.position else POSITIONS:
                    devices_by_position[pos] = p.device
                    ids_by_position[pos] = p.device_id
            try:
                if not ditto_policy_ready:
                    ditto.ensure_policy(settings.policy_id, twin.policy_body(settings.ditto_policy_subjects))
                    ditto_policy_ready = True
                _sync_thing(ditto, settings, rack, location,
                            rack_attributes(location, devices_by_position, position_in_row, ids_by_position),
                            latest_states(rack_readings), result)
            except Exception as exc:  # noqa: BLE001 - one rack's failure must not stop the others
                result.errors.append(f"{rack}: {exc}")
                log.warning("sync of twin %s failed: %s", rack, exc)
        result.backfilled_points = history_writer.points
    finally:
        history_writer.close()
        ditto.close()
        if own:
            tb.close()
    log.info("sync: %d devices, %d twins created, %d updated, %d skipped, %d history points, %d errors",
             result.devices, result.things_created, result.things_updated, len(result.skipped),
             result.backfilled_points, len(result.errors))
    return result


class _NullStream:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _map_groups(mapper: Mapper, placement: DevicePlacement, series: dict, now_ms: int,
                result: SyncResult) -> list[SensorReading]:
    out: list[SensorReading] = []
    for group in groups_from_timeseries(placement.device, placement.device_type, series):
        try:
            out += mapper.map_group(group, now_ms)
        except Rejected as exc:
            result.skipped.append(f"{placement.device}@{group.ts_ms}: {exc.detail}")
    return out


def _sync_thing(ditto: DittoClient, settings: Settings, rack: str, location: RackLocation, attributes: dict,
                states: dict[Position, twin.PositionState], result: SyncResult) -> None:
    tid = twin.thing_id(settings.ditto_namespace, rack)
    current = ditto.get_thing(tid)
    if current is None:
        if ditto.create_thing(tid, twin.new_thing_body(settings.policy_id, attributes)):
            result.things_created += 1
            current = {"attributes": attributes}
        else:
            current = ditto.get_thing(tid) or {}
    changed = False
    have = current.get("attributes") or {}
    if any(have.get(k) != v for k, v in attributes.items()):
        # Merge patch without condition: placement comes from ThingsBoard, the source of truth for it.
        resp = ditto.request("PATCH", twin.thing_path(tid), data=json.dumps({"attributes": attributes}),
                             headers={"Content-Type": MERGE_PATCH})
        if resp.status_code not in (201, 204):
            raise DittoError(resp.status_code, resp.text)
        changed = True
    known = twin.known_from_thing(current)
    fresh, _stale = twin.drop_stale(states, known)
    if fresh:
        merged = {**known, **fresh}
        status = ditto.patch_thing(tid, twin.build_patch(fresh, merged, None, (settings.ashrae_class, settings.rh_cap)), twin.newer_than_condition(fresh))
        changed = changed or status in (201, 204)
    if changed and current is not None and "thingId" in current:
        result.things_updated += 1


def history_series(tb: ThingsBoard, device_id: str, keys: list[str], start_ms: int,
                   end_ms: int) -> dict[str, list[dict[str, Any]]]:
    """A device's telemetry from start to end, asked for in windows of BACKFILL_WINDOW_S: ThingsBoard caps each
    answer at HISTORY_LIMIT points per key, which a long window of frequent readings would exceed silently."""
    merged: dict[str, list[dict[str, Any]]] = {}
    window_ms = int(BACKFILL_WINDOW_S * 1000)
    for lo in range(start_ms, end_ms + 1, window_ms):
        hi = min(lo + window_ms - 1, end_ms)  # inclusive bounds: windows must not overlap
        for key, points in tb.timeseries(device_id, keys, lo, hi, limit=HISTORY_LIMIT).items():
            if len(points) >= HISTORY_LIMIT:
                log.warning("device %s key %s: %d points in %.0f h, ThingsBoard's limit; older ones are missing",
                            device_id, key, len(points), BACKFILL_WINDOW_S / 3600)
            merged.setdefault(key, []).extend(points)
    return merged


class _HistoryWriter:
    """Backfill points to InfluxDB as each device's history is read (one client, opened on first use)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.points = 0
        self._client: Any = None
        self._api: Any = None

    def write(self, readings: list[SensorReading]) -> None:
        from influxdb_client import InfluxDBClient, WritePrecision
        from influxdb_client.client.write_api import SYNCHRONOUS

        from ..sinks.influx import reading_line

        lines = [line for line in (reading_line(r) for r in readings) if line]
        if not lines:
            return
        s = self.settings
        if self._client is None:
            token = s.influx_token.get_secret_value() if s.influx_token else ""
            self._client = InfluxDBClient(url=s.influx_url, token=token, org=s.influx_org,
                                          timeout=int(s.influx_timeout_s * 1000))
            self._api = self._client.write_api(write_options=SYNCHRONOUS)
        for i in range(0, len(lines), s.influx_batch_size):
            self._api.write(bucket=s.influx_bucket, org=s.influx_org,
                            record="\n".join(lines[i:i + s.influx_batch_size]), write_precision=WritePrecision.MS)
        self.points += len(lines)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class SyncWorker:
    """Runs sync at start and every ``sync_interval_s``, or when ``trigger()`` is called.

    ``on_result`` gets each SyncResult (the bridge merges ``result.racks`` into its mapping).
    """

    def __init__(self, settings: Settings, on_result: Callable[[SyncResult], None] | None = None,
                 on_placed: Callable[[SyncResult], None] | None = None):
        self.settings = settings
        self.on_result = on_result
        self.on_placed = on_placed  # each sync's placements, as soon as they are read (run_sync)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tb-sync", daemon=True)
        self.last: SyncResult | None = None

    def start(self) -> None:
        self._thread.start()

    def trigger(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        retry = 5.0
        while not self._stop.is_set():
            try:
                self.last = run_sync(self.settings, on_placed=self.on_placed)
                if self.on_result:
                    self.on_result(self.last)
                wait, retry = self.settings.sync_interval_s or None, 5.0
            except Exception as exc:  # noqa: BLE001 - ThingsBoard may still be starting: retry with backoff
                log.warning("ThingsBoard sync failed (%s); retrying in %.0f s", exc, retry)
                wait, retry = retry, min(retry * 2, 300.0)
            self._wake.wait(wait)
            self._wake.clear()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backfill-hours", type=float, help="copy this much history into InfluxDB "
                        "(default RACKTWIN_SYNC_BACKFILL_HOURS)")


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.backfill_hours is not None and args.backfill_hours * 3600 > settings.max_age_s:
        print(f"racktwin sync: --backfill-hours {args.backfill_hours:g} reaches further back than "
              f"RACKTWIN_MAX_AGE_S ({settings.max_age_s:.0f} s): the bridge would reject the older readings; "
              "raise RACKTWIN_MAX_AGE_S or ask for fewer hours", file=sys.stderr)
        return 2
    from ..logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)
    result = run_sync(settings, progress=Progress("sync"), backfill_hours=args.backfill_hours)
    print(f"synced {result.devices} device(s) into {len(result.racks)} twin(s): {result.things_created} created, "
          f"{result.things_updated} updated, {result.backfilled_points} history point(s) written")
    for line in result.skipped[:20]:
        print(f"  skipped {line}")
    for line in result.errors:
        print(f"  error {line}", file=sys.stderr)
    return 1 if result.errors else 0
