"""MQTT adapter: a persistent MQTT v5 session with manual acknowledgement (paho-mqtt 2.x).

The fixed client id plus session expiry makes the broker keep our subscription and queue messages
while the bridge is away. Acks are manual: a message is acknowledged only after both sinks
confirmed it (the twin's part is let go when Ditto stalls: sinks/ditto.py), so a crash at any moment leads to
redelivery, never loss of a reading. The broker sends at most ``receive_maximum`` unacknowledged messages, which
bounds our memory when a sink is down.

A message still being processed when the connection drops cannot be acked any more (packet ids belong to their
connection), so the broker redelivers it on the next one. Processing that copy again would add a second entry
per message to what is in flight with every reconnect while a sink is down; instead the copy's new packet id is
handed to the message already in flight, which acks it when both sinks confirm.

Connection trouble is logged so it can be told apart, each kind at once and then at most once a minute with a
count (``_Recurring``): a failed attempt (paho swallows the socket's exception and retries, so ``_Client`` keeps
it), a CONNACK refusal (one line, not followed by the disconnect paho then reports as "Protocol error"), and
connections that keep dropping right after they were made, which is what two clients with one client id do to
each other (Mosquitto 2.0 just closes the older connection; an MQTT 5 broker may say "Session taken over").
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import ENV_PREFIX, Settings
from .metrics import Metrics

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, Callable[[], None]], None]

REPORT_EVERY_S = 60.0  # a recurring problem is logged when it starts, then at most this often
SHORT_LIVED_S = 10.0  # a connection dropped this soon after CONNACK ...
FLAPPING_COUNT, FLAPPING_WINDOW_S = 3, 60.0  # ... this many times within this window: someone takes our client id
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT reason code


class _Recurring:
    """One kind of trouble that recurs: reported when it starts, then at most every ``interval`` seconds with how
    often it happened meanwhile, or at once when its reason changes."""

    def __init__(self, interval: float = REPORT_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._reset()

    def _reset(self) -> None:
        self.count = 0  # occurrences since it started
        self.since: float | None = None
        self._reported_at: float | None = None
        self._reported_count = 0
        self._reason: str | None = None

    def occurred(self, reason: str = "") -> int | None:
        """Count one occurrence. Returns how many there were since the last report if this one is to be reported
        (1 for the first), else None."""
        now = self.clock()
        if self.since is None:
            self.since = now
        self.count += 1
        if self._reported_at is not None and reason == self._reason and now - self._reported_at < self.interval:
            return None
        unreported, self._reported_count = self.count - self._reported_count, self.count
        self._reported_at, self._reason = now, reason
        return unreported

    def elapsed(self) -> float:
        return 0.0 if self.since is None else self.clock() - self.since

    def end(self) -> tuple[int, float]:
        """It is over: how many occurrences it had and how long it lasted (0, 0.0 if it never occurred)."""
        count, elapsed = self.count, self.elapsed()
        self._reset()
        return count, elapsed


def describe_connect_error(exc: BaseException, tls: bool) -> str:
    """Why a connection attempt failed, in words an operator can act on."""
    if isinstance(exc, socket.gaierror):
        return f"name does not resolve ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc} (is that port a TLS listener?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listening on that port?)"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    if tls and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return f"connection reset during the TLS handshake (with {ENV_PREFIX}MQTT_TLS on: is that port a TLS listener?)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class _Client(mqtt.Client):
    """paho's client, keeping why the last connection attempt failed: its loop catches the OSError and calls
    ``on_connect_fail`` without it. Any other exception ends paho's network thread, so that one is logged here."""

    connect_error: BaseException | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self.connect_error = None
        try:
            return super().reconnect()
        except Exception as exc:
            self.connect_error = exc
            if not isinstance(exc, OSError):
                log.error("MQTT connection to %s:%d failed: %s; paho does not retry this, the MQTT client stops",
                          self.host, self.port, describe_connect_error(exc, False))
            raise


class _Delivery:
    """The broker's latest copy of one unacknowledged message: whose packet id to ack, on which connection."""

    __slots__ = ("mid", "generation", "finished")

    def __init__(self, mid: int, generation: int):
        self.mid, self.generation, self.finished = mid, generation, False


