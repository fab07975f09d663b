"""Hostile payloads and property-based fuzzing of decode + map + the pipeline's reject accounting.

Properties: nothing but ``Rejected`` ever escapes decoding/mapping; every accepted value lies inside
the plausible range and is finite; every message ends counted as accepted or rejected-by-reason.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from bridge.config import Settings
from bridge.decode import Rejected, decode
from bridge.mapping import Mapper
from bridge.metrics import REJECT_REASONS, Metrics
from bridge.pipeline import Pipeline

NOW = 1_790_000_000_000
SETTINGS = Settings()
MAPPER = Mapper(SETTINGS)

HOSTILE = [
    b"",
    b"{",
    b'{"deviceName": "r1", "values": {"tempTop": 2',
    b"[" * 10_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"tempTop": 1e999999}',
    b'{"tempTop": -1e308}',
    b'{"tempTop": 123456789012345678901234567890}',
    b'{"tempTop": "1e500"}',
    b'{"tempTop": "  25.5  "}',
    b'{"deviceName": "\\u0000rack", "values": {"tempTop": 20}}',
    b'{"deviceName": "\xf0\x9f\x94\xa5rack", "values": {"tempTop": 20}}',
    b'{"deviceName": 12, "values": {"tempTop": 20}}',
    b'{"deviceName": "r", "deviceType": ["x"], "values": {"tempTop": 20}}',
    b'{"deviceName": "r", "ts": true, "values": {"tempTop": 20}}',
    b'{"deviceName": "r", "ts": -5, "values": {"tempTop": 20}}',
    b'{"deviceName": "r", "ts": 1e30, "values": {"tempTop": 20}}',
    b'{"deviceName": "r", "values": {"tempTop": 20}, "extra": 1}',
    b'{"deviceName": "r", "values": null}',
    b'{"tempTop": 20, "tempTop": 21}',
    b'{"tempTop": {"$gt": 1}}',
    b'{"tempTop": 20, "temperature_top": 21}',
    b"\x00\x01\x02",
    b"null",
    b"[null]",
    b"[[]]",
    b'{"ts": 1790000000000}',
    b"x" * (1024 * 1024),
    json.dumps({"tempTop": 20, "pad": "y" * (1024 * 1024)}).encode(),
]
TOPICS = ["racktwin/telemetry/rack-1", "racktwin/telemetry/", "racktwin//", "/", "racktwin/telemetry/gateway",
          "racktwin/telemetry/r\u00e9", "racktwin/telemetry/" + "z" * 400]


def _in_range(readings) -> None:
    for r in readings:
        assert r.position in ("top", "bottom")
        assert NOW - SETTINGS.max_age_s * 1000 <= r.ts_ms <= NOW + SETTINGS.max_future_s * 1000
        for value, (low, high) in ((r.temperature, (SETTINGS.temp_min_c, SETTINGS.temp_max_c)),
                                   (r.humidity, (SETTINGS.humidity_min_pct, SETTINGS.humidity_max_pct))):
            if value is not None:
                assert math.isfinite(value) and low <= value <= high


def check_outcome(topic: str, payload: bytes) -> str:
    """Decode and map one message; returns 'accepted' or the reject reason, asserting the invariants."""
    try:
        readings = [r for g in decode(topic, payload, NOW, SETTINGS.max_payload_bytes)
                    for r in MAPPER.map_group(g, NOW)]
    except Rejected as rej:
        assert rej.reason in REJECT_REASONS
        return rej.reason
    assert readings
    _in_range(readings)
    return "accepted"


class _RecordingSinks:
    """Both sinks of a Pipeline: what it hands on, never confirmed (accepted messages stay in flight)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.readings: list = []

    def submit(self, item, on_done=None, *rest) -> None:
        if isinstance(item, list):
            self.lines.extend(item)
        else:
            self.readings.append(item)


FUZZ_METRICS = Metrics()
FUZZ_SINKS = _RecordingSinks()
FUZZ_PIPELINE = Pipeline(SETTINGS, FUZZ_SINKS, FUZZ_SINKS, FUZZ_METRICS)


def pipeline_outcome(topic: str, payload: bytes) -> str:
    """The message through the real Pipeline: 'accepted' or the reason its reject was counted under, asserting
    that nothing escaped, exactly one counter moved, and every reading handed on lies in the plausible range."""
    counters = ["racktwin_messages_accepted_total", "racktwin_internal_errors_total"]
    before = [FUZZ_METRICS.value(c) for c in counters]
    before_rejected = {r: FUZZ_METRICS.value("racktwin_messages_rejected_total", {"reason": r}) for r in REJECT_REASONS}
    handed_on = len(FUZZ_SINKS.readings)
    FUZZ_PIPELINE.handle(topic, payload, lambda: None, now_ms=NOW)
    accepted, errors = (FUZZ_METRICS.value(c) - b for c, b in zip(counters, before))
    moved = [r for r, n in before_rejected.items()
             if FUZZ_METRICS.value("racktwin_messages_rejected_total", {"reason": r}) != n]
    assert errors == 0, "an exception got out of decoding or mapping"
    assert accepted + len(moved) == 1, (accepted, moved)
    _in_range(FUZZ_SINKS.readings[handed_on:])
    return "accepted" if accepted else moved[0]


