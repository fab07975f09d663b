"""Decoding and mapping: every accepted form, every reject reason, and whole-message rejection."""

from __future__ import annotations

import json

import pytest

from bridge.config import MappingConfig, Settings
from bridge.decode import Rejected, decode
from bridge.mapping import Mapper

NOW = 1_790_000_000_000  # a fixed "receive time" in epoch ms


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


def run(payload, topic="racktwin/telemetry/rack-a01", s: Settings | None = None, now=NOW):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    mapper = Mapper(s or settings())
    return [r for g in decode(topic, raw, now, (s or settings()).max_payload_bytes) for r in mapper.map_group(g, now)]


def reason(payload, **kw) -> str:
    with pytest.raises(Rejected) as info:
        run(payload, **kw)
    return info.value.reason


def test_rule_engine_envelope_maps_to_two_positions():
    readings = run({"deviceName": "rack-a01", "deviceType": "rack-sensor", "ts": NOW - 5000,
                    "values": {"tempTop": 27.5, "tempBottom": "21.25", "humidityTop": 40, "humidityBottom": 45.5}},
                   topic="racktwin/telemetry/whatever")
    assert [(r.rack, r.position, r.temperature, r.humidity, r.ts_ms, r.device) for r in readings] == [
        ("rack-a01", "bottom", 21.25, 45.5, NOW - 5000, "rack-a01"),
        ("rack-a01", "top", 27.5, 40.0, NOW - 5000, "rack-a01"),
    ]


def test_device_api_forms_take_device_from_topic_and_default_ts():
    flat = run({"tempTop": 25, "battery": 88}, topic="v1/x/rack-b02")
    assert [(r.rack, r.position, r.temperature, r.humidity, r.ts_ms) for r in flat] == [
        ("rack-b02", "top", 25.0, None, NOW)
    ]
    ts_values = run([{"ts": NOW - 1000, "values": {"tempBottom": 20}}, {"ts": NOW, "values": {"tempBottom": 21}}])
    assert [(r.ts_ms, r.temperature) for r in ts_values] == [(NOW - 1000, 20.0), (NOW, 21.0)]
    array_of_flat = run([{"humidityTop": 41}, {"tempTop": 24}])
    assert [(r.humidity, r.temperature) for r in array_of_flat] == [(41.0, None), (None, 24.0)]


def test_gateway_form_on_gateway_topic():
    readings = run({"rack-c01": [{"ts": NOW, "values": {"tempTop": 23}}], "rack-c02": {"tempBottom": 19}},
                   topic="racktwin/telemetry/gateway")
    assert sorted((r.rack, r.position, r.temperature) for r in readings) == [
        ("rack-c01", "top", 23.0), ("rack-c02", "bottom", 19.0)]


def test_aliases_are_configurable():
    s = settings(mapping=MappingConfig(rack_keys={"tempTop": ["temperature_top"], "tempBottom": ["t_b"],
                                                  "humidityTop": ["h_t"], "humidityBottom": ["h_b"]}))
    readings = run({"temperature_top": 30.5, "t_b": 22}, s=s)
    assert sorted((r.position, r.temperature) for r in readings) == [("bottom", 22.0), ("top", 30.5)]
    assert reason({"tempTop": 30.5}, s=s) == "no_readings"  # the default name is no alias any more


def test_per_sensor_mode_with_pattern_groups():
    s = settings(mapping=MappingConfig(mode="per_sensor",
                                       device_pattern=r"(?P<room>hall\d)-(?P<rack>[a-z]\d+)-(?P<position>top|bottom)"))
    readings = run({"deviceName": "hall2-r07-bottom", "ts": NOW, "values": {"temperature": 19.5, "humidity": 48}}, s=s)
    assert [(r.rack, r.position, r.location.room, r.temperature, r.humidity) for r in readings] == [
        ("r07", "bottom", "hall2", 19.5, 48.0)]
    assert reason({"deviceName": "hall2-r07-middle", "ts": NOW, "values": {"temperature": 1}}, s=s) == "unknown_device"


