"""The forecast: trend estimator on hand-computed series, tracker and publishing formats, a short evaluation."""

from __future__ import annotations

import math
import random

import pytest

from bridge.config import Settings
from bridge.forecast import evaluate as ev
from bridge.forecast.estimator import TrendWindow, median, theil_sen
from bridge.forecast.limits import ForecastLimits
from bridge.forecast.tracker import (
    Forecast,
    ForecastPublisher,
    ForecastTracker,
    forecast_line,
    projection_line,
    forecast_patch,
    heading_for_trouble,
)
from bridge.mapping import RackLocation, SensorReading
from bridge.twin import dew_point

T0 = 1_764_000_000.0  # a whole minute, so buckets start at T0 - 20 min
STEP = 10.0


def feed(window: TrendWindow, start: float, end: float, value_at, step: float = STEP) -> None:
    t = start
    while t <= end + 1e-9:
        window.add(t, value_at(t))
        t += step


def ramp(rate_per_h: float, level_at_t0: float):
    return lambda t: level_at_t0 + rate_per_h * (t - T0) / 3600.0


# -- estimator: hand-computed series ---------------------------------------------------------------


def test_median_and_theil_sen_by_hand():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    # Points (0,1) (60,2) (120,3) (180,4) (240,50): slopes by pair, sorted, median is the 6th of 10 ... 1/60.
    slope, level = theil_sen([0.0, 60.0, 120.0, 180.0, 240.0], [1.0, 2.0, 3.0, 4.0, 50.0])
    assert slope == pytest.approx(1 / 60)
    # Residuals v - slope*(t-240): 5, 5, 5, 5, 50 -> median 5: the line is at 5 at t=240, the outlier ignored.
    assert level == pytest.approx(5.0)


def test_flat_series_has_zero_slope_and_no_crossing():
    w = TrendWindow()
    feed(w, T0 - 1200, T0, lambda t: 22.0 if int(t / STEP) % 2 else 22.1)  # dithers in the last digit
    assert w.status(T0) == "ok"
    assert w.slope_per_h() == 0.0
    assert w.level_at(T0) == pytest.approx(22.05)
    assert w.minutes_to(27.0, T0) is None


def test_linear_ramp_6_per_hour_from_24_reaches_27_in_30_minutes():
    w = TrendWindow()
    feed(w, T0 - 1200, T0, ramp(6.0, 24.0))
    assert w.status(T0) == "ok"
    assert w.points == 20  # buckets [T0-20min, T0) are closed; the reading at T0 opened the next one
    assert w.slope_per_h() == pytest.approx(6.0, abs=1e-9)
    assert w.level_at(T0) == pytest.approx(24.0, abs=1e-9)
    assert w.minutes_to(27.0, T0) == pytest.approx(30.0, abs=1e-6)
    assert w.minutes_to(32.0, T0) == pytest.approx(80.0, abs=1e-6)
    assert w.minutes_to(23.0, T0) == 0.0  # already above and still rising
    assert w.minutes_to(27.0, T0, max_minutes=20) is None  # beyond the reported range


def test_ramp_with_one_big_outlier_keeps_its_slope():
    clean, spiky = TrendWindow(), TrendWindow()
    feed(clean, T0 - 1200, T0, ramp(6.0, 24.0))
    spike_at = T0 - 600
    feed(spiky, T0 - 1200, T0, lambda t: ramp(6.0, 24.0)(t) + (15.0 if t == spike_at else 0.0))
    # A single spike moves the median of its bucket by one reading (1/60 °C); the slope barely notices.
    assert spiky.slope_per_h() == pytest.approx(6.0, abs=0.05)
    assert spiky.minutes_to(27.0, T0) == pytest.approx(30.0, abs=0.5)
    assert clean.slope_per_h() == pytest.approx(6.0, abs=1e-9)


def test_ramp_with_a_whole_bad_minute_still_keeps_its_slope():
    w = TrendWindow()
    bad = (T0 - 600, T0 - 540)
    feed(w, T0 - 1200, T0, lambda t: ramp(6.0, 24.0)(t) + (12.0 if bad[0] <= t < bad[1] else 0.0))
    # One of 20 points is 12 °C off; Theil–Sen moves by less than 1 °C/h (a least-squares fit: ~ +5 °C/h).
    assert w.slope_per_h() == pytest.approx(6.0, abs=1.0)


