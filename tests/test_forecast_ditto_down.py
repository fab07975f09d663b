"""The forecast publisher against a Ditto that fails, through the real DittoClient and the Ditto double: one log
line a round, a round cut short when Ditto is down as a whole, failures counted, InfluxDB's lines on time."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from bridge.config import Settings
from bridge.forecast.tracker import ForecastPublisher, ForecastTracker
from bridge.mapping import RackLocation, SensorReading
from bridge.metrics import Metrics
from bridge.sinks.ditto import DittoClient
from tests.conftest import DITTO_USERS
from tests.doubles.ditto import standard_policy

RACKS = 200
NS = "dc.test"
POLICY = f"{NS}:racktwin"
TIMEOUT_S = 0.3
LOGGER = "bridge.forecast.tracker"


def rack(i: int) -> str:
    return f"rack-{i:03d}"


def tracked_racks(now: float) -> ForecastTracker:
    """RACKS racks with 20 minutes of a rising top sensor (a forecast and an InfluxDB line each)."""
    tracker = ForecastTracker()
    for i in range(RACKS):
        loc = RackLocation("fra1", "hall 1", "A", rack(i))
        for minute in range(20, -1, -1):
            t = now - 60 * minute
            tracker.observe(SensorReading(loc, "top", f"dev-{i}", round(t * 1000), 22.0 + 0.1 * (20 - minute), 50.0))
    return tracker


def seeded(ditto) -> None:
    ditto.seed_policy(POLICY, standard_policy())
    for i in range(RACKS):
        ditto.seed_thing(f"{NS}:{rack(i)}", {"policyId": POLICY})


def settings_for(ditto, **extra) -> Settings:
    values = dict(ditto_url=ditto.url, ditto_username="bridge", ditto_password=DITTO_USERS["bridge"],
                  ditto_namespace=NS, ditto_timeout_s=TIMEOUT_S)
    return Settings(**{**values, **extra})


def publisher(ditto, tracker: ForecastTracker, metrics: Metrics, lines: list, **extra) -> tuple[ForecastPublisher,
                                                                                                 DittoClient]:
    settings = settings_for(ditto, **extra)
    client = DittoClient(settings)
    pub = ForecastPublisher(tracker, settings, lines.append, client.patch_existing, metrics=metrics)
    return pub, client


def bounded(call, limit_s: float):
    """``call()`` in a thread; fails (instead of hanging for minutes) if it has not returned within ``limit_s``."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"the round took longer than {limit_s} s"
    return out[0], time.monotonic() - began


def twin_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "twin" in r.getMessage()]


def patches(metrics: Metrics, result: str) -> float:
    return metrics.value("racktwin_forecast_twin_patches_total", {"result": result})


@pytest.mark.parametrize("fault", ["timeout", "503"])
def test_ditto_down_gives_one_warning_a_round_a_short_round_counted_failures_and_influx_lines(ditto, caplog, fault):
    seeded(ditto)
    now = time.time()
    metrics, lines = Metrics(), []
    pub, client = publisher(ditto, tracked_racks(now), metrics, lines)
    if fault == "timeout":
        ditto.inject(delay=2.0)  # every request answers after the client's 0.3 s timeout
    else:
        ditto.inject(status=503)
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        for round_no in (1, 2):
            caplog.clear()
            # Without stopping early, 200 racks at 0.3 s each would take a minute; a few timeouts is the bound.
            result, took = bounded(lambda: pub.publish_once(now + round_no), 20 * TIMEOUT_S)
            assert took < 20 * TIMEOUT_S
            assert result.lines == RACKS  # the InfluxDB lines went out in this round anyway
            assert len(lines) == round_no and len(lines[-1]) == 2 * RACKS  # rack_forecast + rack_projection
            records = twin_records(caplog)
            assert len(records) == 1, [r.getMessage() for r in records]
            assert result.patches == 0 and result.patch_failures == 3 and result.patches_skipped == RACKS - 3
            (warning,) = records
            assert warning.levelno == logging.WARNING and warning.exc_info is None
            text = warning.getMessage()
            assert "3 " in text and str(RACKS - 3) in text
            assert ("TimeoutError" if fault == "timeout" else "HTTP 503") in text
        assert patches(metrics, "error") == 6 and patches(metrics, "skipped") == 2 * (RACKS - 3)
        assert patches(metrics, "ok") == 0

        ditto.clear_faults()
        caplog.clear()
        result, _ = bounded(lambda: pub.publish_once(now + 3), 60)
        assert result.patches == RACKS and result.patch_failures == 0 and result.patches_skipped == 0
        assert patches(metrics, "ok") == RACKS
        (recovered,) = twin_records(caplog)
        assert recovered.levelno == logging.INFO and "recovered" in recovered.getMessage()
        props = ditto.things[f"{NS}:{rack(RACKS - 1)}"]["features"]["forecast"]["properties"]
        assert props["statusTop"] == "ok"
        caplog.clear()
        pub.publish_once(now + 4)  # nothing changed, nothing failed: nothing to say
        assert twin_records(caplog) == []
    finally:
        ditto.clear_faults()
        client.close()


