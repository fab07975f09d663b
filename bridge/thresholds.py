"""ASHRAE inlet envelope and the forecast alert's timing: the one table every limit in RackTwin comes from.

ASHRAE TC 9.9, *Thermal Guidelines* 5th ed. (2021), Table 2.1 (see shared/reference/domain.md). The numbers
refer to the IT equipment air inlet, which is what a rack's top and bottom sensors measure. Pure data and
small lookups, no I/O: the bridge reads it at run time (bridge/forecast/limits.py) and dashboards/thresholds.py
at generation time, so panel colours, alert rules and forecasts cannot disagree.
"""

from __future__ import annotations

# Recommended envelope (the same for every class).
RECOMMENDED_TEMP_C = (18.0, 27.0)
RECOMMENDED_DEW_POINT_C = (-9.0, 15.0)
RH_CAPS = (70.0, 50.0)  # recommended RH ceiling: 70 %, or 50 % where gaseous contamination is not shown low

# Allowable envelope per class: dry bulb range, max dew point, max RH. Floors are common to A1..A4.
ALLOWABLE_CLASSES: dict[str, dict[str, float]] = {
    "A1": {"temp_min": 15.0, "temp_max": 32.0, "dew_point_max": 17.0, "rh_max": 80.0},
    "A2": {"temp_min": 10.0, "temp_max": 35.0, "dew_point_max": 21.0, "rh_max": 80.0},
    "A3": {"temp_min": 5.0, "temp_max": 40.0, "dew_point_max": 24.0, "rh_max": 85.0},
    "A4": {"temp_min": 5.0, "temp_max": 45.0, "dew_point_max": 24.0, "rh_max": 90.0},
}
ALLOWABLE_DEW_POINT_MIN_C = -12.0
ALLOWABLE_RH_MIN_PCT = 8.0

DEFAULT_CLASS = "A1"
DEFAULT_RH_CAP = 70.0

# The Grafana alert rule "rack heading for the recommended temperature limit" (dashboards/alerts.py) fires
# when the newest forecast (at most FORECAST_ALERT_QUERY_RANGE_S old) has minutes_to_recommended within
# (0, horizon) at every evaluation for FORECAST_ALERT_FOR_S, and keeps firing FORECAST_ALERT_KEEP_FIRING_S after
# that stops. bridge.forecast.evaluate replays exactly this.
FORECAST_HORIZON_MIN = 30.0  # default of Settings.forecast_horizon_min
# Its own rule group, evaluated every 10 s with a 30 s pending period: a total cooling loss gives minutes, and the
# 1-minute evaluation and pending period of the other rules would spend two of them (bridge/forecast/estimator.py).
FORECAST_ALERT_INTERVAL_S = 10  # rule group evaluation interval ("10s"; Grafana's default minimum)
FORECAST_ALERT_FOR_S = 30  # rule "for" ("30s"): four consecutive evaluations
FORECAST_ALERT_QUERY_RANGE_S = 90  # relativeTimeRange.from: three 30 s publish intervals
# keepFiringFor: a forecast near the horizon can move above it and back as the fit moves; the alert must not resolve
# and page again each time. (The refires the evaluation counted came after the breach, from 0 minutes, which the
# within_range condition keeps out; this holds the alert through the wavering before it.)
FORECAST_ALERT_KEEP_FIRING_S = 600
GRAFANA_MISSING_SERIES_EVALS_TO_RESOLVE = 2  # Grafana's default: a series absent from 2 evaluations resolves


def check_class(ashrae_class: str) -> str:
    """The class in canonical form ("a2" -> "A2"); ValueError for anything but A1..A4."""
    canonical = ashrae_class.strip().upper()
    if canonical not in ALLOWABLE_CLASSES:
        raise ValueError(f"ASHRAE class must be one of {sorted(ALLOWABLE_CLASSES)}, not {ashrae_class!r}")
    return canonical


def check_rh_cap(rh_cap: float) -> float:
    if float(rh_cap) not in RH_CAPS:
        raise ValueError(f"recommended RH cap must be 70 or 50, not {rh_cap!r}")
    return float(rh_cap)


def allowable(ashrae_class: str) -> dict[str, float]:
    return ALLOWABLE_CLASSES[check_class(ashrae_class)]


# Where a reading sits in the envelope, worst first: the state the wall's rack tiles show and are coloured by.
# Outside the allowable class beats outside the recommended envelope; temperature beats humidity at equal rank.
# SILENT (a position with no reading for SILENT_AFTER_INTERVALS reporting intervals) is not a reading's state but
# the rack's (twin.rack_state): below the critical ones, whose last known values still say the most, and above
# the rest, which a dead sensor's last values can no longer vouch for.
ENVELOPE_STATES = ("HOT", "COLD", "VERY HUMID", "VERY DRY", "SILENT", "WARM", "COOL", "HUMID", "DRY", "OK")
ENVELOPE_CRITICAL = frozenset(ENVELOPE_STATES[:4])  # outside the allowable class
SILENT = "SILENT"
SILENT_AFTER_INTERVALS = 3  # as the silent-sensor alert rule and the wall's count


def envelope_state(temp_c: float | None, rh_pct: float | None, dew_point_c: float | None,
                   ashrae_class: str = DEFAULT_CLASS, rh_cap: float = DEFAULT_RH_CAP) -> str:
    """The worst envelope state of one sensor position (missing quantities are not judged)."""
    a = allowable(ashrae_class)

    def above(value: float | None, limit: float) -> bool:
        return value is not None and value > limit

    def below(value: float | None, limit: float) -> bool:
        return value is not None and value < limit

    if above(temp_c, a["temp_max"]):
        return "HOT"
    if below(temp_c, a["temp_min"]):
        return "COLD"
    if above(rh_pct, a["rh_max"]) or above(dew_point_c, a["dew_point_max"]):
        return "VERY HUMID"
    if below(rh_pct, ALLOWABLE_RH_MIN_PCT) or below(dew_point_c, ALLOWABLE_DEW_POINT_MIN_C):
        return "VERY DRY"
    if above(temp_c, RECOMMENDED_TEMP_C[1]):
        return "WARM"
    if below(temp_c, RECOMMENDED_TEMP_C[0]):
        return "COOL"
    if above(rh_pct, rh_cap) or above(dew_point_c, RECOMMENDED_DEW_POINT_C[1]):
        return "HUMID"
    if below(dew_point_c, RECOMMENDED_DEW_POINT_C[0]):
        return "DRY"
    return "OK"


def worst_state(states: list[str]) -> str:
    return min(states, key=ENVELOPE_STATES.index, default="OK")
