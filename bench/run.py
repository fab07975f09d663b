"""`make bench`: throughput, latency, Ditto requests per message and memory of the bridge, all on loopback.

``python -m bench.run [--quick] [--output PATH]`` prints a table and writes JSON (default
bench/results/latest.json). Everything runs in one go on this machine so the figures compare like with like:

- capacity of the sinks used here (Ditto contract double with and without validation, InfluxDB v2 adapter in
  front of a real influxd), so a figure limited by them is recognisable;
- ceiling: the message stream (rule-engine envelopes, one per rack and round) drained from a pre-loaded
  Mosquitto by a minimal paho subscriber (QoS 1, JSON decode, ack);
- bridge: the same stream, same broker, same method, through ``python -m bridge run`` into InfluxDB and the
  Ditto double, until every message is acked (both sinks confirmed); its ratio to the ceiling;
- latency at a fixed offered load (10,000 racks reporting every 10 s = 1,000 msg/s), measured at the sinks;
- Ditto requests per message under the burst, peak RSS of the bridge, forecast tracker cost;
- CPU per point of the bridge's InfluxDB writer (influxdb-client's batching WriteApi) against the same
  client's synchronous writes of the same points;
- the burst and the latency run again with ``RACKTWIN_DITTO_TRANSPORT=websocket`` (Ditto Protocol merge
  commands on ``/ws/2`` instead of HTTP merge-PATCHes), for comparison.

``RACKTWIN_*`` variables in the caller's environment are passed to the bridge under test, to measure a setting.

"Pre-loaded" = the consumer is connected and subscribed, then paused (SIGSTOP) while the whole stream is
published, and timed from SIGCONT to its last ack: no process start-up in the figure, identical for both.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tests.harness.mqtt import Publisher
from tests.harness.process import BridgeProcess
from tests.harness.services import InfluxD, Mosquitto

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "latest.json"
BUCKET = "bench"
ORG = "racktwin"
RECEIVE_MAXIMUM = 1000  # the bridge's default; the ceiling subscriber gets the same window
SLOW_DITTO_S = 0.05  # the Ditto round trip of the "slow Ditto" merging run

FULL = {"racks": 10_000, "burst_rounds": 2, "merge_racks": 200, "merge_rounds": 20, "report_interval_s": 10.0,
        "latency_s": 20.0, "capacity_s": 2.0, "forecast_racks": 10_000, "forecast_fill_min": 30,
        "forecast_measure_min": 1, "timeout_s": 180.0, "writer_points": 60_000}
QUICK = {"racks": 200, "burst_rounds": 2, "merge_racks": 20, "merge_rounds": 5, "report_interval_s": 2.0,
         "latency_s": 2.0, "capacity_s": 0.5, "forecast_racks": 200, "forecast_fill_min": 30,
         "forecast_measure_min": 1, "timeout_s": 60.0, "writer_points": 4_000}

TARGETS = {  # figure -> (comparison, bound), from issue 6
    "bridge_to_ceiling_ratio": (">=", 0.5),
    "latency_influx_p99_s": ("<=", 1.5),
    "latency_ditto_p99_s": ("<=", 1.0),
    "bridge_peak_rss_mb": ("<=", 200.0),
    "ditto_double_headroom": (">=", 1.0),
    "ditto_double_ws_headroom": (">=", 1.0),
    "influx_adapter_headroom": (">=", 1.0),
    # Acks that did not wait for the twin (the bridge let Ditto go after a stall): the runs' figures hold only at 0.
    "released_readings": ("<=", 0),
}


# -- machine and small helpers --------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": mem_gb, "python": platform.python_version(),
            "platform": platform.platform(), "hostname": platform.node()}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS in kB from /proc/<pid>/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def host_cpu_ticks() -> tuple[int, int]:
    """(ticks stolen by the hypervisor for other guests, all ticks) of every CPU so far (/proc/stat "cpu")."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks[:8])


def stolen_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the host's CPU time the hypervisor gave other guests in between: how noisy the run was."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds each named process spent between start() and stop(): who the run's work landed on."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.started: dict[str, float] = {}

    def start(self) -> None:
        self.started = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self.started[name] for name, pid in self.pids.items()}


