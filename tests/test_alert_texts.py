"""What an on-call engineer reads: the committed rules' annotations rendered as Grafana renders them
(tests/gotemplate.py, Go's text/template with Grafana's data), for a firing evaluation, one whose condition no
longer holds (keepFiringFor's Recovering, the "resolved" notification), and one without values (a "no data" or
"error" alert, which carries only the rule's labels).

Grafana renders annotations on each evaluation from its values, except where its state manager applies a no-data
or error state to every alert of a rule (applyNoDataAndErrorToAllStates: setNextStateForAll copies each alert and
moves it to the new state without rendering again): those alerts keep the text of their last evaluation."""

from __future__ import annotations

import pytest

from tests.dashboard_data import RULE_GROUPS
from tests.gotemplate import TemplateError, go_float, render
from tests.grafana_sim import threshold

RULES = {r["uid"]: r for g in RULE_GROUPS for r in g["rules"]}
SENSOR = {"site": "site1", "room": "hall1", "row": "A", "rack": "hall1-a03", "position": "top"}
RACK = {**SENSOR, "position": "top-bottom"}
BRIDGE = {"instance": "bridge-1", "component": "bridge"}
NOT_READY = "Bridge bridge-1 is not ready (ready = 0): MQTT, Ditto or InfluxDB unreachable, see its /readyz"
NO_STATS = ("No bridge stats in InfluxDB for 2 min: the bridge is down or cut off from InfluxDB, or Grafana cannot "
            "query InfluxDB")
SILENT_BRIDGE = ("Bridge bridge-1 sent no stats to InfluxDB for 2 min (it did in the last 24 h): it is down or cut "
                 "off from InfluxDB")
STALE = ("No stats from bridge bridge-1 in InfluxDB for 2 min (its last said ready; in a resolved notification: "
         "ready again): the bridge is down or cut off from InfluxDB, or Grafana cannot query InfluxDB")

