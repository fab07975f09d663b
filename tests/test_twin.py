"""The pure twin model: dew point, timestamps, patches and conditions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import twin
from bridge.mapping import RackLocation, SensorReading

LOC = RackLocation("s", "r", "w", "rack-1")


def test_dew_point_matches_magnus_by_hand():
    # T=25, RH=50: gamma = ln(0.5) + 17.62*25/(243.12+25) = -0.693147 + 1.642870 = 0.949723
    # Td = 243.12*0.949723/(17.62-0.949723) = 13.85
    assert twin.dew_point(25.0, 50.0) == pytest.approx(13.85, abs=0.01)
    assert twin.dew_point(20.0, 100.0) == pytest.approx(20.0, abs=0.01)  # saturated air: Td = T
    assert twin.dew_point(27.0, 47.8) == pytest.approx(15.0, abs=0.05)  # domain.md: 15 °C DP cap at 27 °C
    assert twin.dew_point(20.0, 0.0) is None


def test_iso_timestamps_are_fixed_width_and_round_trip():
    ts = 1_790_000_000_007
    text = twin.iso_ms(ts)
    assert text == "2026-09-21T14:13:20.007Z"
    assert twin.parse_iso_ms(text) == ts
    assert twin.iso_ms(ts) < twin.iso_ms(ts + 1) < twin.iso_ms(ts + 1000)


def test_patch_uses_users_field_names_and_derived_values():
    top = twin.PositionState(1_790_000_000_000, 29.0, 40.0, "dev")
    bottom = twin.PositionState(1_790_000_000_000, 21.5, 50.0, "dev")
    known = {"top": top, "bottom": bottom}
    patch = twin.build_patch({"top": top}, known, None)
    props = patch["features"]["environment"]["properties"]
    assert props == {
        "tempTop": 29.0,
        "humidityTop": 40.0,
        "dewPointTop": twin.dew_point(29.0, 40.0),
        "tsTop": "2026-09-21T14:13:20.000Z",
        "deltaT": 7.5,
        "envelope": "WARM",  # 29 °C: above the recommended 27, below A1's allowable 32
    }
    assert "attributes" not in patch


def test_condition_guards_every_pending_position():
    pending = {"top": twin.PositionState(1000), "bottom": twin.PositionState(2000)}
    cond = twin.newer_than_condition(pending)
    assert cond.startswith("and(")
    assert 'le(features/environment/properties/tsTop,"1970-01-01T00:00:01.000Z")' in cond
    assert 'le(features/environment/properties/tsBottom,"1970-01-01T00:00:02.000Z")' in cond
    assert twin.newer_than_condition({"top": twin.PositionState(1000)}).startswith("or(not(exists(")


def test_merge_reading_keeps_fields_the_newer_reading_lacks():
    first = twin.merge_reading(None, SensorReading(LOC, "top", "d", 1, 20.0, 40.0))
    second = twin.merge_reading(first, SensorReading(LOC, "top", "d", 2, 21.0, None))
    assert (second.ts_ms, second.temperature, second.humidity) == (2, 21.0, 40.0)


def test_the_twin_holds_tenths_and_influxdb_what_was_sent():
    """The wall's tiles show the twin's numbers as their raw text: the twin keeps a tenth, the history all of it."""
    from bridge.sinks.influx import reading_line

    reading = SensorReading(LOC, "top", "d", 1000, 23.456, 45.249)
    state = twin.merge_reading(None, reading)
    props = twin.position_properties("top", state)
    assert (props["tempTop"], props["humidityTop"]) == (23.5, 45.2)
    assert props["dewPointTop"] == twin.dew_point(23.456, 45.249) != twin.dew_point(23.5, 45.2)
    assert "temperature=23.456" in reading_line(reading) and "humidity=45.249" in reading_line(reading)


def test_envelope_and_delta_come_from_the_values_sent_not_the_rounded_ones():
    """27.04 °C is above A1's recommended 27 for the alert rule (InfluxDB holds 27.04): the tile's state says so
    too, though its number reads 27.0."""
    top = twin.merge_reading(None, SensorReading(LOC, "top", "d", 1000, 27.04, 45.0))
    bottom = twin.merge_reading(None, SensorReading(LOC, "bottom", "d", 1000, 20.96, 45.0))
    known = {"top": top, "bottom": bottom}
    props = twin.build_patch(known, known, None)["features"]["environment"]["properties"]
    assert props["tempTop"] == 27.0 and props["envelope"] == "WARM"
    assert props["deltaT"] == 6.08  # not 27.0 - 21.0


def test_a_rack_with_a_silent_position_shows_silent_unless_its_last_values_are_outside_the_class():
    fresh, old = twin.PositionState(10_000, 22.0, 45.0), twin.PositionState(1_000, 22.0, 45.0)
    assert twin.rack_state({"top": fresh, "bottom": fresh}, "A1", 70, silent_since_ms=5_000) == "OK"
    assert twin.rack_state({"top": fresh, "bottom": old}, "A1", 70, silent_since_ms=5_000) == "SILENT"
    assert twin.rack_state({"top": fresh, "bottom": old}, "A1", 70, silent_since_ms=None) == "OK"  # not judged
    warm = twin.PositionState(1_000, 28.0, 45.0)
    assert twin.rack_state({"top": warm}, "A1", 70, silent_since_ms=5_000) == "SILENT"  # its WARM is no longer known
    hot = twin.PositionState(1_000, 33.0, 45.0)
    assert twin.rack_state({"top": hot, "bottom": fresh}, "A1", 70, silent_since_ms=5_000) == "HOT"  # the most said
    # A reading written while the other position is silent keeps the rack SILENT.
    props = twin.build_patch({"top": fresh}, {"top": fresh, "bottom": old}, None, ("A1", 70), 5_000)
    assert props["features"]["environment"]["properties"]["envelope"] == "SILENT"
    assert twin.envelope_of(props) == "SILENT" and twin.envelope_of({"features": []}) is None
    assert twin.unchanged_condition({"top": fresh, "bottom": old}) == (
        'and(le(features/environment/properties/tsTop,"1970-01-01T00:00:10.000Z"),'
        'le(features/environment/properties/tsBottom,"1970-01-01T00:00:01.000Z"))')
    # A position we never saw must still be absent: another replica may have written it.
    assert twin.unchanged_condition({"top": fresh}) == (
        'and(le(features/environment/properties/tsTop,"1970-01-01T00:00:10.000Z"),'
        'not(exists(features/environment/properties/tsBottom)))')


def test_conditions_compare_with_the_timestamp_text_the_twin_holds():
    """Ditto compares timestamps as strings: one the twin holds in another form than ours ("…:00Z" for
    "…:00.000Z", which sorts above it) must be compared as held, or le() would fail for good."""
    known = twin.known_from_thing({"features": {"environment": {"properties": {
        "tsTop": "2026-12-02T01:00:00Z", "tempTop": 22.0}}}})
    assert known["top"].ts_ms == twin.parse_iso_ms("2026-12-02T01:00:00.000Z")
    assert twin.nothing_newer(known, ["top"]) == ['le(features/environment/properties/tsTop,"2026-12-02T01:00:00Z")']
    merged = twin.newest_of(twin.PositionState(known["top"].ts_ms, None, 40.0), known["top"])  # same instant
    assert merged.ts_text == "2026-12-02T01:00:00Z"
    # Values no sensor sends (a twin edited by hand) give no dew point rather than a ZeroDivisionError.
    assert twin.dew_point(-243.12, 50.0) is None
    assert twin.rack_state({"top": twin.PositionState(1, -243.12, 50.0)}, "A1", 70, 0) == "COLD"


def test_a_redelivered_reading_adds_nothing_to_a_twin_holding_its_rounded_values():
    sent = twin.merge_reading(None, SensorReading(LOC, "top", "d", 10, 23.456, 45.249))
    from_ditto = twin.known_from_thing(twin.build_patch({"top": sent}, {"top": sent}, None))
    assert from_ditto["top"].temperature == 23.5
    assert twin.drop_stale({"top": sent}, from_ditto) == ({}, ["top"])


def test_known_state_round_trips_through_thing_json():
    known = {"top": twin.PositionState(5000, 25.0, 45.0, "dev-t"), "bottom": twin.PositionState(4000, 20.0, None, "dev-b")}
    patch = twin.build_patch(known, known, twin.attributes_for(LOC, {"top": "dev-t", "bottom": "dev-b"}))
    back = twin.known_from_thing(patch)
    assert back == known


def test_known_state_reads_what_fits_from_a_twin_edited_into_other_shapes():
    good = {"tsTop": "2026-12-01T10:00:00.000Z", "tempTop": 25.0, "humidityTop": "45"}
    assert twin.known_from_thing({"attributes": {"tbDevices": "dev-t"}, "features": {"environment": {
        "properties": good}}}) == {"top": twin.PositionState(1796119200000, 25.0, None, None)}
    for odd in ([], None, "x", {"features": []}, {"features": {"environment": None}}, {"attributes": 5},
                {"features": {"environment": {"properties": ["tsTop"]}}}):
        assert twin.known_from_thing(odd) == {}


def test_drop_stale():
    pending = {"top": twin.PositionState(10), "bottom": twin.PositionState(10)}
    fresh, stale = twin.drop_stale(pending, {"top": twin.PositionState(10), "bottom": twin.PositionState(9)})
    assert list(fresh) == ["bottom"] and stale == ["top"]


def test_drop_stale_at_an_equal_timestamp_keeps_only_what_adds_to_the_twin():
    twin_has = {"top": twin.PositionState(10, 22.0, None), "bottom": twin.PositionState(10, 20.0, 41.0)}
    pending = {"top": twin.PositionState(10, None, 45.0),  # the humidity half of a reading sent in two messages
               "bottom": twin.PositionState(10, 20.0, None)}  # a redelivered copy: nothing new
    fresh, stale = twin.drop_stale(pending, twin_has)
    assert fresh == {"top": twin.PositionState(10, 22.0, 45.0)} and stale == ["bottom"]
    changed, _ = twin.drop_stale({"bottom": twin.PositionState(10, 20.5, None)}, twin_has)  # same ts, other value
    assert changed == {"bottom": twin.PositionState(10, 20.5, 41.0)}


def test_thing_path_escapes_names():
    assert twin.thing_path("dc.a:rack 1") == "/api/2/things/dc.a:rack%201"
    assert twin.thing_path("dc.a:r,x=y") == "/api/2/things/dc.a:r%2Cx%3Dy"


def test_policy_grants():
    body = twin.policy_body({"admin": ["nginx:ditto"], "bridge": ["nginx:bridge"], "reader": ["nginx:grafana"]})
    assert body["entries"]["reader"]["resources"] == {"thing:/": {"grant": ["READ"], "revoke": []}}
    assert body["entries"]["bridge"]["resources"]["thing:/"]["grant"] == ["READ", "WRITE"]


def test_newest_of_keeps_the_newer_state_whichever_side_it_is_on():
    older = twin.PositionState(1, 20.0, 40.0, "d-old")
    newer = twin.PositionState(2, 21.0, None, None)
    for a, b in ((older, newer), (newer, older)):
        assert twin.newest_of(a, b) == twin.PositionState(2, 21.0, 40.0, "d-old")


@pytest.mark.parametrize("temp, rh, cls, cap, expected", [
    (24.0, 45.0, "A1", 70, "OK"),          # dew point 11.3
    (28.0, 40.0, "A1", 70, "WARM"),        # above 27, below 32
    (33.0, 30.0, "A1", 70, "HOT"),         # above A1's 32
    (33.0, 30.0, "A2", 70, "WARM"),        # A2 allows 35
    (17.0, 50.0, "A1", 70, "COOL"),        # below 18, above 15
    (14.0, 50.0, "A1", 70, "COLD"),
    (20.0, 72.0, "A1", 70, "HUMID"),       # RH above the 70 % cap, dew point 14.8 still fine
    (22.0, 55.0, "A1", 50, "HUMID"),       # the 50 % cap
    (24.0, 62.0, "A1", 70, "HUMID"),       # dew point 16.3 above 15
    (24.0, 75.0, "A1", 70, "VERY HUMID"),  # dew point 19.3 above A1's 17
    (20.0, 13.0, "A1", 70, "DRY"),         # dew point -9.3
    (20.0, 10.0, "A1", 70, "VERY DRY"),    # dew point -12.6
    (20.0, 5.0, "A1", 70, "VERY DRY"),     # RH below 8 %
    (24.0, None, "A1", 70, "OK"),          # temperature-only sensor
])
def test_envelope_state_of_one_position(temp, rh, cls, cap, expected):
    from bridge.thresholds import envelope_state

    dp = twin.dew_point(temp, rh) if rh is not None else None
    assert envelope_state(temp, rh, dp, cls, cap) == expected


def test_rack_envelope_is_the_worse_position_and_goes_into_every_patch():
    known = {"top": twin.PositionState(2, 28.5, 40.0), "bottom": twin.PositionState(2, 20.0, 72.0)}
    assert twin.envelope(known, "A1", 70) == "WARM"  # outside recommended both; temperature ranks first
    known["bottom"] = twin.PositionState(3, 20.0, 5.0)
    assert twin.envelope(known, "A1", 70) == "VERY DRY"  # outside allowable beats outside recommended
    patch = twin.build_patch({"bottom": known["bottom"]}, known, None, ("A1", 70))
    assert patch["features"]["environment"]["properties"]["envelope"] == "VERY DRY"
    assert twin.build_patch({}, known, None)["features"]["environment"]["properties"] == {}


def test_iso_ms_is_fixed_width_utc_with_milliseconds():
    from datetime import datetime, timezone

    from bridge.twin import iso_ms

    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(1764547200123) == "2025-12-01T00:00:00.123Z"
    assert iso_ms(1764547199999) == "2025-11-30T23:59:59.999Z"
    for ts in range(951_782_400_000, 4_102_444_800_000, 7_777_777_777):  # 2000-02-29 onwards, leap days included
        expected = datetime.fromtimestamp(ts / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
        assert iso_ms(ts) == expected.replace("+00:00", "Z"), ts


@given(st.text(max_size=80) | st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_the_condition_quoting_is_urllibs(text):
    from urllib.parse import quote

    from bridge.sinks.ditto import quote_component

    assert quote_component(text) == quote(text, safe="")


def test_a_real_condition_quotes_like_urllib():
    from urllib.parse import quote

    from bridge.sinks.ditto import quote_component

    condition = twin.newer_than_condition({"top": twin.PositionState(1_790_000_000_123, 24.1, 40.0, "dev"),
                                           "bottom": twin.PositionState(1_790_000_000_456)})
    assert quote_component(condition) == quote(condition, safe="") and "%22" in quote_component(condition)


@pytest.mark.parametrize("status, retried", [
    (None, True), (500, True), (502, True), (503, True), (429, True), (408, True),
    (424, True),  # twin-persisted acknowledgement failed or timed out (ditto.md): Ditto could not persist it then
    (401, True), (403, True), (404, True),  # policy or thing not there yet, nginx user being rolled out
    (400, False), (413, False), (415, False),  # a request Ditto will never take
])
def test_which_ditto_answers_are_waited_out(status, retried):
    from bridge.sinks.ditto import retryable

    assert retryable(status) is retried


def test_a_twins_location_is_read_from_its_attributes_and_what_is_not_text_is_left_empty():
    thing = {"attributes": {"site": "s", "room": "hall1", "row": 3, "rack": "hall1-a03"}}
    assert twin.location_of(thing) == RackLocation("s", "hall1", "", "hall1-a03")
    assert twin.location_of({"attributes": []}) == twin.location_of({}) == RackLocation("", "", "", "")


def test_the_search_filter_for_silent_twins_names_both_positions_timestamps():
    assert twin.older_than_filter(0) == ('or(lt(features/environment/properties/tsTop,"1970-01-01T00:00:00.000Z"),'
                                         'lt(features/environment/properties/tsBottom,"1970-01-01T00:00:00.000Z"))')
