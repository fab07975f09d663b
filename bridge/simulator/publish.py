"""Publishers of simulated readings (paho-mqtt), one per output mode.

- ``GatewayPublisher``: ThingsBoard gateway MQTT API, one connection for all devices: ``v1/gateway/connect``
  ``{"device", "type"}`` once per device (and after every reconnect), then ``v1/gateway/telemetry``
  ``{"<device>": [{"ts", "values"}]}`` in chunks.
- ``DevicePublisher``: ThingsBoard device MQTT API, one connection per device, access token as user name,
  ``v1/devices/me/telemetry`` ``{"ts", "values"}``.
- ``EnvelopePublisher``: the rule-engine envelope straight to ``<prefix>/<device>`` on the bridge's broker,
  exactly what the installed rule chain would publish; for running without ThingsBoard.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from typing import Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ..thingsboard.rulechain import sanitize_device_name

log = logging.getLogger(__name__)

GATEWAY_CHUNK = 50  # devices per gateway telemetry message; keeps messages well under TB's size limits


def _client(client_id: str, username: str | None, password: str | None, protocol: int) -> mqtt.Client:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if username is not None:
        client.username_pw_set(username, password)
    client.reconnect_delay_set(1, 30)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(10000)  # bounded: a long outage drops the oldest ticks, not memory
    return client


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Connected:
    def __init__(self) -> None:
        self.event = threading.Event()

    def wait(self, timeout: float) -> bool:
        return self.event.wait(timeout)


class EnvelopePublisher:
    def __init__(self, host: str, port: int, username: str | None = None, password: str | None = None,
                 topic_prefix: str = "racktwin/telemetry", device_type: str = "rack-sensor"):
        self.prefix = topic_prefix.rstrip("/")
        self.device_type = device_type
        self.connected = _Connected()
        self.client = _client(f"racktwin-sim-{uuid.uuid4().hex[:8]}", username, password, mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p=None: self.connected.event.set() if not rc.is_failure else None
        self.client.on_disconnect = lambda *a: self.connected.event.clear()
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def topic(self, device: str) -> str:
        return f"{self.prefix}/{sanitize_device_name(device)}"

    def publish(self, ts_ms: int, readings: dict[str, dict[str, float]]) -> list[mqtt.MQTTMessageInfo]:
        return [
            self.client.publish(self.topic(device), _dumps({"deviceName": device, "deviceType": self.device_type,
                                                            "ts": ts_ms, "values": values}), qos=1)
            for device, values in readings.items()
        ]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class GatewayPublisher:
    def __init__(self, host: str, port: int, token: str, devices: Iterable[str], device_type: str = "rack-sensor"):
        self.device_type = device_type
        self.devices = list(devices)
        self.connected = _Connected()
        self.client = _client(f"racktwin-sim-gw-{uuid.uuid4().hex[:8]}", token, None, mqtt.MQTTv311)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.event.clear()
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None) -> None:
        if getattr(rc, "is_failure", False):
            log.error("ThingsBoard refused the gateway connection: %s (is the gateway token right?)", rc)
            return
        # Announcing devices makes TB create them with our profile instead of 'default'.
        for device in self.devices:
            client.publish("v1/gateway/connect", _dumps({"device": device, "type": self.device_type}), qos=1)
        self.connected.event.set()

    def publish(self, ts_ms: int, readings: dict[str, dict[str, float]]) -> list[mqtt.MQTTMessageInfo]:
        items = list(readings.items())
        infos = []
        for i in range(0, len(items), GATEWAY_CHUNK):
            body = {device: [{"ts": ts_ms, "values": values}] for device, values in items[i:i + GATEWAY_CHUNK]}
            infos.append(self.client.publish("v1/gateway/telemetry", _dumps(body), qos=1))
        return infos

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DevicePublisher:
    def __init__(self, host: str, port: int, tokens: dict[str, str]):
        self.clients: dict[str, mqtt.Client] = {}
        self.connected = _Connected()
        self._up: set[str] = set()
        self._lock = threading.Lock()
        for device, token in tokens.items():
            client = _client(f"racktwin-sim-{uuid.uuid4().hex[:8]}", token, None, mqtt.MQTTv311)
            client.on_connect = self._on_connect(device)
            client.on_disconnect = self._on_disconnect(device)
            self.clients[device] = client
        # Start only when all exist: "all connected" compares against the full count.
        for client in self.clients.values():
            client.connect_async(host, port, keepalive=60)
            client.loop_start()

    def _on_connect(self, device: str):
        def handler(client, userdata, flags, rc, props=None):
            if getattr(rc, "is_failure", False):
                log.error("ThingsBoard refused device %s: %s", device, rc)
                return
            with self._lock:
                self._up.add(device)
                if len(self._up) == len(self.clients):
                    self.connected.event.set()
        return handler

    def _on_disconnect(self, device: str):
        def handler(*args):
            with self._lock:
                self._up.discard(device)
                self.connected.event.clear()
        return handler

    def publish(self, ts_ms: int, readings: dict[str, dict[str, float]]) -> list[mqtt.MQTTMessageInfo]:
        return [
            self.clients[device].publish("v1/devices/me/telemetry", _dumps({"ts": ts_ms, "values": values}), qos=1)
            for device, values in readings.items()
            if device in self.clients
        ]

    def close(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()
