"""Break things on purpose and count exactly: no reading lost, none written twice, twins converge.

Each test runs the bridge as a separate process against real Mosquitto and InfluxDB and the Ditto
double, and asserts exact counts in InfluxDB (one point per series and timestamp) and the newest
reading in every twin.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import requests

from bridge.twin import TEMPERATURE_DECIMALS, iso_ms
from tests.harness.mqtt import Publisher, wait_until
from tests.harness.process import BridgeProcess
from tests.harness.services import InfluxD, InfluxV2Adapter, Mosquitto

pytestmark = pytest.mark.slow


def stream(prefix: str, racks: int, rounds: int, base_ts: int) -> list[tuple[str, dict]]:
    """Round-major message stream: every rack reports top and bottom once per round (1 s apart)."""
    out = []
    for rnd in range(rounds):
        for rack in range(racks):
            name = f"rack-{rack:03d}"
            out.append((prefix + name, {
                "deviceName": name, "deviceType": "rack-sensor", "ts": base_ts + rnd * 1000,
                "values": {"tempTop": round(22 + (rack % 7) + rnd * 0.01, 2), "tempBottom": 20.0,
                           "humidityTop": 40.0, "humidityBottom": 45.0}}))
    return out


def point_count(influxd: InfluxD, db: str) -> int:
    rows = influxd.rows("SELECT count(temperature) FROM rack_environment", db)
    return int(rows[0]["count"]) if rows else 0


def assert_twins_newest(ditto, racks: int, rounds: int, base_ts: int, timeout: float = 30) -> None:
    """Every twin converges to its rack's newest reading (Ditto may trail InfluxDB a little)."""
    last_ts = iso_ms(base_ts + (rounds - 1) * 1000)

    def behind() -> list[str]:
        out = []
        for rack in range(racks):
            props = ditto.things.get(f"dc.test:rack-{rack:03d}", {}).get("features", {}).get("environment", {}) \
                .get("properties", {})
            # Sent to a hundredth, held in the twin to its precision: the timestamps tell the newest reading.
            sent = round(22 + (rack % 7) + (rounds - 1) * 0.01, 2)
            expected = (last_ts, last_ts, round(sent, TEMPERATURE_DECIMALS))
            if (props.get("tsTop"), props.get("tsBottom"), props.get("tempTop")) != expected:
                out.append(f"rack-{rack:03d}: {props.get('tsTop')} {props.get('tempTop')}")
        return out

    wait_until(lambda: not behind(), timeout=timeout, what="twins at the newest reading")
    assert behind() == []


