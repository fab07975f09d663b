"""The limits the forecast projects towards, and the alert rule's timing. One place for both.

Numbers from ASHRAE TC 9.9, *Thermal Guidelines* 5th ed. (2021), Table 2.1 (see
shared/reference/domain.md); they refer to the IT equipment air inlet, which is what the rack's
top and bottom sensors measure.

TODO(unify): dashboards/thresholds.py holds the ASHRAE class and RH cap for the dashboards and the
threshold alert rules; once it exists, both should read the numbers from one module.
"""

from __future__ import annotations

from dataclasses import dataclass

RECOMMENDED_MAX_C = 27.0  # recommended envelope, all classes: 18-27 °C
ALLOWABLE_MAX_C = 32.0  # class A1 allowable: 15-32 °C
RECOMMENDED_DEW_POINT_MAX_C = 15.0  # recommended envelope: -9..15 °C dew point

# The Grafana alert rule "rack heading for the recommended limit" (dashboards helper provisions it):
# it fires when minutes_to_recommended < ALERT_HORIZON_MIN at every evaluation for ALERT_FOR_S.
# bridge.forecast.evaluate simulates exactly this condition to measure lead time and false alerts.
ALERT_HORIZON_MIN = 30.0
ALERT_INTERVAL_S = 60.0  # rule group evaluation interval ("1m")
ALERT_FOR_S = 60.0  # rule "for" ("1m"): two consecutive evaluations
ALERT_QUERY_RANGE_S = 90  # relativeTimeRange.from: a forecast older than this no longer counts


@dataclass(frozen=True, slots=True)
class ForecastLimits:
    """Upper limits the forecast counts minutes to (°C)."""

    recommended_max_c: float = RECOMMENDED_MAX_C
    allowable_max_c: float = ALLOWABLE_MAX_C
    dew_point_max_c: float = RECOMMENDED_DEW_POINT_MAX_C
