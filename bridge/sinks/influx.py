"""InfluxDB history sink: line protocol (pure) and a batching writer with confirmation per batch.

influxdb-client's own batching WriteApi drops a batch after its retry budget and reports it with
the line-protocol text only, so it cannot tell which MQTT messages a write confirmed. We batch
ourselves and write each batch with the client's synchronous API; a batch is retried until it is
written (or refused with a 4xx, which can never succeed), and only then are its messages confirmed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from ..config import Settings
from ..mapping import SensorReading
from ..metrics import POINT_KINDS, Metrics
from ..twin import dew_point

log = logging.getLogger(__name__)

MEASUREMENT = "rack_environment"

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\ ", "\r": r"\ ", "\t": r"\ "})


def escape_tag(value: str) -> str:
    """Escape a tag key or value; line protocol forbids newlines and a trailing backslash."""
    escaped = value.translate(_TAG_ESCAPES)
    if escaped.endswith("\\"):
        escaped += " "  # a trailing backslash would escape the separator
    return escaped


def format_float(value: float) -> str:
    return repr(float(value))


def reading_line(reading: SensorReading) -> str | None:
    """One point per reading: tags site, room, row, rack, position, device; float fields."""
    fields = []
    if reading.temperature is not None:
        fields.append(f"temperature={format_float(reading.temperature)}")
    if reading.humidity is not None:
        fields.append(f"humidity={format_float(reading.humidity)}")
    if reading.temperature is not None and reading.humidity is not None:
        dp = dew_point(reading.temperature, reading.humidity)
        if dp is not None:
            fields.append(f"dew_point={format_float(dp)}")
    if not fields:
        return None
    loc = reading.location
    key = (reading.device, reading.position, loc.rack, loc.room, loc.row, loc.site)
    series = _series_keys.get(key)
    if series is None:
        if len(_series_keys) >= MAX_CACHED_SERIES:
            _series_keys.clear()
        series = _series_keys[key] = series_key(*key)
    return f"{series} {','.join(fields)} {reading.ts_ms}"


def series_key(device: str, position: str, rack: str, room: str, row: str, site: str) -> str:
    """Measurement and tags, keys in sorted order, empty values left out."""
    tags = (("device", device), ("position", position), ("rack", rack), ("room", room), ("row", row), ("site", site))
    return ",".join([MEASUREMENT, *(f"{k}={escape_tag(v)}" for k, v in tags if v)])


# Escaping the same six tags for every reading was a tenth of the bridge's work per message; a rack's
# series key only changes when it moves. Bounded: 10,000 racks x 2 positions fit many times over.
MAX_CACHED_SERIES = 100_000
_series_keys: dict[tuple[str, ...], str] = {}


READING = POINT_KINDS[0]
# The bridge's own points (forecasts, stats) have no MQTT message to hold back, so during an outage
# they are bounded here instead: past this many queued, the oldest are shed (and counted).
MAX_QUEUED_SIDE_POINTS = 50_000
PROBE_INTERVAL_S = 5.0  # how often an idle writer that has not reached InfluxDB asks /ping again


@dataclass
class _Entry:
    lines: list[str]
    on_written: Callable[[], None] | None
    kind: str = READING
    enqueued: float = field(default_factory=time.monotonic)


class InfluxWriter:
    """Single writer thread; ``submit`` never blocks.

    Memory is bounded: readings by the MQTT in-flight window (unconfirmed messages stay unacknowledged),
    the bridge's own points (``kind`` other than ``reading``) by ``MAX_QUEUED_SIDE_POINTS``.
    """

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        token = settings.influx_token.get_secret_value() if settings.influx_token else ""
        self.client = InfluxDBClient(
            url=settings.influx_url,
            token=token,
            org=settings.influx_org,
            timeout=int(settings.influx_timeout_s * 1000),
        )
        self.write_api = self.client.write_api(write_options=SYNCHRONOUS)
        self._queue: deque[_Entry] = deque()
        self._side_points = 0  # queued lines of entries that are not readings
        self._queued_points = 0  # all queued lines: the batch-filling wait checks it on every submit
        self._points_written = {kind: metrics.influx_points.labels(kind) for kind in POINT_KINDS}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self.healthy = False  # until InfluxDB answered once: /readyz must not claim a sink it never reached
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, lines: list[str], on_written: Callable[[], None] | None, kind: str = READING) -> None:
        with self._cond:
            self._queue.append(_Entry(lines, on_written, kind))
            self._queued_points += len(lines)
            if kind != READING:
                self._side_points += len(lines)
                if self._side_points > MAX_QUEUED_SIDE_POINTS:
                    self._shed_side_points()
            self._cond.notify()

    def _shed_side_points(self) -> None:
        """Drop the oldest queued forecast/stats entries until under the cap (caller holds the lock)."""
        kept: deque[_Entry] = deque()
        for entry in self._queue:
            if entry.kind != READING and self._side_points > MAX_QUEUED_SIDE_POINTS:
                self._side_points -= len(entry.lines)
                self._queued_points -= len(entry.lines)
                self.metrics.influx_shed.labels(entry.kind).inc(len(entry.lines))
            else:
                kept.append(entry)
        self._queue = kept

    def _take_batch(self) -> list[_Entry] | None:
        """The next batch; [] when stopping and drained; None when idle and InfluxDB should be probed."""
        s = self.settings
        with self._cond:
            while not self._queue and not self._stopping:
                if not self._cond.wait(timeout=None if self.healthy else PROBE_INTERVAL_S) and not self.healthy:
                    return None
            if not self._queue:
                return []
            # Give a young batch a moment to fill, without holding the oldest point longer than the interval.
            deadline = self._queue[0].enqueued + s.influx_flush_interval_s
            while (
                self._queued_points < s.influx_batch_size
                and not self._stopping
                and time.monotonic() < deadline
            ):
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            batch, points = [], 0
            while self._queue and (points == 0 or points + len(self._queue[0].lines) <= s.influx_batch_size):
                entry = self._queue.popleft()
                if entry.kind != READING:
                    self._side_points -= len(entry.lines)
                batch.append(entry)
                points += len(entry.lines)
            self._queued_points -= points
            return batch

    def _probe(self) -> None:
        """Idle and not known healthy: ask InfluxDB's /ping, so readiness tells the truth without traffic."""
        if self.client.ping():
            if not self.healthy:
                log.info("InfluxDB reachable at %s", self.settings.influx_url)
            self.healthy, self.last_error = True, None
        else:
            error = f"no answer to /ping at {self.settings.influx_url}"
            if error != self.last_error:
                log.warning("InfluxDB not reachable (%s); asking again every %.0f s", error, PROBE_INTERVAL_S)
            self.healthy, self.last_error = False, error

    def _run(self) -> None:
        backoff = 0.2
        batch: list[_Entry] = []
        self._probe()
        while True:
            if not batch:
                taken = self._take_batch()
                if taken is None:
                    self._probe()
                    continue
                if not taken:
                    return  # stopping and drained
                batch = taken
            batch = self._deliver(batch)
            if batch:  # not written yet: InfluxDB unreachable or overloaded
                if self._stopping and self._abandon:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2

    _abandon = False

    def _deliver(self, batch: list[_Entry]) -> list[_Entry]:
        """Write a batch and confirm its messages; returns the entries still to write (retry later).

        A batch InfluxDB refuses for good is split in halves until the refusal is pinned to single messages, so
        one bad message costs only its own points, never other racks' readings in the same batch."""
        outcome = self._write(batch)
        if outcome == "retry":
            return batch
        if outcome == "refused":
            if len(batch) > 1:
                mid = len(batch) // 2
                rest = self._deliver(batch[:mid])
                return rest + batch[mid:] if rest else self._deliver(batch[mid:])
            self.metrics.influx_dropped.inc(len(batch[0].lines))
            self.metrics.influx_errors.labels("refused").inc()
            log.error("InfluxDB refused %d points of one message for good: %s", len(batch[0].lines),
                      self.last_refusal)
        for entry in batch:
            if entry.on_written:
                entry.on_written()
        return []

    last_refusal = ""

    def _write(self, batch: list[_Entry]) -> str:
        try:
            self.write_api.write(
                bucket=self.settings.influx_bucket,
                org=self.settings.influx_org,
                record="\n".join(line for e in batch for line in e.lines),
                write_precision=WritePrecision.MS,
            )
        except ApiException as exc:
            status = exc.status or 0
            if 400 <= status < 500 and status not in (401, 403, 404, 408, 429):
                # The server refused these points for good (e.g. a field type conflict): retrying cannot help.
                self.last_refusal = f"HTTP {status}: {_short(exc.body)}"
                self.healthy = True
                return "refused"
            return self._failed(f"HTTP {status}: {_short(exc.body)}", "http")
        except Exception as exc:  # noqa: BLE001 - network errors, timeouts: all retried
            return self._failed(f"{type(exc).__name__}: {exc}", "network")
        written: dict[str, int] = {}
        for entry in batch:
            written[entry.kind] = written.get(entry.kind, 0) + len(entry.lines)
        for kind, n in written.items():
            (self._points_written.get(kind) or self.metrics.influx_points.labels(kind)).inc(n)
        if not self.healthy:
            log.info("InfluxDB writes recovered")
        self.healthy = True
        self.last_error = None
        return "ok"

    def _failed(self, error: str, kind: str) -> str:
        self.metrics.influx_errors.labels(kind).inc()
        if self.healthy or error != self.last_error:
            log.warning("InfluxDB write failed, will retry: %s", error[:300])
        self.healthy = False
        self.last_error = error
        return "retry"

    def stop(self, timeout: float) -> None:
        """Write what is queued (retrying until ``timeout``), then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abandon = True  # unconfirmed messages stay unacknowledged; the broker redelivers them
            self._thread.join(2.0)
        self.client.close()


def _short(body: object) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    return text.strip()[:200]
