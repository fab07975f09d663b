"""Wires the bridge together and runs it until SIGTERM/SIGINT: MQTT -> pipeline -> InfluxDB + Ditto."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable

from .config import ConfigError, Settings
from .http_api import OpsServer
from .metrics import Metrics
from .pipeline import Pipeline
from .sinks.ditto import DittoClient, DittoUpdater
from .sinks.influx import InfluxWriter
from .source_mqtt import MqttSource
from .stats import StatsReporter

log = logging.getLogger(__name__)


class HeldUntilPlaced:
    """An MQTT handler that holds messages, unacknowledged and in arrival order, until ``release()``, then hands
    them and every later one to ``handle``. The broker sends no more unacknowledged messages than the receive
    window, so the hold is bounded; what the bridge never releases (it stopped) the broker redelivers."""

    def __init__(self, handle: Callable[..., None]):
        self._handle = handle
        self._lock = threading.Lock()
        self._held: deque[tuple[str, bytes, Callable[[], None], int]] = deque()
        self._holding = True

    def __call__(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        with self._lock:
            if self._holding:  # the arrival time, for readings without a timestamp of their own
                self._held.append((topic, payload, ack, int(time.time() * 1000)))
                return
        self._handle(topic, payload, ack)

    @property
    def count(self) -> int:
        return len(self._held)

    def release(self, stopped: threading.Event) -> None:
        """Hand the held messages over in order, then stop holding. Messages arriving meanwhile queue behind them,
        so the order stays the broker's."""
        while not stopped.is_set():
            with self._lock:
                if not self._held:
                    self._holding = False
                    return
                topic, payload, ack, received_ms = self._held.popleft()
            self._handle(topic, payload, ack, now_ms=received_ms)


