"""The limits the forecast projects towards, and the alert rule's timing.

Both come from bridge/thresholds.py, the ASHRAE table the Grafana dashboards and alert rules are generated
from, so "minutes to 27 °C" here and the 27 °C on the wall are the same number. The allowable limit depends
on the ASHRAE class (Settings.ashrae_class, env RACKTWIN_ASHRAE_CLASS, the variable `make dashboards` reads).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from ..thresholds import (
    DEFAULT_CLASS,
    FORECAST_ALERT_FOR_S,
    FORECAST_ALERT_INTERVAL_S,
    FORECAST_ALERT_KEEP_FIRING_S,
    FORECAST_ALERT_QUERY_RANGE_S,
    FORECAST_HORIZON_MIN,
    GRAFANA_MISSING_SERIES_EVALS_TO_RESOLVE,
    RECOMMENDED_DEW_POINT_C,
    RECOMMENDED_TEMP_C,
    allowable,
)

RECOMMENDED_MAX_C = RECOMMENDED_TEMP_C[1]  # recommended envelope, all classes
ALLOWABLE_MAX_C = allowable(DEFAULT_CLASS)["temp_max"]  # default class A1
RECOMMENDED_DEW_POINT_MAX_C = RECOMMENDED_DEW_POINT_C[1]

# The Grafana alert rule "rack heading for the recommended limit" (dashboards/alerts.py provisions it): it fires
# when heading_for_limit(minutes_to_recommended) at every evaluation for ALERT_FOR_S, and keeps firing until that has
# been false for ALERT_KEEP_FIRING_S (or the series has been missing from the query's result at
# ALERT_MISSING_EVALS_TO_RESOLVE evaluations). bridge.forecast.evaluate replays exactly this to measure lead time and
# false alerts.
ALERT_HORIZON_MIN = FORECAST_HORIZON_MIN
ALERT_INTERVAL_S = float(FORECAST_ALERT_INTERVAL_S)
ALERT_FOR_S = float(FORECAST_ALERT_FOR_S)
ALERT_QUERY_RANGE_S = FORECAST_ALERT_QUERY_RANGE_S
ALERT_KEEP_FIRING_S = float(FORECAST_ALERT_KEEP_FIRING_S)
ALERT_MISSING_EVALS_TO_RESOLVE = GRAFANA_MISSING_SERIES_EVALS_TO_RESOLVE


def heading_for_limit(minutes: float | None, horizon_min: float = ALERT_HORIZON_MIN) -> bool:
    """The alert's condition, its threshold within_range (0, horizon): a crossing forecast within the horizon, and
    not 0, which means the line is already above the limit (the inlet rule's business)."""
    return minutes is not None and 0 < minutes < horizon_min


@dataclass(frozen=True, slots=True)
class ForecastLimits:
    """Upper limits the forecast counts minutes to (°C)."""

    recommended_max_c: float = RECOMMENDED_MAX_C
    allowable_max_c: float = ALLOWABLE_MAX_C
    dew_point_max_c: float = RECOMMENDED_DEW_POINT_MAX_C

    @classmethod
    def for_class(cls, ashrae_class: str) -> "ForecastLimits":
        return cls(RECOMMENDED_MAX_C, allowable(ashrae_class)["temp_max"], RECOMMENDED_DEW_POINT_MAX_C)

    @classmethod
    def from_settings(cls, settings: Settings) -> "ForecastLimits":
        return cls.for_class(settings.ashrae_class)
