"""`racktwin thingsboard install` against the ThingsBoard REST double (tb-rest-client model shapes)."""

from __future__ import annotations

import copy
import json

import pytest

from bridge.config import Settings
from bridge.thingsboard import rulechain
from bridge.thingsboard.install import install
from bridge.thingsboard.rest import ThingsBoard
from tests.doubles.thingsboard import ThingsBoardDouble, check_keys, default_root_chain_metadata

BROKER = rulechain.BrokerTarget(host="mosquitto", port=1883, username="thingsboard", password="tb-secret")


def settings_for(double: ThingsBoardDouble, **extra) -> Settings:
    return Settings(tb_url=double.url, tb_username=double.username, tb_password=double.password,
                    tb_broker_host="mosquitto", tb_broker_username="thingsboard", tb_broker_password="tb-secret",
                    **extra)


# -- pure rule-chain functions -----------------------------------------------------------------------


def test_export_file_has_the_documented_import_format():
    exported = rulechain.export_file("RackTwin", BROKER)
    assert set(exported) == {"ruleChain", "metadata"}
    assert exported["ruleChain"]["type"] == "CORE" and exported["ruleChain"]["root"] is False
    meta = exported["metadata"]
    assert meta["firstNodeIndex"] == 0 and meta["connections"] == [{"fromIndex": 0, "toIndex": 1, "type": "Success"}]
    for node in meta["nodes"]:
        assert {"type", "name", "configurationVersion", "configuration", "additionalInfo"} <= set(node)
        assert {"layoutX", "layoutY"} <= set(node["additionalInfo"])
    script, mqtt = meta["nodes"]
    assert script["type"] == rulechain.SCRIPT_NODE and script["configuration"]["scriptLang"] == "TBEL"
    assert "parseLong(metadata.ts)" in script["configuration"]["tbelScript"]
    assert mqtt["type"] == rulechain.MQTT_NODE and mqtt["configurationVersion"] == 2
    cfg = mqtt["configuration"]
    assert cfg["protocolVersion"] == "MQTT_3_1_1" and cfg["topicPattern"] == "racktwin/telemetry/${deviceName}"
    assert cfg["credentials"] == {"type": "basic", "username": "thingsboard", "password": "tb-secret"}
    # The same metadata, as REST sends it, fits tb-rest-client's RuleChainMetaData exactly.
    check_keys(rulechain.forwarding_metadata("x", BROKER, 3), "RuleChainMetaData")


def test_script_sanitises_topic_characters_but_keeps_the_real_name():
    script = rulechain.TBEL_SCRIPT
    out_line, sanitise_line = script.splitlines()[0], script.splitlines()[1]
    assert "deviceName: metadata.deviceName" in out_line  # envelope built before sanitising
    for char in "/+#":
        assert f'.replace("{char}", "_")' in sanitise_line
    assert rulechain.sanitize_device_name("hall/1+a#01") == "hall_1_a_01"


def test_anonymous_broker_and_changed_password_are_detected():
    anon = rulechain.BrokerTarget(host="m")
    assert rulechain.mqtt_credentials(anon) == {"type": "anonymous"}
    current = rulechain.forwarding_metadata("id", BROKER)
    assert rulechain.forwarding_up_to_date(current, BROKER)
    masked = copy.deepcopy(current)
    masked["nodes"][1]["configuration"]["credentials"]["password"] = ""  # as if TB masked it
    assert rulechain.forwarding_up_to_date(masked, BROKER)
    other = rulechain.BrokerTarget(host="mosquitto", username="thingsboard", password="new")
    assert not rulechain.forwarding_up_to_date(current, other)
    moved = rulechain.BrokerTarget(host="broker2", username="thingsboard", password="tb-secret")
    assert not rulechain.forwarding_up_to_date(current, moved)
    assert any("host" in c for c in rulechain.changed_fields(current, moved))