def test_falling_series_gives_no_crossing():
    w = TrendWindow()
    feed(w, T0 - 1200, T0, ramp(-6.0, 26.0))
    assert w.slope_per_h() == pytest.approx(-6.0, abs=1e-9)
    assert w.minutes_to(27.0, T0) is None


def test_slow_rise_counts_as_stable():
    w = TrendWindow()
    feed(w, T0 - 1200, T0, ramp(0.3, 26.9))
    assert w.slope_per_h() == pytest.approx(0.3, abs=1e-9)
    assert w.minutes_to(27.0, T0, min_rise_per_h=0.5) is None
    assert w.minutes_to(27.0, T0, min_rise_per_h=0.1) == pytest.approx(20.0, abs=1e-6)


def test_stuck_sensor_gets_no_forecast():
    w = TrendWindow()
    feed(w, T0 - 1800, T0 - 600, ramp(6.0, 25.0))
    feed(w, T0 - 590, T0, lambda t: 24.2)  # frozen at one value for ten minutes
    assert w.status(T0) == "stuck"
    assert w.minutes_to(27.0, T0) is None
    w.add(T0 + 10, 24.3)  # it moves again
    assert w.status(T0 + 10) == "ok"


def test_sensor_that_jumps_and_freezes_is_held_back_before_the_step_reads_as_a_trend():
    w = TrendWindow()
    feed(w, T0 - 1800, T0, lambda t: 22.0 if int(t / STEP) % 2 else 22.1)
    feed(w, T0 + 10, T0 + 130, lambda t: 25.5)  # 13 identical readings over 2 min
    assert w.status(T0 + 130) == "stuck"
    assert w.minutes_to(27.0, T0 + 130) is None


def dither(t: float) -> float:
    """A steady sensor: 22.0 and 22.1 in turn, so every bucket's median is 22.05 and it never repeats itself."""
    return 22.0 if int(t / STEP) % 2 else 22.1


def steep_after_t0(t: float) -> float:
    return dither(t) if t < T0 else 22.05 + 30.0 * (t - T0) / 3600.0  # 30 °C/h (a total cooling loss) from T0


def test_steep_onset_is_caught_by_the_fast_fit_after_three_rising_buckets(monkeypatch):
    w = TrendWindow()
    feed(w, T0 - 1800, T0 + 120, steep_after_t0)
    # Two rising buckets (medians 22.258 at T0+25 s, 22.758 at T0+85 s) after three flat ones (22.05 at T0-155,
    # -95, -35 s): of the fast fit's 10 pairwise slopes 3 are 0, its median 8.4 °C/h, under the 10 °C/h floor.
    assert w.slope_per_h() < 10.0
    feed(w, T0 + 130, T0 + 180, steep_after_t0)
    # A third (23.258 at T0+145 s): the 10 slopes over the newest 5 buckets have the median
    # (0.005033 + 0.005900) / 2 °C/s = 19.68 °C/h; the level there is the median of v - slope * (t - t_ref),
    # 23.086 °C at T0+145 s, so 27 °C is (27 - 23.086 - 0.005467 * 35) / 0.005467 / 60 = 11.35 min ahead.
    assert w.status(T0 + 180) == "ok"
    assert w.slope_per_h() == pytest.approx(19.68, abs=0.01)
    assert w.minutes_to(27.0, T0 + 180) == pytest.approx(11.35, abs=0.02)
    # The 10- and 30-bucket fits alone, with 7 and 27 of their buckets flat, see hardly a rise yet.
    monkeypatch.setattr("bridge.forecast.estimator.FAST_MIN_C_PER_H", math.inf)
    slow = TrendWindow()
    feed(slow, T0 - 1800, T0 + 180, steep_after_t0)
    assert slow.slope_per_h() < 5.0
    assert slow.minutes_to(27.0, T0 + 180) is None or slow.minutes_to(27.0, T0 + 180) > 30.0


