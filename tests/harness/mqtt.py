"""A small QoS 1 publisher for tests and benchmarks (paho-mqtt, waits for every PUBACK)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class Publisher:
    def __init__(self, port: int, host: str = "127.0.0.1", client_id: str | None = None):
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(host, port)
        self.client.loop_start()

    def publish(self, topic: str, payload: Any, qos: int = 1) -> mqtt.MQTTMessageInfo:
        if not isinstance(payload, (bytes, bytearray)):
            payload = json.dumps(payload).encode()
        return self.client.publish(topic, payload, qos=qos)

    def publish_all(self, items: list[tuple[str, Any]], timeout: float = 30) -> None:
        infos = [self.publish(topic, payload) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
