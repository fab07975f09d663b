"""What the paged engineer reads in the email and the webhook: the committed notification templates
(provisioning/grafana/alerting/templates.yaml) rendered by tests/gotemplate.py on the data grafana/alerting builds
(templates/template_data.go), from alerts whose annotations are the committed rules' as Grafana renders them.

An alert resolved without an evaluation of its own keeps the annotations it was last rendered with: Grafana's state
manager resolves a series missing from the result as stale (pkg/services/ngalert/state/manager.go,
processMissingSeriesStates: ``s.StateReason = ngModels.StateReasonMissingSeries``, "MissingSeries", annotations left
as they were) and StateToPostableAlert (state/compat.go) sends the reason as the annotation grafana_state_reason."""

from __future__ import annotations

import re

import pytest
import yaml

from dashboards import alerts
from tests.dashboard_data import PROVISIONING, RULE_GROUPS
from tests.gotemplate import TemplateError, define_names, extended_alert, extended_data, render, render_notification

RULES = {r["uid"]: r for g in RULE_GROUPS for r in g["rules"]}
TEMPLATES = yaml.safe_load((PROVISIONING / "alerting/templates.yaml").read_text())
CONTACT_POINTS = yaml.safe_load((PROVISIONING / "alerting/contact-points.yaml").read_text())
(GROUP,) = [t["template"] for t in TEMPLATES["templates"]]
NOC = next(cp for cp in CONTACT_POINTS["contactPoints"] if cp["name"] == alerts.RECEIVER)
# What each receiver makes of a notification: (title setting, message setting).
SETTINGS = {r["type"]: ((r["settings"]["title"] if r["type"] == "webhook" else r["settings"]["subject"]),
                        r["settings"]["message"]) for r in NOC["receivers"]}
SENSOR = {"site": "site1", "room": "hall1", "row": "A", "rack": "hall1-a03", "position": "top"}
GROUP_LABELS = {"site": "site1", "room": "hall1"}
INLET = "racktwin-inlet-recommended"
FIRING_TEXT = "hall1-a03 top inlet 28.4 °C outside recommended 18–27 °C"
RACK_URL = "http://localhost:3000/d/racktwin-rack/rack-detail?var-rack=hall1-a03"
WALL_URL = "http://localhost:3000/d/racktwin-wall/data-hall-wall"
DEAD_TEXT = ("<no value>", "<nil>", "[no value]", "{{", "%!")


def alert(uid: str, status: str, series: dict, values: dict, reason: str = "", no_data: str = "") -> dict:
    """An alert as Grafana sends it to its Alertmanager: the rule's labels (alertname its title, for a "no data" or
    "error" alert DatasourceNoData/DatasourceError with the title in rulename), the series', and the annotations
    rendered from ``values`` (for a resolved stale alert: those of its last evaluation)."""
    rule = RULES[uid]
    labels = {**rule["labels"], **series, "alertname": rule["title"], "grafana_folder": "RackTwin",
              "__alert_rule_uid__": uid}
    if no_data:
        labels.update(alertname=no_data, rulename=rule["title"])
    annotations = {name: render(text, labels, values) for name, text in rule["annotations"].items()}
    annotations.update({"__dashboardUid__": rule["dashboardUid"], "__orgId__": "1"})
    if reason:
        annotations["grafana_state_reason"] = reason
    dashboard = f"http://localhost:3000/d/{rule['dashboardUid']}"
    return extended_alert(status, labels, annotations, dashboard_url=dashboard)


def notify(*alerts_: dict, group_labels: dict = GROUP_LABELS) -> dict[str, tuple[str, str]]:
    """receiver type -> (title, message) of one notification of a group."""
    data = extended_data(list(alerts_), group_labels, receiver=alerts.RECEIVER)
    out = {kind: tuple(render_notification(GROUP, text, data) for text in pair) for kind, pair in SETTINGS.items()}
    assert len(set(out.values())) == 1, "the webhook and the email say the same"
    return out


