"""Per rack and position trend windows fed by the pipeline, and the forecasts published from them.

Wiring (bridge/service.py)::

    tracker = ForecastTracker.from_settings(settings)
    pipeline = Pipeline(..., hooks=[tracker.observe])
    publisher = ForecastPublisher(tracker, settings,
                                  submit_lines=lambda lines: influx.submit(lines, None, kind="forecast"),
                                  patch_thing=<callable(thing_id, merge_patch)>, metrics=metrics)
    publisher.start() ... publisher.stop()

Where forecasts go:

- InfluxDB measurement ``rack_forecast`` (tags site, room, row, rack, position; time = computed
  at): fields ``trend_c_per_h``, ``level_c``, ``projected_temp_30m`` and, only when a crossing is
  forecast, ``minutes_to_recommended``, ``minutes_to_allowable``, ``minutes_to_dew_point``,
  plus ``dew_point_trend_c_per_h`` when known. A held-back position (warming up, stuck, silent)
  writes no point. "None" is an absent field, not a sentinel. So a query that takes
  ``last(minutes_to_recommended)`` over a short range (≤ 3 publish intervals) lists exactly the racks
  heading for trouble and sorts them by minutes.
- InfluxDB measurement ``rack_projection`` (same tags): field ``projected_temp`` stamped at computed
  at + 30 min, so a panel whose range ends at now+30m draws the projection ahead of the measurements.
- Ditto feature ``forecast`` (merge patch of ``features/forecast/properties``): ``trend<P>CPerH``,
  ``level<P>C``, ``projectedTemp<P>30m``, ``minutesToRecommended<P>``, ``minutesToAllowable<P>``,
  ``minutesToDewPoint<P>``, ``dewPointTrend<P>CPerH``, ``status<P>`` (ok|warming_up|stuck|silent)
  for P in Top/Bottom, and ``computedAt``. "None" is sent as ``null``; a merge patch deletes the
  key, so in the twin "none" is a missing key, the same convention as in InfluxDB.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import requests

from ..config import Settings
from ..mapping import POSITIONS, Position, RackLocation, SensorReading
from ..metrics import FORECAST_PATCH_RESULTS, Metrics
from ..sinks.ditto import DittoError, ditto_wide
from ..sinks.influx import escape_tag, format_float
from ..twin import SUFFIX, dew_point, iso_ms, thing_id
from .estimator import Status, TrendWindow, minutes_until
from .limits import ForecastLimits, heading_for_limit

log = logging.getLogger(__name__)

MEASUREMENT = "rack_forecast"
# The same forecasts' 30-minute projections, stamped at the time they project to (computed at + 30 min), so the
# rack detail can draw the projection ahead of "now". Its own measurement: future points must not become the
# "last" of rack_forecast's fields.
PROJECTION_MEASUREMENT = "rack_projection"
FEATURE = "forecast"
PROJECTION_S = 1800.0  # projected_temp_30m


@dataclass(frozen=True, slots=True)
class Forecast:
    """What the trend of one rack position says at ``computed_at_ms``. None means "no crossing forecast"."""

    location: RackLocation
    position: Position
    status: Status
    computed_at_ms: int
    trend_c_per_h: float | None = None
    level_c: float | None = None
    projected_temp_30m: float | None = None
    minutes_to_recommended: float | None = None
    minutes_to_allowable: float | None = None
    minutes_to_dew_point_limit: float | None = None
    dew_point_trend_c_per_h: float | None = None

    @property
    def rack(self) -> str:
        return self.location.rack


@dataclass(frozen=True, slots=True)
class WindowSettings:
    window_s: float = 1800.0
    bucket_s: float = 60.0
    min_span_s: float = 600.0
    stuck_after_s: float = 120.0
    silent_after_s: float = 90.0
    min_trend_c_per_h: float = 0.5
    max_minutes: float = 240.0

    @classmethod
    def from_settings(cls, s: Settings) -> "WindowSettings":
        return cls(s.forecast_window_s, s.forecast_bucket_s, s.forecast_min_span_s, s.forecast_stuck_after_s,
                   s.forecast_silent_after_s, s.forecast_min_trend_c_per_h, s.forecast_max_minutes)

    def new_window(self) -> TrendWindow:
        min_points = max(3, int(self.min_span_s / self.bucket_s * 0.8))  # tolerate a few missing buckets
        return TrendWindow(self.window_s, self.bucket_s, min_points, self.min_span_s,
                           self.stuck_after_s, self.silent_after_s)


class _Series:
    __slots__ = ("location", "temperature", "dew_point")

    def __init__(self, location: RackLocation, ws: WindowSettings):
        self.location = location
        self.temperature = ws.new_window()
        self.dew_point = ws.new_window()


class ForecastTracker:
    """Holds one temperature and one dew-point window per (rack, position); thread-safe.

    ``observe`` runs on the pipeline's thread for every accepted reading and costs O(1);
    ``forecasts`` runs on the publisher's thread and takes the lock per series, so it never holds
    the pipeline up for longer than one fit.
    """

    def __init__(self, windows: WindowSettings | None = None, limits: ForecastLimits | None = None):
        self.windows = windows or WindowSettings()
        self.limits = limits or ForecastLimits()
        self._series: dict[tuple[str, Position], _Series] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, limits: ForecastLimits | None = None) -> "ForecastTracker":
        return cls(WindowSettings.from_settings(settings), limits or ForecastLimits.from_settings(settings))

    def __len__(self) -> int:
        return len(self._series)

    def observe(self, reading: SensorReading) -> None:
        """Pipeline hook: fold one accepted reading into its position's windows."""
        temperature = reading.temperature
        if temperature is None:
            return
        ts = reading.ts_ms / 1000.0
        key = (reading.location.rack, reading.position)
        dp = dew_point(temperature, reading.humidity) if reading.humidity is not None else None
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(reading.location, self.windows)
            else:
                series.location = reading.location  # the mapping may have moved the rack
            series.temperature.add(ts, temperature)
            if dp is not None:
                series.dew_point.add(ts, dp)

    def forecasts(self, now_s: float, forget_after_s: float = 3600.0) -> list[Forecast]:
        """Forecasts for every known position at ``now_s``; positions silent longer than ``forget_after_s`` are dropped."""
        with self._lock:
            keys = list(self._series)
        out = []
        for key in keys:
            with self._lock:
                series = self._series.get(key)
                if series is None:
                    continue
                last = series.temperature.last_ts
                if last is None or now_s - last > forget_after_s:
                    del self._series[key]
                    continue
                out.append(self._forecast(series, key[1], now_s))
        return out

    def _forecast(self, series: _Series, position: Position, now_s: float) -> Forecast:
        ws, lim = self.windows, self.limits
        computed_at = round(now_s * 1000)
        temp = series.temperature
        status = temp.status(now_s)
        fit = temp.fit() if status == "ok" else None
        if fit is None:
            return Forecast(series.location, position, status if status != "ok" else "warming_up", computed_at)
        dp_window = series.dew_point
        dp_fit = dp_window.fit() if dp_window.status(now_s) == "ok" else None
        return Forecast(
            location=series.location,
            position=position,
            status="ok",
            computed_at_ms=computed_at,
            trend_c_per_h=fit.slope_per_h,
            level_c=fit.level_at(now_s),
            projected_temp_30m=fit.level_at(now_s + PROJECTION_S),
            minutes_to_recommended=minutes_until(fit, lim.recommended_max_c, now_s, ws.min_trend_c_per_h,
                                                 ws.max_minutes),
            minutes_to_allowable=minutes_until(fit, lim.allowable_max_c, now_s, ws.min_trend_c_per_h, ws.max_minutes),
            minutes_to_dew_point_limit=(
                minutes_until(dp_fit, lim.dew_point_max_c, now_s, ws.min_trend_c_per_h, ws.max_minutes)
                if dp_fit else None
            ),
            dew_point_trend_c_per_h=dp_fit.slope_per_h if dp_fit else None,
        )


