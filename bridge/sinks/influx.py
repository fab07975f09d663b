"""InfluxDB history sink: line protocol (pure) and a writer on influxdb-client's batching WriteApi.

The client batches and retries; it reports each batch by its line-protocol text only, so the writer keeps a
map from line to the MQTT messages waiting for it, and confirms a message once all its lines are written.
A batch the client gives up on is handed back to it, so a reading is never dropped on the way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS, WriteApi, WriteOptions
from reactivex.scheduler import ThreadPoolScheduler

from ..config import Settings
from ..delivery import confirm_each
from ..mapping import SensorReading
from ..metrics import POINT_KINDS, Metrics
from ..twin import dew_point

log = logging.getLogger(__name__)


class _DropRetryChatter(logging.Filter):
    """The client logs every retried request and every batch it gives up on, a line a second during an outage,
    though the writer hands each batch back; ``_failed`` logs each new error once instead. (A filter, not a
    level: every InfluxDBClient resets its loggers' levels.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("The batch item wasn't processed successfully",
                                       "The retriable error occurred during request"))


for _name in ("influxdb_client.client.write_api", "influxdb_client.client.write.retry"):
    logging.getLogger(_name).addFilter(_DropRetryChatter())

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
# The bridge's own points (forecasts, stats) have no MQTT message to hold back, so while InfluxDB is not
# answering they wait here instead of in the client: past this many, the oldest are shed (and counted).
MAX_QUEUED_SIDE_POINTS = 50_000
PROBE_INTERVAL_S = 5.0  # how often an idle writer that has not reached InfluxDB asks /ping again
# A batch the client gave up on is handed back to it after this back-off (doubling, capped).
RESUBMIT_BACKOFF_S = (0.2, 10.0)
# Statuses the client does not retry itself but that a later attempt can fix: a token or bucket the bootstrap
# has not created yet, a proxy timeout. Any other 4xx is InfluxDB refusing the points for good.
TRANSIENT_4XX = frozenset({401, 403, 404, 408, 429})
# Lines per item handed to the client, at most. The client counts its batches in items, and each item costs it
# some 10 µs of Reactive plumbing alone, several times that under load (its locks contend with its timer and
# write threads: a quarter of the bridge's CPU in a py-spy profile at 1,000 msg/s, one item per message). So a
# feeder thread hands over whatever arrived since its last pass, cut into items of this many lines.
MAX_LINES_PER_ITEM = 50


@dataclass
class _Entry:
    """One submit: its lines are confirmed one by one (a batch boundary may fall between them)."""

    lines: list[bytes]
    on_written: Callable[[], None] | None
    kind: str = READING
    remaining: int = field(init=False)  # lines not yet written (or refused)

    def __post_init__(self) -> None:
        self.remaining = len(self.lines)