def text_of(*alerts_: dict, **kwargs) -> tuple[str, str]:
    return notify(*alerts_, **kwargs)["email"]


def firing() -> dict:
    return alert(INLET, "firing", SENSOR, {"B": 28.4, "C": 1.0})


def stale(uid: str = INLET, series: dict = SENSOR, values: dict | None = None) -> dict:
    """Resolved as stale: its series went missing; annotations from the last (firing) evaluation."""
    return alert(uid, "resolved", series, values or {"B": 28.4, "C": 1.0}, reason="MissingSeries")


def assert_tells_missing_series(title: str, message: str, last_text: str, alone: bool = True) -> None:
    """A rack whose readings stopped is not reported fixed: its entry does not say RESOLVED (nor, where it is the
    notification's only alert, the title), says it is no longer reported, and gives its firing text only as the
    last thing known."""
    assert "NO LONGER REPORTED" in title, title
    if alone:
        assert "RESOLVED" not in title.replace("NO LONGER REPORTED", ""), title
    (line,) = [line for line in message.splitlines() if last_text in line] or [""]
    assert line.startswith("NO LONGER REPORTED: ") and "no longer reported" in line, message
    assert line.count(last_text) == line.count(f"(last: {last_text})") == 1, message


# ------------------------------------------------------------------------------------------- the cases

def test_a_firing_alert():
    title, message = text_of(firing())
    assert title == "[FIRING:1] Inlet temperature outside recommended envelope | hall1 (site1)"
    assert message == (f"FIRING: {FIRING_TEXT}\n"
                       "  Inlet temperature outside recommended envelope | warning | room hall1 | rack hall1-a03 top\n"
                       f"  {RACK_URL}\n")


def test_an_alert_resolved_by_an_evaluation_says_back_inside():
    title, message = text_of(alert(INLET, "resolved", SENSOR, {"B": 25.9, "C": 0.0}))
    assert title == "[RESOLVED] Inlet temperature outside recommended envelope | hall1 (site1)"
    assert message.splitlines()[0] == "RESOLVED: hall1-a03 top inlet 25.9 °C, back inside recommended 18–27 °C"
    assert RACK_URL in message


def test_an_alert_resolved_because_its_series_went_missing_says_it_is_no_longer_reported():
    title, message = text_of(stale())
    assert_tells_missing_series(title, message, FIRING_TEXT)
    assert title == "[NO LONGER REPORTED] Inlet temperature outside recommended envelope | hall1 (site1)"
    assert message.splitlines()[0] == (
        f"NO LONGER REPORTED: hall1-a03 top: no longer reported, so this alert can no longer be judged (last: "
        f'{FIRING_TEXT}); see "{alerts.SILENT_TITLE}"')
    assert f"  {RACK_URL}" in message.splitlines()


def test_the_missing_series_check_fails_what_grafana_s_default_said():
    """The check above can fail: Grafana's default subject is "[RESOLVED] ..." and its message lists a resolved
    alert's annotations as they are (templates/default_template.go: ``**Resolved**`` then `` - summary = ...``)."""
    a = stale()
    data = extended_data([a], GROUP_LABELS)
    default_like = ('{{ define "t" }}[RESOLVED] {{ .CommonLabels.alertname }}{{ end }}'
                    '{{ define "m" }}**Resolved**\n{{ range .Alerts.Resolved }}Annotations:\n - summary = '
                    "{{ .Annotations.summary }}\n{{ end }}{{ end }}")
    title = render_notification(default_like, '{{ template "t" . }}', data)
    message = render_notification(default_like, '{{ template "m" . }}', data)
    assert FIRING_TEXT in message
    with pytest.raises(AssertionError):
        assert_tells_missing_series(title, message, FIRING_TEXT)
    # Nor would our template pass if it printed the summary of every resolved alert.
    plain = GROUP.replace(f"{{{{ else if {alerts.JUDGED} }}}}", "{{ else if true }}")
    assert plain != GROUP
    with pytest.raises(AssertionError):
        assert_tells_missing_series(render_notification(plain, SETTINGS["email"][0], data),
                                    render_notification(plain, SETTINGS["email"][1], data), FIRING_TEXT)