def report_failure(bridge: BridgeProcess, ditto: "ServerProcess", influx: "ServerProcess") -> None:
    """What a failed bench phase leaves to look at: the bridge's log and counters, the sink doubles' logs."""
    sys.stderr.write(f"bridge log tail:\n{bridge.log()[-3000:]}\n")
    try:
        counters = {k: v for k, v in scrape(bridge).items()
                    if any(w in k for w in ("in_flight", "received", "accepted", "ditto_updates", "points_written"))}
        sys.stderr.write(f"bridge counters: {counters}\n")
    except Exception as exc:  # noqa: BLE001 - the bridge may be the thing that broke
        sys.stderr.write(f"bridge counters unavailable: {exc}\n")
    for name, server in (("Ditto double", ditto), ("InfluxDB adapter", influx)):
        sys.stderr.write(f"{name} log tail:\n{server.log_tail()}\n")
    # A bridge that stopped delivering without a word is stuck somewhere: where its threads are, if py-spy is here.
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if bridge.proc.poll() is None and Path(spy).exists():
        subprocess.run([spy, "dump", "-p", str(bridge.proc.pid)], stdout=sys.stderr, stderr=sys.stderr, timeout=60,
                       check=False)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class ServerProcess:
    """A bench.servers process: first stdout line is its URL, then one JSON reply per stdin command."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.servers", *args], cwd=REPO,
                                     env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), text=True)
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError(f"bench.servers {args[0]} did not start: {log.read_text()[-2000:]}")
        self.url = json.loads(first)["url"]
        self.lock = threading.Lock()
        self.log_path = log

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def call(self, command: str) -> dict[str, Any]:
        with self.lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the message stream ---------------------------------------------------------------------------------

ENVELOPE = ('{"deviceName":"%s","deviceType":"rack-sensor","ts":%d,"values":{"tempTop":%.1f,"tempBottom":%.1f,'
            '"humidityTop":%.1f,"humidityBottom":%.1f}}')


def rack_name(i: int) -> str:
    return f"bench-r{i:05d}"


def envelope(rng: random.Random, rack: int, ts_ms: int) -> bytes:
    bottom = rng.uniform(19.0, 24.0)
    return (ENVELOPE % (rack_name(rack), ts_ms, bottom + rng.uniform(2.0, 8.0), bottom,
                        rng.uniform(35.0, 45.0), rng.uniform(40.0, 55.0))).encode()


class Stream:
    """Rounds of one envelope per rack; source timestamps strictly increase across everything published,
    so a later run never arrives as 'stale' at a twin an earlier run wrote."""

    def __init__(self, racks: int, seed: int = 6):
        self.racks = racks
        self.rng = random.Random(seed)
        self.last_ts = 0

    def next_ts(self, ts_ms: int | None = None) -> int:
        self.last_ts = max(ts_ms if ts_ms is not None else int(time.time() * 1000), self.last_ts + 1)
        return self.last_ts

    def burst(self, rounds: int) -> list[tuple[str, bytes]]:
        """The stream for a pre-loaded drain: device names without topic prefix, payloads."""
        now = int(time.time() * 1000)
        out = []
        for k in range(rounds):
            ts = self.next_ts(now - (rounds - k) * 1000)
            out += [(rack_name(i), envelope(self.rng, i, ts)) for i in range(self.racks)]
        return out


def publish_burst(port: int, prefix: str, items: list[tuple[str, bytes]]) -> float:
    """Publish everything with QoS 1 and wait for every PUBACK; returns messages/s of the publisher."""
    pub = Publisher(port)
    try:
        started = time.monotonic()
        infos = [pub.publish(f"{prefix}/{device}", payload) for device, payload in items]
        for info in infos:
            info.wait_for_publish(120)
        return len(items) / (time.monotonic() - started)
    finally:
        pub.close()


# -- capacity of the sinks ------------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# A sender for one capacity thread: (thing id, merge patch, condition) -> status, and how to close it.
Sender = tuple[Callable[[str, dict[str, Any], str], int], Callable[[], None]]


def _conditional_merges(seconds: float, threads: int, open_sender: Callable[[int], Sender]) -> tuple[float, int]:
    """Conditional merges like the bridge's, one thing per thread, for ``seconds``: (merges/s, errors)."""
    from bridge.twin import iso_ms

    counts, errors = [0] * threads, [0] * threads
    prop = "features/environment/properties/tsTop"
    start_ms = int(time.time() * 1000)
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        send, close = open_sender(i)
        try:
            n = 0
            while time.monotonic() < deadline:
                ts = iso_ms(start_ms + n)
                status = send(f"bench:cap-{i}", {"features": {"environment": {"properties": {
                    "tempTop": 20 + n % 50 / 10, "tsTop": ts}}}}, f'or(not(exists({prop})),lt({prop},"{ts}"))')
                if status in (201, 204):
                    counts[i] += 1
                else:
                    errors[i] += 1
                n += 1
        finally:
            close()

    elapsed = _timed_workers(worker, threads)
    return sum(counts) / elapsed, sum(errors)


def ditto_capacity(url: str, auth: str, seconds: float, threads: int = 8) -> dict[str, Any]:
    """Conditional merge-PATCHes like the bridge's, one thing per thread, keep-alive: requests/s."""
    target = urllib.parse.urlsplit(url)

    def open_sender(_: int) -> Sender:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)

        def send(tid: str, patch: dict[str, Any], condition: str) -> int:
            conn.request("PATCH", f"/api/2/things/{tid}?condition={urllib.parse.quote(condition)}", json.dumps(patch),
                         {"Content-Type": "application/merge-patch+json", "Authorization": auth})
            resp = conn.getresponse()
            resp.read()
            return resp.status

        return send, conn.close

    rate, errors = _conditional_merges(seconds, threads, open_sender)
    return {"requests_per_s": rate, "errors": errors, "threads": threads}


