"""One MQTT message in, readings out to both sinks; the message's ack waits for both (for Ditto only while
it takes updates: see sinks/ditto.py).

decode (bytes -> telemetry groups) -> map (groups -> validated rack readings) -> fan out:
InfluxDB gets one point per reading, Ditto gets the reading merged into its rack's twin.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from .config import Settings
from .decode import Rejected, decode, device_from_topic
from .delivery import InFlight, Ticket
from .mapping import Mapper, SensorReading
from .metrics import Metrics
from .sinks.influx import reading_line

log = logging.getLogger(__name__)


class InfluxSink(Protocol):
    def submit(self, lines: list[str], on_written: Callable[[], None] | None) -> None: ...


class TwinSink(Protocol):
    def submit(self, reading: SensorReading, on_confirmed: Callable[[], None] | None) -> None: ...


ReadingHook = Callable[[SensorReading], None]


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        influx: InfluxSink,
        ditto: TwinSink,
        metrics: Metrics,
        hooks: list[ReadingHook] | None = None,
    ):
        self.settings = settings
        self.mapper = Mapper(settings)
        self.influx = influx
        self.ditto = ditto
        self.metrics = metrics
        self._influx_lag = metrics.lag.labels("influx")
        self.in_flight = InFlight()
        # Both gauges read the in-flight bookkeeping when collected, instead of a second count kept beside it.
        metrics.in_flight.set_function(lambda: self.in_flight.count)
        metrics.oldest_in_flight.set_function(self.in_flight.oldest_age_s)
        self.hooks = hooks or []
        self._last_reject_log: dict[str, float] = {}

    def handle(self, topic: str, payload: bytes, ack: Callable[[], None], now_ms: int | None = None) -> None:
        """Process one message. Never raises: a bad message is counted, logged and acknowledged."""
        self.metrics.received.inc()
        received_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        try:
            groups = decode(topic, payload, received_ms, self.settings.max_payload_bytes)
            readings = []
            for group in groups:
                try:
                    readings.extend(self.mapper.map_group(group, received_ms))
                except Rejected as rej:
                    rej.device = rej.device or group.device  # a gateway topic carries many devices
                    raise
        except Rejected as rej:
            self._reject(topic, rej)
            ack()  # it will never succeed: do not let the broker redeliver it forever
            return
        except Exception:  # noqa: BLE001 - a bug must not take the bridge down, nor lose the message
            log.exception("unexpected error decoding a message on %s; left unacknowledged", topic)
            self.metrics.internal_errors.inc()
            return
        self.metrics.accepted.inc()
        self.metrics.readings.inc(len(readings))
        lines = [line for r in readings if (line := reading_line(r))]
        token = self.in_flight.add()

        def done() -> None:
            self.in_flight.remove(token)
            ack()

        ticket = Ticket(1 + len(readings), done)
        oldest_ts = min(r.ts_ms for r in readings)

        def influx_written() -> None:
            self._influx_lag.observe(max(0.0, time.time() - oldest_ts / 1000))
            ticket.confirm()

        self.influx.submit(lines, influx_written)
        for reading in readings:
            self.ditto.submit(reading, ticket.confirm)
            for hook in self.hooks:
                try:
                    hook(reading)
                except Exception:  # noqa: BLE001 - an optional consumer must not break delivery
                    log.exception("reading hook %r failed", hook)

    def _reject(self, topic: str, rej: Rejected) -> None:
        self.metrics.rejected.labels(rej.reason).inc()
        device = rej.device
        if device is None:  # the payload did not get as far as naming one
            try:
                device = device_from_topic(topic)
            except Rejected:
                device = topic
        now = time.monotonic()
        interval = self.settings.reject_log_interval_s
        last = self._last_reject_log.get(device)
        if last is not None and now - last < interval:
            return
        if len(self._last_reject_log) > 10000:
            self._last_reject_log.clear()
        self._last_reject_log[device] = now
        log.warning("rejected message from %s on %s: %s: %s", device[:80], topic[:120], rej.reason, rej.detail[:200])