def test_a_group_of_several_alerts():
    """Firing first, then the resolved, each with its own state; the title names every state present."""
    other = {**SENSOR, "rack": "hall1-a05", "position": "bottom"}
    critical = alert("racktwin-inlet-allowable", "firing", other, {"B": 33.0, "C": 1.0})
    back = alert(INLET, "resolved", {**SENSOR, "rack": "hall1-a04"}, {"B": 25.9, "C": 0.0})
    gone = stale()
    title, message = text_of(back, gone, critical)
    assert title == "[FIRING:1, RESOLVED, NO LONGER REPORTED] 3 alerts | hall1 (site1)"
    firsts = [line.split(":", 1)[0] for line in message.splitlines() if not line.startswith(" ")]
    assert firsts == ["FIRING", "RESOLVED", "NO LONGER REPORTED"]
    assert "FIRING: hall1-a05 bottom inlet 33.0 °C outside A1 allowable 15–32 °C" in message
    assert "  Inlet temperature outside A1 allowable | critical | room hall1 | rack hall1-a05 bottom" in message
    assert "RESOLVED: hall1-a04 top inlet 25.9 °C, back inside" in message
    assert_tells_missing_series(title, message, FIRING_TEXT, alone=False)
    assert len(message.splitlines()) == 9  # three lines an alert
    # Several firing: counted.
    assert text_of(critical, firing())[0].startswith("[FIRING:2] 2 alerts")


@pytest.mark.parametrize("uid, kind", [("racktwin-sensor-silent", "DatasourceNoData"),
                                       ("racktwin-bridge-down", "DatasourceError")])
def test_alerts_without_a_rack_read_cleanly(uid, kind):
    """A "no data" or "error" alert carries the rule's labels only (no rack, room, position): no hole in the text,
    the wall or the rule's dashboard as the link. Once its rule answers with series again, Grafana resolves it as
    a missing series: that one did end, and says so."""
    rule = RULES[uid]
    raised = alert(uid, "firing", {}, {}, no_data=kind)
    title, message = text_of(raised, group_labels={})
    ended_title, ended = text_of(alert(uid, "resolved", {}, {}, reason="MissingSeries", no_data=kind),
                                 group_labels={})
    for text in (title, message, ended_title, ended):
        assert not any(dead in text for dead in DEAD_TEXT), text
        assert " | |" not in text and ":  " not in text and "()" not in text, text
    assert title == f"[FIRING:1] {rule['title']} ({kind})"
    assert message.splitlines()[1] == f"  {rule['title']} ({kind}) | {rule['labels']['severity']}"
    link = WALL_URL if "rack_detail_url" in rule["annotations"] else f"http://localhost:3000/d/{rule['dashboardUid']}"
    assert message.splitlines()[2] == f"  {link}"
    assert ended_title == f"[RESOLVED] {rule['title']} ({kind})"
    again = "its query works again" if kind == "DatasourceError" else "its query finds series again"
    summary = render(rule["annotations"]["summary"], raised["Labels"], {})
    assert ended.splitlines()[0] == f"RESOLVED: {rule['title']}: {again} (was: {summary})"


def test_a_bridge_alert_links_its_dashboard():
    lagging = alert("racktwin-bridge-lagging", "firing", {"instance": "bridge-1"}, {"B": 45.0, "C": 1.0})
    title, message = text_of(lagging, group_labels={})
    assert title == "[FIRING:1] Bridge lagging"
    assert message.splitlines()[1:] == ["  Bridge lagging | warning | instance bridge-1",
                                        "  http://localhost:3000/d/racktwin-bridge"]
    # A replica gone: its lag series missing, nothing to point at (bridge-down names it as silent).
    _, message = text_of(stale("racktwin-bridge-lagging", {"instance": "bridge-1"}, {"B": 45.0, "C": 1.0}),
                         group_labels={})
    assert message.splitlines()[0].startswith("NO LONGER REPORTED: Bridge bridge-1: no longer reported")
    assert "see" not in message.splitlines()[0]