def test_fast_fit_ignores_one_bad_minute_and_a_sensor_that_jumps_and_freezes():
    bad_minute = TrendWindow()
    feed(bad_minute, T0 - 1800, T0 + 60, lambda t: dither(t) + (3.0 if T0 <= t < T0 + 60 else 0.0))
    # The newest of the fast fit's 5 buckets 3 °C high: 6 of its 10 slopes are 0, so the median is 0.
    assert bad_minute.slope_per_h() == pytest.approx(0.0, abs=0.01)
    frozen, stepped = TrendWindow(), TrendWindow()
    feed(frozen, T0 - 1800, T0, dither)
    feed(stepped, T0 - 1800, T0, dither)
    feed(frozen, T0 + 10, T0 + 120, lambda t: 25.5)  # jumps and repeats itself, not yet for the 2 min of "stuck"
    feed(stepped, T0 + 10, T0 + 120, lambda t: dither(t) + 3.5)  # the same step from a sensor still dithering
    # Two high buckets of five: the fast fit reads the step as a steep rise, for the dithering sensor only.
    assert frozen.status(T0 + 120) == stepped.status(T0 + 120) == "ok"
    assert stepped.slope_per_h() > 30.0 and stepped.minutes_to(27.0, T0 + 120) < 30.0
    assert frozen.slope_per_h() < 10.0
    assert frozen.minutes_to(27.0, T0 + 120) is None or frozen.minutes_to(27.0, T0 + 120) > 30.0
    # Repeating is judged in time: a sensor reporting every 2 s at 0.1 °C resolution repeats its value a few
    # readings in a row even while rising 30 °C/h, and keeps the fast fit.
    fine = TrendWindow()
    feed(fine, T0 - 1800, T0, dither)
    # The rounded value changes every 12 s; 238 s is the 6th reading of one value.
    feed(fine, T0 + 2, T0 + 238, lambda t: round(22.05 + 30.0 * (t - T0) / 3600.0, 1), step=2)
    assert fine._same_count >= 5 and fine.status(T0 + 238) == "ok" and fine.slope_per_h() > 10.0


def test_silent_sensor_gets_no_forecast():
    w = TrendWindow(silent_after_s=90)
    feed(w, T0 - 1200, T0, ramp(6.0, 24.0))
    assert w.minutes_to(27.0, T0 + 60) is not None
    assert w.status(T0 + 91) == "silent"
    assert w.minutes_to(27.0, T0 + 91) is None


def test_short_window_is_held_back_and_late_readings_are_dropped():
    w = TrendWindow(min_span_s=600)
    feed(w, T0 - 300, T0, ramp(6.0, 24.0))
    assert w.status(T0) == "warming_up"
    assert w.minutes_to(27.0, T0) is None
    w.add(T0 - 3600, 99.0)
    assert w.late == 1


def test_window_slides():
    w = TrendWindow(window_s=600)
    feed(w, T0 - 3600, T0, ramp(6.0, 24.0))
    assert w.points <= 11
    assert w.slope_per_h() == pytest.approx(6.0, abs=1e-9)


# -- tracker and formats ------------------------------------------------------------------------

LOC = RackLocation("fra1", "hall 1", "A", "rack-a01")


def reading(ts: float, position: str, temp: float | None, rh: float | None = 50.0) -> SensorReading:
    return SensorReading(LOC, position, "dev-1", round(ts * 1000), temp, rh)


def tracked_ramp() -> ForecastTracker:
    tracker = ForecastTracker(limits=ForecastLimits(27.0, 32.0, 15.0))
    t = T0 - 1200
    while t <= T0:
        tracker.observe(reading(t, "top", ramp(6.0, 24.0)(t)))
        tracker.observe(reading(t, "bottom", 20.0 + (0.1 if int(t / STEP) % 2 else 0.0)))
        t += STEP
    return tracker