class Bridge:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Metrics()
        self.influx = InfluxWriter(settings, self.metrics)
        self.ditto = DittoUpdater(settings, self.metrics)
        self.forecast, self.forecast_publisher = self._forecast(settings)
        hooks = [self.forecast.observe] if self.forecast is not None else []
        self.pipeline = Pipeline(settings, self.influx, self.ditto, self.metrics, hooks=hooks)
        self._stopped = threading.Event()
        # With a ThingsBoard, messages are held (subscribed, unacknowledged) until the first sync placed the racks,
        # at most sync_first_wait_s: readings mapped before it would be placed at the default site/room/row,
        # ghost racks in InfluxDB and flipped twins. Subscribed at once, so nothing published meanwhile is lost.
        self._first_sync = threading.Event()
        self._stop_waiting = threading.Event()  # the first sync came, or the bridge is stopping
        self._placed = threading.Event()  # holding is over: the first sync came, or the wait ran out
        self._held = (HeldUntilPlaced(self.pipeline.handle)
                      if settings.tb_url and settings.sync_first_wait_s > 0 else None)
        if self._held is None:
            self._placed.set()
        self.source = MqttSource(settings, self.metrics, self._held or self.pipeline.handle)
        self._starter: threading.Thread | None = None
        self.sync = self._sync_worker(settings)
        try:
            self.ops = OpsServer(settings.http_host, settings.http_port, self.metrics.registry, self.readiness,
                                 sync_now=self.sync.trigger if self.sync is not None else None)
        except OSError as exc:  # e.g. another bridge on the port: say which setting, not a traceback
            raise ConfigError(f"http_port: cannot listen on {settings.http_host}:{settings.http_port} "
                              f"({exc.strerror}); set RACKTWIN_HTTP_PORT to a free port") from exc
        self.stats = StatsReporter(
            self.metrics,
            settings.mqtt_client_id,
            settings.influx_stats_interval_s,
            lambda lines: self.influx.submit(lines, None, kind="stats"),
            self._stats_ready,
        )

    def _forecast(self, settings: Settings):  # noqa: ANN202
        """Trend per rack and position, published to InfluxDB (rack_forecast) and the twins' forecast feature."""
        if not settings.forecast_enabled:
            return None, None
        from .forecast.tracker import ForecastPublisher, ForecastTracker

        tracker = ForecastTracker.from_settings(settings)
        client = self._forecast_client = DittoClient(settings)  # its own connection: not behind the readings

        def patch_thing(tid: str, patch: dict) -> bool:
            return client.patch_existing(tid, patch)  # False: the readings have not created the twin yet

        publisher = ForecastPublisher(
            tracker, settings, lambda lines: self.influx.submit(lines, None, kind="forecast"), patch_thing,
            metrics=self.metrics,
        )
        return tracker, publisher

    def _sync_worker(self, settings: Settings):  # noqa: ANN202 - optional dependency on ThingsBoard
        """With a ThingsBoard configured, learn rack placement from its device attributes, at start and then
        every sync_interval_s, so devices added later appear without a restart."""
        if not settings.tb_url:
            return None
        from .thingsboard.sync import SyncWorker, merged_mapping, placement_index

        configured = settings.mapping

        def placed(result) -> None:  # noqa: ANN001 - the placements, before the sync's slower telemetry and twins
            self.pipeline.mapper.replace_mapping(merged_mapping(configured, result.racks))
            self.pipeline.mapper.replace_placements(placement_index(result.placements))
            self._first_sync.set()
            self._stop_waiting.set()

        def learnt(result) -> None:  # noqa: ANN001
            placed(result)
            log.info("ThingsBoard sync: %d devices, %d racks placed", result.devices, len(result.racks))

        return SyncWorker(settings, learnt, on_placed=placed)

    def readiness(self) -> dict[str, bool]:
        checks = {
            "mqtt": self.source.connected.is_set(),
            "influxdb": self.influx.healthy,
            # Stalled: a hung Ditto answers nothing, so no failure says so until the requests time out.
            "ditto": self.ditto.healthy and self.ditto.policy_ready and not self.ditto.stalled,
        }
        if self._held is not None:
            # False while messages are held for the first ThingsBoard sync; true once it came or the wait ran out.
            checks["first_sync_wait_over"] = self._placed.is_set()
        return checks

    def _stats_ready(self) -> bool:
        """The readiness the stats report (and the bridge-down rule judges): the sinks and MQTT. The bounded
        wait for the first sync is a start-up phase, not an outage; /readyz shows it."""
        return all(ok for name, ok in self.readiness().items() if name != "first_sync_wait_over")

    def start(self) -> None:
        self.ops.start()
        self._prepare_ditto()
        self.influx.start()
        self.ditto.start()
        self.stats.start()
        if self.forecast_publisher is not None:
            self.forecast_publisher.start()
        if self.sync is not None:
            self.sync.start()
        self.source.start()
        if self._held is not None:
            wait = self.settings.sync_first_wait_s
            log.info("holding MQTT messages until the first ThingsBoard sync places the racks (up to %.0f s)", wait)
            # On a thread of its own, so start() returns and SIGTERM during the wait stops the bridge at once.
            self._starter = threading.Thread(target=self._release_after_first_sync, args=(wait,),
                                             name="await-first-sync", daemon=True)
            self._starter.start()

    def _release_after_first_sync(self, wait: float) -> None:
        began = time.monotonic()
        self._stop_waiting.wait(wait)
        if self._stopped.is_set():
            return
        if self._first_sync.is_set():
            log.info("first ThingsBoard sync done after %.1f s; processing the %d messages held meanwhile",
                     time.monotonic() - began, self._held.count)
        else:
            m = self.settings.mapping
            log.warning("no ThingsBoard sync within %.0f s (RACKTWIN_SYNC_FIRST_WAIT_S): processing MQTT messages "
                        "anyway (%d held); until a sync succeeds, readings of racks placed by ThingsBoard "
                        "attributes get the default site/room/row (%s/%s/%s) or what the mapping says, in InfluxDB "
                        "and in the twins", wait, self._held.count, m.default_site, m.default_room, m.default_row)
        self._held.release(self._stopped)
        if not self._stopped.is_set():
            self._placed.set()

    def _prepare_ditto(self) -> None:
        # Not fatal: Ditto may still be starting. Updates create the policy on first use and retry.
        client = DittoClient(self.settings)
        try:
            self.ditto.ensure_policy(client)
        except Exception as exc:  # noqa: BLE001 - DittoError, connection errors: all retried later
            log.warning("Ditto policy not ensured yet (%s); will retry with the first update", exc)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop taking messages, let in-flight ones reach both sinks and be acked, then disconnect."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._stop_waiting.set()  # held messages stay unacknowledged: the broker redelivers them
        if self._starter is not None:
            self._starter.join(timeout=1.0)
        timeout = self.settings.shutdown_timeout_s
        log.info("shutting down: %d messages in flight", self.pipeline.in_flight.count)
        self.source.leave_shared_group(timeout=2.0)
        self.source.stop_accepting()
        self.stats.stop()
        if self.forecast_publisher is not None:
            self.forecast_publisher.stop(timeout=2.0)
            if not self.forecast_publisher.running:  # a patch still out keeps its connection until it ends
                self._forecast_client.close()
        if self.sync is not None:
            self.sync.stop(timeout=1.0)
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