class InfluxWriter:
    """influxdb-client's batching ``WriteApi`` with confirmation per submitted message; ``submit`` never blocks.

    The client batches by count and flush interval and calls back with each batch's line protocol. Every line
    submitted is registered (line -> waiting entries) before the client sees it, so a success callback confirms
    exactly the messages whose lines it carries, whatever the batch boundaries. A batch the client gives up on
    (retry budget spent, or a status it does not retry) is handed back to it after a back-off; one InfluxDB
    refuses for good is narrowed down with synchronous writes until the refusal is pinned to single messages.

    Memory is bounded: readings by the MQTT in-flight window (unconfirmed messages stay unacknowledged), the
    bridge's own points (``kind`` other than ``reading``) by ``MAX_QUEUED_SIDE_POINTS`` while InfluxDB is down.
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
        self._sync_api = self.client.write_api(write_options=SYNCHRONOUS)  # only to narrow down refusals
        self._batching: WriteApi | None = None  # created by start(): it starts threads of its own
        self._write_scheduler: ThreadPoolScheduler | None = None
        self._lock = threading.Lock()
        self._pending: dict[bytes, list[_Entry]] = {}  # line -> entries waiting for it, oldest first
        self._feed: list[_Entry] = []  # submitted, not yet handed to the client (also before start())
        self._fed = threading.Condition(self._lock)  # the feed got its first entry, or stop()
        self._feeder = threading.Thread(target=self._feed_loop, name="influx-feed", daemon=True)
        self._held_side: deque[_Entry] = deque()  # side points waiting for InfluxDB to answer
        self._held_side_points = 0
        self._points_written = {kind: metrics.influx_points.labels(kind) for kind in POINT_KINDS}
        self._stop = threading.Event()  # stop() called: no more probing
        self._abandon = threading.Event()  # the shutdown timeout passed: give back what is unwritten
        self._probe_thread = threading.Thread(target=self._probe_loop, name="influx-probe", daemon=True)
        self._backoff = RESUBMIT_BACKOFF_S[0]
        self._lines_per_item = min(MAX_LINES_PER_ITEM, settings.influx_batch_size)
        self.healthy = False  # until InfluxDB answered once: /readyz must not claim a sink it never reached
        self.last_error: str | None = None
        self.last_refusal = ""

    # -- submitting -------------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        # Our own scheduler: WriteOptions' default one is a single instance shared by every WriteApi.
        self._write_scheduler = ThreadPoolScheduler(max_workers=1)
        options = WriteOptions(
            # Items hold up to _lines_per_item lines: so a request carries at most influx_batch_size points.
            batch_size=max(1, s.influx_batch_size // self._lines_per_item),
            flush_interval=max(1, int(s.influx_flush_interval_s * 1000)),
            # The client's own round of retries is short (it honours Retry-After on 429/503); a batch it gives
            # up on comes back to _on_error, which waits and hands it back, so nothing is ever dropped.
            retry_interval=200,
            max_retries=3,
            max_retry_delay=2_000,
            max_retry_time=3_000,
            write_scheduler=self._write_scheduler,
        )
        self._batching = self.client.write_api(
            write_options=options,
            success_callback=self._on_success,
            error_callback=self._on_error,
            retry_callback=self._on_retry,
        )
        self._feeder.start()
        self._probe_thread.start()

    def submit(self, lines: list[str], on_written: Callable[[], None] | None, kind: str = READING) -> None:
        encoded = [part for line in lines for part in line.encode().split(b"\n") if part]
        entry = _Entry(encoded, on_written, kind)
        if not encoded:
            if on_written:
                on_written()
            return
        with self._lock:
            if kind != READING and not self.healthy:  # also before start(): healthy comes with the first answer
                self._hold_side(entry)
                return
            self._feed.append(entry)
            if len(self._feed) == 1:
                self._fed.notify()

    def _hold_side(self, entry: _Entry) -> None:
        """Keep a forecast/stats entry back while InfluxDB is not answering; shed the oldest past the cap
        (caller holds the lock)."""
        self._held_side.append(entry)
        self._held_side_points += len(entry.lines)
        while self._held_side_points > MAX_QUEUED_SIDE_POINTS:
            old = self._held_side.popleft()
            self._held_side_points -= len(old.lines)
            self.metrics.influx_shed.labels(old.kind).inc(len(old.lines))

    def _release_side(self) -> None:
        with self._lock:
            held, self._held_side, self._held_side_points = self._held_side, deque(), 0
            if held and not self._feed:
                self._fed.notify()
            self._feed.extend(held)

    def _feed_loop(self) -> None:
        """Hand everything submitted since the last pass to the client; until stop(), then once more."""
        while True:
            with self._lock:
                while not self._feed and not self._stop.is_set():
                    self._fed.wait()
                entries, self._feed = self._feed, []
                # Registered before the client sees the lines: it may call back before write() returns.
                pending = self._pending
                for entry in entries:
                    for line in entry.lines:
                        waiting = pending.get(line)
                        if waiting is None:
                            pending[line] = [entry]
                        else:
                            waiting.append(entry)
            if entries:
                self._hand_to_client([line for entry in entries for line in entry.lines])
            elif self._stop.is_set():
                return

    def _hand_to_client(self, lines: list[bytes]) -> None:
        """``_write``, again after a back-off if the client raises: a dead feeder would stall every reading after."""
        while True:
            try:
                self._write(lines)
                return
            except Exception:  # noqa: BLE001 - a client bug must not take the feeder (and all later points) down
                log.exception("handing %d lines to the InfluxDB client failed; trying again", len(lines))
                self.metrics.internal_errors.inc()
            if not self._backed_off():
                return

    def _write(self, lines: list[bytes]) -> None:
        batching = self._batching
        if batching is None or self._abandon.is_set():
            return  # stopped: what is unconfirmed stays unacknowledged, and the broker redelivers it
        n = self._lines_per_item
        items = [b"\n".join(lines[i:i + n]) for i in range(0, len(lines), n)] if n > 1 else lines
        try:
            # One item goes in as bytes: a list costs the client a chain of isinstance checks per item.
            batching.write(bucket=self.settings.influx_bucket, org=self.settings.influx_org,
                           record=items[0] if len(items) == 1 else items, write_precision=WritePrecision.MS)
        except AttributeError:
            if not self._stop.is_set():
                raise
            # close() has disposed of the client's queue: these stay unacknowledged and come back from the broker

    # -- the client's callbacks (on its write thread) ---------------------------------------------------------

    def _on_success(self, _conf: tuple, data: bytes) -> None:
        self._confirm(data.split(b"\n"))
        self._backoff = RESUBMIT_BACKOFF_S[0]
        was_healthy = self.healthy
        self.healthy, self.last_error = True, None
        if not was_healthy:
            log.info("InfluxDB writes recovered")
            self._release_side()

    def _confirm(self, lines: list[bytes], refused: bool = False) -> None:
        """Pop one waiting entry per line; entries with every line resolved are confirmed."""
        done: list[_Entry] = []
        written: dict[str, int] = {}
        with self._lock:
            pending = self._pending
            for line in lines:
                waiting = pending.get(line)
                if not waiting:
                    continue  # an identical line already confirmed its entry
                entry = waiting.pop(0)
                if not waiting:
                    del pending[line]
                written[entry.kind] = written.get(entry.kind, 0) + 1
                entry.remaining -= 1
                if entry.remaining == 0:
                    done.append(entry)
        if refused:
            self.metrics.influx_dropped.inc(sum(written.values()))
        else:
            for kind, n in written.items():
                (self._points_written.get(kind) or self.metrics.influx_points.labels(kind)).inc(n)
        confirm_each([entry.on_written for entry in done], self.metrics.internal_errors.inc)

    def _on_retry(self, _conf: tuple, _data: bytes, exc: Exception) -> None:
        self._failed(_describe(exc), "http" if _status(exc) else "network")

    def _on_error(self, _conf: tuple, data: bytes, exc: Exception) -> None:
        lines = data.split(b"\n")
        status, error = _status(exc), _describe(exc)
        if _refused(status):
            self.last_refusal = error
            self.healthy = True  # InfluxDB answered; it is the points that are wrong
            self._narrow(self._entries_of(lines))
            return
        if status in TRANSIENT_4XX:  # the client does not retry these itself
            self._failed(error, "http")
        log.debug("InfluxDB batch of %d points handed back after %s", len(lines), error)
        self._resubmit(lines)

    def _resubmit(self, lines: list[bytes]) -> None:
        """After a back-off, give unwritten lines back to the client (their entries are still registered)."""
        if self._backed_off():
            self._write(lines)

    def _backed_off(self) -> bool:
        """Wait the current back-off and double it; False when the shutdown abandoned the writes meanwhile."""
        if self._abandon.wait(self._backoff):
            return False
        self._backoff = min(self._backoff * 2, RESUBMIT_BACKOFF_S[1])
        return True

    def _entries_of(self, lines: list[bytes]) -> list[tuple[_Entry, list[bytes]]]:
        """The batch's lines grouped by the entry each one would confirm, in submit order."""
        groups: dict[int, tuple[_Entry, list[bytes]]] = {}
        taken: dict[bytes, int] = {}
        with self._lock:
            for line in lines:
                waiting = self._pending.get(line)
                i = taken.get(line, 0)
                if not waiting or i >= len(waiting):
                    continue
                taken[line] = i + 1
                entry = waiting[i]
                groups.setdefault(id(entry), (entry, []))[1].append(line)
        return list(groups.values())

    def _narrow(self, groups: list[tuple[_Entry, list[bytes]]]) -> None:
        """Write halves synchronously until each refusal is pinned to one message; only its points are dropped.

        One bad message then costs only its own points, never other racks' readings in the same batch."""
        lines = [line for _, group in groups for line in group]
        try:
            self._sync_api.write(bucket=self.settings.influx_bucket, org=self.settings.influx_org,
                                 record=b"\n".join(lines), write_precision=WritePrecision.MS)
        except Exception as exc:  # noqa: BLE001 - sorted by status below
            if not _refused(_status(exc)):
                self._resubmit(lines)  # InfluxDB went away meanwhile: back to the batching path
                return
            if len(groups) > 1:
                mid = len(groups) // 2
                self._narrow(groups[:mid])
                self._narrow(groups[mid:])
                return
            self.metrics.influx_errors.labels("refused").inc()
            log.error("InfluxDB refused %d points of one message for good: %s", len(lines), _describe(exc))
            self._confirm(lines, refused=True)
            return
        self._confirm(lines)

    def _failed(self, error: str, kind: str) -> None:
        self.metrics.influx_errors.labels(kind).inc()
        if self.healthy or error != self.last_error:
            log.warning("InfluxDB write failed, will retry: %s", error[:300])
        self.healthy = False
        self.last_error = error

    # -- readiness while idle, and stopping -------------------------------------------------------------------

    def _probe_loop(self) -> None:
        """Not known healthy and nothing in flight: ask InfluxDB's /ping, so readiness tells the truth without
        traffic (with traffic, the callbacks do)."""
        while True:
            if not self.healthy and not self._pending:
                if self.client.ping():
                    log.info("InfluxDB reachable at %s", self.settings.influx_url)
                    self.healthy, self.last_error = True, None
                    self._release_side()
                else:
                    error = f"/ping at {self.settings.influx_url} did not answer as InfluxDB does (204)"
                    if error != self.last_error:
                        log.warning("InfluxDB not reachable (%s); asking again every %.0f s", error,
                                    PROBE_INTERVAL_S)
                    self.healthy, self.last_error = False, error
            if self._stop.wait(PROBE_INTERVAL_S if not self.healthy else 0.5):
                return

    def stop(self, timeout: float) -> None:
        """Write what is submitted (retrying until ``timeout``), then stop the client's threads."""
        batching = self._batching
        if batching is not None and self.healthy:
            self._release_side()
        with self._lock:
            self._stop.set()
            self._fed.notify()
        if batching is not None:
            self._feeder.join(timeout)  # what is submitted reaches the client before its last flush
            # The client's close() flushes its last window and waits for its writes; give it ``timeout``.
            closer = threading.Thread(target=batching.close, name="influx-close", daemon=True)
            closer.start()
            closer.join(timeout)
            if closer.is_alive():
                # Unconfirmed messages stay unacknowledged; the broker redelivers them. Queued batches are
                # cancelled so the interpreter need not wait for them at exit.
                self._abandon.set()
                if self._write_scheduler is not None:
                    self._write_scheduler.executor.shutdown(wait=False, cancel_futures=True)
                closer.join(2.0)
        self._abandon.set()
        self.client.close()


def _status(exc: BaseException) -> int:
    """HTTP status of a failed write, 0 for network errors and timeouts."""
    status = getattr(exc, "status", None)  # ApiException
    if not isinstance(status, int):
        status = getattr(getattr(exc, "response", None), "status", None)  # InfluxDBError, in retry callbacks
    return status if isinstance(status, int) else 0


def _refused(status: int) -> bool:
    """InfluxDB refused the points for good: retrying the same lines cannot succeed."""
    return 400 <= status < 500 and status not in TRANSIENT_4XX


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    if status:
        return f"HTTP {status}: {_short(getattr(exc, 'body', '') or getattr(exc, 'message', ''))}"
    return f"{type(exc).__name__}: {exc}"


def _short(body: object) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    return text.strip()[:200]