# uid -> labels, (B, text) firing, (B, text) with the condition false (defaults: ASHRAE A1, RH cap 70 %)
TEXTS = {
    "racktwin-inlet-recommended": (SENSOR, (28.4, "hall1-a03 top inlet 28.4 °C outside recommended 18–27 °C"),
                                   (25.9, "hall1-a03 top inlet 25.9 °C, back inside recommended 18–27 °C")),
    "racktwin-inlet-allowable": (SENSOR, (33.0, "hall1-a03 top inlet 33.0 °C outside A1 allowable 15–32 °C"),
                                 (31.5, "hall1-a03 top inlet 31.5 °C, back inside A1 allowable 15–32 °C")),
    "racktwin-dewpoint-recommended": (
        SENSOR, (15.6, "hall1-a03 top dew point 15.6 °C above recommended 15 °C"),
        (14.2, "hall1-a03 top dew point 14.2 °C, back at or below recommended 15 °C")),
    "racktwin-dewpoint-allowable": (
        SENSOR, (17.3, "hall1-a03 top dew point 17.3 °C above A1 allowable 17 °C"),
        (16.0, "hall1-a03 top dew point 16.0 °C, back at or below A1 allowable 17 °C")),
    "racktwin-humidity-recommended": (SENSOR, (72.0, "hall1-a03 top RH 72.0 % above recommended 70 %"),
                                      (68.5, "hall1-a03 top RH 68.5 %, back at or below recommended 70 %")),
    "racktwin-humidity-allowable": (SENSOR, (81.0, "hall1-a03 top RH 81.0 % above A1 allowable 80 %"),
                                    (79.0, "hall1-a03 top RH 79.0 %, back at or below A1 allowable 80 %")),
    "racktwin-dry-dewpoint-recommended": (
        SENSOR, (-9.5, "hall1-a03 top dew point -9.5 °C below recommended -9 °C"),
        (-8.0, "hall1-a03 top dew point -8.0 °C, back at or above recommended -9 °C")),
    "racktwin-dry-dewpoint-allowable": (
        SENSOR, (-12.5, "hall1-a03 top dew point -12.5 °C below allowable -12 °C"),
        (-11.0, "hall1-a03 top dew point -11.0 °C, back at or above allowable -12 °C")),
    "racktwin-dry-humidity-allowable": (SENSOR, (7.0, "hall1-a03 top RH 7.0 % below allowable 8 %"),
                                        (9.0, "hall1-a03 top RH 9.0 %, back at or above allowable 8 %")),
    "racktwin-recirculation": (RACK, (8.0, "hall1-a03 top − bottom 8.0 °C above 5 °C for 10m (recirculation?)"),
                               (4.0, "hall1-a03 top − bottom 4.0 °C, back at or below 5 °C")),
    "racktwin-rate-of-change": (
        SENSOR, (6.2, "hall1-a03 top inlet changed 6.2 °C within 15 min (limit 20 °C/h)"),
        (1.5, "hall1-a03 top inlet changed 1.5 °C within 15 min, back within the limit of 5 °C (20 °C/h)")),
    "racktwin-sensor-silent": (
        SENSOR, (0.0, ("hall1-a03 top sent no reading (or no humidity) for more than 180 s (0 readings in 3 intervals "
                 "of 60 s)")),
        (3.0, "hall1-a03 top reporting again (3 readings in the last 180 s)")),
    "racktwin-sensor-stuck": (
        SENSOR, (0.0, ("hall1-a03 top reported identical temperature and humidity for 15 min (spread 0.0, at "
                       "least 10 readings)")),
        (0.4, "hall1-a03 top readings vary again (spread 0.4 over 15 min)")),
    "racktwin-forecast-recommended": (
        SENSOR, (26.0, "hall1-a03 top forecast to pass 27 °C in 26 min"),
        (45.0, "hall1-a03 top no longer forecast to pass 27 °C within 30 min (in 45 min)")),
    "racktwin-bridge-down": (BRIDGE, (0.0, NOT_READY), (1.0, STALE)),
    "racktwin-bridge-lagging": (
        BRIDGE, (45.0, ("Bridge bridge-1 lags 45.0 s behind (p95 to a sink, or its oldest unconfirmed message), "
                        "more than 30 s")),
        (3.2, "Bridge bridge-1 lag 3.2 s, back at or below 30 s")),
}


def summary(uid: str, labels: dict, values: dict) -> str:
    return render(RULES[uid]["annotations"]["summary"], labels, values)


def condition(uid: str, b: float) -> float:
    """The rule's threshold expression (its condition refId) on the reduced value B, as Grafana computes C."""
    rule = RULES[uid]
    [node] = [d["model"] for d in rule["data"] if d["refId"] == rule["condition"]]
    evaluator = node["conditions"][0]["evaluator"]
    return 1.0 if threshold(b, evaluator["type"], evaluator["params"]) else 0.0


def test_every_rule_has_its_texts_checked():
    assert set(TEXTS) == set(RULES)


@pytest.mark.parametrize("uid", sorted(TEXTS))
def test_a_firing_alert_says_what_is_wrong(uid):
    labels, (b, text), _ = TEXTS[uid]
    assert condition(uid, b) == 1.0, f"{uid}: B = {b} does not meet the rule's own threshold"
    assert summary(uid, labels, {"B": b, "C": 1.0}) == text
    # Grafana takes a NaN condition for firing: so does the text.
    assert summary(uid, labels, {"B": b, "C": float("nan")}) == text


@pytest.mark.parametrize("uid", sorted(TEXTS))
def test_an_alert_whose_condition_no_longer_holds_says_so(uid):
    """keepFiringFor holds it firing (Recovering), then the "resolved" goes out: both rendered from an evaluation
    where the condition is 0, which must not read as the breach it no longer is."""
    labels, _, (b, text) = TEXTS[uid]
    assert condition(uid, b) == 0.0, f"{uid}: B = {b} still meets the rule's own threshold"
    assert summary(uid, labels, {"B": b, "C": 0.0}) == text