def test_rack_metadata_from_config_wins_over_defaults():
    s = settings(mapping=MappingConfig(racks={"rack-a01": {"site": "fra1", "room": "hall-1", "row": "A"}},
                                       default_site="x"))
    loc = run({"tempTop": 22}, s=s)[0].location
    assert (loc.site, loc.room, loc.row, loc.rack) == ("fra1", "hall-1", "A", "rack-a01")
    other = run({"tempTop": 22}, topic="t/rack-zz", s=s)[0].location
    assert (other.site, other.room, other.row) == ("x", "room1", "row1")


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"tempTop": 1, "tempTop": 2}', "invalid_json"),
        (b"[" * 100 + b"]" * 100, "invalid_json"),
        (b'"just a string"', "not_object"),
        (b"42", "not_object"),
        (b"[]", "no_readings"),
        (b'{"battery": 3}', "no_readings"),
        (b'{"tempTop": "warm"}', "non_numeric"),
        (b'{"tempTop": true}', "non_numeric"),
        (b'{"tempTop": [1]}', "non_numeric"),
        (b'{"tempTop": NaN}', "not_finite"),
        (b'{"tempTop": Infinity}', "not_finite"),
        (b'{"tempTop": "nan"}', "not_finite"),
        (b'{"tempTop": 1e400}', "not_finite"),
        (b'{"tempTop": 81}', "out_of_range"),
        (b'{"tempTop": -21}', "out_of_range"),
        (b'{"humidityTop": 100.5}', "out_of_range"),
        (b'{"ts": 1, "values": "x"}', "not_object"),
        (b'{"ts": "soon", "values": {"tempTop": 1}}', "ts_invalid"),
        (b'{"ts": %d, "values": {"tempTop": 1}}' % (NOW + 301_000), "ts_future"),
        (b'{"ts": %d, "values": {"tempTop": 1}}' % (NOW - 8 * 86400_000), "ts_too_old"),
        (b'{"deviceName": "", "values": {"tempTop": 1}}', "unknown_device"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(payload, expected):
    assert reason(payload) == expected


def test_one_bad_value_rejects_the_whole_message():
    assert reason({"tempTop": 25, "tempBottom": "x"}) == "non_numeric"
    assert reason([{"tempTop": 25}, {"tempBottom": 99}]) == "out_of_range"


def test_payload_size_limit():
    big = json.dumps({"tempTop": 25, "pad": "x" * 70000}).encode()
    assert reason(big) == "payload_too_large"


def test_rack_names_illegal_in_ditto_are_rejected():
    assert reason({"deviceName": "rack/a01", "values": {"tempTop": 1}}) == "invalid_rack_name"
    assert reason({"deviceName": "r\u00e9ck", "values": {"tempTop": 1}}) == "invalid_rack_name"
    assert reason({"deviceName": "x" * 300, "values": {"tempTop": 1}}) == "invalid_rack_name"
    # Spaces and non-Latin-1 letters are legal in Ditto names (escaped in URLs and line protocol).
    assert run({"deviceName": "rack 01,x=y", "values": {"tempTop": 1}})[0].rack == "rack 01,x=y"
    assert run({"deviceName": "\u673a\u67b6-1", "values": {"tempTop": 1}})[0].rack == "\u673a\u67b6-1"


def test_device_type_filter():
    s = settings(mapping=MappingConfig(device_types=["rack-sensor"]))
    assert run({"deviceName": "r1", "deviceType": "rack-sensor", "values": {"tempTop": 1}}, s=s)
    assert reason({"deviceName": "r1", "deviceType": "thermostat", "values": {"tempTop": 1}}, s=s) == "unknown_device"


def test_only_listed_racks():
    s = settings(mapping=MappingConfig(only_listed_racks=True, racks={"r1": {}}))
    assert run({"tempTop": 1}, topic="t/r1", s=s)
    assert reason({"tempTop": 1}, topic="t/r2", s=s) == "unknown_device"


def test_a_timestamp_in_seconds_is_rejected_with_a_hint():
    with pytest.raises(Rejected) as info:
        run({"ts": NOW // 1000, "values": {"tempTop": 25}})
    assert info.value.reason == "ts_too_old" and "in seconds?" in str(info.value)
    with pytest.raises(Rejected) as info:
        run({"ts": NOW - 8 * 86400_000, "values": {"tempTop": 25}})
    assert "in seconds?" not in str(info.value)
