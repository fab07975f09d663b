"""The one typed configuration model of RackTwin.

Sources, strongest first: environment variables ``RACKTWIN_*`` (flat names, e.g.
``RACKTWIN_MQTT_HOST``), secrets read from ``RACKTWIN_<FIELD>_FILE`` files, then the YAML file named
by ``RACKTWIN_CONFIG`` (same flat keys, plus the ``mapping`` section). Unknown keys are rejected
everywhere, so a typo stops start-up with the field's name instead of being silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from .thresholds import DEFAULT_CLASS, DEFAULT_RH_CAP, FORECAST_HORIZON_MIN, check_rh_cap

ENV_PREFIX = "RACKTWIN_"
# A Ditto namespace (ditto.md: Java-package-like); the dashboards generator checks its copy with the same pattern.
DITTO_NAMESPACE_PATTERN = r"^[a-zA-Z]\w*(?:[.-][a-zA-Z]\w*)*$"

# Keys the rule-engine / device payloads carry, for the one-device-per-rack model (our users' names).
DEFAULT_RACK_KEYS: dict[str, list[str]] = {
    "tempTop": ["tempTop", "temperature_top", "temp_top"],
    "tempBottom": ["tempBottom", "temperature_bottom", "temp_bottom"],
    "humidityTop": ["humidityTop", "humidity_top", "hum_top"],
    "humidityBottom": ["humidityBottom", "humidity_bottom", "hum_bottom"],
}
DEFAULT_SENSOR_KEYS: dict[str, list[str]] = {
    "temperature": ["temperature", "temp"],
    "humidity": ["humidity", "hum"],
}


class ConfigError(Exception):
    """Raised when the configuration is invalid; the message names the offending field(s)."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RackMeta(StrictModel):
    """Where a rack stands. Any field left out falls back to the mapping defaults."""

    site: str | None = Field(None, description="Site (data center) name, e.g. 'fra1'.")
    room: str | None = Field(None, description="Room or data hall, e.g. 'hall-1'.")
    row: str | None = Field(None, description="Row in the room, e.g. 'A'.")
    position_in_row: int | None = Field(None, description="Order of the rack within its row, 1-based.")


class MappingConfig(StrictModel):
    """How ThingsBoard devices and telemetry keys map to racks and sensor positions."""

    mode: Literal["per_rack", "per_sensor"] = Field(
        "per_rack",
        description="per_rack: one device per rack with keys tempTop/tempBottom/humidityTop/humidityBottom. "
        "per_sensor: one device per sensor position, named by device_pattern, with keys temperature/humidity.",
    )
    device_pattern: str = Field(
        r"(?P<rack>.+)",
        description="Regex matched against the whole device name. Named groups: rack (required), position "
        "(per_sensor: must match top|bottom), optionally site, room, row. Devices that do not match are rejected.",
    )
    device_types: list[str] = Field(
        default_factory=list,
        description="If set, only devices of these ThingsBoard device types (profile names) are accepted.",
    )
    rack_keys: dict[Literal["tempTop", "tempBottom", "humidityTop", "humidityBottom"], list[str]] = Field(
        default_factory=lambda: dict(DEFAULT_RACK_KEYS),
        description="per_rack: telemetry key aliases for each twin field.",
    )
    sensor_keys: dict[Literal["temperature", "humidity"], list[str]] = Field(
        default_factory=lambda: dict(DEFAULT_SENSOR_KEYS),
        description="per_sensor: telemetry key aliases for temperature and humidity.",
    )
    default_site: str = Field("site1", description="Site of racks with no site in racks: or the device name.")
    default_room: str = Field("room1", description="Room of racks with no room in racks: or the device name.")
    default_row: str = Field("row1", description="Row of racks with no row in racks: or the device name.")
    racks: dict[str, RackMeta] = Field(default_factory=dict, description="Per-rack metadata keyed by rack name.")
    only_listed_racks: bool = Field(False, description="Reject devices whose rack is not listed under racks:.")

    @field_validator("device_pattern")
    @classmethod
    def _pattern_compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "rack" not in compiled.groupindex:
            raise ValueError("must have a named group (?P<rack>...)")
        return value

    @model_validator(mode="after")
    def _per_sensor_needs_position(self) -> "MappingConfig":
        if self.mode == "per_sensor" and "position" not in re.compile(self.device_pattern).groupindex:
            raise ValueError("device_pattern: mode per_sensor needs a named group (?P<position>top|bottom)")
        seen: dict[str, str] = {}
        aliases = self.rack_keys if self.mode == "per_rack" else self.sensor_keys
        for field, keys in aliases.items():
            for key in keys:
                if key in seen and seen[key] != field:
                    raise ValueError(f"key alias {key!r} is used for both {seen[key]} and {field}")
                seen[key] = field
        return self


class YamlFileSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by RACKTWIN_CONFIG (flat keys as in the environment, plus mapping)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | None):
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if not path:
            return
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"RACKTWIN_CONFIG: cannot read {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"RACKTWIN_CONFIG: {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"RACKTWIN_CONFIG: {path} must hold a mapping of settings at the top level")
        self._data = loaded

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class SecretFileSource(PydanticBaseSettingsSource):
    """RACKTWIN_<FIELD>_FILE=/run/secrets/x puts the file's content (stripped) into a secret field."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, field in self.settings_cls.model_fields.items():
            if field.annotation not in (SecretStr, SecretStr | None):
                continue
            env = f"{ENV_PREFIX}{name.upper()}_FILE"
            path = os.environ.get(env)
            if path and os.environ.get(env.removesuffix("_FILE")):
                # Which one wins is not something to find out from a failed login.
                raise ConfigError(f"{env.removesuffix('_FILE')} and {env} are both set: keep one")
            if path:
                try:
                    values[name] = Path(path).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(f"{env}: cannot read {path}: {exc.strerror}") from exc
        return values


class Settings(BaseSettings):
    """Everything the bridge needs to run. Env: RACKTWIN_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False)

    # MQTT: the broker ThingsBoard's rule engine publishes to.
    mqtt_host: str = Field("localhost", description="MQTT broker host.")
    mqtt_port: int = Field(1883, ge=1, le=65535, description="MQTT broker port.")
    mqtt_username: str | None = Field(None, description="MQTT user name.")
    mqtt_password: SecretStr | None = Field(None, description="MQTT password (or RACKTWIN_MQTT_PASSWORD_FILE).")
    mqtt_tls: bool = Field(False, description="Connect to the broker with TLS.")
    mqtt_client_id: str = Field(
        "racktwin-bridge",
        min_length=1,
        max_length=64,
        description="Fixed client id: with a persistent session the broker keeps messages while the bridge restarts.",
    )
    mqtt_topic: str = Field("racktwin/telemetry/#", min_length=1, description="Topic filter to subscribe to.")
    mqtt_shared_group: str | None = Field(
        None,
        pattern=r"^[^/+#]+$",
        description="If set, subscribe as $share/<group>/<topic> so several bridge replicas split the load.",
    )
    mqtt_session_expiry_s: int = Field(
        86400,
        ge=0,
        description="How long the broker keeps the session (and queued messages) while we are away. "
        "With mqtt_shared_group the default is 0: Mosquitto keeps routing shared messages to a dead replica's session.",
    )
    mqtt_receive_maximum: int = Field(
        1000,
        ge=1,
        le=65535,
        description="Unacknowledged messages the broker may have in flight to us: bounds memory under backpressure.",
    )
    mqtt_keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive interval.")

    # Ditto: current twin state.
    ditto_url: str = Field("http://localhost:8080", description="Ditto base URL (nginx in front of the gateway).")
    ditto_username: str = Field("bridge", description="Ditto (nginx basic auth) user of the bridge.")
    ditto_password: SecretStr | None = Field(None, description="Its password (or RACKTWIN_DITTO_PASSWORD_FILE).")
    ditto_namespace: str = Field(
        "dc.site1",
        pattern=DITTO_NAMESPACE_PATTERN,
        description="Namespace of the rack things: <namespace>:<rack>.",
    )
    ditto_policy_id: str | None = Field(
        None, description="Shared policy of all rack things; default <namespace>:racktwin."
    )
    ditto_policy_subjects: dict[Literal["admin", "bridge", "reader"], list[str]] = Field(
        default_factory=lambda: {"admin": ["nginx:ditto"], "bridge": ["nginx:bridge"], "reader": ["nginx:grafana"]},
        description="Subjects granted on the shared policy: admin (policy+thing RW), bridge (thing RW), reader (thing R).",
    )
    ditto_transport: Literal["http", "websocket"] = Field(
        "http",
        description="How twin updates travel: 'http' (one merge-PATCH each, kept-alive connections) or "
        "'websocket' (Ditto Protocol merge commands on one WebSocket, higher throughput).",
    )
    ditto_ws_url: str | None = Field(
        None, description="Ditto WebSocket endpoint for ditto_transport=websocket; default ditto_url + /ws/2."
    )
    ditto_concurrency: int = Field(
        8, ge=1, le=256, description="Things updated concurrently (HTTP connections, or commands in flight on the WebSocket)."
    )
    ditto_timeout_s: float = Field(10.0, gt=0, le=60, description="Timeout of one Ditto request.")
    ditto_release_after_s: float = Field(
        5.0, ge=0.5, le=600,
        description="Ditto answering no twin update this long while readings wait (after a failure of Ditto's as a "
        "whole, or with a request out this long): their messages, and all until it answers one again, are "
        "acknowledged on InfluxDB's confirmation alone, so a Ditto that takes nothing holds InfluxDB's writes up at "
        "most this long; the twins get the newest reading once Ditto is back.",
    )

    # InfluxDB: history.
    influx_url: str = Field("http://localhost:8086", description="InfluxDB base URL.")
    influx_token: SecretStr | None = Field(
        None, description="2.x API token, or 'user:password' for 1.8+ (or RACKTWIN_INFLUX_TOKEN_FILE)."
    )
    influx_org: str = Field("racktwin", description="2.x organisation ('-' for 1.8+).")
    influx_bucket: str = Field("racktwin", min_length=1, description="2.x bucket, or 'db/rp' for 1.8+.")
    influx_batch_size: int = Field(1000, ge=1, le=50000, description="Points per write request at most.")
    influx_flush_interval_s: float = Field(0.2, gt=0, le=60, description="Longest a point waits for its batch.")
    influx_timeout_s: float = Field(10.0, gt=0, le=120, description="Timeout of one InfluxDB write.")
    influx_stats_interval_s: float = Field(
        10.0, ge=0, description="How often the bridge writes its own counters to InfluxDB (0 = never)."
    )

    # Input validation.
    max_payload_bytes: int = Field(65536, ge=256, description="Larger MQTT payloads are rejected.")
    temp_min_c: float = Field(-20.0, description="Lowest plausible temperature (°C).")
    temp_max_c: float = Field(80.0, description="Highest plausible temperature (°C).")
    humidity_min_pct: float = Field(0.0, ge=0, le=100, description="Lowest plausible relative humidity (%).")
    humidity_max_pct: float = Field(100.0, ge=0, le=100, description="Highest plausible relative humidity (%).")
    max_future_s: float = Field(300.0, ge=0, description="Readings further in the future than this are rejected.")
    max_age_s: float = Field(7 * 86400.0, gt=0, description="Readings older than this are rejected.")

    mapping: MappingConfig = Field(default_factory=MappingConfig, description="Device and key mapping (YAML).")

    # Operating.
    http_host: str = Field("0.0.0.0", description="Bind address of /healthz, /readyz, /metrics.")
    http_port: int = Field(9108, ge=0, le=65535, description="Port of /healthz, /readyz, /metrics (0 = any).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_json: bool = Field(False, description="One JSON object per log line.")
    reject_log_interval_s: float = Field(60.0, ge=0, description="At most one reject log line per device per interval.")
    shutdown_timeout_s: float = Field(20.0, gt=0, description="How long SIGTERM waits for in-flight readings.")

    # Forecast (bridge/forecast/): trend per rack and position, minutes until a limit is crossed.
    forecast_enabled: bool = Field(
        True, description="Keep a robust temperature/dew-point trend per rack and position and publish forecasts."
    )
    forecast_window_s: float = Field(
        1800.0, ge=300, le=21600, description="Length of the sliding window the trend is fitted over (s)."
    )
    forecast_bucket_s: float = Field(
        60.0, ge=5, le=600, description="Readings are reduced to one median per bucket of this length before fitting (s)."
    )
    forecast_min_span_s: float = Field(
        600.0, ge=60, description="No forecast until the window's buckets span at least this long (s)."
    )
    forecast_min_trend_c_per_h: float = Field(
        0.5, ge=0, description="Slower rises count as stable: no minutes-to-limit (°C per hour)."
    )
    forecast_max_minutes: float = Field(
        240.0, gt=0, description="A crossing further ahead than this is reported as none (min)."
    )
    forecast_stuck_after_s: float = Field(
        120.0, gt=0, description="A sensor repeating the same value this long (and at least 6 readings) gets no forecast (s)."
    )
    forecast_silent_after_s: float = Field(
        90.0, gt=0, description="A sensor with no reading for this long gets no forecast (s)."
    )
    forecast_horizon_min: float = Field(
        FORECAST_HORIZON_MIN, gt=0,
        description="A rack is 'heading for trouble' when the recommended limit is this close (min); "
        "the Grafana forecast alert uses the same horizon."
    )
    forecast_publish_interval_s: float = Field(
        30.0, ge=1, description="How often forecasts are written to InfluxDB (measurement rack_forecast) (s)."
    )
    forecast_twin_refresh_s: float = Field(
        300.0, ge=0, description="Twin forecast features are patched when they change, and at least this often (s)."
    )
    # The ASHRAE class and RH cap `make dashboards` reads (same env vars), so one environment serves both.
    ashrae_class: Literal["A1", "A2", "A3", "A4"] = Field(
        DEFAULT_CLASS, description="ASHRAE class (A1..A4) for the twins' envelope state and the forecast's allowable "
        "limit; the dashboards and alert rules are generated with the same variable."
    )
    rh_cap: float = Field(
        DEFAULT_RH_CAP, description="Recommended RH cap (70 or 50 %) for the twins' envelope state; `make dashboards` "
        "reads the same variable."
    )
    reading_interval_s: int = Field(
        60, ge=1, le=86400, description="How often each sensor reports (s): a rack with a position silent for 3 of "
        "these shows SILENT on the wall, as the silent-sensor rule `make dashboards` generates from the same variable."
    )

    @field_validator("ashrae_class", mode="before")
    @classmethod
    def _canonical_class(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("rh_cap")
    @classmethod
    def _known_rh_cap(cls, value: float) -> float:
        return check_rh_cap(value)

    # --- ThingsBoard onboarding, sync, verify and the simulator (bridge/thingsboard/, bridge/simulator/) ---
    tb_url: str | None = Field(
        None, description="ThingsBoard base URL, e.g. http://thingsboard:8080 (install, sync, verify, simulator)."
    )
    tb_username: str | None = Field(None, description="ThingsBoard tenant administrator (rule chains need it).")
    tb_password: SecretStr | None = Field(None, description="Its password (or RACKTWIN_TB_PASSWORD_FILE).")
    tb_timeout_s: float = Field(15.0, gt=0, le=120, description="Timeout of one ThingsBoard REST request.")
    tb_device_profile: str = Field(
        "rack-sensor", min_length=1, description="Device profile (= device type) of the rack sensor devices."
    )
    tb_rule_chain_name: str = Field(
        "RackTwin: forward telemetry to bridge", min_length=1,
        description="Name of the rule chain `racktwin thingsboard install` creates and wires after Save Timeseries.",
    )
    tb_topic_prefix: str = Field(
        "racktwin/telemetry", pattern=r"^[^+#]+$",
        description="The rule chain publishes to <prefix>/<deviceName>; must match mqtt_topic.",
    )
    tb_broker_host: str = Field(
        "mosquitto", description="The bridge's MQTT broker as ThingsBoard sees it (host name in TB's network)."
    )
    tb_broker_port: int = Field(1883, ge=1, le=65535, description="Its port as ThingsBoard sees it.")
    tb_broker_username: str | None = Field(None, description="MQTT user the rule chain publishes as.")
    tb_broker_password: SecretStr | None = Field(
        None, description="Its password (or RACKTWIN_TB_BROKER_PASSWORD_FILE)."
    )
    tb_broker_client_id: str = Field(
        "thingsboard-racktwin", min_length=1, max_length=64, description="MQTT client id of the rule chain's node."
    )
    sync_page_size: int = Field(100, ge=1, le=10000, description="Devices per ThingsBoard page when syncing.")
    sync_interval_s: float = Field(
        300.0, ge=0, description="The bridge re-syncs ThingsBoard devices this often, so new devices appear (0 = only at start)."
    )
    sync_first_wait_s: float = Field(
        60.0, ge=0, le=3600,
        description="At start the bridge consumes MQTT only after the first sync placed the racks, waiting at most "
        "this long; then it consumes anyway, placing by the mapping until a sync succeeds (0 = do not wait).",
    )
    sync_backfill_hours: float = Field(
        0.0, ge=0, le=24 * 30, description="Sync copies this many hours of ThingsBoard history into InfluxDB (0 = none)."
    )
    verify_tolerance: float = Field(
        0.05, ge=0, description="`racktwin verify`: largest allowed difference between sources (°C or %RH)."
    )
    verify_max_lag_s: float = Field(
        60.0, gt=0, description="`racktwin verify`: a twin or InfluxDB this far behind ThingsBoard is stale (s)."
    )
    sim_rooms: int = Field(2, ge=1, le=26, description="Simulator: rooms (data halls), named hall1, hall2, ...")
    sim_rows: int = Field(4, ge=1, le=26, description="Simulator: rows per room, named a, b, ...")
    sim_racks: int = Field(40, ge=1, le=100000, description="Simulator: racks in total, spread over rooms and rows.")
    sim_interval_s: float = Field(10.0, gt=0, description="Simulator: seconds between two reports of a rack.")
    sim_mode: Literal["gateway", "device", "envelope"] = Field(
        "gateway",
        description="Simulator output: gateway = TB gateway MQTT API (one connection), device = TB device API "
        "(one connection per device), envelope = rule-engine envelope straight to mqtt_host (no ThingsBoard).",
    )
    sim_seed: int = Field(1, description="Simulator: random seed; same seed and time give the same readings.")
    sim_scenarios: list[str] = Field(
        default_factory=list,
        description="Simulator: scenarios active from the start, e.g. [\"hotspot:hall1-a03@600\"] (see README).",
    )
    sim_tb_mqtt_host: str = Field("localhost", description="Simulator: ThingsBoard's MQTT transport host.")
    sim_tb_mqtt_port: int = Field(1883, ge=1, le=65535, description="Simulator: ThingsBoard's MQTT transport port.")
    sim_gateway_name: str = Field(
        "racktwin-simulator", min_length=1, description="Simulator: name of its gateway device in ThingsBoard."
    )
    sim_gateway_token: SecretStr | None = Field(
        None,
        description="Simulator: access token of the gateway device; if unset it is read (and the device created) "
        "through the REST API with tb_username (or RACKTWIN_SIM_GATEWAY_TOKEN_FILE).",
    )
    sim_provision: bool = Field(
        True,
        description="Simulator: create missing devices in ThingsBoard and set their server attributes "
        "(site, room, row, positionInRow) through the REST API before publishing.",
    )
    sim_control_host: str = Field("0.0.0.0", description="Simulator: bind address of its control HTTP endpoint.")
    sim_control_port: int = Field(
        8099, ge=0, le=65535, description="Simulator: port of GET/POST /scenarios to switch scenarios at run time (0 = off)."
    )
    # --- end of the ThingsBoard / simulator block ---

    @field_validator("ditto_url", "influx_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("mqtt_host", "sim_tb_mqtt_host")
    @classmethod
    def _host_name(cls, value: str) -> str:
        # paho's network thread dies on a name the resolver cannot encode (a label over 63 characters), and
        # never connects again: say so here instead.
        if not value or any(c.isspace() or c == "/" for c in value):
            raise ValueError("must be a host name or address (no scheme, path or spaces)")
        if not value.startswith("[") and ":" not in value:  # not an IPv6 literal
            labels = value.rstrip(".").split(".")
            if len(value) > 253 or any(not 0 < len(label) <= 63 for label in labels):
                raise ValueError("not a valid host name: at most 253 characters, dot-separated labels of 1-63")
        return value

    @field_validator("ditto_ws_url")
    @classmethod
    def _ws_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^wss?://[^/\s]+", value):
            raise ValueError("must be a ws:// or wss:// URL")
        return value

    @model_validator(mode="after")
    def _ranges(self) -> "Settings":
        if self.temp_min_c >= self.temp_max_c:
            raise ValueError("temp_min_c must be below temp_max_c")
        if self.humidity_min_pct >= self.humidity_max_pct:
            raise ValueError("humidity_min_pct must be below humidity_max_pct")
        if self.tb_url and self.mapping.device_types and self.tb_device_profile not in self.mapping.device_types:
            raise ValueError(f"tb_device_profile ({self.tb_device_profile!r}) is not among mapping.device_types "
                             f"({', '.join(map(repr, self.mapping.device_types))}): the bridge would place that "
                             "profile's devices from ThingsBoard and then reject every reading they send; name the "
                             "same profile in both (in the stack TB_DEVICE_PROFILE and BRIDGE_MAPPING)")
        if self.sync_backfill_hours * 3600 > self.max_age_s:
            raise ValueError(f"sync_backfill_hours ({self.sync_backfill_hours:g} h) reaches further back than "
                             f"max_age_s ({self.max_age_s:g} s), whose older readings are rejected: raise max_age_s "
                             "or lower sync_backfill_hours")
        return self

    @model_validator(mode="after")
    def _forecast_can_fire(self) -> "Settings":
        # These start fine and then never warn (or fail on every reading), so they stop start-up instead.
        if self.forecast_window_s < 2 * self.forecast_bucket_s:
            raise ValueError(f"forecast_window_s ({self.forecast_window_s:g} s) must hold at least two buckets of "
                             f"forecast_bucket_s ({self.forecast_bucket_s:g} s) to fit a trend; lengthen the window "
                             "or shorten the buckets")
        if self.forecast_window_s < self.forecast_min_span_s:
            raise ValueError(f"forecast_window_s ({self.forecast_window_s:g} s) is shorter than forecast_min_span_s "
                             f"({self.forecast_min_span_s:g} s): a window can never span that long, so every "
                             "position would stay warming_up; lengthen the window or lower the span")
        if self.forecast_horizon_min > self.forecast_max_minutes:
            raise ValueError(f"forecast_horizon_min ({self.forecast_horizon_min:g} min) is beyond "
                             f"forecast_max_minutes ({self.forecast_max_minutes:g} min): crossings further ahead "
                             "are reported as none, so no rack could be heading for trouble that far out; raise "
                             "forecast_max_minutes or lower the horizon")
        return self

    @property
    def policy_id(self) -> str:
        return self.ditto_policy_id or f"{self.ditto_namespace}:racktwin"

    @property
    def websocket_url(self) -> str:
        if self.ditto_ws_url:
            return self.ditto_ws_url
        scheme, _, rest = self.ditto_url.partition("://")  # validated: http(s)://..., no trailing slash
        return ("wss" if scheme.lower() == "https" else "ws") + "://" + rest + "/ws/2"

    @property
    def session_expiry_s(self) -> int:
        # Mosquitto 2.0 round-robins a shared subscription over all sessions, live or not: a persistent
        # session of a dead replica would swallow half the stream until it returns. See README "Scaling out".
        if self.mqtt_shared_group and "mqtt_session_expiry_s" not in self.model_fields_set:
            return 0
        return self.mqtt_session_expiry_s

    @property
    def subscription_topic(self) -> str:
        if self.mqtt_shared_group:
            return f"$share/{self.mqtt_shared_group}/{self.mqtt_topic}"
        return self.mqtt_topic

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            SecretFileSource(settings_cls),
            YamlFileSource(settings_cls, os.environ.get(f"{ENV_PREFIX}CONFIG")),
        )


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        top = str(err["loc"][0]) if err["loc"] else ""
        hint = f" (env {ENV_PREFIX}{top.upper()})" if top and top != "mapping" else ""
        lines.append(f"  {loc}{hint}: {err['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


# RACKTWIN_* variables that are not bridge settings but belong to the project's other tools, so a shell that
# exports them for those tools can still run the bridge: the config file, the dashboard generator's thresholds,
# compose's image tag, and test switches.
OTHER_TOOLS_ENV = frozenset({
    "CONFIG", "DELTA_T_LIMIT", "RATE_LIMIT_C_PER_H", "BRIDGE_LAG_LIMIT_S",
    "DITTO_UI_URL", "THINGSBOARD_UI_URL",  # the dashboards' links
    "WATCHDOG_URL",  # set: the dashboard generator adds the watchdog alert rule
    "VERSION", "CONTRACTS_DIR", "FAULT_SEED", "SMOKE",
})


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from env/files; raise ConfigError with every bad field named."""
    unknown = sorted(
        key
        for key in os.environ
        if key.upper().startswith(ENV_PREFIX)
        and key.upper()[len(ENV_PREFIX):] not in OTHER_TOOLS_ENV
        and _field_of_env(key.upper()) is None
    )
    if unknown:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {k}: unknown setting" for k in unknown))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:  # a complex field (JSON) that does not even parse, before validation
        raise ConfigError(_describe_unparsable(exc)) from None


def _describe_unparsable(exc: SettingsError) -> str:
    named = re.search(r'field "(\w+)"', str(exc))
    field = named.group(1) if named else "?"
    cause = exc.__cause__
    reason = f"not valid JSON ({cause})" if isinstance(cause, json.JSONDecodeError) else str(cause or exc)
    return f"invalid configuration:\n  {field} (env {ENV_PREFIX}{field.upper()}): {reason}"


def _field_of_env(env: str) -> str | None:
    name = env[len(ENV_PREFIX):].lower()
    if name in Settings.model_fields:
        return name
    if name.endswith("_file") and name[:-5] in Settings.model_fields:
        return name[:-5]
    return None


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with secrets masked, for `racktwin check-config`."""
    data = settings.model_dump(mode="json")
    for name, field in Settings.model_fields.items():
        if field.annotation in (SecretStr, SecretStr | None):
            data[name] = "***" if getattr(settings, name) is not None else None
    return data


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference_markdown() -> str:
    """The settings table of README, generated from the model so the two cannot drift apart."""
    rows = ["| env variable | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "mapping":
            continue
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else json.dumps(default) if isinstance(default, (dict, list)) else str(default)
        secret = field.annotation in (SecretStr, SecretStr | None)
        env = f"`{ENV_PREFIX}{name.upper()}`" + (f" (or `{ENV_PREFIX}{name.upper()}_FILE`)" if secret else "")
        rows.append(f"| {env} | {_cell(shown)} | {_cell(field.description or '')} |")
    rows += ["", "`mapping` (YAML file named by `RACKTWIN_CONFIG`, section `mapping:`):", "",
             "| key | default | description |", "|---|---|---|"]
    for name, field in MappingConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, (dict, list)) else str(default)
        rows.append(f"| `{name}` | `{_cell(shown)}` | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"
