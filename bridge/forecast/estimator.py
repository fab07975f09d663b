"""Robust trend of one sensor over a sliding time window, updated per reading at O(1). Pure.

Choice of estimator: **Theil–Sen over per-bucket medians**.

- Raw readings are folded into fixed time buckets (default 60 s, so 6 readings at a 10 s
  interval). A bucket is reduced to one point, (median time, median value), when the first
  reading of a later bucket arrives. The window keeps at most ``window_s / bucket_s`` closed
  points (30 for the defaults).
- The trend is the Theil–Sen slope over those points: the median of all pairwise slopes. The
  level (where the line stands now) is the median of ``value - slope * time`` over the newest 5
  points, not over the whole window. The textbook intercept uses the whole window, and at the onset
  of a rise most of those points are older and lower, so it drags the line down and delays the
  warning. When a rise levels off it pushes the line up and warns of a crossing that never comes.
  A median of 5 still ignores 2 bad buckets.
- A second Theil–Sen fit covers only the newest 10 buckets. The slope used is the steeper of the
  two. Theil–Sen over 30 points follows a new trend only once about 30 % of the points (9 min)
  show it, so a sharp onset would cost most of the warning time. For a 15 °C/h ramp from 23 °C the
  short fit moves the warning from 12 to 5 min after onset, leaving 11 instead of 4 min before
  27 °C. The long fit still catches a slow creep that the short fit cannot separate from noise.
  The short fit tolerates 2 bad buckets out of 10; a frozen sensor is caught by ``stuck`` first.
- A third, fast fit covers the newest 5 buckets and counts only when it is steep: at least
  ``FAST_MIN_C_PER_H`` (10 °C/h). On a 30 °C/h ramp it is past that floor after 3 rising buckets
  where the 10-bucket fit needs 4 (after 2 its median slope is 8.4 °C/h: 3 of its 10 pairs are flat);
  with the alert rule's 10 s evaluation and 30 s pending period the alert fires 3–4 min after the
  onset of a total cooling loss instead of 5–7, 4–6 min at 15 °C/h (``make evaluate``). A 5-bucket
  fit is noisy (about 1.5 °C/h for the simulator's sensors), hence the floor: below 10 °C/h the
  slower fits give 13 min or more of warning anyway. It still ignores one bad bucket of 5. A sensor
  that has repeated one value for ``FAST_REPEAT_S`` (30 s, ``FAST_REPEAT_MIN_READINGS``) gets no
  fast fit: one that jumps to a wrong value and freezes there is a step, which the fast fit would
  read as a steep rise before ``stuck`` holds it back (2 min). A quiet sensor at 0.1 °C resolution
  rising 10–12 °C/h sits on one value for 30–36 s and loses the fast fit for those readings; at
  those rates the slower fits warn 13 min or more ahead anyway, and from 15 °C/h on it never does.

Why this is robust: a single spike can move only the median of its own bucket, and then only by
one rank (the median of 6 readings ignores one extreme one). Theil–Sen then tolerates up to about
29 % of bad *points* (buckets) before it breaks down, so a handful of bad minutes cannot swing it.

Why it is cheap: per reading we append one float to the open bucket (O(1)). Closing a bucket
takes the median of about 6 values. The O(B²) Theil–Sen fit over B ≤ 30 points (435 pairwise
slopes, plus 45 and 10 for the short and fast fits) runs lazily, at most once per closed bucket,
and only when someone asks. The bridge asks once per publish interval, so a fit costs about 435
slopes per sensor per minute, not per reading. Running Theil–Sen over the raw window instead would cost 180² / 2 ≈ 16,000 slopes per fit. An
incremental sorted-slope structure saves CPU but needs ~3.5 KB per window; for 40,000 windows
(10,000 racks × top/bottom × temperature/dew point) that memory costs more than the CPU it saves.
The window stores its points in two ``array('d')`` (8 bytes per number).

Measured (``make evaluate``, shared 2-core dev box, 10,000 racks × 2 positions, full windows):
4.5 µs per reading to observe, plus 42–48 µs per reading amortised for the fits and forecasts. That
is about 10 % of one core at a 10 s interval, and about 5 times the cost of decoding and mapping a
reading. ``forecast_bucket_s=120`` (15 points) cuts the fit cost about 4×, at the price of up to
one more minute of latency.

The cost of buckets is latency: the fit sees a minute only once it is over, so a trend shows up
at most one bucket later. The evaluation (``bridge.forecast.evaluate``) measures lead time with
that latency included.

Held back (``minutes_to`` gives None, ``status`` says why):
- ``warming_up``: fewer than ``min_points`` buckets, or they span less than ``min_span_s``;
- ``stuck``: the raw value has not changed for ``stuck_after_s`` (default 2 min) and at least
  ``stuck_min_readings`` (6) readings. A frozen sensor repeats itself; a healthy one in a stable
  room still dithers in its last digit. It must be caught early: a sensor that jumps to a wrong
  value and freezes there looks like a step. After 3 min (3 of 10 points) the short fit would
  read that step as a steep rise. A very quiet sensor (0.1 °C resolution, little noise) that is
  rising slowly can sit on one value for minutes and be held back for a while. That costs nothing
  here, because a slow rise is not a 30-minute warning anyway.
- ``silent``: the newest reading is older than ``silent_after_s`` at ``now``.
The silent-sensor alert rule reports the last two; a forecast built on them would be invented.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from operator import sub, truediv
from typing import Literal, Sequence

Status = Literal["ok", "warming_up", "stuck", "silent"]

SECONDS_PER_HOUR = 3600.0
LEVEL_POINTS = 5  # the line is anchored on the newest buckets (see the module docstring)
RECENT_POINTS = 10  # the short fit that catches the onset of a rise (see the module docstring)
FAST_POINTS = 5  # the fast fit for abrupt rises, trusted only when at least this steep (°C/h):
FAST_MIN_C_PER_H = 10.0
# ... and not from a sensor that has repeated one value for this long (and this many readings): in time, not in
# readings, because a sensor reporting every 2 s at 0.1 °C resolution repeats itself a few times even at 30 °C/h.
FAST_REPEAT_S, FAST_REPEAT_MIN_READINGS = 30.0, 3


def median(values: list[float]) -> float:
    """Median of a non-empty list (mean of the two middle values for an even count)."""
    ordered = sorted(values)
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def theil_sen(ts: Sequence[float], vs: Sequence[float], level_points: int = 0) -> tuple[float, float]:
    """Theil–Sen fit ``v ≈ level + slope * (t - ts[-1])``; returns (slope per second, level at ts[-1]).

    The level is the median of ``v - slope * (t - ts[-1])`` over the last ``level_points`` points
    (0: all points, the textbook intercept).

    The pairwise slopes are built lag by lag with C-level ``map`` (about twice as fast as a Python
    loop; for 30 points ~60 µs). Pairs with equal times are skipped (their slope is undefined).
    """
    n = len(ts)
    slopes: list[float] = []
    try:
        for lag in range(1, n):
            slopes.extend(map(truediv, map(sub, vs[lag:], vs), map(sub, ts[lag:], ts)))
    except ZeroDivisionError:
        slopes = [(vs[j] - vs[i]) / (ts[j] - ts[i]) for i in range(n - 1) for j in range(i + 1, n) if ts[j] != ts[i]]
    if not slopes:
        raise ValueError("Theil–Sen needs at least two distinct times")
    slope = median(slopes)
    t_ref = ts[-1]
    first = max(0, n - level_points) if level_points > 0 else 0
    level = median([vs[i] - slope * (ts[i] - t_ref) for i in range(first, n)])
    return slope, level


@dataclass(frozen=True, slots=True)
class Fit:
    """A trend line: ``level`` (°C) at time ``t_ref`` (s), ``slope`` in °C per second."""

    t_ref: float
    level: float
    slope: float

    @property
    def slope_per_h(self) -> float:
        return self.slope * SECONDS_PER_HOUR

    def level_at(self, ts: float) -> float:
        return self.level + self.slope * (ts - self.t_ref)


class TrendWindow:
    """Sliding-window robust trend of one series (e.g. the top inlet temperature of one rack).

    ``add`` takes readings in time order; a reading older than the open bucket is dropped (and
    counted in ``late``), because the bridge may see redeliveries and the past is already fitted.
    """

    __slots__ = (
        "window_s", "bucket_s", "min_points", "min_span_s", "stuck_after_s", "silent_after_s",
        "_ts", "_vs", "_bucket_start", "_bucket_ts", "_bucket_vs",
        "stuck_min_readings", "last_ts", "_last_value", "_same_since", "_same_count", "_fit", "_fast_fit", "late",
    )

    def __init__(
        self,
        window_s: float = 1800.0,
        bucket_s: float = 60.0,
        min_points: int = 8,
        min_span_s: float = 600.0,
        stuck_after_s: float = 120.0,
        silent_after_s: float = 90.0,
        stuck_min_readings: int = 6,
    ):
        if bucket_s <= 0 or window_s < 2 * bucket_s:
            raise ValueError("need bucket_s > 0 and window_s >= 2 * bucket_s")
        if min_points < 3:
            raise ValueError("min_points must be at least 3")
        self.window_s = float(window_s)
        self.bucket_s = float(bucket_s)
        self.min_points = min_points
        self.min_span_s = float(min_span_s)
        self.stuck_after_s = float(stuck_after_s)
        self.silent_after_s = float(silent_after_s)
        self.stuck_min_readings = stuck_min_readings
        self._ts = array("d")  # closed bucket points: median time, median value
        self._vs = array("d")
        self._bucket_start: float | None = None
        self._bucket_ts: list[float] = []
        self._bucket_vs: list[float] = []
        self.last_ts: float | None = None
        self._last_value: float | None = None
        self._same_since: float | None = None
        self._same_count = 0
        self._fit: Fit | None = None
        self._fast_fit: Fit | None = None
        self.late = 0

    # -- updates -----------------------------------------------------------------------------------

    def add(self, ts: float, value: float) -> None:
        """Add one reading (time in seconds, value). O(1) except when a bucket closes (O(bucket size))."""
        start = self._bucket_start
        if start is not None and ts < start:
            self.late += 1
            return
        if start is None or ts >= start + self.bucket_s:
            if start is not None:
                self._close_bucket()
            start = self._bucket_start = ts - ts % self.bucket_s
        self._bucket_ts.append(ts)
        self._bucket_vs.append(value)
        if value != self._last_value:
            self._last_value = value
            self._same_since = ts
            self._same_count = 1
        else:
            self._same_count += 1
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts

    def _close_bucket(self) -> None:
        self._ts.append(median(self._bucket_ts))
        self._vs.append(median(self._bucket_vs))
        self._bucket_ts = []
        self._bucket_vs = []
        horizon = self._ts[-1] - self.window_s
        drop = 0
        while drop < len(self._ts) and self._ts[drop] < horizon:
            drop += 1
        if drop:
            del self._ts[:drop]
            del self._vs[:drop]
        self._fit = self._fast_fit = None

    # -- queries -----------------------------------------------------------------------------------

    @property
    def points(self) -> int:
        """Closed buckets in the window."""
        return len(self._ts)

    def status(self, now: float) -> Status:
        if self.last_ts is None:
            return "warming_up"
        if now - self.last_ts > self.silent_after_s:
            return "silent"
        if self._repeating(self.stuck_after_s, self.stuck_min_readings):
            return "stuck"
        if len(self._ts) < self.min_points or self._ts[-1] - self._ts[0] < self.min_span_s:
            return "warming_up"
        return "ok"

    def fit(self) -> Fit | None:
        """The trend line: the steepest of up to three Theil–Sen fits (see the module docstring).

        One covers the whole window, one the newest ``RECENT_POINTS`` buckets; both are cached until the
        next bucket closes. The fast fit over the newest ``FAST_POINTS`` counts when it rises at least
        ``FAST_MIN_C_PER_H`` and the sensor is not repeating itself, judged at each call because a sensor
        can freeze between two buckets.
        """
        if self._fit is None and len(self._ts) >= 2 and self._ts[-1] > self._ts[0]:
            slope, level = theil_sen(self._ts, self._vs, LEVEL_POINTS)
            if len(self._ts) > RECENT_POINTS:
                recent_slope, recent_level = theil_sen(self._ts[-RECENT_POINTS:], self._vs[-RECENT_POINTS:],
                                                       LEVEL_POINTS)
                if recent_slope > slope:
                    slope, level = recent_slope, recent_level
            self._fit = Fit(self._ts[-1], level, slope)
            if len(self._ts) > FAST_POINTS:
                fast_slope, fast_level = theil_sen(self._ts[-FAST_POINTS:], self._vs[-FAST_POINTS:], LEVEL_POINTS)
                if fast_slope * SECONDS_PER_HOUR >= FAST_MIN_C_PER_H and fast_slope > slope:
                    self._fast_fit = Fit(self._ts[-1], fast_level, fast_slope)
        if self._fast_fit is not None and not self._repeating(FAST_REPEAT_S, FAST_REPEAT_MIN_READINGS):
            return self._fast_fit
        return self._fit

    def _repeating(self, for_s: float, min_readings: int) -> bool:
        """The newest readings have all had one value, for at least ``for_s`` and ``min_readings`` of them."""
        return (self._same_since is not None and self.last_ts is not None
                and self.last_ts - self._same_since >= for_s and self._same_count >= min_readings)

    def slope_per_h(self) -> float | None:
        fit = self.fit()
        return fit.slope_per_h if fit else None

    def level_at(self, ts: float) -> float | None:
        fit = self.fit()
        return fit.level_at(ts) if fit else None

    def minutes_to(
        self, limit: float, now: float, min_rise_per_h: float = 0.5, max_minutes: float = 240.0
    ) -> float | None:
        """Minutes from ``now`` until the trend line crosses ``limit`` going up.

        None when held back (see ``status``), when the trend rises slower than ``min_rise_per_h``
        (stable or falling), or when the crossing lies beyond ``max_minutes``. 0 when the line is
        already above the limit and still rising.
        """
        if self.status(now) != "ok":
            return None
        fit = self.fit()
        if fit is None:
            return None
        return minutes_until(fit, limit, now, min_rise_per_h, max_minutes)


def minutes_until(fit: Fit, limit: float, now: float, min_rise_per_h: float, max_minutes: float) -> float | None:
    """Minutes from ``now`` until ``fit`` reaches ``limit`` (see ``TrendWindow.minutes_to``)."""
    if fit.slope_per_h < min_rise_per_h or fit.slope <= 0:
        return None
    gap = limit - fit.level_at(now)
    if gap <= 0:
        return 0.0
    minutes = gap / fit.slope / 60.0
    return minutes if minutes <= max_minutes else None