# -- publishing: pure formats ---------------------------------------------------------------------


def _r(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def forecast_properties(forecasts_for_rack: Iterable[Forecast]) -> dict[str, Any]:
    """``features.forecast.properties`` merge-patch content for one rack (positions given only).

    Rounded to what a person reads (0.1 °C, 0.1 °C/h, whole minutes) so an unchanged outlook gives
    an unchanged patch and the publisher can skip it. None becomes null (deletes the key).
    """
    props: dict[str, Any] = {}
    newest = 0
    for f in sorted(forecasts_for_rack, key=lambda f: POSITIONS.index(f.position)):
        sfx = SUFFIX[f.position]
        props[f"status{sfx}"] = f.status
        props[f"trend{sfx}CPerH"] = _r(f.trend_c_per_h, 1)
        props[f"level{sfx}C"] = _r(f.level_c, 1)
        props[f"projectedTemp{sfx}30m"] = _r(f.projected_temp_30m, 1)
        props[f"minutesToRecommended{sfx}"] = _r(f.minutes_to_recommended, 0)
        props[f"minutesToAllowable{sfx}"] = _r(f.minutes_to_allowable, 0)
        props[f"minutesToDewPoint{sfx}"] = _r(f.minutes_to_dew_point_limit, 0)
        props[f"dewPointTrend{sfx}CPerH"] = _r(f.dew_point_trend_c_per_h, 1)
        newest = max(newest, f.computed_at_ms)
    if props:
        props["computedAt"] = iso_ms(newest)
    return props


def forecast_patch(forecasts_for_rack: Iterable[Forecast]) -> dict[str, Any]:
    """Merge patch for the rack's thing: ``{"features": {"forecast": {"properties": {...}}}}``."""
    return {"features": {FEATURE: {"properties": forecast_properties(forecasts_for_rack)}}}


def writes_forecast_point(f: Forecast) -> bool:
    """Whether ``f`` goes to ``rack_forecast``: not for a held-back position, nor one without a trend yet."""
    return f.status == "ok" and f.trend_c_per_h is not None


def forecast_line(f: Forecast) -> str | None:
    """Line protocol for measurement ``rack_forecast``; None for a held-back position."""
    if not writes_forecast_point(f):
        return None
    values = {
        "trend_c_per_h": f.trend_c_per_h,
        "level_c": f.level_c,
        "projected_temp_30m": f.projected_temp_30m,
        "minutes_to_recommended": f.minutes_to_recommended,
        "minutes_to_allowable": f.minutes_to_allowable,
        "minutes_to_dew_point": f.minutes_to_dew_point_limit,
        "dew_point_trend_c_per_h": f.dew_point_trend_c_per_h,
    }
    fields = ",".join(f"{k}={format_float(round(v, 3))}" for k, v in values.items() if v is not None)
    return f"{MEASUREMENT},{_tag_text(f)} {fields} {f.computed_at_ms}"


def _tag_text(f: Forecast) -> str:
    loc = f.location
    tags = {"position": f.position, "rack": loc.rack, "room": loc.room, "row": loc.row, "site": loc.site}
    return ",".join(f"{k}={escape_tag(v)}" for k, v in sorted(tags.items()) if v)


def projection_line(f: Forecast) -> str | None:
    """Line protocol for ``rack_projection``: field ``projected_temp`` at computed_at + 30 min."""
    if f.status != "ok" or f.projected_temp_30m is None:
        return None
    return (f"{PROJECTION_MEASUREMENT},{_tag_text(f)} projected_temp={format_float(round(f.projected_temp_30m, 3))} "
            f"{f.computed_at_ms + int(PROJECTION_S * 1000)}")


def heading_for_trouble(forecasts: Iterable[Forecast], horizon_min: float) -> list[Forecast]:
    """Positions less than ``horizon_min`` from the recommended limit and not over it yet, soonest first (the alert's
    condition)."""
    hits = [f for f in forecasts if heading_for_limit(f.minutes_to_recommended, horizon_min)]
    return sorted(hits, key=lambda f: (f.minutes_to_recommended, f.rack, f.position))


# -- publishing: the periodic adapter -------------------------------------------------------------

# Twin patches failing this many racks in a row, each in a way that is Ditto's as a whole (no answer or a timeout,
# 5xx, 401/403/408/424/429), end the round's twin patches: the rest are skipped until the next round. Three, not
# one: a single reset connection or 503 can be a blip (one Ditto service restarting), three different things in a
# row failing alike is Ditto, or the way to it, being down. So a round against a dead Ditto costs at most three
# timeouts, and sends it three requests rather than one per rack. A failure of one twin's own (404, 400, ...) ends
# the run of failures: Ditto answered.
TWIN_FAILURES_TO_STOP = 3


# 403 counts too although it is a thing's policy: every rack thing shares one policy, so 403 for racks in a row is
# that policy no longer letting the bridge write. A round stopped by a few odd twins in a row costs little: the
# next round starts after the rack that stopped it (see ``_resume_after``).
def _ditto_wide(exc: BaseException) -> bool:
    status = exc.status if isinstance(exc, DittoError) else None
    return ditto_wide(status) or status == 403


@dataclass
class PublishResult:
    positions: int = 0
    lines: int = 0
    patches: int = 0
    heading: int = 0
    patches_absent: int = 0  # twin patches not sent: no such thing yet
    patch_failures: int = 0  # twin patches that failed this round
    patches_skipped: int = 0  # twin patches not tried this round: Ditto was down (TWIN_FAILURES_TO_STOP)


class ForecastPublisher:
    """Every ``forecast_publish_interval_s``: forecast lines to InfluxDB, changed forecasts to the twins.

    ``submit_lines(lines)`` and ``patch_thing(thing_id, merge_patch)`` are the bridge's sinks,
    passed in so this class has no I/O of its own. A twin is patched when its rounded forecast
    changed, or ``forecast_twin_refresh_s`` after the last patch (so computedAt stays fresh).
    ``patch_thing`` returns False when the thing does not exist yet (a new rack whose first reading
    is still on its way to Ditto); that patch is tried again next round. A patch that fails is tried
    again next round too.

    Started, the InfluxDB lines go out on the publisher's thread every interval and the twin patches on a
    thread of their own, so a slow or failing Ditto never delays the lines; a twin round still going when the
    next forecasts are ready takes the newest of them when it ends (the ones between are not sent to the twins).
    ``publish_once`` does one round of both, in that order, on the caller's thread.

    Failing patches make one log line per round (how many, and the first one's reason; a traceback only for an
    unexpected exception) and one "recovered" line when they go through again; counted in
    ``racktwin_forecast_twin_patches_total{result}``.
    """

    def __init__(
        self,
        tracker: ForecastTracker,
        settings: Settings,
        submit_lines: Callable[[list[str]], None] | None,
        patch_thing: Callable[[str, dict[str, Any]], bool | None] | None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.tracker = tracker
        self.settings = settings
        self.submit_lines = submit_lines
        self.patch_thing = patch_thing
        self.clock = clock
        self.metrics = metrics
        self._patch_counts = (
            {result: metrics.forecast_twin_patches.labels(result) for result in FORECAST_PATCH_RESULTS}
            if metrics is not None else {}
        )
        self._sent: dict[str, tuple[dict[str, Any], float]] = {}
        self._failing = False  # the last round with patches to send had failures
        self._resume_after: str | None = None  # the thing that stopped the last round early: the next starts after it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forecast-publisher", daemon=True)
        self._twin_thread = threading.Thread(target=self._run_twins, name="forecast-twins", daemon=True)
        self._twin_cond = threading.Condition()
        self._twin_job: tuple[list[Forecast], float] | None = None
        self._last_heading = 0

    def publish_once(self, now_s: float | None = None) -> PublishResult:
        """One round on the caller's thread: the InfluxDB lines, then the twin patches."""
        forecasts, now, result = self._publish_lines(now_s)
        if self.patch_thing is not None:
            self._patch_twins(forecasts, now, result)
        return result

    def _publish_lines(self, now_s: float | None) -> tuple[list[Forecast], float, PublishResult]:
        now = self.clock() if now_s is None else now_s
        forecasts = self.tracker.forecasts(now, forget_after_s=max(3600.0, self.settings.forecast_window_s))
        result = PublishResult(positions=len(forecasts))
        if self.submit_lines is not None:
            lines = [line for f in forecasts if (line := forecast_line(f))]
            result.lines = len(lines)
            lines += [line for f in forecasts if (line := projection_line(f))]
            if lines:
                self.submit_lines(lines)
        result.heading = len(heading_for_trouble(forecasts, self.settings.forecast_horizon_min))
        if result.heading != self._last_heading:
            log.info("%d rack positions heading for the recommended limit within %.0f min",
                     result.heading, self.settings.forecast_horizon_min)
            self._last_heading = result.heading
        return forecasts, now, result

    def _patch_twins(self, forecasts: list[Forecast], now: float, result: PublishResult) -> None:
        """One round of twin patches, counted into ``result``'s patch fields."""
        by_rack: dict[str, list[Forecast]] = {}
        for f in forecasts:
            by_rack.setdefault(thing_id(self.settings.ditto_namespace, f.rack), []).append(f)
        refresh = self.settings.forecast_twin_refresh_s
        due = []
        for tid in sorted(by_rack):
            props = forecast_properties(by_rack[tid])
            content = {k: v for k, v in props.items() if k != "computedAt"}
            previous = self._sent.get(tid)
            if previous is None or previous[0] != content or now - previous[1] >= refresh:
                due.append((tid, props, content))
        if self._resume_after is not None:  # the racks after the one that stopped the last round go first
            first = next((i for i, (tid, _, _) in enumerate(due) if tid > self._resume_after), 0)
            due = due[first:] + due[:first]
            self._resume_after = None
        first_error: str | None = None
        unexpected: BaseException | None = None
        in_a_row = 0
        for n, (tid, props, content) in enumerate(due):
            if self._stop.is_set():  # stopping: the rest are neither sent nor failures
                break
            try:
                sent = self.patch_thing(tid, {"features": {FEATURE: {"properties": props}}})  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - one twin failing must not stop the others
                result.patch_failures += 1
                expected = isinstance(exc, (DittoError, requests.RequestException, OSError))
                if first_error is None:
                    first_error = f"{tid}: {str(exc)[:200] or type(exc).__name__}"
                if not expected and unexpected is None:
                    unexpected = exc
                in_a_row = in_a_row + 1 if expected and _ditto_wide(exc) else 0
                if in_a_row >= TWIN_FAILURES_TO_STOP and n + 1 < len(due):
                    result.patches_skipped = len(due) - n - 1
                    self._resume_after = tid
                    break
                continue
            in_a_row = 0
            if sent is False:
                result.patches_absent += 1  # no such thing yet: not sent, so tried again next round
                continue
            self._sent[tid] = (content, now)
            result.patches += 1
        for tid in set(self._sent) - set(by_rack):
            del self._sent[tid]
        self._report(result, first_error, unexpected)

    def _report(self, r: PublishResult, first_error: str | None, unexpected: BaseException | None) -> None:
        """Count the round's patches and log it: at most one line, and none while all is well."""
        for label, n in (("ok", r.patches), ("absent", r.patches_absent), ("error", r.patch_failures),
                         ("skipped", r.patches_skipped)):
            if n and label in self._patch_counts:
                self._patch_counts[label].inc(n)
        if r.patch_failures:
            tried = r.patches + r.patches_absent + r.patch_failures
            skipped = (f"; Ditto looks down ({TWIN_FAILURES_TO_STOP} failed in a row), the other {r.patches_skipped} "
                       "skipped until the next round") if r.patches_skipped else ""
            text = (f"forecast twin patches: {r.patch_failures} of {tried} racks failed{skipped} "
                    f"(first: {first_error}); InfluxDB's forecast lines are not affected")
            if unexpected is not None:  # a bug, not Ditto: its traceback, once a round
                log.error("%s; unexpected error:", text, exc_info=unexpected)
                if self.metrics is not None:
                    self.metrics.internal_errors.inc()
            else:
                log.warning("%s", text)
            self._failing = True
        elif self._failing and r.patches:
            log.info("forecast twin patches recovered: %d twins patched", r.patches)
            self._failing = False

    def start(self) -> None:
        if self.patch_thing is not None:
            self._twin_thread.start()
        self._thread.start()

    @property
    def running(self) -> bool:
        """A thread of the publisher is still at work (a stop that timed out)."""
        return self._thread.is_alive() or self._twin_thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._twin_cond:
            self._twin_cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in (self._thread, self._twin_thread):
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        interval = self.settings.forecast_publish_interval_s
        while not self._stop.wait(interval):
            try:
                forecasts, now, _ = self._publish_lines(None)
            except Exception:  # noqa: BLE001 - keep publishing; the next round may succeed
                log.exception("forecast publishing failed")
                continue
            if self.patch_thing is not None:
                with self._twin_cond:  # replaces forecasts the twin thread has not taken yet: the newest win
                    self._twin_job = (forecasts, now)
                    self._twin_cond.notify()

    def _run_twins(self) -> None:
        while True:
            with self._twin_cond:
                while self._twin_job is None and not self._stop.is_set():
                    self._twin_cond.wait()
                if self._stop.is_set():
                    return
                job, self._twin_job = self._twin_job, None
            try:
                self._patch_twins(*job, PublishResult())  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - keep patching; the next round may succeed
                log.exception("forecast twin patching failed")
                if self.metrics is not None:
                    self.metrics.internal_errors.inc()
