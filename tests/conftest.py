"""Shared fixtures: real Mosquitto and InfluxDB on free loopback ports, the InfluxDB v2 adapter,
the Ditto contract double, and a bridge configured against them."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from tests.harness.services import InfluxD, InfluxV2Adapter, Mosquitto

REPO = Path(__file__).resolve().parent.parent
INFLUX_TOKEN = "test-token"
DITTO_USERS = {"ditto": "admin-secret", "bridge": "bridge-secret", "grafana": "grafana-secret"}

_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory):
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def influxd(tmp_path_factory):
    server = InfluxD(tmp_path_factory.mktemp("influxd")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influx_adapter(influxd):
    adapter = InfluxV2Adapter(influxd.url, token=INFLUX_TOKEN).start()
    yield adapter
    adapter.stop()


@pytest.fixture
def influx_db(influxd) -> str:
    """A fresh database (= bucket name through the adapter) per test."""
    name = f"t{os.getpid()}_{next(_db_counter)}"
    influxd.create_db(name)
    return name


@pytest.fixture
def ditto():
    from tests.doubles.ditto import DittoDouble

    double = DittoDouble(users=DITTO_USERS)
    double.start()
    yield double
    double.stop()
    double.assert_no_violations()


@pytest.fixture
def tb_double():
    from tests.doubles.thingsboard import ThingsBoardDouble

    double = ThingsBoardDouble().start()
    yield double
    double.stop()
    double.assert_no_violations()


_client_ids = itertools.count(1)


@pytest.fixture
def bridge_env(mosquitto, influx_adapter, influx_db, ditto, tmp_path) -> dict[str, str]:
    """RACKTWIN_* environment for a bridge wired to the test services (fresh topic and client id)."""
    n = next(_client_ids)
    return {
        "RACKTWIN_MQTT_HOST": "127.0.0.1",
        "RACKTWIN_MQTT_PORT": str(mosquitto.port),
        "RACKTWIN_MQTT_CLIENT_ID": f"bridge-test-{os.getpid()}-{n}",
        "RACKTWIN_MQTT_TOPIC": f"test{n}/telemetry/#",
        "RACKTWIN_DITTO_URL": ditto.url,
        "RACKTWIN_DITTO_USERNAME": "bridge",
        "RACKTWIN_DITTO_PASSWORD": DITTO_USERS["bridge"],
        "RACKTWIN_DITTO_NAMESPACE": "dc.test",
        "RACKTWIN_INFLUX_URL": influx_adapter.url,
        "RACKTWIN_INFLUX_TOKEN": INFLUX_TOKEN,
        "RACKTWIN_INFLUX_ORG": "racktwin",
        "RACKTWIN_INFLUX_BUCKET": influx_db,
        "RACKTWIN_HTTP_HOST": "127.0.0.1",
        "RACKTWIN_HTTP_PORT": "0",
        "RACKTWIN_INFLUX_STATS_INTERVAL_S": "1",
    }


@pytest.fixture
def bridge_environ(bridge_env, monkeypatch) -> dict[str, str]:
    """bridge_env set in this process's environment (undone after the test), for an in-process bridge or part."""
    for key, value in bridge_env.items():
        monkeypatch.setenv(key, value)
    return bridge_env
