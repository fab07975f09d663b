"""RackTwin bridge: ThingsBoard telemetry (via MQTT) -> Eclipse Ditto twins + InfluxDB history."""

__version__ = "0.1.0"
