"""Smoke test of `make bench`: the tiny --quick configuration runs end to end and reports every figure.

No timing assertions: only that each figure is present, finite and plausible (the machine decides the rest).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import TARGETS, percentile
from tests.harness.services import MissingService, _binary

REPO = Path(__file__).resolve().parent.parent

EXPECTED = [
    "ceiling_msgs_per_s", "bridge_msgs_per_s", "bridge_to_ceiling_ratio", "bridge_cold_msgs_per_s",
    "latency_offered_msgs_per_s", "latency_host_cpu_stolen_pct", "latency_ws_host_cpu_stolen_pct",
    "latency_influx_p50_s", "latency_influx_p95_s", "latency_influx_p99_s",
    "latency_ditto_p50_s", "latency_ditto_p95_s", "latency_ditto_p99_s",
    "bridge_ws_msgs_per_s", "bridge_ws_to_ceiling_ratio", "latency_ws_influx_p99_s", "latency_ws_ditto_p99_s",
    "ditto_requests_per_msg_burst", "ditto_requests_per_msg_merge", "ditto_requests_per_msg_merge_slow",
    "ditto_requests_per_msg_steady", "bridge_peak_rss_mb", "released_readings",
    "ditto_double_validated_req_per_s", "ditto_double_req_per_s", "ditto_double_headroom",
    "ditto_double_ws_commands_per_s", "ditto_double_ws_headroom",
    "influx_adapter_points_per_s", "influx_adapter_headroom",
    "influx_writer_us_per_point", "influx_sync_us_per_point", "influx_writer_to_sync_ratio",
    "forecast_us_per_reading", "forecast_to_decode_map_ratio",
    "ceiling_cpu_ms_per_msg", "cpu_ms_per_msg_bridge", "cpu_ms_per_msg_ditto_double", "cpu_ms_per_msg_rest",
    "cpu_ms_per_msg_bridge_ws", "cpu_ms_per_msg_ditto_double_ws",
]


def test_stolen_share_is_the_steal_ticks_over_all_ticks():
    from bench.run import host_cpu_ticks, stolen_share

    # /proc/stat "cpu" user nice system idle iowait irq softirq steal: 10 of 200 ticks stolen in between
    assert stolen_share((50, 1000), (60, 1200)) == pytest.approx(0.05)
    assert stolen_share((5, 100), (5, 100)) == 0.0
    steal, total = host_cpu_ticks()
    assert 0 <= steal <= total and total > 0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(list(reversed(values)), 100) == 100.0
    assert percentile([], 50) is None


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> tuple[dict, str]:
    try:
        _binary("mosquitto", "mosquitto")
        _binary("influxd", "influxdb")
    except MissingService as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_bench_reports_every_figure(quick_result):
    result, stdout = quick_result
    figures = result["figures"]
    assert sorted(figures) == sorted(EXPECTED)
    for key, f in figures.items():
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]), (key, f)
        # CPU time comes in clock ticks (10 ms): a light process may show none in the tiny run, nor the
        # hypervisor steal anything from a quiet host.
        assert f["value"] >= 0 if "cpu_ms" in key or "stolen" in key or key == "released_readings" \
            else f["value"] > 0, (key, f)
        assert f["label"] in stdout, key  # every figure is in the printed table
        if key in TARGETS:
            assert f["target"] and isinstance(f["ok"], bool), key
        else:
            assert f["ok"] is None, key
    for sink in ("influx", "ditto"):
        p50, p95, p99 = (figures[f"latency_{sink}_p{q}_s"]["value"] for q in (50, 95, 99))
        assert p50 <= p95 <= p99 < 60, sink
    assert 0 < figures["bridge_to_ceiling_ratio"]["value"] < 10
    assert 10 < figures["bridge_peak_rss_mb"]["value"] < 2000


def test_quick_bench_delivered_everything(quick_result):
    result, _ = quick_result
    racks, rounds = result["config"]["racks"], result["config"]["burst_rounds"]
    assert result["ceiling"]["messages"] == result["bridge"]["messages"] == racks * rounds
    assert result["bridge_cold"]["messages"] == racks
    assert result["websocket"]["bridge"]["messages"] == racks * rounds
    assert result["bridge"]["ditto_websocket_commands"] == 0  # HTTP merge-PATCHes only
    assert result["websocket"]["bridge"]["ditto_websocket_commands"] >= result["websocket"]["bridge"]["ditto_reading_patches"]
    for run in (result["bridge_cold"], result["bridge"], result["websocket"]["bridge"]):
        assert run["rejected"] == 0
        assert run["influx_points"] == 2 * run["messages"]  # two positions per rack envelope
        assert run["ditto_reading_patches"] >= 1
        assert run["released_readings"] == 0  # every ack waited for its twin: "fully delivered" holds
    assert result["latency"]["released_readings"] == 0 and result["figures"]["released_readings"]["ok"] is True
    assert result["bridge"]["cpu_ms_per_message"]["bridge"] > 0  # 400 messages take the bridge far over a tick
    assert result["bridge_cold"]["ditto_requests_per_message"] >= 2  # GET 404 + PUT + PATCH per new twin
    # Against a Ditto answering in 50 ms, a rack's queued readings go out together: fewer requests than readings.
    slow = result["bridge_merge_slow_ditto"]
    assert slow["messages"] == result["config"]["merge_racks"] * result["config"]["merge_rounds"]
    assert slow["influx_points"] == 2 * slow["messages"] and slow["rejected"] == 0
    assert slow["ditto_reading_patches"] < slow["messages"] and slow["coalesced_readings"] > 0
    latency = result["latency"]
    assert latency["influx_points"] == 2 * latency["messages"]
    assert 0 < latency["ditto_values"] <= 2 * latency["messages"]
    for run in ("ditto_validated", "ditto_unvalidated", "ditto_websocket"):
        assert result["capacity"][run]["errors"] == 0, run  # every capacity request a real, accepted update
    machine = result["machine"]
    assert machine["nproc"] >= 1 and machine["python"].startswith("3.")


@pytest.mark.parametrize("block", [
    b"Host: 127.0.0.1:8080\r\nAuthorization: Basic eDp5\r\nContent-Type: application/merge-patch+json\r\n"
    b"Content-Length: 42\r\nX-Empty:\r\nX-Spaces:   padded value  \r\n\r\n",
    b"Accept: a\r\nAccept: b\r\nkeep-case: MiXeD\n\n",
    b"X-Folded: first\r\n second line\r\nHost: h\r\n\r\n",  # folded: the stdlib parser takes over
    b"Bad Name: x\r\nHost: h\r\n\r\n",
    b"\r\n",
])
def test_the_bench_servers_header_parser_gives_what_the_stdlib_gives(block):
    import io
    import http.client

    from bench.servers import fast_parse_headers

    fast, slow = fast_parse_headers(io.BytesIO(block + b"BODY")), http.client.parse_headers(io.BytesIO(block + b"BODY"))
    assert fast.items() == slow.items()
    assert type(fast) is type(slow)