def test_the_forecast_of_a_rack_whose_rise_levelled_off():
    """No crossing forecast any more (the query's NO_CROSSING): judged, so its "resolved" is a real one, and says
    why; not "in -1 min", nor "already at or above"."""
    from dashboards.alerts import NO_CROSSING

    assert condition("racktwin-forecast-recommended", NO_CROSSING) == 0.0
    assert summary("racktwin-forecast-recommended", SENSOR, {"B": float(NO_CROSSING), "C": 0.0}) == (
        "hall1-a03 top no longer heading for 27 °C (its trend forecasts no crossing)")


def test_the_forecast_of_a_rack_already_past_the_limit():
    """0 minutes: the line is above the limit already (not a crossing within the horizon): the inlet rule's."""
    assert summary("racktwin-forecast-recommended", SENSOR, {"B": 0.0, "C": 0.0}) == (
        "hall1-a03 top forecast already at or above 27 °C (the inlet rule reports it)")


def test_a_bridge_that_goes_silent_fires_with_the_text_of_its_last_ready_evaluation():
    """No stats: bridge-down's query finds nothing and the no-data state (Alerting) is applied to each existing
    alert, a copy not rendered again. A bridge that was ready thus fires with the text rendered from ready = 1,
    which must tell of the silence, naming the bridge; that text is the "resolved" one too, hence its aside."""
    rendered_while_ready = summary("racktwin-bridge-down", BRIDGE, {"B": 1.0, "C": 0.0})
    assert rendered_while_ready == STALE and "not ready" not in rendered_while_ready
    # Not ready is told by its value; a placeholder below 0 or NaN, or no values at all, by the no-stats text.
    assert summary("racktwin-bridge-down", BRIDGE, {"B": 0.0, "C": 1.0}) == NOT_READY
    # A bridge silent for 2 min while known from the last day: -1, by name.
    assert summary("racktwin-bridge-down", BRIDGE, {"B": -1.0, "C": 1.0}) == SILENT_BRIDGE
    assert summary("racktwin-bridge-down", BRIDGE, {"B": float("nan"), "C": 1.0}) == NO_STATS
    assert summary("racktwin-bridge-down", {"component": "bridge", "alertname": "DatasourceNoData"}, {}) == NO_STATS


def test_the_lag_alert_is_not_resolved_by_the_bridge_going_silent():
    """With no data = OK, Grafana would resolve a firing lag alert from a copy of its firing state: a "resolved"
    reading "lags 45.0 s behind". KeepLast keeps it until the bridge's next stats judge it (bridge-down reports
    the silence)."""
    assert RULES["racktwin-bridge-lagging"]["noDataState"] == "KeepLast"
    assert RULES["racktwin-bridge-down"]["noDataState"] == "Alerting"


def no_data_labels(rule: dict) -> dict:
    """The labels of Grafana's DatasourceNoData / DatasourceError alert: the rule's, none of the series."""
    return {**rule["labels"], "alertname": "DatasourceNoData", "grafana_folder": "RackTwin",
            "datasource_uid": "influxdb", "ref_id": "A"}


@pytest.mark.parametrize("uid", sorted(RULES))
def test_an_alert_without_values_or_series_labels_reads_cleanly(uid):
    """A rule that raises an alert of its own on no data or on a query error says what happened without values;
    the others raise none (no data OK or KeepLast, errors KeepLast), as tests/test_alert_rules.py checks."""
    rule = RULES[uid]
    raises = rule["noDataState"] in ("Alerting", "NoData") or rule["execErrState"] in ("Alerting", "Error")
    if not raises:
        assert rule["noDataState"] in ("OK", "KeepLast") and rule["execErrState"] == "KeepLast"
        return
    text = render(rule["annotations"]["summary"], no_data_labels(rule), {})
    assert text and "[no value]" not in text and "<nil>" not in text and "{{" not in text, text


