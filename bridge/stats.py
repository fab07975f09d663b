"""The bridge's own counters, written to InfluxDB every few seconds for the Bridge health dashboard.

Why InfluxDB and not a Prometheus server: the stack already has InfluxDB and Grafana reads it, so
the health dashboard and the "bridge down or lagging" alert need no extra service. /metrics stays
available for users who scrape with their own Prometheus.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .metrics import REJECT_REASONS, Metrics
from .sinks.influx import escape_tag

log = logging.getLogger(__name__)

BRIDGE_MEASUREMENT = "racktwin_bridge"
REJECTS_MEASUREMENT = "racktwin_rejects"


def quantile_from_buckets(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Quantile from cumulative (upper bound, count) pairs, interpolated as Prometheus does."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def _lag_buckets(metrics: Metrics, sink: str) -> list[tuple[float, float]]:
    out = []
    for metric in metrics.lag.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("sink") == sink:
                out.append((float(sample.labels["le"]), sample.value))
    return sorted(out)


def stats_lines(metrics: Metrics, instance: str, ready: bool, previous: dict[str, list], now_ms: int) -> list[str]:
    v = metrics.value
    fields = {
        "received": v("racktwin_messages_received_total"),
        "accepted": v("racktwin_messages_accepted_total"),
        "rejected": sum(v("racktwin_messages_rejected_total", {"reason": r}) for r in REJECT_REASONS),
        "readings": v("racktwin_readings_accepted_total"),
        "influx_points": v("racktwin_influx_points_written_total", {"kind": "reading"}),
        "influx_errors": v("racktwin_influx_write_errors_total", {"kind": "http"})
        + v("racktwin_influx_write_errors_total", {"kind": "network"}),
        "ditto_ok": v("racktwin_ditto_updates_total", {"result": "ok"})
        + v("racktwin_ditto_updates_total", {"result": "created"}),
        "ditto_stale": v("racktwin_ditto_stale_total"),
        "ditto_errors": v("racktwin_ditto_updates_total", {"result": "retry"})
        + v("racktwin_ditto_updates_total", {"result": "error"}),
        "coalesced": v("racktwin_ditto_coalesced_total"),
        "ditto_released": v("racktwin_ditto_released_total"),
        "in_flight": v("racktwin_messages_in_flight"),
        # Grows while a sink hangs, when no lag is written because nothing gets through.
        "oldest_in_flight_s": round(v("racktwin_oldest_in_flight_seconds"), 3),
        "ready": 1.0 if ready else 0.0,
    }
    for sink in ("influx", "ditto"):
        # Lag quantiles over this interval only: difference of the cumulative buckets.
        current = _lag_buckets(metrics, sink)
        before = dict(previous.get(sink, []))
        window = [(b, c - before.get(b, 0.0)) for b, c in current]
        previous[sink] = current
        for q in (0.5, 0.95, 0.99):
            value = quantile_from_buckets(window, q)
            if value is not None:
                fields[f"lag_{sink}_p{int(q * 100)}"] = round(value, 4)
    tag = f"instance={escape_tag(instance)}"
    field_text = ",".join(f"{k}={float(val)!r}" for k, val in fields.items())
    lines = [f"{BRIDGE_MEASUREMENT},{tag} {field_text} {now_ms}"]
    for reason in REJECT_REASONS:
        count = v("racktwin_messages_rejected_total", {"reason": reason})
        lines.append(f"{REJECTS_MEASUREMENT},{tag},reason={reason} count={float(count)!r} {now_ms}")
    return lines


class StatsReporter:
    def __init__(self, metrics: Metrics, instance: str, interval_s: float,
                 submit: Callable[[list[str]], None], ready: Callable[[], bool]):
        self.metrics = metrics
        self.instance = instance
        self.interval_s = interval_s
        self.submit = submit
        self.ready = ready
        self._stop = threading.Event()
        self._previous: dict[str, list] = {}
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)

    def start(self) -> None:
        if self.interval_s > 0:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.submit(stats_lines(self.metrics, self.instance, self.ready(), self._previous,
                                        int(time.time() * 1000)))
            except Exception:  # noqa: BLE001 - stats must never disturb the bridge
                log.exception("writing bridge stats failed")

    def stop(self) -> None:
        self._stop.set()
