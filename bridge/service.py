"""Wires the bridge together and runs it until SIGTERM/SIGINT: MQTT -> pipeline -> InfluxDB + Ditto."""

from __future__ import annotations

import logging
import signal
import threading
import time

from .config import Settings
from .http_api import OpsServer
from .metrics import Metrics
from .pipeline import Pipeline
from .sinks.ditto import DittoClient, DittoError, DittoUpdater
from .sinks.influx import InfluxWriter
from .source_mqtt import MqttSource
from .stats import StatsReporter

log = logging.getLogger(__name__)


class Bridge:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.influx = InfluxWriter(settings, self.metrics)
        self.ditto = DittoUpdater(settings, self.metrics)
        self.pipeline = Pipeline(settings, self.influx, self.ditto, self.metrics)
        self.source = MqttSource(settings, self.metrics, self.pipeline.handle)
        self.ops = OpsServer(settings.http_host, settings.http_port, self.metrics.registry, self.readiness)
        self.stats = StatsReporter(
            self.metrics,
            settings.mqtt_client_id,
            settings.influx_stats_interval_s,
            lambda lines: self.influx.submit(lines, None),
            lambda: all(self.readiness().values()),
        )
        self._stopped = threading.Event()

    def readiness(self) -> dict[str, bool]:
        return {
            "mqtt": self.source.connected.is_set(),
            "influxdb": self.influx.healthy,
            "ditto": self.ditto.healthy and self.ditto.policy_ready,
        }

    def start(self) -> None:
        self.ops.start()
        self._prepare_ditto()
        self.influx.start()
        self.ditto.start()
        self.stats.start()
        self.source.start()

    def _prepare_ditto(self) -> None:
        # Not fatal: Ditto may still be starting. Updates create the policy on first use and retry.
        client = DittoClient(self.settings)
        try:
            self.ditto.ensure_policy(client)
        except (DittoError, OSError, Exception) as exc:  # noqa: BLE001
            log.warning("Ditto policy not ensured yet (%s); will retry with the first update", exc)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop taking messages, let in-flight ones reach both sinks and be acked, then disconnect."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        timeout = self.settings.shutdown_timeout_s
        log.info("shutting down: %d messages in flight", self.pipeline.in_flight.count)
        self.source.leave_shared_group(timeout=2.0)
        self.source.stop_accepting()
        self.stats.stop()
        drained = self.pipeline.in_flight.wait_empty(timeout)
        if not drained:
            log.warning("%d messages not confirmed within %.0f s; the broker will redeliver them",
                        self.pipeline.in_flight.count, timeout)
        self.ditto.stop(timeout=2.0)
        self.influx.stop(timeout=2.0)
        time.sleep(0.1)  # let paho's network thread send the last acks
        self.source.stop()
        self.ops.stop()
        log.info("stopped")


def run(settings: Settings) -> int:
    bridge = Bridge(settings)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bridge.start()
    stop_requested.wait()
    bridge.stop()
    return 0