def ditto_ws_capacity(url: str, user: str, password: str, seconds: float, threads: int = 8) -> dict[str, Any]:
    """The same conditional merges as Ditto Protocol commands over one WebSocket, through the bridge's own
    client (bridge/sinks/ditto_ws.py), one thing per thread: commands/s."""
    from bridge.sinks.ditto_ws import DittoWebSocket

    channel = DittoWebSocket(url.replace("http://", "ws://", 1) + "/ws/2", user, password, timeout=10.0)

    def open_sender(_: int) -> Sender:
        return (lambda tid, patch, condition: channel.merge(tid, patch, condition)[0]), (lambda: None)

    try:
        rate, errors = _conditional_merges(seconds, threads, open_sender)
    finally:
        channel.close()
    return {"commands_per_s": rate, "errors": errors, "threads": threads}


def _timed_workers(worker: Callable[[int], None], threads: int) -> float:
    """Run ``worker(i)`` on ``threads`` threads at once; seconds until the last one finished."""
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.monotonic() - started


def influx_capacity(url: str, token: str, seconds: float, threads: int = 2, batch: int = 1000) -> dict[str, Any]:
    """Batches of ``batch`` points (like the bridge's) POSTed to the v2 adapter: points/s."""
    target = urllib.parse.urlsplit(url)
    counts, errors = [0] * threads, [0] * threads
    path = f"/api/v2/write?org={ORG}&bucket={BUCKET}&precision=ms"
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
        n = 0
        while time.monotonic() < deadline:
            ts = int(time.time() * 1000)
            body = "\n".join(f"bench_capacity,writer=w{i},series=s{j} value={(n + j) % 97}.5 {ts}"
                             for j in range(batch)).encode()
            conn.request("POST", path, body, {"Authorization": f"Token {token}",
                                              "Content-Type": "text/plain; charset=utf-8"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 204:
                counts[i] += batch
            else:
                errors[i] += 1
            n += 1
        conn.close()

    elapsed = _timed_workers(worker, threads)
    return {"points_per_s": sum(counts) / elapsed, "batches_per_s": sum(counts) / batch / elapsed,
            "errors": sum(errors), "batch": batch, "threads": threads}


def influx_writer_cost(url: str, token: str, points: int) -> dict[str, Any]:
    """CPU per point of the bridge's InfluxDB writer (influxdb-client's batching WriteApi, plus the map from
    lines back to their messages) against the client's synchronous writes of the same 1,000-point batches, the
    cheapest way to write with it: what the batching client costs. Both run in this process (the adapter and
    influxd in their own), the writer with at most RECEIVE_MAXIMUM messages of two points in flight."""
    from influxdb_client import InfluxDBClient, WritePrecision
    from influxdb_client.client.write_api import SYNCHRONOUS

    from bridge.config import Settings
    from bridge.metrics import Metrics
    from bridge.sinks.influx import InfluxWriter

    ts0 = int(time.time() * 1000) - 7_200_000

    def messages(measurement: str) -> list[list[str]]:
        return [[f"{measurement},position={pos},rack=r{i % 10_000} temperature={20 + i % 7}.5,humidity=40.0 {ts0 + i}"
                 for pos in ("top", "bottom")] for i in range(points // 2)]

    lines = [line for m in messages("bench_writer_sync") for line in m]
    client = InfluxDBClient(url=url, token=token, org=ORG)
    api = client.write_api(write_options=SYNCHRONOUS)
    cpu0 = time.process_time()
    for i in range(0, len(lines), 1000):
        api.write(bucket=BUCKET, org=ORG, record="\n".join(lines[i:i + 1000]), write_precision=WritePrecision.MS)
    sync_cpu = time.process_time() - cpu0
    client.close()

    batches = messages("bench_writer")
    writer = InfluxWriter(Settings(influx_url=url, influx_token=token, influx_org=ORG, influx_bucket=BUCKET),
                          Metrics())
    writer.start()
    confirmed = threading.Semaphore(0)
    try:
        cpu0 = time.process_time()
        for i in range(0, len(batches), RECEIVE_MAXIMUM):
            window = batches[i:i + RECEIVE_MAXIMUM]
            for message in window:
                writer.submit(message, confirmed.release)
            for _ in window:
                if not confirmed.acquire(timeout=60):
                    raise RuntimeError("the InfluxDB writer confirmed nothing for 60 s")
        writer_cpu = time.process_time() - cpu0
    finally:
        writer.stop(5.0)
    return {"points": len(lines), "writer_us_per_point": writer_cpu / len(lines) * 1e6,
            "sync_us_per_point": sync_cpu / len(lines) * 1e6}


# -- the bridge -----------------------------------------------------------------------------------------


# What the drain polls ask for, 20 times a second: rendering all of /metrics each time cost the bridge under
# test about 1 ms of CPU per poll (2-5 % of its time while draining), a load no Prometheus puts on it.
DELIVERY_METRICS = ["racktwin_messages_accepted_total", "racktwin_messages_rejected_total",
                    "racktwin_messages_in_flight", "racktwin_ditto_coalesced_total",
                    # Acks that did not wait for the twin (Ditto stalled): nonzero means the figure is not "fully
                    # delivered" for them, so it is reported beside the throughput.
                    "racktwin_ditto_released_total"]


def scrape(bridge: BridgeProcess, names: list[str] | None = None) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in bridge.metrics(names).splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def delivered_count(metrics: dict[str, float]) -> float:
    """Messages the bridge has finished with (acked): accepted or rejected, none in flight."""
    rejected = sum(v for k, v in metrics.items() if k.startswith("racktwin_messages_rejected_total"))
    return metrics.get("racktwin_messages_accepted_total", 0.0) + rejected


def wait_delivered(bridge: BridgeProcess, total: float, timeout: float) -> dict[str, float]:
    def check() -> dict[str, float] | None:
        m = scrape(bridge, DELIVERY_METRICS)
        return m if delivered_count(m) >= total and m.get("racktwin_messages_in_flight", 1) == 0 else None

    return wait_for(check, timeout, f"the bridge to deliver {total:.0f} messages", interval=0.05)


def paused(pid: int):  # noqa: ANN201 - a context manager
    """SIGSTOP the consumer; SIGCONT on exit (also on error)."""

    class _Paused:
        def __enter__(self) -> None:
            os.kill(pid, signal.SIGSTOP)

        def __exit__(self, *exc: object) -> None:
            os.kill(pid, signal.SIGCONT)

    return _Paused()


def run_ceiling(broker: Mosquitto, items: list[tuple[str, bytes]], workdir: Path) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.ceiling", "--port", str(broker.port), "--topic", "bench/ceiling/#",
         "--client-id", "bench-ceiling", "--count", str(len(items)), "--receive-maximum", str(RECEIVE_MAXIMUM)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(workdir / "ceiling.log", "ab"), text=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"ceiling subscriber did not subscribe: {(workdir / 'ceiling.log').read_text()}")
        cpu = CpuMeter({"subscriber": proc.pid, "mosquitto": broker.proc.pid})
        with paused(proc.pid):
            publish_rate = publish_burst(broker.port, "bench/ceiling", items)
            resumed = time.monotonic()
            cpu.start()
        line = proc.stdout.readline().split()
        if not line or line[0] != "done":
            raise RuntimeError(f"ceiling subscriber failed: {(workdir / 'ceiling.log').read_text()}")
        cpu_s = cpu.stop()  # the subscriber lingers 0.1 s after "done" for its last acks
        elapsed = float(line[1]) - resumed
        proc.wait(10)
        return {"messages": len(items), "drain_s": elapsed, "messages_per_s": len(items) / elapsed,
                "publisher_messages_per_s": publish_rate,
                "cpu_ms_per_message": {name: 1000 * s / len(items) for name, s in cpu_s.items()}}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_bridge_burst(bridge: BridgeProcess, broker: Mosquitto, items: list[tuple[str, bytes]],
                     ditto: ServerProcess, influx: ServerProcess, timeout: float,
                     others: dict[str, int]) -> dict[str, Any]:
    """``others``: pids of the processes besides the bridge whose CPU time the drain is charged with."""
    before = scrape(bridge)
    ditto.call("reset")
    influx.call("reset")
    cpu = CpuMeter({"bridge": bridge.proc.pid, **others})
    with paused(bridge.proc.pid):
        publish_burst(broker.port, "bench/bridge", items)
        resumed = time.monotonic()
        cpu.start()
    after = wait_delivered(bridge, delivered_count(before) + len(items), timeout)
    elapsed = time.monotonic() - resumed
    cpu_s = cpu.stop()
    d, i = ditto.call("stats"), influx.call("stats")
    n = len(items)
    return {
        "cpu_ms_per_message": {name: 1000 * s / n for name, s in cpu_s.items()},
        "cpu_share": {name: s / elapsed for name, s in cpu_s.items()},
        "messages": n,
        "drain_s": elapsed,
        "messages_per_s": n / elapsed,
        "rejected": delivered_count(after) - after.get("racktwin_messages_accepted_total", 0)
        - (delivered_count(before) - before.get("racktwin_messages_accepted_total", 0)),
        "influx_points": i["points"],
        "influx_points_per_s": i["points"] / elapsed,
        "ditto_requests": d["requests_total"],
        "ditto_requests_by_status": d["requests"],
        "ditto_requests_per_s": d["requests_total"] / elapsed,
        "ditto_requests_per_message": d["requests_total"] / n,
        "ditto_reading_patches": d["patches"].get("reading", 0),
        "ditto_websocket_commands": d["ws_commands"],
        "coalesced_readings": after.get("racktwin_ditto_coalesced_total", 0)
        - before.get("racktwin_ditto_coalesced_total", 0),
        "released_readings": after.get("racktwin_ditto_released_total", 0)
        - before.get("racktwin_ditto_released_total", 0),
    }


def run_latency(bridge: BridgeProcess, broker: Mosquitto, stream: Stream, rate: float, seconds: float,
                ditto: ServerProcess, influx: ServerProcess, timeout: float) -> dict[str, Any]:
    """Offered load: ``rate`` messages/s, racks in turn, each with ts = its publish time."""
    before = scrape(bridge)
    ditto.call("reset")
    influx.call("reset")
    pub = Publisher(broker.port)
    total = int(rate * seconds)
    sent, tick = 0, 0.01
    host_before = host_cpu_ticks()
    started = time.monotonic()
    try:
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            while sent < due:
                rack = sent % stream.racks
                pub.publish(f"bench/bridge/{rack_name(rack)}", envelope(stream.rng, rack, stream.next_ts()))
                sent += 1
            time.sleep(tick)
        offered = total / (time.monotonic() - started)
    finally:
        pub.close()
    after = wait_delivered(bridge, delivered_count(before) + total, timeout)
    stolen = stolen_share(host_before, host_cpu_ticks())
    d, i = ditto.call("stats"), influx.call("stats")
    out: dict[str, Any] = {"messages": total, "offered_messages_per_s": offered, "seconds": seconds,
                           "host_cpu_stolen_share": stolen,
                           "influx_points": len(i["latencies"]), "ditto_values": len(d["latencies"]),
                           "ditto_requests_per_message": d["requests_total"] / total,
                           "released_readings": after.get("racktwin_ditto_released_total", 0)
                           - before.get("racktwin_ditto_released_total", 0)}
    for sink, values in (("influx", i["latencies"]), ("ditto", d["latencies"])):
        for q in (50, 95, 99):
            out[f"{sink}_p{q}_s"] = percentile(values, q)
        out[f"{sink}_max_s"] = max(values) if values else None
    return out


def forecast_cost(cfg: dict[str, Any]) -> dict[str, Any] | None:
    try:
        from bridge.forecast.evaluate import measure_cost
    except ImportError:
        return None
    return measure_cost(cfg["forecast_racks"], fill_minutes=cfg["forecast_fill_min"],
                        measure_minutes=cfg["forecast_measure_min"])


# -- the report -----------------------------------------------------------------------------------------


def figure(value: float | None, unit: str, label: str, key: str) -> dict[str, Any]:
    target = TARGETS.get(key)
    ok = None
    if target and value is not None:
        ok = value >= target[1] if target[0] == ">=" else value <= target[1]
    return {"label": label, "value": value, "unit": unit,
            "target": f"{target[0]} {target[1]:g}" if target else None, "ok": ok}


def figures(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cap, ceil, warm, cold, lat = r["capacity"], r["ceiling"], r["bridge"], r["bridge_cold"], r["latency"]
    f = {
        "ceiling_msgs_per_s": figure(ceil["messages_per_s"], "msg/s", "Ceiling: paho subscriber drain", ""),
        "bridge_msgs_per_s": figure(warm["messages_per_s"], "msg/s", "Bridge: fully delivered (warm twins)", ""),
        "bridge_to_ceiling_ratio": figure(warm["messages_per_s"] / ceil["messages_per_s"], "",
                                          "Bridge / ceiling", "bridge_to_ceiling_ratio"),
        "bridge_cold_msgs_per_s": figure(cold["messages_per_s"], "msg/s",
                                         "Bridge: first contact (creates every twin)", ""),
        "latency_offered_msgs_per_s": figure(lat["offered_messages_per_s"], "msg/s", "Latency run: offered load", ""),
    }
    for sink, name in (("influx", "InfluxDB"), ("ditto", "Ditto")):
        for q in (50, 95, 99):
            key = f"latency_{sink}_p{q}_s"
            f[key] = figure(lat[f"{sink}_p{q}_s"], "s", f"Latency to {name} p{q}", key)
    runs = [cold, warm, r["bridge_merge"], r.get("bridge_merge_slow_ditto", {}), lat,
            r["websocket"].get("first_contact", {}), r["websocket"]["bridge"], r["websocket"]["latency"]]
    f["released_readings"] = figure(sum(run.get("released_readings", 0) for run in runs), "readings",
                                    "Acknowledged before their twin (Ditto stalled), all runs", "released_readings")
    f["latency_host_cpu_stolen_pct"] = figure(100 * lat.get("host_cpu_stolen_share", 0.0), "%",
                                              "Latency run: host CPU taken by other guests (steal)", "")
    ws = r["websocket"]
    f["bridge_ws_msgs_per_s"] = figure(ws["bridge"]["messages_per_s"], "msg/s",
                                       "Bridge over Ditto's WebSocket: fully delivered (warm twins)", "")
    f["bridge_ws_to_ceiling_ratio"] = figure(ws["bridge"]["messages_per_s"] / ceil["messages_per_s"], "",
                                             "Bridge over WebSocket / ceiling", "")
    for sink, name in (("influx", "InfluxDB"), ("ditto", "Ditto")):
        f[f"latency_ws_{sink}_p99_s"] = figure(ws["latency"][f"{sink}_p99_s"], "s",
                                               f"Latency to {name} p99, WebSocket transport", "")
    f["latency_ws_host_cpu_stolen_pct"] = figure(100 * ws["latency"].get("host_cpu_stolen_share", 0.0), "%",
                                                 "Latency run over WebSocket: host CPU taken by other guests", "")
    f["ditto_requests_per_msg_burst"] = figure(warm["ditto_requests_per_message"], "req/msg",
                                               f"Ditto requests per message, burst of {r['config']['burst_rounds']}"
                                               " rounds", "")
    f["ditto_requests_per_msg_merge"] = figure(r["bridge_merge"]["ditto_requests_per_message"], "req/msg",
                                               f"Ditto requests per message, backlog of {r['config']['merge_rounds']}"
                                               " readings per rack", "")
    f["ditto_requests_per_msg_merge_slow"] = figure(
        r["bridge_merge_slow_ditto"]["ditto_requests_per_message"], "req/msg",
        f"Ditto requests per message, the same backlog, Ditto answering in {SLOW_DITTO_S * 1000:.0f} ms", "")
    f["ditto_requests_per_msg_steady"] = figure(lat["ditto_requests_per_message"], "req/msg",
                                                "Ditto requests per message, steady load", "")
    # Where the CPU went: every process of a run shares the same cores, so a sink double that needs as much
    # CPU per message as the bridge halves what the bridge can get, whatever its capacity alone.
    f["ceiling_cpu_ms_per_msg"] = figure(ceil["cpu_ms_per_message"]["subscriber"], "ms/msg",
                                         "CPU per message: ceiling subscriber", "")
    cpu = warm["cpu_ms_per_message"]
    f["cpu_ms_per_msg_bridge"] = figure(cpu["bridge"], "ms/msg", "CPU per message during the burst: bridge", "")
    f["cpu_ms_per_msg_ditto_double"] = figure(cpu["ditto_double"], "ms/msg",
                                              "CPU per message during the burst: Ditto double", "")
    f["cpu_ms_per_msg_rest"] = figure(cpu["mosquitto"] + cpu["influxd"] + cpu["influx_adapter"], "ms/msg",
                                      "CPU per message during the burst: Mosquitto + InfluxDB + adapter", "")
    f["cpu_ms_per_msg_bridge_ws"] = figure(ws["bridge"]["cpu_ms_per_message"]["bridge"], "ms/msg",
                                           "CPU per message during the burst: bridge, WebSocket transport", "")
    f["cpu_ms_per_msg_ditto_double_ws"] = figure(ws["bridge"]["cpu_ms_per_message"]["ditto_double"], "ms/msg",
                                                 "CPU per message during the burst: Ditto double, WebSocket", "")
    f["bridge_peak_rss_mb"] = figure(r["bridge_memory"]["peak_rss_mb"], "MB",
                                     f"Bridge peak RSS, {r['config']['racks']:,} racks", "bridge_peak_rss_mb")
    f["ditto_double_validated_req_per_s"] = figure(cap["ditto_validated"]["requests_per_s"], "req/s",
                                                   "Ditto double capacity, validated", "")
    f["ditto_double_req_per_s"] = figure(cap["ditto_unvalidated"]["requests_per_s"], "req/s",
                                         "Ditto double capacity, unvalidated (used)", "")
    f["ditto_double_headroom"] = figure(cap["ditto_unvalidated"]["requests_per_s"] / max(warm["ditto_requests_per_s"], 1e-9),
                                        "x", "Ditto double capacity / bridge's request rate", "ditto_double_headroom")
    f["ditto_double_ws_commands_per_s"] = figure(cap["ditto_websocket"]["commands_per_s"], "cmd/s",
                                                 "Ditto double capacity over WebSocket (one connection)", "")
    ws_rate = ws["bridge"]["ditto_websocket_commands"] / ws["bridge"]["drain_s"]
    f["ditto_double_ws_headroom"] = figure(cap["ditto_websocket"]["commands_per_s"] / max(ws_rate, 1e-9), "x",
                                           "Ditto double WebSocket capacity / bridge's command rate",
                                           "ditto_double_ws_headroom")
    f["influx_adapter_points_per_s"] = figure(cap["influx"]["points_per_s"], "points/s",
                                              "InfluxDB adapter capacity (1000-point batches)", "")
    f["influx_adapter_headroom"] = figure(cap["influx"]["points_per_s"] / max(warm["influx_points_per_s"], 1e-9),
                                          "x", "InfluxDB adapter capacity / bridge's point rate",
                                          "influx_adapter_headroom")
    iw = r["influx_writer"]
    f["influx_writer_us_per_point"] = figure(iw["writer_us_per_point"], "µs",
                                             "InfluxDB writer CPU per point (batching WriteApi)", "")
    f["influx_sync_us_per_point"] = figure(iw["sync_us_per_point"], "µs",
                                           "influxdb-client synchronous writes, same points (baseline)", "")
    f["influx_writer_to_sync_ratio"] = figure(iw["writer_us_per_point"] / max(iw["sync_us_per_point"], 1e-9), "x",
                                              "InfluxDB writer / synchronous baseline", "")
    fc = r.get("forecast_cost")
    if fc:
        f["forecast_us_per_reading"] = figure(fc["tracker_us_per_reading"], "µs",
                                              f"Forecast tracker per reading, {fc['racks']:,} racks x 2", "")
        f["forecast_to_decode_map_ratio"] = figure(fc["ratio_tracker_to_decode_map"], "x",
                                                   "Forecast tracker / decode+map per reading", "")
    return f


def format_value(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"RackTwin bench ({'quick' if result['config']['quick'] else 'full'}) {result['started']}",
             f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_gb']} GB RAM, Python {m['python']}", ""]
    rows = [("figure", "value", "unit", "target", "result")]
    for f in result["figures"].values():
        verdict = "" if f["ok"] is None else ("pass" if f["ok"] else "MISS")
        rows.append((f["label"], format_value(f["value"]), f["unit"], f["target"] or "", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if i == 1 else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if "forecast_cost" in result and result["forecast_cost"] is None:
        lines.append("(forecast tracker cost: bridge.forecast not available, skipped)")
    lines.append(f"\ntook {result['duration_s']:.0f} s")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------


def run(cfg: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    result: dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(), "config": cfg}
    racks = cfg["racks"]
    token = secrets.token_hex(16)
    users = {"ditto": secrets.token_hex(12), "bridge": secrets.token_hex(12)}
    server_env = {"BENCH_DITTO_USERS": json.dumps(users), "BENCH_INFLUX_TOKEN": token}
    with tempfile.TemporaryDirectory(prefix="racktwin-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        log("starting Mosquitto, InfluxDB, the InfluxDB adapter and the Ditto double")
        broker = Mosquitto(work / "mosquitto").start()
        stack.callback(broker.stop)
        influxd = InfluxD(work / "influxd").start()
        stack.callback(influxd.stop)
        influxd.create_db(BUCKET)
        influx = ServerProcess(["influx", "--target", influxd.url], server_env, work / "influx-adapter.log")
        stack.callback(influx.stop)
        ditto = ServerProcess(["ditto"], server_env, work / "ditto.log")
        stack.callback(ditto.stop)

        log("capacity of the sinks")
        capacity: dict[str, Any] = {}
        auth = _basic("bridge", users["bridge"])
        validated = ServerProcess(["ditto", "--validate"], server_env, work / "ditto-validated.log")
        try:
            validated.call("seed 8")
            capacity["ditto_validated"] = ditto_capacity(validated.url, auth, cfg["capacity_s"])
        finally:
            validated.stop()
        ditto.call("seed 8")
        capacity["ditto_unvalidated"] = ditto_capacity(ditto.url, auth, cfg["capacity_s"])
        capacity["ditto_websocket"] = ditto_ws_capacity(ditto.url, "bridge", users["bridge"], cfg["capacity_s"])
        capacity["influx"] = influx_capacity(influx.url, token, cfg["capacity_s"])
        log("CPU cost of the InfluxDB writer")
        result["influx_writer"] = influx_writer_cost(influx.url, token, cfg["writer_points"])
        result["capacity"] = capacity

        others = {"ditto_double": ditto.proc.pid, "influx_adapter": influx.proc.pid, "mosquitto": broker.proc.pid,
                  "influxd": influxd.proc.pid}
        stream = Stream(racks)
        burst = stream.burst(cfg["burst_rounds"])
        log(f"ceiling: {len(burst):,} messages through a minimal subscriber")
        result["ceiling"] = run_ceiling(broker, burst, work)

        def start_bridge(transport: str, client_id: str) -> BridgeProcess:
            bridge = BridgeProcess({
                "RACKTWIN_MQTT_HOST": "127.0.0.1",
                "RACKTWIN_MQTT_PORT": str(broker.port),
                "RACKTWIN_MQTT_CLIENT_ID": client_id,
                "RACKTWIN_MQTT_TOPIC": "bench/bridge/#",
                "RACKTWIN_MQTT_RECEIVE_MAXIMUM": str(RECEIVE_MAXIMUM),
                "RACKTWIN_DITTO_URL": ditto.url,
                "RACKTWIN_DITTO_TRANSPORT": transport,
                "RACKTWIN_DITTO_USERNAME": "bridge",
                "RACKTWIN_DITTO_PASSWORD": users["bridge"],
                "RACKTWIN_DITTO_NAMESPACE": "dc.bench",
                "RACKTWIN_DITTO_POLICY_SUBJECTS": json.dumps({"admin": ["nginx:ditto"], "bridge": ["nginx:bridge"]}),
                "RACKTWIN_INFLUX_URL": influx.url,
                "RACKTWIN_INFLUX_TOKEN": token,
                "RACKTWIN_INFLUX_ORG": ORG,
                "RACKTWIN_INFLUX_BUCKET": BUCKET,
                "RACKTWIN_HTTP_HOST": "127.0.0.1",
                "RACKTWIN_HTTP_PORT": "0",
                # RACKTWIN_* from the caller's environment tune the bridge under test (e.g. RACKTWIN_DITTO_CONCURRENCY).
                **{k: v for k, v in os.environ.items() if k.startswith("RACKTWIN_")},
            }, work / f"bridge-{transport}.log")
            bridge.start()
            stack.callback(bridge.kill)
            return bridge

        bridge = start_bridge("http", "bench-bridge")
        try:
            log(f"bridge, first contact: {racks:,} messages, every twin created")
            result["bridge_cold"] = run_bridge_burst(bridge, broker, stream.burst(1), ditto, influx,
                                                     cfg["timeout_s"], others)
            log(f"bridge: the same {len(burst):,}-message stream as the ceiling")
            result["bridge"] = run_bridge_burst(bridge, broker, stream.burst(cfg["burst_rounds"]), ditto, influx,
                                                cfg["timeout_s"], others)
            merge = Stream(cfg["merge_racks"], seed=7)
            merge.last_ts = stream.last_ts
            log(f"merging: {cfg['merge_racks']} racks x {cfg['merge_rounds']} readings each, queued at once")
            result["bridge_merge"] = run_bridge_burst(bridge, broker, merge.burst(cfg["merge_rounds"]), ditto, influx,
                                                      cfg["timeout_s"], others)
            # The same backlog against a Ditto that answers in 50 ms (a remote or busy one): there the round trip,
            # not local CPU, is the limit, and merging is what keeps the twins current.
            slow = Stream(cfg["merge_racks"], seed=8)
            slow.last_ts = merge.last_ts
            log(f"merging, Ditto answering in {SLOW_DITTO_S * 1000:.0f} ms: the same backlog")
            ditto.call(f"delay {SLOW_DITTO_S}")
            try:
                result["bridge_merge_slow_ditto"] = run_bridge_burst(bridge, broker, slow.burst(cfg["merge_rounds"]),
                                                                     ditto, influx, cfg["timeout_s"], others)
            finally:
                ditto.call("delay 0")
            stream.last_ts = slow.last_ts
            rate = racks / cfg["report_interval_s"]
            log(f"latency: {rate:,.0f} msg/s offered for {cfg['latency_s']:.0f} s")
            result["latency"] = run_latency(bridge, broker, stream, rate, cfg["latency_s"], ditto, influx,
                                            cfg["timeout_s"])
            status = proc_status(bridge.proc.pid)
            result["bridge_memory"] = {"peak_rss_mb": status["VmHWM"] / 1024, "rss_mb": status["VmRSS"] / 1024}
        except Exception:
            report_failure(bridge, ditto, influx)
            raise
        bridge.terminate()

        # The same runs with twin updates as Ditto Protocol merge commands on the WebSocket channel.
        bridge = start_bridge("websocket", "bench-bridge-ws")
        try:
            log("WebSocket transport: first contact with the existing twins, then the stream and the latency run")
            first = run_bridge_burst(bridge, broker, stream.burst(1), ditto, influx, cfg["timeout_s"], others)
            ws: dict[str, Any] = {"first_contact": first,
                                  "bridge": run_bridge_burst(bridge, broker, stream.burst(cfg["burst_rounds"]), ditto,
                                                             influx, cfg["timeout_s"], others)}
            ws["latency"] = run_latency(bridge, broker, stream, rate, cfg["latency_s"], ditto, influx, cfg["timeout_s"])
            result["websocket"] = ws
        except Exception:
            report_failure(bridge, ditto, influx)
            raise
        bridge.terminate()

    log("forecast tracker cost")
    result["forecast_cost"] = forecast_cost(cfg)
    result["figures"] = figures(result)
    result["duration_s"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration for a smoke test (seconds)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, quick=args.quick)
    result = run(cfg, lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    report(result, args.output, table)
    return 0


def report(result: dict[str, Any], output: Path, render: Callable[[dict[str, Any]], str]) -> None:
    """Write the result as JSON, and a copy named by its start time so earlier runs stay comparable (e.g.
    latest.json and latest-20261201T164132Z.json); print its table."""
    output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    output.write_text(text)
    stamp = re.sub(r"[^0-9T]", "", result["started"].split("+")[0]) + "Z"
    (output.parent / f"{output.stem}-{stamp}.json").write_text(text)
    print(render(result))
    print(f"wrote {output} (and {output.stem}-{stamp}.json)")


if __name__ == "__main__":
    sys.exit(main())