def test_wiring_appends_after_save_timeseries_and_is_idempotent():
    root = default_root_chain_metadata()
    root["version"] = 7
    plan = rulechain.plan_wiring(root, "chain-1")
    meta = plan.metadata
    assert meta is not None and meta["version"] == 7
    assert meta["nodes"][:6] == root["nodes"] and meta["connections"][:5] == root["connections"]
    added = meta["nodes"][6]
    assert added["type"] == rulechain.INPUT_NODE and added["configurationVersion"] == 1
    assert added["configuration"] == {"ruleChainId": "chain-1", "forwardMsgToDefaultRuleChain": False}
    assert meta["connections"][5:] == [{"fromIndex": 0, "toIndex": 6, "type": "Success"}]
    assert rulechain.plan_wiring(meta, "chain-1").metadata is None
    # Chain re-created under a new id: the same node is re-pointed, nothing is added.
    again = rulechain.plan_wiring(meta, "chain-2").metadata
    assert len(again["nodes"]) == 7 and again["nodes"][6]["configuration"]["ruleChainId"] == "chain-2"


def test_wiring_refuses_a_chain_without_save_timeseries():
    with pytest.raises(rulechain.WiringError):
        rulechain.plan_wiring({"nodes": [{"type": "x", "name": "y"}], "connections": []}, "c")


# -- against the double ----------------------------------------------------------------------------------


def test_install_creates_everything_and_second_run_is_a_no_op(tb_double):
    settings = settings_for(tb_double)
    first = install(settings)
    assert first.changed
    chain = tb_double.chain_by_name(settings.tb_rule_chain_name)
    assert chain is not None and not chain.root
    meta = tb_double.metadata_json(chain.id.id)
    assert [n["type"] for n in meta["nodes"]] == [rulechain.SCRIPT_NODE, rulechain.MQTT_NODE]
    assert meta["nodes"][1]["configuration"]["host"] == "mosquitto"
    root = tb_double.metadata_json(tb_double.root_id)
    inputs = [i for i, n in enumerate(root["nodes"]) if n["type"] == rulechain.INPUT_NODE]
    assert len(inputs) == 1
    assert root["nodes"][inputs[0]]["configuration"]["ruleChainId"] == chain.id.id
    assert {"fromIndex": 0, "toIndex": inputs[0], "type": "Success"} in root["connections"]
    assert any(p.name == "rack-sensor" for p in tb_double.profiles.values())

    writes_before = list(tb_double.writes)
    second = install(settings)
    assert not second.changed, second.changes
    assert tb_double.writes == writes_before  # not a single POST


def test_dry_run_writes_nothing_and_lists_the_changes(tb_double):
    report = install(settings_for(tb_double), dry_run=True)
    assert tb_double.writes == []
    text = "\n".join(report.changes)
    assert "create rule chain" in text and "create device profile" in text and "add node" in text


def test_user_rules_in_root_chain_survive(tb_double):
    user = default_root_chain_metadata()
    user["nodes"].append({"type": "org.thingsboard.rule.engine.rest.TbRestApiCallNode", "name": "User webhook",
                          "configurationVersion": 3, "configuration": {"restEndpointUrlPattern": "http://x/hook",
                                                                       "requestMethod": "POST"},
                          "additionalInfo": {"layoutX": 1100, "layoutY": 150}})
    user["connections"].append({"fromIndex": 0, "toIndex": 6, "type": "Success"})
    tb_double.replace_root_metadata(user)
    before = tb_double.metadata_json(tb_double.root_id)

    install(settings_for(tb_double))
    after = tb_double.metadata_json(tb_double.root_id)
    assert after["nodes"][: len(before["nodes"])] == before["nodes"]  # same ids, order, configs
    assert after["connections"][: len(before["connections"])] == before["connections"]
    assert after["version"] == before["version"] + 1
    assert len(after["nodes"]) == len(before["nodes"]) + 1


def test_broker_change_updates_our_chain_only(tb_double):
    install(settings_for(tb_double))
    root_version = tb_double.metadata_json(tb_double.root_id)["version"]
    report = install(settings_for(tb_double, tb_broker_port=1884))
    assert report.changed and all("Root" not in c for c in report.changes)
    chain = tb_double.chain_by_name(Settings().tb_rule_chain_name)
    assert tb_double.metadata_json(chain.id.id)["nodes"][1]["configuration"]["port"] == 1884
    assert tb_double.metadata_json(tb_double.root_id)["version"] == root_version