def test_tracker_forecasts_each_position():
    forecasts = {f.position: f for f in tracked_ramp().forecasts(T0)}
    top, bottom = forecasts["top"], forecasts["bottom"]
    assert top.status == "ok" and top.rack == "rack-a01"
    assert top.trend_c_per_h == pytest.approx(6.0, abs=1e-6)
    assert top.minutes_to_recommended == pytest.approx(30.0, abs=1e-4)
    assert top.minutes_to_allowable == pytest.approx(80.0, abs=1e-4)
    assert top.projected_temp_30m == pytest.approx(27.0, abs=1e-6)
    # Constant RH on a rising temperature: the dew point rises too (12.9 °C at 24 °C, 15.7 °C at 27 °C).
    assert dew_point(24.0, 50.0) == pytest.approx(12.94, abs=0.01)
    assert 20.0 < top.minutes_to_dew_point_limit < 25.0
    assert top.dew_point_trend_c_per_h == pytest.approx(5.5, abs=0.3)
    assert bottom.trend_c_per_h == 0.0
    assert bottom.minutes_to_recommended is None and bottom.minutes_to_dew_point_limit is None
    assert [f.position for f in heading_for_trouble(forecasts.values(), 30.01)] == ["top"]
    assert heading_for_trouble(forecasts.values(), 29.99) == []
    over = Forecast(LOC, "top", "ok", 0, trend_c_per_h=6.0, minutes_to_recommended=0.0)  # already over the limit
    assert heading_for_trouble([over], 30) == []  # as the alert rule: the inlet rule reports it


def test_tracker_ignores_readings_without_temperature_and_forgets_old_racks():
    tracker = tracked_ramp()
    tracker.observe(reading(T0 + 10, "top", None, 50.0))
    assert len(tracker) == 2
    assert tracker.forecasts(T0 + 7200, forget_after_s=3600) == []
    assert len(tracker) == 0


def test_forecast_line_and_patch_formats():
    f = Forecast(LOC, "top", "ok", 1_764_000_000_123, trend_c_per_h=6.04321, level_c=24.0, projected_temp_30m=27.02,
                 minutes_to_recommended=29.6, minutes_to_allowable=None, minutes_to_dew_point_limit=None,
                 dew_point_trend_c_per_h=5.5)
    assert forecast_line(f) == (
        r"rack_forecast,position=top,rack=rack-a01,room=hall\ 1,row=A,site=fra1 "
        "trend_c_per_h=6.043,level_c=24.0,projected_temp_30m=27.02,minutes_to_recommended=29.6,"
        "dew_point_trend_c_per_h=5.5 1764000000123"
    )
    held = Forecast(LOC, "bottom", "stuck", 1_764_000_000_123)
    assert forecast_line(held) is None
    # The projection is stamped where it projects to, 30 min after computedAt, in its own measurement.
    assert projection_line(f) == ("rack_projection,position=top,rack=rack-a01,room=hall\\ 1,row=A,site=fra1 "
                                  f"projected_temp=27.02 {1_764_000_000_123 + 1_800_000}")
    assert projection_line(held) is None
    patch = forecast_patch([held, f])
    assert patch == {"features": {"forecast": {"properties": {
        "statusTop": "ok", "trendTopCPerH": 6.0, "levelTopC": 24.0, "projectedTempTop30m": 27.0,
        "minutesToRecommendedTop": 30.0, "minutesToAllowableTop": None, "minutesToDewPointTop": None,
        "dewPointTrendTopCPerH": 5.5,
        "statusBottom": "stuck", "trendBottomCPerH": None, "levelBottomC": None, "projectedTempBottom30m": None,
        "minutesToRecommendedBottom": None, "minutesToAllowableBottom": None, "minutesToDewPointBottom": None,
        "dewPointTrendBottomCPerH": None,
        "computedAt": "2025-11-24T16:00:00.123Z",
    }}}}


def test_publisher_writes_lines_and_patches_twins_only_on_change():
    tracker = tracked_ramp()
    settings = Settings(forecast_twin_refresh_s=300, forecast_horizon_min=29.75)
    lines: list[list[str]] = []
    patches: list[tuple[str, dict]] = []
    pub = ForecastPublisher(tracker, settings, lines.append, lambda tid, p: patches.append((tid, p)))
    first = pub.publish_once(T0)
    assert (first.positions, first.lines, first.patches, first.heading) == (2, 2, 1, 0)
    assert patches[0][0] == "dc.site1:rack-a01"
    assert patches[0][1]["features"]["forecast"]["properties"]["minutesToRecommendedTop"] == 30.0
    assert sorted(line.split(",", 1)[0] for line in lines[0]) == ["rack_forecast"] * 2 + ["rack_projection"] * 2
    assert pub.publish_once(T0 + 1).patches == 0  # same rounded outlook: no patch
    assert pub.publish_once(T0 + 60).patches == 1  # minutes to the limit changed (now 29)
    assert pub.publish_once(T0 + 30).heading == 1  # 29.5 min < 29.75