@pytest.mark.parametrize("uid", sorted(uid for uid, r in RULES.items() if "rack_detail_url" in r["annotations"]))
def test_the_rack_detail_link_without_a_rack_is_the_wall(uid):
    link = RULES[uid]["annotations"]["rack_detail_url"]
    assert render(link, SENSOR | {"rack": "a#1 b&c+"}, {"B": 1.0, "C": 1.0}) == (
        "http://localhost:3000/d/racktwin-rack/rack-detail?var-rack=a%231+b%26c%2B")
    assert render(link, no_data_labels(RULES[uid]), {}) == "http://localhost:3000/d/racktwin-wall/data-hall-wall"
    # Grafana behind a path: its root_url with a sub-path, which Grafana ends with "/" like any other.
    assert render(link, SENSOR, {}, external_url="https://noc.example/grafana/") == (
        "https://noc.example/grafana/d/racktwin-rack/rack-detail?var-rack=hall1-a03")


def test_no_rule_annotation_relies_on_env_expansion():
    """Which file provisioning expands in rule annotations depends on the release (grafana/grafana
    pkg/services/provisioning/alerting/rules_types.go: ``rule.Annotations.Raw`` in one stored version,
    ``ValueWithBracedVars()`` in a later one): a ``${VAR}`` there might reach the notification as it stands."""
    for rule in RULES.values():
        for name, text in rule["annotations"].items():
            assert "${" not in text, (rule["uid"], name)


# ------------------------------------------------------------------------------------------- the renderer


def test_the_renderer_follows_go_and_grafana():
    assert render('{{ printf "%.1f" $values.B.Value }}', {}, {"B": 25.94}) == "25.9"
    assert render('{{ printf "%.0f" $values.B.Value }}', {}, {"B": float("nan")}) == "NaN"
    assert render("{{ $values.B.Value }}", {}, {"B": 1.0}) == "1"
    assert [go_float(v) for v in (0.5, 123456.0, 1e6, 1e-5, -3.25)] == ["0.5", "123456", "1e+06", "1e-05", "-3.25"]
    # a missing key (missingkey=invalid): printed "<no value>", which Grafana turns into "[no value]"; false in
    # an if; nil for urlquery
    assert render("{{ $labels.rack }}", {}, {}) == "[no value]"
    assert render("{{ if $labels.rack }}a{{ else }}b{{ end }}", {}, {}) == "b"
    assert render("{{ urlquery $labels.rack }}", {}, {}) == "%3Cnil%3E"
    # and stops at the first false argument: no values, no look at B
    assert render("{{ if and $values (ge $values.B.Value 0.0) }}a{{ else }}b{{ end }}", {}, {}) == "b"
    assert render("{{ if $values }}a{{ end }}", {}, {"B": 0.0}) == "a"
    assert render("{{ if gt $values.B.Value 1.0 }}a{{ else if lt $values.B.Value 0.5 }}b{{ else }}c{{ end }}",
                  {}, {"B": 0.7}) == "c"
    assert render("{{ if lt $values.B.Value 0.5 }}a{{ else }}b{{ end }}", {}, {"B": float("nan")}) == "b"


@pytest.mark.parametrize("template", [
    "{{ if eq $values.C.Value 1 }}a{{ end }}",  # Go: incompatible types for comparison (float64, int)
    "{{ $values.B.Value }}{{ $values.X.Value }}",  # field of a missing value
    "{{ lt $labels.nope 1.0 }}",  # a missing value compared
    "{{ range $values }}x{{ end }}",
    "{{ $values.B | printf \"%.1f\" }}",
    "{{- $labels.rack -}}",
    "{{ humanize $values.B.Value }}",
    '{{ printf "%d" $values.B.Value }}',
    "{{ $values.B }}",  # a Value's String(): not modelled
    "{{ if $values }}a",
    "a{{ end }}",
    "{{ .Labels.rack }}",
])
def test_the_renderer_refuses_what_it_does_not_model(template):
    with pytest.raises(TemplateError):
        render(template, {"rack": "r"}, {"B": 1.0, "C": 1.0})