def test_the_silent_sensor_alert_that_outlives_its_look_back():
    """A sensor silent for more than the rule's 24 h drops out of its result: that alert, too, resolves as a missing
    series, and must not read "reporting again" nor point at itself."""
    silent = stale("racktwin-sensor-silent", SENSOR, {"B": 0.0, "C": 1.0})
    title, message = text_of(silent)
    last = render(RULES["racktwin-sensor-silent"]["annotations"]["summary"], silent["Labels"], {"B": 0.0, "C": 1.0})
    assert title.startswith("[NO LONGER REPORTED] Sensor stopped reporting")
    assert message.splitlines()[0] == (
        "NO LONGER REPORTED: hall1-a03 top: silent for more than 24 h, or removed: past this rule's 24 h look-back, "
        f"it ends without a reading (last: {last})")
    assert "reporting again" not in message


def test_an_alert_ended_by_no_data_at_all_is_not_called_resolved():
    """No data = OK (the rate, stuck and forecast rules): Grafana resolves every alert of the rule from a copy, reason
    NoData, with the text it fired with."""
    uid = "racktwin-rate-of-change"
    assert RULES[uid]["noDataState"] == "OK"
    values = {"B": 6.2, "C": 1.0}
    a = alert(uid, "resolved", SENSOR, values, reason="NoData")
    last = a["Annotations"]["summary"]
    title, message = text_of(a)
    assert title.startswith("[ENDED UNJUDGED] Inlet temperature changing too fast")
    assert message.splitlines()[0] == (
        f"ENDED UNJUDGED: hall1-a03 top: ended without a new judgement (its query found no data at all; last: {last})")
    # Any other reason (a rule changed, paused or deleted) is named as Grafana gives it.
    _, message = text_of(alert(uid, "resolved", SENSOR, values, reason="Updated"))
    assert "(Grafana's reason: Updated; last: " in message


# ------------------------------------------------------------------------------------------- structure

def test_every_noc_receiver_uses_the_templates_by_their_defined_names():
    defined = define_names(GROUP)
    assert {alerts.TITLE_TEMPLATE, alerts.MESSAGE_TEMPLATE} <= defined
    assert set(SETTINGS) == {"webhook", "email"}
    for title, message in SETTINGS.values():
        assert re.fullmatch(r'\{\{ template "([^"]+)" \. \}\}', title).group(1) == alerts.TITLE_TEMPLATE
        assert re.fullmatch(r'\{\{ template "([^"]+)" \. \}\}', message).group(1) == alerts.MESSAGE_TEMPLATE
    # Contact point settings are env-expanded (os.ExpandEnv on $VAR and ${VAR}): no $ there but the receivers' own.
    for receiver in NOC["receivers"]:
        for key, value in receiver["settings"].items():
            if isinstance(value, str):
                assert re.sub(r"\$\{[A-Z_][A-Z0-9_]*\}", "", value).count("$") == 0, (receiver["uid"], key)


def test_the_template_file_has_what_grafana_s_file_loader_reads():
    """pkg/services/provisioning/alerting/text_templates_types.go: orgId, and MessageTemplate inline (name,
    template); the rest of the file's shape as the other alerting files."""
    assert TEMPLATES["apiVersion"] == 1 and set(TEMPLATES) == {"apiVersion", "templates"}
    (entry,) = TEMPLATES["templates"]
    assert set(entry) == {"orgId", "name", "template"}
    assert entry["orgId"] == 1 and entry["name"] == alerts.TEMPLATE_GROUP and entry["template"].strip()
    assert entry["template"] == alerts.notification_templates()
    # Not env-expanded by provisioning (its docs list templates[].template among the exceptions): nothing to expand.
    assert "${" not in entry["template"]
    # Every template it calls is one it defines.
    called = set(re.findall(r'\{\{ template "([^"]+)"', entry["template"]))
    assert called and called <= define_names(GROUP)
    # The rule titles it names are the rules'.
    assert alerts.SILENT_TITLE in {r["title"] for r in RULES.values()}


