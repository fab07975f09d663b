"""What the MQTT source logs when it cannot connect or keeps losing its connection, against a real Mosquitto:
each failed attempt's reason with the broker's address (rate-limited), one clear line for a refused login, and
a warning naming the client id when two clients share it and take the connection from each other."""

from __future__ import annotations

import logging
import time

import pytest
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.config import load_settings
from bridge.metrics import Metrics
from bridge.source_mqtt import MqttSource, _Recurring
from tests.harness.mqtt import wait_until
from tests.harness.services import Mosquitto, free_port

LOGGER = "bridge.source_mqtt"


@pytest.fixture
def mqtt_log(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def lines(caplog, level: int = logging.INFO, *words: str) -> list[str]:
    """This module's log lines at ``level`` or above that contain every one of ``words``."""
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= level and all(w in r.getMessage() for w in words)]


def source_for(port: int, client_id: str | None = None, **settings) -> MqttSource:
    settings = load_settings(mqtt_host="127.0.0.1", mqtt_port=port, mqtt_topic="diag/#",
                             mqtt_client_id=client_id or f"diag-{time.monotonic_ns()}", **settings)
    return MqttSource(settings, Metrics(), lambda topic, payload, ack: ack())


def count_calls(source: MqttSource, callback: str) -> list:
    """Counts the client's calls of ``callback`` (each attempt's on_pre_connect, each CONNACK's on_connect),
    passing them on to whatever the source set there."""
    calls: list = []
    inner = getattr(source.client, callback)

    def counting(*args):
        calls.append(args)
        if inner is not None:
            inner(*args)

    setattr(source.client, callback, counting)
    return calls


def test_a_broker_that_is_not_there_is_named_at_once_then_rate_limited_and_its_arrival_logged(mqtt_log, tmp_path):
    port = free_port()  # nothing listens here yet
    source = source_for(port)
    attempts = count_calls(source, "on_pre_connect")
    broker = Mosquitto(tmp_path, port=port)
    source.start()
    try:
        warned = wait_until(lambda: lines(mqtt_log, logging.WARNING, f"127.0.0.1:{port}", "connection refused"),
                            timeout=15, what="a warning naming the address and the refusal")
        assert "MQTT connection to" in warned[0]
        wait_until(lambda: len(attempts) >= 3, timeout=30, what="three attempts (paho retries at about 3 and 7 s)")
        assert len(lines(mqtt_log, logging.WARNING, f"127.0.0.1:{port}")) == 1, "repeats within a minute are not logged"
        broker.start()
        assert source.connected.wait(60), "connected once the broker listens"
        recovered = lines(mqtt_log, logging.INFO, f"MQTT connected to 127.0.0.1:{port}", "failed attempts")
        assert len(recovered) == 1, mqtt_log.text
    finally:
        source.stop()
        broker.stop()


def test_a_wrong_password_gives_one_clear_line_and_no_protocol_error(mqtt_log, tmp_path):
    broker = Mosquitto(tmp_path, users={"bridge": "right-secret"}).start()
    wrong = source_for(broker.port, mqtt_username="bridge", mqtt_password="wrong-secret")
    connacks = count_calls(wrong, "on_connect")
    right = source_for(broker.port, mqtt_username="bridge", mqtt_password="right-secret")
    try:
        wrong.start()
        # The second refusal comes after the first connection was closed: its disconnect has been through.
        wait_until(lambda: len(connacks) >= 2, timeout=30, what="two refused attempts")
        refused = lines(mqtt_log, logging.WARNING, "Not authorized")
        assert len(refused) == 1, mqtt_log.text
        assert f"127.0.0.1:{broker.port}" in refused[0] and "RACKTWIN_MQTT_PASSWORD" in refused[0]
        assert not lines(mqtt_log, logging.DEBUG, "Protocol error"), mqtt_log.text
        assert not wrong.connected.is_set()
        right.start()
        assert right.connected.wait(15), "the right password is accepted: the refusal was about the password"
    finally:
        wrong.stop()
        right.stop()
        broker.stop()


def test_two_sources_with_one_client_id_are_told_so(mqtt_log, mosquitto):
    client_id = f"diag-twin-{time.monotonic_ns()}"
    first, second = source_for(mosquitto.port, client_id), source_for(mosquitto.port, client_id)
    try:
        first.start()
        assert first.connected.wait(15)
        second.start()  # from now on each takes the connection from the other about once a second
        warned = wait_until(lambda: lines(mqtt_log, logging.WARNING, "same client id", repr(client_id)),
                            timeout=60, what="the duplicate client id warning")
        assert "RACKTWIN_MQTT_CLIENT_ID" in warned[0] and f"127.0.0.1:{mosquitto.port}" in warned[0]
    finally:
        first.stop()
        second.stop()


def test_session_taken_over_is_named_at_once(mqtt_log):
    """An MQTT 5 broker may say why it closed the connection (Mosquitto 2.0 does not): reason code 142."""
    source = source_for(1, "diag-taken")
    client = source.client
    source._on_pre_connect(client, None)
    source._on_connect(client, None, ConnectFlags(session_present=False), ReasonCode(PacketTypes.CONNACK, "Success"), Properties(PacketTypes.CONNACK))
    source._on_disconnect(client, None, DisconnectFlags(is_disconnect_packet_from_server=True),
                          ReasonCode(PacketTypes.DISCONNECT, "Session taken over"), Properties(PacketTypes.DISCONNECT))
    warned = lines(mqtt_log, logging.WARNING, "Session taken over", "'diag-taken'", "RACKTWIN_MQTT_CLIENT_ID")
    assert len(warned) == 1, mqtt_log.text


def test_recurring_trouble_is_reported_when_it_starts_then_once_per_interval_with_a_count():
    now = [0.0]
    trouble = _Recurring(interval=60, clock=lambda: now[0])
    assert trouble.occurred("refused") == 1
    for t in (1, 30, 59):
        now[0] = t
        assert trouble.occurred("refused") is None
    now[0] = 61
    assert trouble.occurred("refused") == 4  # the three silent ones and this one
    now[0] = 62
    assert trouble.occurred("not authorized") == 1  # a new reason is news
    assert trouble.end() == (6, 62)
    assert trouble.occurred("refused") == 1  # the next outage starts afresh
