"""Prometheus metrics of one bridge instance (own registry, so tests can run several bridges)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REJECT_REASONS = (
    "payload_too_large",
    "invalid_json",
    "not_object",
    "unknown_device",
    "invalid_rack_name",
    "no_readings",
    "non_numeric",
    "not_finite",
    "out_of_range",
    "ts_invalid",
    "ts_future",
    "ts_too_old",
)

LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# What the bridge writes to InfluxDB: readings first (the history); forecasts and its own stats beside them.
POINT_KINDS = ("reading", "forecast", "stats")
# The result label of racktwin_ditto_updates_total.
DITTO_OUTCOMES = ("ok", "created", "stale", "retry", "error")
# The result label of racktwin_forecast_twin_patches_total: patched, the thing not there yet, failed, not tried
# because Ditto was down (the round's patches stopped early).
FORECAST_PATCH_RESULTS = ("ok", "absent", "error", "skipped")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("racktwin_messages_received", "MQTT messages received", registry=r)
        self.accepted = Counter("racktwin_messages_accepted", "Messages that mapped to readings", registry=r)
        self.rejected = Counter(
            "racktwin_messages_rejected", "Messages rejected, by reason", ["reason"], registry=r
        )
        self.internal_errors = Counter(
            "racktwin_internal_errors", "Unexpected errors inside the bridge (bugs), each logged with its traceback",
            registry=r,
        )
        self.readings = Counter("racktwin_readings_accepted", "Sensor readings accepted", registry=r)
        self.influx_points = Counter(
            "racktwin_influx_points_written",
            "Points confirmed by InfluxDB, by kind: reading (history), forecast, stats (the bridge's own)",
            ["kind"], registry=r,
        )
        self.influx_shed = Counter(
            "racktwin_influx_points_shed",
            "Forecast/stats points dropped while InfluxDB was unreachable (readings are never dropped)",
            ["kind"], registry=r,
        )
        self.influx_errors = Counter(
            "racktwin_influx_write_errors", "Failed InfluxDB writes (retried), by kind", ["kind"], registry=r
        )
        self.influx_dropped = Counter(
            "racktwin_influx_points_refused", "Points InfluxDB refused permanently (4xx)", registry=r
        )
        self.ditto_updates = Counter(
            "racktwin_ditto_updates", "Ditto requests by result", ["result"], registry=r
        )
        self.coalesced = Counter(
            "racktwin_ditto_coalesced", "Readings merged into a pending twin update instead of their own request",
            registry=r,
        )
        self.ditto_released = Counter(
            "racktwin_ditto_released",
            "Readings acknowledged while Ditto was stalled, before their twin update (InfluxDB has them; the twin "
            "gets the newest per position once Ditto takes it)",
            registry=r,
        )
        self.forecast_twin_patches = Counter(
            "racktwin_forecast_twin_patches",
            "Forecast feature patches of the twins by result: ok, absent (no such thing yet), error, skipped (not "
            "tried: Ditto was down, the round stopped early); each tried again next round unless ok",
            ["result"], registry=r,
        )
        self.stale = Counter(
            "racktwin_ditto_stale", "Readings older than the twin's state, not written", registry=r
        )
        # These two are set by the pipeline to read its in-flight bookkeeping when collected.
        self.in_flight = Gauge("racktwin_messages_in_flight", "Messages not yet confirmed by all sinks", registry=r)
        self.oldest_in_flight = Gauge("racktwin_oldest_in_flight_seconds",
                                      "How long the oldest message not yet confirmed by all sinks has waited",
                                      registry=r)
        self.redelivered_in_flight = Counter(
            "racktwin_mqtt_redelivered_in_flight",
            "Broker redeliveries (after a reconnect) of messages still in flight: acked with them, not processed twice",
            registry=r,
        )
        self.lag = Histogram(
            "racktwin_end_to_end_lag_seconds",
            "From the reading's source timestamp to the sink's confirmation",
            ["sink"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.connected = Gauge("racktwin_mqtt_connected", "1 while connected to the broker", registry=r)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for result in ("ok", "created", "stale", "retry", "error"):
            self.ditto_updates.labels(result)
        for result in FORECAST_PATCH_RESULTS:
            self.forecast_twin_patches.labels(result)
        for sink in ("influx", "ditto"):
            self.lag.labels(sink)
        for kind in POINT_KINDS:
            self.influx_points.labels(kind)
        for kind in POINT_KINDS[1:]:
            self.influx_shed.labels(kind)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample, for tests and the stats writer."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
