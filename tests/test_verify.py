"""`racktwin verify`: agreement, an injected mismatch, a stale twin, a missing InfluxDB series."""

from __future__ import annotations

import json
import time

import pytest

from bridge import cli
from bridge.config import load_settings
from bridge.thingsboard.sync import run_sync
from bridge.thingsboard.verify import Sample, judge, render_table, verify


@pytest.fixture
def env(bridge_env, tb_double, monkeypatch):
    values = {**bridge_env, "RACKTWIN_TB_URL": tb_double.url, "RACKTWIN_TB_USERNAME": tb_double.username,
              "RACKTWIN_TB_PASSWORD": tb_double.password}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RACKTWIN_CONFIG", raising=False)
    return values


@pytest.fixture
def agreeing(tb_double, ditto, env):
    """Three racks whose latest values are in TB, the twin and InfluxDB alike (synced with backfill)."""
    now = int(time.time() * 1000) - 2000
    for i in range(1, 4):
        name = f"rack-{i:02d}"
        tb_double.add_device(name, "rack-sensor", attributes={"room": "hall-1", "row": "A"})
        tb_double.add_telemetry(name, now, {"tempTop": 24.0 + i, "tempBottom": 21.0, "humidityTop": 42.0,
                                            "humidityBottom": 47.0})
    settings = load_settings(sync_backfill_hours=1)
    run_sync(settings)
    return now


def test_judge_is_pure_and_strict():
    assert judge(Sample(1000, 21.0), Sample(1000, 21.04), 0.05, 60) == ("ok", 0.0)
    assert judge(Sample(1000, 21.0), Sample(1000, 21.2), 0.05, 60) == ("mismatch", 0.0)
    # The twin's tenth of a two-decimal reading, exactly the tolerance apart (in floats a hair more): ok.
    assert judge(Sample(1000, 23.25), Sample(1000, round(23.25, 1)), 0.05, 60) == ("ok", 0.0)
    assert judge(Sample(1000, 23.25), Sample(1000, 23.19), 0.05, 60) == ("mismatch", 0.0)
    assert judge(Sample(61_001, 21.0), Sample(1000, 21.0), 0.05, 60)[0] == "stale"
    assert judge(Sample(11_000, 22.0), Sample(1000, 21.0), 0.05, 60) == ("lagging", 10.0)
    assert judge(Sample(1000, 21.0), None, 0.05, 60)[0] == "missing"
    assert judge(Sample(1000, 21.0), Sample(2000, 23.0), 0.05, 60)[0] == "ok"  # sink ahead of our read


def test_all_sources_agree(agreeing):
    report = verify(load_settings())
    assert report["ok"], render_table(report, only_problems=True)
    assert report["counts"] == {"ok": 12}  # 3 racks x 2 positions x 2 quantities
    row = next(r for r in report["rows"] if r["rack"] == "rack-02" and r["position"] == "top"
               and r["quantity"] == "temperature")
    assert (row["thingsboard"], row["twin"], row["influx"]) == (26.0, 26.0, 26.0)
    assert report["delay_s"]["max"] is not None and report["delay_s"]["max"] >= 0
    assert "RESULT: OK" in render_table(report)


def test_injected_mismatch_is_reported_and_fails_the_exit_status(agreeing, ditto, capsys):
    ditto.things["dc.test:rack-02"]["features"]["environment"]["properties"]["tempBottom"] = 21.5
    report = verify(load_settings())
    bad = [r for r in report["rows"] if r["status"] != "ok"]
    assert [(r["rack"], r["position"], r["quantity"], r["status"]) for r in bad] == \
        [("rack-02", "bottom", "temperature", "mismatch")]
    assert bad[0]["detail"] == "twin mismatch"
    assert verify(load_settings(), tolerance=1.0)["ok"]  # within a looser tolerance

    assert cli.main(["verify", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["counts"] == {"ok": 11, "mismatch": 1}
    assert cli.main(["verify", "--tolerance", "1"]) == 0
    assert "RESULT: OK" in capsys.readouterr().out


def test_stale_twin_and_missing_influx_are_reported(agreeing, tb_double, influxd, env):
    # ThingsBoard got a reading 5 minutes newer that never reached the twin or InfluxDB.
    tb_double.add_telemetry("rack-03", agreeing + 300_000, {"tempTop": 30.0})
    influxd.query("DROP SERIES FROM rack_environment WHERE rack = 'rack-01'", env["RACKTWIN_INFLUX_BUCKET"])
    report = verify(load_settings())
    status = {(r["rack"], r["position"], r["quantity"]): (r["status"], r["detail"]) for r in report["rows"]}
    assert status[("rack-03", "top", "temperature")] == ("stale", "twin stale, influx stale")
    assert status[("rack-03", "bottom", "temperature")][0] == "ok"
    assert status[("rack-01", "top", "humidity")] == ("missing", "influx missing")
    assert not report["ok"]
    row = next(r for r in report["rows"] if r["rack"] == "rack-03" and r["quantity"] == "temperature"
               and r["position"] == "top")
    assert row["twin_lag_s"] == pytest.approx(300.0)