def test_hostile_corpus_never_raises_and_every_message_is_counted():
    metrics = Metrics()
    sink_calls = []

    class Sink:
        def submit(self, *args):
            sink_calls.append(args)

    pipeline = Pipeline(SETTINGS, Sink(), Sink(), metrics)
    acks = []
    outcomes = {}
    for topic in TOPICS:
        for payload in HOSTILE:
            outcomes[(topic, payload[:40])] = check_outcome(topic, payload)
            pipeline.handle(topic, payload, lambda: acks.append(1), now_ms=NOW)
    total = len(TOPICS) * len(HOSTILE)
    rejected = sum(metrics.value("racktwin_messages_rejected_total", {"reason": r}) for r in REJECT_REASONS)
    accepted = metrics.value("racktwin_messages_accepted_total")
    assert metrics.value("racktwin_messages_received_total") == total
    assert accepted + rejected == total
    assert len(acks) == rejected  # rejected ones are acknowledged at once; accepted ones wait for the sinks
    assert accepted == sum(1 for v in outcomes.values() if v == "accepted") > 0
    # Every reject under its own reason: the counters say what decoding and mapping said of each message.
    for reason in REJECT_REASONS:
        expected = sum(1 for v in outcomes.values() if v == reason)
        assert metrics.value("racktwin_messages_rejected_total", {"reason": reason}) == expected, reason
    assert {v for v in outcomes.values()} >= {"invalid_json", "payload_too_large", "not_object"}
    assert outcomes[("racktwin/telemetry/rack-1", b'{"tempTop": "  25.5  "}')] == "accepted"
    assert outcomes[("racktwin/telemetry/rack-1", HOSTILE[3][:40])] == "invalid_json"


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
keys = st.sampled_from(["tempTop", "tempBottom", "humidityTop", "humidityBottom", "temperature_top", "battery", "ts"])
values_dicts = st.dictionaries(keys, json_scalars, max_size=5)
envelopes = st.fixed_dictionaries(
    {"values": values_dicts},
    optional={"deviceName": st.one_of(st.text(max_size=30), st.integers()), "deviceType": st.text(max_size=10),
              "ts": st.one_of(st.integers(min_value=NOW - 10 ** 9, max_value=NOW + 10 ** 9), json_scalars)})


@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=st.sampled_from(TOPICS), doc=st.one_of(envelopes, values_dicts, st.lists(envelopes, max_size=3), json_values))
def test_fuzzed_documents_keep_the_invariants(topic, doc):
    payload = json.dumps(doc, allow_nan=True).encode()
    assert pipeline_outcome(topic, payload) == check_outcome(topic, payload)


@hsettings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=200))
def test_fuzzed_bytes_keep_the_invariants(payload):
    assert pipeline_outcome("racktwin/telemetry/rack-1", payload) == check_outcome("racktwin/telemetry/rack-1", payload)


def test_reject_log_lines_are_rate_limited_per_device_not_per_topic(caplog):
    """Many devices share one topic (rule-engine envelopes on a fixed topic, a gateway): one noisy device must not
    hide the others' rejects from the log; the same device is logged once per interval, and counted every time."""
    class Sink:
        def submit(self, *args):
            pass

    metrics = Metrics()
    pipeline = Pipeline(SETTINGS, Sink(), Sink(), metrics)
    too_hot = {"tempTop": 500}
    messages = [{"deviceName": name, "deviceType": "rack-sensor", "ts": NOW, "values": too_hot}
                for name in ("rack-1", "rack-1", "rack-2", "rack-1", "rack-3")]
    with caplog.at_level("WARNING", logger="bridge.pipeline"):
        for doc in messages:
            pipeline.handle("racktwin/telemetry/shared", json.dumps(doc).encode(), lambda: None, now_ms=NOW)
    logged = [r.getMessage() for r in caplog.records if "rejected message" in r.getMessage()]
    assert [m.split()[3] for m in logged] == ["rack-1", "rack-2", "rack-3"], logged
    assert metrics.value("racktwin_messages_rejected_total", {"reason": "out_of_range"}) == 5


def test_log_events_stay_on_one_line_in_both_formats():
    import logging

    from bridge.logs import JsonFormatter, OneLineFormatter

    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        import sys
        record = logging.LogRecord("bridge.x", logging.ERROR, __file__, 1, "failed on %s", ("a\nb",), sys.exc_info())
    plain = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in plain and plain.startswith("ERROR bridge.x: failed on a | b | Traceback")
    assert "ValueError: bad | value" in plain
    assert "\n" not in JsonFormatter().format(record)