class MqttSource:
    def __init__(self, settings: Settings, metrics: Metrics, handler: MessageHandler):
        self.settings = settings
        self.metrics = metrics
        self.handler = handler
        self.connected = threading.Event()
        self._generation = 0
        self._accepting = True
        self._lock = threading.Lock()
        self._unacked: dict[tuple[str, bytes], _Delivery] = {}  # QoS 1 messages in flight, by topic and payload
        self._failures = _Recurring()  # failed connection attempts since the last successful one
        self._flapping = _Recurring()  # connections dropped right after they were made
        self._short_lived: deque[float] = deque()  # when such drops happened, within FLAPPING_WINDOW_S
        self._answered = False  # the broker answered this connection's CONNECT (either way)
        self._up_since: float | None = None  # CONNACK Success on the current connection
        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.mqtt_client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if settings.mqtt_username:
            password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
            client.username_pw_set(settings.mqtt_username, password)
        if settings.mqtt_tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        self._unsubscribed = threading.Event()
        self.client = client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.mqtt_receive_maximum
        return props

    def start(self) -> None:
        s = self.settings
        log.info("connecting to MQTT %s:%d as %s", s.mqtt_host, s.mqtt_port, s.mqtt_client_id)
        # connect_async + loop_start: the first connection is retried like any reconnection.
        self.client.connect_async(
            s.mqtt_host,
            s.mqtt_port,
            keepalive=s.mqtt_keepalive_s,
            clean_start=False,
            properties=self._connect_properties(),
        )
        self.client.loop_start()

    def _where(self) -> str:
        return f"{self.settings.mqtt_host}:{self.settings.mqtt_port}"

    def _attempt_failed(self, reason: str, level: int = logging.WARNING) -> None:
        unreported = self._failures.occurred(reason)
        if unreported is None:
            return
        if self._failures.count == 1:
            log.log(level, "MQTT connection to %s failed: %s; retrying (logged again at most every %.0f s)",
                    self._where(), reason, REPORT_EVERY_S)
        else:
            log.log(level, "MQTT connection to %s still failing: %s (%d failed attempts in %.0f s, %d since the "
                    "last report); retrying", self._where(), reason, self._failures.count,
                    self._failures.elapsed(), unreported)

    def _on_pre_connect(self, client, userdata) -> None:  # noqa: ANN001
        self._answered, self._up_since = False, None

    def _on_connect_fail(self, client, userdata) -> None:  # noqa: ANN001
        if not self._accepting:
            return
        exc = getattr(client, "connect_error", None)
        self._attempt_failed(describe_connect_error(exc, self.settings.mqtt_tls) if exc else "unknown reason")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._answered = True
        if reason_code.is_failure:
            hint = ""
            if reason_code.getName() in ("Not authorized", "Bad user name or password"):
                hint = f" (check {ENV_PREFIX}MQTT_USERNAME and {ENV_PREFIX}MQTT_PASSWORD)"
            elif reason_code.getName() == "Client identifier not valid":
                hint = f" (check {ENV_PREFIX}MQTT_CLIENT_ID)"
            self._attempt_failed(f"the broker refused it: {reason_code}{hint}", logging.ERROR)
            return
        with self._lock:
            self._generation += 1
        self._up_since = time.monotonic()
        failed, elapsed = self._failures.end()
        after = f", after {failed} failed attempts in {elapsed:.0f} s" if failed else ""
        log.log(logging.DEBUG if self._is_flapping() and not failed else logging.INFO,
                "MQTT connected to %s (session present: %s%s); subscribing to %s", self._where(),
                flags.session_present, after, self.settings.subscription_topic)
        client.subscribe(self.settings.subscription_topic, options=SubscribeOptions(qos=1))

    def _is_flapping(self) -> bool:
        now = time.monotonic()
        while self._short_lived and now - self._short_lived[0] > FLAPPING_WINDOW_S:
            self._short_lived.popleft()
        return len(self._short_lived) >= FLAPPING_COUNT

    def _dropped_soon(self, taken_over: bool) -> None:
        """A connection that was made is gone again within SHORT_LIVED_S, or the broker said another took it."""
        self._short_lived.append(time.monotonic())
        if not (taken_over or self._is_flapping()):
            return
        unreported = self._flapping.occurred("taken over" if taken_over else "dropped")
        if unreported is None:
            return
        if taken_over:
            what = "the broker ended our session (Session taken over): another client connected with"
        else:
            what = (f"it keeps dropping right after it is made ({len(self._short_lived)} times in "
                    f"{FLAPPING_WINDOW_S:.0f} s): another client is probably using")
        then = (f"logged again at most every {REPORT_EVERY_S:.0f} s" if self._flapping.count == 1
                else f"{unreported} drops since the last report, {self._flapping.count} in {self._flapping.elapsed():.0f} s")
        log.warning("MQTT connection to %s: %s the same client id %r (%sMQTT_CLIENT_ID; every bridge, each replica "
                    "too, needs its own) (%s)", self._where(), what, self.settings.mqtt_client_id, ENV_PREFIX, then)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("MQTT subscription to %s refused: %s", self.settings.subscription_topic, failed)
            return
        self.connected.set()
        self.metrics.connected.set(1)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        with self._lock:
            self._generation += 1  # acks of this connection's messages must not reach the next one
        self.connected.clear()
        self.metrics.connected.set(0)
        up_since, self._up_since = self._up_since, None
        if not self._accepting:
            return
        if not self._answered:  # the connection closed before any CONNACK: an attempt that failed
            hint = "" if self.settings.mqtt_tls else f" (a TLS listener? {ENV_PREFIX}MQTT_TLS is off)"
            said = f" ({reason_code})" if flags.is_disconnect_packet_from_server else ""
            self._attempt_failed(f"the broker closed the connection without answering CONNECT{said}{hint}")
            return
        if up_since is None:
            return  # CONNACK refused it, and that was logged: paho's reason here ("Protocol error") would mislead
        taken_over = flags.is_disconnect_packet_from_server and reason_code.value == SESSION_TAKEN_OVER
        if taken_over or (not flags.is_disconnect_packet_from_server and time.monotonic() - up_since < SHORT_LIVED_S):
            self._dropped_soon(taken_over)
        else:  # it lasted: whatever took the id over has stopped
            self._flapping.end()
            self._short_lived.clear()
        log.log(logging.DEBUG if self._is_flapping() else logging.WARNING,
                "MQTT disconnected from %s: %s; reconnecting", self._where(), reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:  # noqa: ANN001
        if not self._accepting:
            return  # shutting down: leave it unacknowledged, the broker redelivers it to our next session
        topic, payload, qos = message.topic, message.payload, message.qos
        if qos == 0:
            self.handler(topic, payload, lambda: None)
            return
        key = (topic, payload)
        with self._lock:
            generation = self._generation
            earlier = self._unacked.get(key) if message.dup else None
            if earlier is not None and not earlier.finished and earlier.generation != generation:
                # A redelivery of a message we are still processing from a closed connection.
                earlier.mid, earlier.generation = message.mid, generation
                self.metrics.redelivered_in_flight.inc()
                return
            delivery = self._unacked[key] = _Delivery(message.mid, generation)

        def ack() -> None:
            with self._lock:
                delivery.finished = True
                if self._unacked.get(key) is delivery:
                    del self._unacked[key]
                mid, current = delivery.mid, delivery.generation == self._generation
            # Packet ids of a closed connection may be reused by the broker: never ack across connections.
            # (Not gated on the subscription: a resumed session redelivers before SUBACK arrives.)
            if current:
                client.ack(mid, qos)

        self.handler(topic, payload, ack)

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        self._unsubscribed.set()

    def leave_shared_group(self, timeout: float) -> None:
        """Stop the broker routing new shared messages to us; what already came is still processed."""
        if not self.settings.mqtt_shared_group or not self.connected.is_set():
            return
        self.client.unsubscribe(self.settings.subscription_topic)
        if not self._unsubscribed.wait(timeout):
            log.warning("no UNSUBACK within %.0f s", timeout)

    def stop_accepting(self) -> None:
        self._accepting = False

    def stop(self) -> None:
        self._accepting = False
        self.client.disconnect()
        self.client.loop_stop()