def test_failures_of_single_twins_do_not_stop_the_round_and_are_one_warning(ditto, caplog):
    """403/404 for a few things (their own policy, a twin being deleted): every other twin is still patched."""
    seeded(ditto)
    now = time.time()
    metrics, lines = Metrics(), []
    pub, client = publisher(ditto, tracked_racks(now), metrics, lines)
    refused = {f"{NS}:{rack(i)}" for i in (3, 4, 5, 6, 50)}

    def patch(tid: str, p: dict) -> bool:
        if tid in refused:
            from bridge.sinks.ditto import DittoError
            raise DittoError(404, f"thing {tid} not found")
        return client.patch_existing(tid, p)

    pub.patch_thing = patch
    caplog.set_level(logging.INFO, logger=LOGGER)
    try:
        result = pub.publish_once(now)
        (warning,) = twin_records(caplog)
        assert result.patches == RACKS - 5 and result.patch_failures == 5 and result.patches_skipped == 0
        assert warning.levelno == logging.WARNING and warning.exc_info is None and "HTTP 404" in warning.getMessage()
        assert patches(metrics, "ok") == RACKS - 5 and patches(metrics, "error") == 5
    finally:
        client.close()


def test_an_unexpected_error_logs_one_traceback_a_round(caplog):
    now = time.time()
    metrics = Metrics()

    def broken(tid: str, p: dict) -> bool:
        raise KeyError("a bug")

    pub = ForecastPublisher(tracked_racks(now), Settings(), None, broken, metrics=metrics)
    caplog.set_level(logging.INFO, logger=LOGGER)
    result = pub.publish_once(now)
    (record,) = twin_records(caplog)
    assert result.patch_failures == RACKS and result.patches_skipped == 0  # a bug is not Ditto being down
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert patches(metrics, "error") == RACKS and metrics.value("racktwin_internal_errors_total") == 1


def test_influx_lines_keep_their_interval_while_ditto_times_out(ditto):
    """The periodic publisher: twin patches that hang on Ditto must not hold the next rounds' InfluxDB lines."""
    seeded(ditto)
    now = time.time()
    submitted: list[float] = []
    settings = settings_for(ditto, forecast_publish_interval_s=1.0, ditto_timeout_s=2.0)
    client = DittoClient(settings)
    pub = ForecastPublisher(tracked_racks(now), settings, lambda lines: submitted.append(time.monotonic()),
                            client.patch_existing, metrics=Metrics())
    ditto.inject(delay=5.0)
    began = time.monotonic()
    pub.start()
    try:
        time.sleep(4.6)  # rounds at about 1, 2, 3 and 4 s; each twin round would take 3 timeouts (6 s) at least
        assert len(submitted) >= 3, [round(t - began, 2) for t in submitted]
    finally:
        pub.stop(timeout=0.5)
        ditto.clear_faults()
        client.close()