def test_publisher_tries_again_a_twin_that_did_not_exist_yet():
    """A new rack's forecast can be ready before its first reading has created the twin: that patch is not sent,
    so the next round sends it even though the forecast has not changed."""
    tracker = tracked_ramp()
    exists, tried = False, []

    def patch(tid: str, p: dict) -> bool:
        tried.append(tid)
        return exists

    pub = ForecastPublisher(tracker, Settings(forecast_twin_refresh_s=300), None, patch)
    assert pub.publish_once(T0).patches == 0
    exists = True
    assert pub.publish_once(T0 + 1).patches == 1  # the same outlook, sent now that the twin is there
    assert pub.publish_once(T0 + 2).patches == 0 and tried == ["dc.site1:rack-a01"] * 2


def test_publisher_refreshes_an_unchanged_twin_after_the_refresh_interval():
    tracker = ForecastTracker()
    t = T0 - 1200
    while t <= T0:
        tracker.observe(reading(t, "top", 22.0 if int(t / STEP) % 2 else 22.1))
        t += STEP
    patches: list[tuple[str, dict]] = []
    pub = ForecastPublisher(tracker, Settings(forecast_twin_refresh_s=60), None, lambda tid, p: patches.append((tid, p)))
    assert [pub.publish_once(T0 + dt).patches for dt in (0, 30, 61)] == [1, 0, 1]
    assert patches[-1][1]["features"]["forecast"]["properties"]["computedAt"] == "2025-11-24T16:01:01.000Z"


# -- a short evaluation -------------------------------------------------------------------------


def test_short_evaluation_on_the_simulator_lead_time_and_false_alerts():
    settings = Settings()
    hall = ev.sim.build_hall(racks=40, rooms=2, rows=4, seed=3)
    onset = ev.START_S + ev.WARMUP_S  # 17:00 UTC: near the daily peak load, the least headroom
    hottest = max(hall.racks[:20], key=lambda r: ev.sim.true_values(hall, r, onset, [])["tempTop"])
    specs = [("cooling_failure:hall1,rate=12", onset)]
    cooling = ev.simulate_simulator(hall, specs, ev.START_S, ev.WARMUP_S + 1800, settings, racks=[hottest.name])
    hot = ev.simulate_simulator(hall, [("hotspot:hall2-a01,rate=10", onset)], ev.START_S, ev.WARMUP_S + 3600,
                                settings, racks=["hall2-a01"])
    for run in (cooling, hot):
        leads = ev.lead_times(run)
        assert [row["series"] for row in leads if row["series"].endswith("/top")], "the scenario must breach at the top"
        assert all(row["lead_min"] is not None and row["lead_min"] >= 10 for row in leads), leads
    abrupt = ev.simulate_simulator(hall, [("cooling_failure:hall1,rate=30", onset)], ev.START_S,
                                   ev.WARMUP_S + 1800, settings, racks=[hottest.name])
    # A total loss (30 °C/h) passes 27 °C sooner than the alert fires (3-4 min after the onset) plus 10 min.
    assert min(row["lead_min"] or -1 for row in ev.lead_times(abrupt)) < 10
    normal = ev.simulate_simulator(hall, [], ev.START_S, 6 * 3600.0, settings, racks=[r.name for r in hall.racks[::5]],
                                   glitches=ev.WEEK_GLITCHES)
    assert normal.readings > 30_000 and normal.spikes > 10 and normal.lost > 20
    assert normal.breaches == {} and normal.fired == []


def test_stuck_silent_proof_fires_on_the_healthy_sensors_only_and_fails_without_the_hold_back():
    report = ev.stuck_silent_report([ev.stuck_silent_run(1, Settings())])
    assert report["faulty_series_by_kind"] == {"stuck": 2, "stuck_jump": 2, "silent": 5}
    assert report["alerts_on_faulty_series"] == 0, report["faulty_alerts"]
    assert report["healthy_series"] == 31 and report["healthy_series_fired"] == 31
    assert set(report["final_status_of_faulty"]) <= {"stuck", "silent", "forgotten"}
    # The same run with stuck and silent never declared: a silent sensor's last trend runs on, a jump reads as a
    # rise, and both alert. (A sensor frozen at its own value reads low in the warming room: quiet either way.)
    blind = Settings(forecast_stuck_after_s=1e9, forecast_silent_after_s=1e9)
    assert set(ev.stuck_silent_report([ev.stuck_silent_run(1, blind)])["alerted_faulty_series_by_kind"]) == {
        "stuck_jump", "silent"}


