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
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .config import Settings
from .metrics import Metrics

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, Callable[[], None]], None]


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
        client = mqtt.Client(
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

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.error("MQTT connection refused: %s", reason_code)
            return
        with self._lock:
            self._generation += 1
        log.info("MQTT connected (session present: %s); subscribing to %s", flags.session_present,
                 self.settings.subscription_topic)
        client.subscribe(self.settings.subscription_topic, options=SubscribeOptions(qos=1))

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
        if self._accepting:
            log.warning("MQTT disconnected: %s; reconnecting", reason_code)

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