def test_the_renderer_models_notification_templates_as_go_does():
    data = extended_data([extended_alert("firing", {"a": "1"}, {"__values__": "{}", "s": "x"})], {})
    run = lambda text: render_notification('{{ define "n" }}{{ . }}{{ end }}', text, data)  # noqa: E731
    assert run("{{ len .Alerts.Firing }}{{ len .Alerts.Resolved }}{{ if .Alerts.Resolved }}x{{ end }}") == "10"
    assert run("{{ range .Alerts }}{{ .Annotations.nope }}|{{ .Annotations.s }}{{ end }}") == "|x"  # missingkey=zero
    assert run("{{ range .Alerts }}{{ .Annotations.__values__ }}{{ end }}") == ""  # private annotations removed
    assert run("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ end }}{{ $x }}") == "2"
    assert run('{{ if match "Missing" "MissingSeries" }}a{{ end }}{{ if or "" "b" }}b{{ end }}') == "ab"
    assert run('{{ template "n" "v" }}') == "v"
    for bad in ("{{ $y }}", "{{ if true }}{{ $y := 3 }}{{ end }}{{ $y }}", '{{ template "nope" . }}',
                "{{ range .Alerts }}{{ .StartsAt }}{{ end }}", "{{ externalURL }}", "{{ with . }}x{{ end }}",
                "{{ .Alerts | len }}"):
        with pytest.raises(TemplateError):
            run(bad)


@pytest.mark.parametrize("reason, why", [("NoData, KeepLast", "finds no data"), ("Error, KeepLast", "fails")])
def test_a_firing_alert_held_by_keep_last_says_its_text_is_its_last_judgement(reason, why):
    """When a limit rule's query finds nothing (all telemetry stopped) or fails, KeepLast keeps its alerts firing
    (state manager, resultKeepLast: reason "<result>, KeepLast") with the text of their last evaluation: each
    repeat of the notification must not read as a fresh measurement."""
    held = alert(INLET, "firing", SENSOR, {"B": 28.4, "C": 1.0}, reason=reason)
    title, message = text_of(held)
    assert title == "[FIRING:1] Inlet temperature outside recommended envelope | hall1 (site1)"
    assert message.splitlines()[0] == f"FIRING: {FIRING_TEXT} (held as last judged: its query {why})"
    assert "held" not in text_of(firing())[1]


def test_the_bridge_down_alert_raised_by_no_data_ends_as_stats_returning():
    """Bridge-down's no-data state is Alerting: with no bridge stats at all (a fresh stack whose bridge has not
    written yet, every bridge gone for a day) it fires as an alert of the rule's labels alone, alertname its title,
    no instance. Once stats arrive, that label set is missing from the result and Grafana resolves it as a missing
    series with its old text: it ended because the query finds series again, not because something went unjudged."""
    uid = "racktwin-bridge-down"
    rule = RULES[uid]
    assert rule["noDataState"] == "Alerting"
    raised = alert(uid, "firing", {}, {})
    summary = raised["Annotations"]["summary"]
    assert summary.startswith("No bridge stats in InfluxDB for 2 min")
    title, message = text_of(alert(uid, "resolved", {}, {}, reason="MissingSeries"), group_labels={})
    assert title == f"[RESOLVED] {rule['title']}"
    assert message.splitlines()[0] == f"RESOLVED: {rule['title']}: its query finds series again (was: {summary})"
    assert "NO LONGER REPORTED" not in title + message and "can no longer be judged" not in message
    # A bridge instance's own alert, gone from the result, is still one that can no longer be judged.
    _, message = text_of(stale(uid, {"instance": "bridge-1"}, {"B": 0.0, "C": 1.0}), group_labels={})
    assert message.splitlines()[0].startswith("NO LONGER REPORTED: Bridge bridge-1: no longer reported")