def test_lead_counts_from_the_alert_still_firing_at_the_breach():
    series = ["a/top", "a/bottom", "b/top", "b/bottom", "c/top"]
    fired = [(60.0, "a", "top"), (2400.0, "a", "top"),  # an early alert that resolved, then the one that lasted
             (120.0, "a", "bottom"),  # resolved long before the breach
             (1200.0, "b", "top"),  # resolved exactly at the breach
             (1800.0, "b", "bottom"),  # still firing at the end of the run
             (-300.0, "c", "top")]  # began before the event's onset
    resolved = [(600.0, "a", "top"), (900.0, "a", "bottom"), (3000.0, "b", "top")]
    run = ev.RunResult("timeline", 1, 3, 1.0, 0, breaches={key: 3000.0 for key in series}, fired=fired,
                       onsets={key: 0.0 for key in series}, statuses={}, wall_s=0.0, resolved=resolved)
    assert ev.firing_episodes(run)["a/top"] == [(60.0, 600.0), (2400.0, math.inf)]
    leads = {row["series"]: row["lead_min"] for row in ev.lead_times(run)}
    assert leads == {"a/top": 10.0, "a/bottom": None, "b/top": None, "b/bottom": 20.0, "c/top": None}
    summary = ev.summarize([run])
    assert summary["lead_worst_min"] == -math.inf and summary["leads_ge_target"] == 2


def test_glitches_spike_single_readings_and_lose_whole_reports():
    values = {"tempTop": 24.0, "tempBottom": 21.0, "humidityTop": 40.0}
    always = ev.Glitches(spike_share=1.0, spike_c=3.0, lost_share=0.0)
    assert always.apply(values, random.Random(1)) == ({"tempTop": 27.0, "tempBottom": 24.0, "humidityTop": 40.0}, 2)
    assert values["tempTop"] == 24.0  # the simulator's report itself is left alone
    assert ev.Glitches(lost_share=1.0).apply(values, random.Random(1)) == ({}, 0)
    rng = random.Random(7)
    outcomes = [ev.WEEK_GLITCHES.apply(values, rng) for _ in range(100_000)]
    assert 400 <= sum(not report for report, _ in outcomes) <= 600  # 0.5 % of the reports lost
    assert 140 <= sum(spiked for _, spiked in outcomes) <= 260  # 0.1 % of the 2 temperatures per report spiked


def test_alert_replay_needs_the_condition_for_the_whole_for_duration():
    replay = ev.AlertReplay(horizon_min=30, for_s=60, query_range_s=90)

    def publish(t, minutes):
        replay.publish([Forecast(LOC, "top", "ok", round(t * 1000), trend_c_per_h=6.0, minutes_to_recommended=minutes)])

    publish(0, 25)
    replay.evaluate(0)  # pending
    publish(30, 40)
    replay.evaluate(60)  # condition broken: back to normal
    publish(90, 20)
    replay.evaluate(120)  # pending again
    assert replay.fired == []
    publish(150, 19)
    replay.evaluate(180)
    assert replay.fired == [(180, "rack-a01", "top")]
    replay.evaluate(400)  # the newest forecast is too old for the query: the series is missing, once
    assert replay.firing == {("rack-a01", "top")}
    replay.evaluate(410)  # missing from a second evaluation: resolved (Grafana's default)
    assert replay.firing == set() and replay.resolved == [(410, "rack-a01", "top")]


