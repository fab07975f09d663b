"""The generation-time front of the environmental limits: panel colours and alert rules are derived from here.

The ASHRAE table itself (TC 9.9 (2021) Table 2.1) lives in bridge/thresholds.py, which the bridge's forecast
reads at run time too, so dashboards, alert rules and forecasts use the same numbers. The class (A1..A4) and the
recommended RH cap (70 % or 50 %, the latter where gaseous contamination is not shown to be low) are chosen when
the files are generated, from the same variables the bridge reads:
``RACKTWIN_ASHRAE_CLASS=A2 RACKTWIN_RH_CAP=50 make dashboards``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bridge.thresholds import (ALLOWABLE_CLASSES, ALLOWABLE_DEW_POINT_MIN_C, ALLOWABLE_RH_MIN_PCT,  # noqa: F401
                               DEFAULT_CLASS, DEFAULT_RH_CAP, FORECAST_HORIZON_MIN, RECOMMENDED_DEW_POINT_C,
                               RECOMMENDED_TEMP_C, RH_CAPS, SILENT_AFTER_INTERVALS, check_class, check_rh_cap)

# ASHRAE "5/20": 20 °C per hour for IT equipment (5 °C/h for tape). Measured as max − min inlet temperature
# over a window; 15 min at 20 °C/h gives 5 °C, which is also the (unverified) "5 °C in any 15 minutes" note.
RATE_WINDOW_S = 900

COLORS = {"cold_critical": "blue", "cold_warning": "light-blue", "ok": "green", "warning": "orange",
          "critical": "red", "unknown": "text", "none": "transparent"}
# The twin's envelope state (bridge/thresholds.py envelope_state) -> tile colour: the same palette as the bands,
# hot and humid on the warm side, cold and dry on the cold side.
ENVELOPE_COLORS = {"HOT": "critical", "VERY HUMID": "critical", "COLD": "cold_critical", "VERY DRY": "cold_critical",
                   "WARM": "warning", "HUMID": "warning", "COOL": "cold_warning", "DRY": "cold_warning", "OK": "ok",
                   "SILENT": "none"}  # a dead sensor's last values vouch for nothing: no colour (not "no twin"'s grey)


STUCK_WINDOW_MIN_S = 900
STUCK_MIN_READINGS = 10  # fewer readings than this is the silent-sensor rule's business


@dataclass(frozen=True)
class Thresholds:
    ashrae_class: str = DEFAULT_CLASS
    rh_cap: float = DEFAULT_RH_CAP
    # Top − bottom inlet difference that indicates recirculation / starved supply air (site policy, not ASHRAE).
    delta_t_limit_c: float = 5.0
    delta_t_for: str = "10m"
    rate_limit_c_per_h: float = 20.0
    # Expected sensor reporting interval; a sensor is "silent" after 3 of them without a reading.
    reading_interval_s: int = 60
    bridge_lag_limit_s: float = 30.0

    # Forecast: a rack is "heading for trouble" when the recommended limit is this close (bridge setting
    # forecast_horizon_min, same env var RACKTWIN_FORECAST_HORIZON_MIN).
    forecast_horizon_min: float = FORECAST_HORIZON_MIN

    def __post_init__(self) -> None:
        if self.ashrae_class not in ALLOWABLE_CLASSES:  # exact spelling here; from_env canonicalises "a2"
            raise ValueError(f"ASHRAE class must be one of {sorted(ALLOWABLE_CLASSES)}, not {self.ashrae_class!r}")
        check_rh_cap(self.rh_cap)
        if self.reading_interval_s <= 0:
            raise ValueError(f"reading interval must be a positive number of seconds, not {self.reading_interval_s!r}")
        if self.forecast_horizon_min <= 0:
            raise ValueError(f"forecast horizon must be positive, not {self.forecast_horizon_min!r}")

    # --- derived limits -------------------------------------------------------------------------
    @property
    def allowable(self) -> dict[str, float]:
        return ALLOWABLE_CLASSES[self.ashrae_class]

    @property
    def temp_recommended(self) -> tuple[float, float]:
        return RECOMMENDED_TEMP_C

    @property
    def temp_allowable(self) -> tuple[float, float]:
        return self.allowable["temp_min"], self.allowable["temp_max"]

    @property
    def dew_point_recommended(self) -> tuple[float, float]:
        return RECOMMENDED_DEW_POINT_C

    @property
    def dew_point_allowable(self) -> tuple[float, float]:
        return ALLOWABLE_DEW_POINT_MIN_C, self.allowable["dew_point_max"]

    @property
    def rh_allowable(self) -> tuple[float, float]:
        return ALLOWABLE_RH_MIN_PCT, self.allowable["rh_max"]

    @property
    def rate_window_s(self) -> int:
        """The rate-of-change window: ASHRAE's 15 min, longer where that may hold a single reading (at least two
        reporting intervals, in whole minutes); else readings 15 min or more apart never show a change."""
        return max(RATE_WINDOW_S, -(-2 * self.reading_interval_s // 60) * 60)

    @property
    def rate_span_s(self) -> int:
        """The time the allowed change is pro-rated over: the 15-min window, or where it grew, one reporting
        interval (its readings, two or three, are that far apart)."""
        return RATE_WINDOW_S if self.rate_window_s == RATE_WINDOW_S else self.reading_interval_s

    @property
    def rate_limit_c(self) -> float:
        """Allowed max − min inlet temperature within ``rate_window_s`` (the hourly limit, pro rata)."""
        return round(self.rate_limit_c_per_h * self.rate_span_s / 3600.0, 3)

    @property
    def silent_after_s(self) -> int:
        """No reading for this long: the sensor is silent (the alert rule, the wall's count, the bridge's tiles)."""
        return SILENT_AFTER_INTERVALS * self.reading_interval_s

    @property
    def stuck_window_s(self) -> int:
        """The stuck-sensor window: 15 min, longer where that holds fewer than the readings the rule needs (with
        two to spare), in whole minutes; else a slow-reporting sensor could never be called stuck."""
        needed = (STUCK_MIN_READINGS + 2) * self.reading_interval_s
        return max(STUCK_WINDOW_MIN_S, -(-needed // 60) * 60)

    # --- Grafana colour steps -------------------------------------------------------------------
    def temperature_steps(self) -> list[dict]:
        return band_steps(self.temp_allowable, self.temp_recommended)

    def dew_point_steps(self) -> list[dict]:
        return band_steps(self.dew_point_allowable, self.dew_point_recommended)

    def humidity_steps(self) -> list[dict]:
        # The recommended humidity band is bounded by dew point, not RH, below; above it is the RH cap.
        return band_steps(self.rh_allowable, (self.rh_allowable[0], self.rh_cap))

    def delta_t_steps(self) -> list[dict]:
        return [{"color": COLORS["ok"], "value": None},
                {"color": COLORS["warning"], "value": self.delta_t_limit_c}]


def band_steps(allowable: tuple[float, float], recommended: tuple[float, float]) -> list[dict]:
    """Grafana threshold steps: below allowable, below recommended, in band, above recommended, above allowable.

    A step applies from its value upwards, so the value that equals a limit is still inside the band
    only for the lower limits; colours are a display aid, the alert rules use the exact comparisons.
    """
    steps = [{"color": COLORS["cold_critical"], "value": None}]
    if recommended[0] > allowable[0]:
        steps.append({"color": COLORS["cold_warning"], "value": allowable[0]})
    steps.append({"color": COLORS["ok"], "value": recommended[0]})
    steps.append({"color": COLORS["warning"], "value": recommended[1]})
    steps.append({"color": COLORS["critical"], "value": allowable[1]})
    return steps


def from_env(env: dict[str, str] | None = None) -> Thresholds:
    """Thresholds chosen at generation time (RACKTWIN_ASHRAE_CLASS, RACKTWIN_RH_CAP, RACKTWIN_DELTA_T_LIMIT...)."""
    env = os.environ if env is None else env

    def number(name: str, default: str, kind: type = float):  # noqa: ANN202
        text = env.get(name, default)
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, not {text!r}") from None

    return Thresholds(
        ashrae_class=check_class(env.get("RACKTWIN_ASHRAE_CLASS", DEFAULT_CLASS)),
        rh_cap=check_rh_cap(number("RACKTWIN_RH_CAP", str(DEFAULT_RH_CAP))),
        delta_t_limit_c=number("RACKTWIN_DELTA_T_LIMIT", "5"),
        rate_limit_c_per_h=number("RACKTWIN_RATE_LIMIT_C_PER_H", "20"),
        reading_interval_s=number("RACKTWIN_READING_INTERVAL_S", "60", int),
        bridge_lag_limit_s=number("RACKTWIN_BRIDGE_LAG_LIMIT_S", "30"),
        forecast_horizon_min=number("RACKTWIN_FORECAST_HORIZON_MIN", str(FORECAST_HORIZON_MIN)),
    )