def _profile(double: ThingsBoardDouble, name: str = "rack-sensor"):
    return next(p for p in double.profiles.values() if p.name == name)


def test_a_profile_racktwin_created_is_brought_up_to_date_keeping_what_the_user_added(tb_double):
    settings = settings_for(tb_double)
    install(settings)
    profile = _profile(tb_double)
    assert profile.description.startswith("RackTwin") and profile.version == 1
    # Someone changed a field RackTwin sets, and gave the profile a queue and an image of their own.
    profile.transport_type = "MQTT"
    profile.default_queue_name = "HighPriority"
    profile.image = "data:image/png;base64,iVBORw0KGgo="

    dry = install(settings, dry_run=True)
    assert any("update device profile 'rack-sensor': transportType" in c for c in dry.changes), dry.changes
    assert _profile(tb_double).transport_type == "MQTT"

    report = install(settings)
    assert report.changes == ["update device profile 'rack-sensor': transportType"]
    profile = _profile(tb_double)
    assert profile.transport_type == "DEFAULT" and profile.version == 2
    assert profile.default_queue_name == "HighPriority" and profile.image == "data:image/png;base64,iVBORw0KGgo="
    assert not install(settings).changed


def test_a_profile_the_user_made_is_left_exactly_as_it_is(tb_double):
    pid = tb_double._add_profile("rack-sensor")
    tb_double.profiles[pid].description = "Our racks, set up by facilities"
    tb_double.profiles[pid].transport_type = "MQTT"
    before = copy.deepcopy(tb_double.profiles[pid])
    report = install(settings_for(tb_double))
    assert not any("device profile" in c for c in report.changes), report.changes
    assert ("POST", "/api/deviceProfile") not in tb_double.writes
    assert tb_double.profiles[pid] == before


def test_a_stale_profile_version_is_refused_like_thingsboard_does(tb_double):
    tb = ThingsBoard(tb_double.url, tb_double.username, tb_double.password)
    tb_double._add_profile("rack-sensor")
    stale = tb.device_profile("rack-sensor")
    tb.save_device_profile(copy.deepcopy(stale))
    with pytest.raises(Exception, match="409"):
        tb.save_device_profile(stale)


def test_profile_with_its_own_rule_chain_is_wired_there(tb_double):
    own = tb_double._add_chain("Racks chain")
    tb_double._set_metadata(own, default_root_chain_metadata())
    pid = tb_double._add_profile("rack-sensor")
    tb_double.profiles[pid].default_rule_chain_id = tb_double.chains[own].id
    report = install(settings_for(tb_double))
    assert report.wired_into == "Racks chain"
    assert any(n["type"] == rulechain.INPUT_NODE for n in tb_double.metadata_json(own)["nodes"])
    assert not any(n["type"] == rulechain.INPUT_NODE for n in tb_double.metadata_json(tb_double.root_id)["nodes"])


def test_rest_adapter_logs_in_again_after_token_expiry_and_the_double_rejects_unknown_fields(tb_double):
    tb = ThingsBoard(tb_double.url, tb_double.username, tb_double.password)
    assert tb.root_rule_chain()["root"] is True
    tb_double.expire_tokens()
    assert tb.root_rule_chain()["name"] == "Root Rule Chain"
    meta = tb.rule_chain_metadata(tb_double.root_id)
    meta["nodes"][0]["colour"] = "red"
    with pytest.raises(Exception, match="unknown field"):
        tb.save_rule_chain_metadata(meta)
    assert tb_double.violations
    tb_double.violations.clear()
    stale = tb.rule_chain_metadata(tb_double.root_id)
    tb.save_rule_chain_metadata(copy.deepcopy(stale))
    with pytest.raises(Exception, match="409"):
        tb.save_rule_chain_metadata(stale)  # optimistic locking on version
    json.dumps(stale)