def test_alert_replay_reads_the_newest_point_that_has_minutes_to_recommended():
    """Grafana's query is last("minutes_to_recommended"): a newer point without the field does not hide an older one;
    once none in the range has it, the position's forecasts read "no crossing", judged, not missing."""
    replay = ev.AlertReplay(horizon_min=30, for_s=60, query_range_s=90)

    def publish(t, minutes, status="ok"):
        replay.publish([Forecast(LOC, "top", status, round(t * 1000), trend_c_per_h=6.0 if status == "ok" else None,
                                 minutes_to_recommended=minutes)])

    publish(0, 25)
    replay.evaluate(0)  # pending
    publish(30, None)  # no crossing forecast this time: a point without the field
    publish(45, None, status="stuck")  # held back: no point at all
    replay.evaluate(60)  # last() still returns the 25 written at t=0
    assert replay.fired == [(60, "rack-a01", "top")]
    publish(90, None)
    replay.evaluate(120)  # that 25 is now 120 s old, outside the 90 s range: no crossing, judged (Recovering)
    replay.evaluate(130)
    assert replay.firing == {("rack-a01", "top")} and replay.resolved == []
    for t in range(140, 730, 10):
        publish(t - 5, None)
        replay.evaluate(t)
    # resolved by keepFiringFor (600 s from the first evaluation without a crossing), not as a missing series
    assert replay.firing == set() and replay.resolved == [(720, "rack-a01", "top")]


def test_alert_replay_resolves_a_position_without_any_forecast_as_a_missing_series():
    """Held back (stuck, silent) or no publisher: no point at all, so no series, resolved after two evaluations."""
    replay = ev.AlertReplay(horizon_min=30, for_s=0, query_range_s=90, keep_firing_for_s=600)
    replay.publish([Forecast(LOC, "top", "ok", 0, trend_c_per_h=6.0, minutes_to_recommended=25)])
    replay.evaluate(0)
    assert replay.fired == [(0, "rack-a01", "top")]
    replay.publish([Forecast(LOC, "top", "silent", 30_000, minutes_to_recommended=None)])
    replay.evaluate(90)  # the t=0 point is still in range
    replay.evaluate(100)  # no point of the position in the range: missing, once
    assert replay.firing == {("rack-a01", "top")}
    replay.evaluate(110)
    assert replay.firing == set() and replay.resolved == [(110, "rack-a01", "top")]


def test_alert_replay_keeps_firing_for_its_keep_firing_for_once_the_forecast_moves_above_the_horizon():
    replay = ev.AlertReplay(horizon_min=30, for_s=30, query_range_s=90, keep_firing_for_s=600)

    def publish(t, minutes):
        replay.publish([Forecast(LOC, "top", "ok", round(t * 1000), trend_c_per_h=6.0, minutes_to_recommended=minutes)])

    publish(0, 25)
    replay.evaluate(0)
    replay.evaluate(30)
    assert replay.fired == [(30, "rack-a01", "top")]
    publish(40, 35)
    replay.evaluate(50)  # above the horizon: recovering, still firing
    publish(60, 25)
    replay.evaluate(70)  # below it again: firing on, not a second firing
    publish(80, 35)
    replay.evaluate(90)  # above it: recovering from here
    for t in range(100, 690, 10):
        publish(t - 5, 35)
        replay.evaluate(t)
    assert replay.fired == [(30, "rack-a01", "top")] and replay.resolved == []  # 590 s above the horizon
    publish(685, 35)
    replay.evaluate(690)  # 600 s after the first evaluation above it
    assert replay.firing == set() and replay.resolved == [(690, "rack-a01", "top")]
    # 0 minutes means the line is already above the limit: the inlet rule's business, so no (new) forecast alert.
    over = ev.AlertReplay(horizon_min=30, for_s=30, query_range_s=90, keep_firing_for_s=600)
    for t in (0, 10, 20, 30, 40):
        over.publish([Forecast(LOC, "top", "ok", round(t * 1000), trend_c_per_h=6.0, minutes_to_recommended=0.0)])
        over.evaluate(t)
    assert over.fired == [] and over.pending_since == {}
    # Without keepFiringFor the first evaluation above the horizon resolves it.
    plain = ev.AlertReplay(horizon_min=30, for_s=30, query_range_s=90, keep_firing_for_s=0)
    for t, minutes in ((0, 25), (30, 25), (50, 35)):
        plain.publish([Forecast(LOC, "top", "ok", round(t * 1000), trend_c_per_h=6.0, minutes_to_recommended=minutes)])
        plain.evaluate(t)
    assert plain.fired == [(30, "rack-a01", "top")] and plain.resolved == [(50, "rack-a01", "top")]