def metric(bridge: BridgeProcess, name: str) -> float:
    """A sample from the bridge's /metrics, by its name and labels as exposed (``name{label="x"}``)."""
    for line in bridge.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def publish_in_background(publisher: Publisher, items, per_second: float | None = None) -> threading.Thread:
    def run():
        infos = []
        for i, (topic, payload) in enumerate(items):
            infos.append(publisher.publish(topic, payload))
            if per_second:
                time.sleep(1.0 / per_second)
            elif i % 500 == 499:
                for info in infos:
                    info.wait_for_publish(60)
                infos.clear()
        for info in infos:
            info.wait_for_publish(60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigkill_five_times_loses_nothing_and_duplicates_nothing(bridge_env, mosquitto, ditto, influxd, influx_db,
                                                                 tmp_path):
    seed = int(os.environ.get("RACKTWIN_FAULT_SEED", time.time()))
    rng = random.Random(seed)
    racks, rounds = 100, 100  # 10,000 messages = 20,000 readings
    base = int(time.time() * 1000) - 200_000
    prefix = bridge_env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    items = stream(prefix, racks, rounds, base)
    bridge = BridgeProcess(bridge_env, tmp_path / "bridge.log").start()
    publisher = Publisher(mosquitto.port)
    try:
        # Paced, so that the stream outlasts five kills and restarts: each kill must land mid-stream.
        sender = publish_in_background(publisher, items, per_second=600)
        written_at_kill = []
        for kill in range(5):
            time.sleep(rng.uniform(0.2, 1.5))
            written_at_kill.append(point_count(influxd, influx_db))
            bridge.kill()
            bridge.start()
        assert sender.is_alive(), f"seed {seed}: the stream ended before the last kill"
        assert 0 < written_at_kill[0] and written_at_kill[-1] < 2 * racks * rounds, (seed, written_at_kill)
        sender.join(120)
        assert not sender.is_alive()
        try:
            wait_until(lambda: point_count(influxd, influx_db) == 2 * racks * rounds, timeout=120,
                       what=f"20,000 points (seed {seed})")
        except AssertionError:
            short = [r for r in influxd.rows("SELECT count(temperature) FROM rack_environment GROUP BY rack, position",
                                             influx_db) if r["count"] != rounds]
            raise AssertionError(f"seed {seed}: {point_count(influxd, influx_db)} points; short series {short[:5]}; "
                                 f"metrics {bridge.metrics()[-1500:]}")
        wait_until(lambda: bridge.ready() and "racktwin_messages_in_flight 0.0" in bridge.metrics(), timeout=60,
                   what="nothing in flight")
        # Exactly one point per series and timestamp: 20,000 distinct, and each rack/position has `rounds` of them.
        per_series = influxd.rows("SELECT count(temperature) FROM rack_environment GROUP BY rack, position", influx_db)
        assert len(per_series) == 2 * racks and {int(r["count"]) for r in per_series} == {rounds}
        # ... and with the values sent (a replay that wrote another reading's value at a timestamp would show here).
        sent = sum(p["values"]["tempTop"] + p["values"]["tempBottom"] for _, p in items)
        stored = influxd.rows("SELECT sum(temperature) FROM rack_environment", influx_db)[0]["sum"]
        assert stored == pytest.approx(sent, abs=1e-6), seed
        assert_twins_newest(ditto, racks, rounds, base)
        assert bridge.terminate() == 0
    finally:
        publisher.close()
        bridge.kill()


def test_influxdb_outage_backpressure_bounded_memory_nothing_lost(bridge_env, mosquitto, ditto, tmp_path):
    influxd = InfluxD(tmp_path / "influxd").start()
    adapter = InfluxV2Adapter(influxd.url, token="test-token").start()
    influxd.create_db("outage")
    env = dict(bridge_env, RACKTWIN_INFLUX_URL=adapter.url, RACKTWIN_INFLUX_BUCKET="outage",
               RACKTWIN_MQTT_RECEIVE_MAXIMUM="200")
    racks = 50
    prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    base = int(time.time() * 1000) - 300_000
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    publisher = Publisher(mosquitto.port)
    try:
        publisher.publish_all(stream(prefix, racks, 4, base))
        wait_until(lambda: point_count(influxd, "outage") == racks * 4 * 2, what="points before the outage")
        rss_before = rss_kib(bridge.proc.pid)
        influxd.stop()
        outage_items = [(t, dict(p, ts=p["ts"] + 4000)) for t, p in stream(prefix, racks, 60, base)]
        sender = publish_in_background(publisher, outage_items, per_second=100)  # 3,000 messages over ~30 s
        wait_until(lambda: requests.get(f"http://127.0.0.1:{bridge.port}/readyz", timeout=2).status_code == 503,
                   timeout=15, what="/readyz reports the outage")
        peak_in_flight, peak_rss = 0.0, rss_before
        received_at_start = metric(bridge, "racktwin_messages_received_total")
        outage_end = time.monotonic() + 60
        while time.monotonic() < outage_end:
            peak_in_flight = max(peak_in_flight, metric(bridge, "racktwin_messages_in_flight"))
            peak_rss = max(peak_rss, rss_kib(bridge.proc.pid))
            assert requests.get(f"http://127.0.0.1:{bridge.port}/readyz", timeout=2).status_code == 503
            time.sleep(1)
        sender.join(60)
        # Backpressure: the broker holds the backlog; the bridge never holds more than its receive maximum, so
        # of the 3,000 messages published during the outage it took in about that many. Debian's Mosquitto 2.0.11
        # can overrun a client's receive maximum by a few (seen once: 204 of 200; 2.0.13 fixed inflight quota
        # handling, eclipse/mosquitto#2306): what is bounded is the window, not the 3,000.
        window = 200 + 200 // 20
        assert 0 < peak_in_flight <= window
        assert metric(bridge, "racktwin_messages_received_total") - received_at_start <= window
        assert peak_rss - rss_before < 30 * 1024, f"RSS grew {peak_rss - rss_before} KiB during the outage"
        influxd.start()
        wait_until(lambda: point_count(influxd, "outage") == racks * 64 * 2, timeout=90, what="every point after")
        wait_until(bridge.ready, timeout=30, what="ready again")
    finally:
        publisher.close()
        bridge.kill()
        adapter.stop()
        influxd.stop()


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_ditto_errors_and_timeouts_then_twins_converge(transport, bridge_env, mosquitto, ditto, influxd, influx_db,
                                                       tmp_path):
    env = dict(bridge_env, RACKTWIN_DITTO_TIMEOUT_S="1", RACKTWIN_DITTO_TRANSPORT=transport)
    racks = 20
    prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    base = int(time.time() * 1000) - 100_000
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    publisher = Publisher(mosquitto.port)
    try:
        publisher.publish_all(stream(prefix, racks, 1, base))
        wait_until(lambda: len(ditto.things) >= racks, what="twins created")
        for fault, rounds in (({"status": 503}, range(1, 10)), ({"status": 429}, range(10, 20)),
                              ({"delay": 1.5}, range(20, 30))):
            injected = ditto.inject(duration=3.0, **fault)
            fault_ends = time.monotonic() + 3.0
            items = [(t, dict(p, ts=p["ts"] + rnd * 1000)) for rnd in rounds for t, p in stream(prefix, racks, 1, base)]
            publisher.publish_all(items)
            # InfluxDB keeps receiving while Ditto misbehaves: all of this round's points before the fault ends.
            wait_until(lambda: point_count(influxd, influx_db) == racks * 2 * (rounds[-1] + 1),
                       timeout=max(0.5, fault_ends - time.monotonic()), what=f"influx carries on during {fault}")
            time.sleep(max(0.0, fault_ends - time.monotonic()) + 0.2)
            assert injected.used > 0, f"{fault} never reached a twin update"
        wait_until(lambda: all(
            {k: ditto.things[f"dc.test:rack-{r:03d}"]["features"]["environment"]["properties"].get(k)
             for k in ("tsTop", "tsBottom")} == {"tsTop": iso_ms(base + 29_000), "tsBottom": iso_ms(base + 29_000)}
            for r in range(racks)), timeout=30, what="twins converge to the newest")
        metrics = bridge.metrics()
        retries = [line for line in metrics.splitlines() if line.startswith('racktwin_ditto_updates_total{result="retry"}')]
        assert float(retries[0].split()[1]) > 0
        assert (ditto.ws_commands > 0) == (transport == "websocket")
    finally:
        publisher.close()
        bridge.kill()


def test_mosquitto_restart_mid_stream_loses_nothing(bridge_env, ditto, influxd, influx_db, tmp_path):
    broker = Mosquitto(tmp_path / "mosquitto").start()
    env = dict(bridge_env, RACKTWIN_MQTT_PORT=str(broker.port))
    racks, rounds = 50, 40
    prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    base = int(time.time() * 1000) - 100_000
    items = stream(prefix, racks, rounds, base)
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start()
    try:
        publisher = Publisher(broker.port)
        ditto.inject(delay=0.02)  # twin updates take a while: messages are still unacknowledged at the restart
        publisher.publish_all(items[: len(items) // 2])  # all acknowledged by the broker
        publisher.close()
        assert metric(bridge, "racktwin_messages_in_flight") > 0, "nothing in flight: the restart would not be mid-stream"
        broker.restart()  # while the bridge is still working through them
        ditto.clear_faults()
        publisher = Publisher(broker.port)
        publisher.publish_all(items[len(items) // 2:])
        publisher.close()
        try:
            wait_until(lambda: point_count(influxd, influx_db) == racks * rounds * 2, timeout=60, what="every point")
        except AssertionError:
            rows = influxd.rows("SELECT count(temperature) FROM rack_environment GROUP BY rack, position", influx_db)
            raise AssertionError(f"{point_count(influxd, influx_db)} points, {rows[:3]}; "
                                 f"{[l for l in bridge.metrics().splitlines() if 'messages' in l and not l.startswith('#')]}"
                                 f"{bridge.log()[-3000:]}")
        assert_twins_newest(ditto, racks, rounds, base)
    finally:
        bridge.kill()
        broker.stop()


def test_two_replicas_share_the_load_and_survive_one_kill(bridge_env, mosquitto, ditto, influxd, influx_db, tmp_path):
    shared = dict(bridge_env, RACKTWIN_MQTT_SHARED_GROUP="bridges")
    a = BridgeProcess(dict(shared, RACKTWIN_MQTT_CLIENT_ID=bridge_env["RACKTWIN_MQTT_CLIENT_ID"] + "-a"),
                      tmp_path / "a.log").start()
    b = BridgeProcess(dict(shared, RACKTWIN_MQTT_CLIENT_ID=bridge_env["RACKTWIN_MQTT_CLIENT_ID"] + "-b"),
                      tmp_path / "b.log").start()
    racks, rounds = 50, 20
    prefix = shared["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    base = int(time.time() * 1000) - 100_000
    items = stream(prefix, racks, rounds, base)
    publisher = Publisher(mosquitto.port)
    written_name = 'racktwin_influx_points_written_total{kind="reading"}'  # not the bridge's stats or forecasts

    try:
        publisher.publish_all(items[: len(items) // 2])
        wait_until(lambda: point_count(influxd, influx_db) == len(items), timeout=60, what="first half")
        got_a = metric(a, "racktwin_messages_accepted_total")
        got_b = metric(b, "racktwin_messages_accepted_total")
        assert got_a > 0 and got_b > 0 and got_a + got_b == len(items) // 2  # split, and nothing taken twice
        wait_until(lambda: metric(a, written_name) + metric(b, written_name) >= len(items), what="both flushed")
        assert metric(a, written_name) + metric(b, written_name) == len(items)  # every point written exactly once
        a.kill()  # SIGKILL: no goodbye; the broker must route everything new to b at once
        written_b = metric(b, written_name)
        publisher.publish_all(items[len(items) // 2:])
        wait_until(lambda: point_count(influxd, influx_db) == 2 * len(items), timeout=60, what="second half via b")
        assert metric(b, "racktwin_messages_accepted_total") == got_b + len(items) // 2
        wait_until(lambda: metric(b, written_name) - written_b >= len(items), what="b flushed the second half")
        assert metric(b, written_name) == written_b + len(items)  # b alone wrote all of it, each point once
        assert_twins_newest(ditto, racks, rounds, base)
    finally:
        publisher.close()
        a.kill()
        b.kill()


def test_sigterm_while_influxdb_refuses_writes_exits_in_time_and_loses_nothing(bridge_env, mosquitto, ditto, influxd,
                                                                                influx_db, tmp_path):
    """SIGTERM while every InfluxDB write fails: the bridge exits 0 soon after its shutdown timeout instead of
    hanging in the InfluxDB client's retries, acknowledges nothing it did not write, and the next start (same
    persistent session) writes every reading."""
    adapter = InfluxV2Adapter(influxd.url, token="test-token").start()
    adapter.fail_status = 503
    env = dict(bridge_env, RACKTWIN_INFLUX_URL=adapter.url, RACKTWIN_SHUTDOWN_TIMEOUT_S="3")
    racks, rounds = 20, 3
    prefix = env["RACKTWIN_MQTT_TOPIC"].rstrip("#")
    base = int(time.time() * 1000) - 300_000
    bridge = BridgeProcess(env, tmp_path / "bridge.log").start(wait_ready=False)
    publisher = Publisher(mosquitto.port)
    try:
        wait_until(lambda: requests.get(f"http://127.0.0.1:{bridge.port}/readyz", timeout=2).json()["checks"]["mqtt"],
                   what="bridge subscribed")
        publisher.publish_all(stream(prefix, racks, rounds, base))
        wait_until(lambda: f"racktwin_messages_in_flight {float(racks * rounds)}" in bridge.metrics(),
                   what="every message held, none written")
        started = time.monotonic()
        assert bridge.terminate(timeout=30) == 0
        took = time.monotonic() - started
        assert took < 3 + 12, f"SIGTERM took {took:.1f} s"
        assert "not confirmed within" in bridge.log()
        assert point_count(influxd, influx_db) == 0
        adapter.fail_status = None
        bridge = BridgeProcess(env, tmp_path / "bridge2.log").start()
        wait_until(lambda: point_count(influxd, influx_db) == racks * rounds * 2, timeout=60,
                   what="every reading written after the restart")
    finally:
        publisher.close()
        bridge.kill()
        adapter.stop()
