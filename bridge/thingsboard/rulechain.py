"""The forwarding rule chain and the root-chain wiring, as pure functions over ThingsBoard's JSON.

Our chain (thingsboard.md §4): a TBEL script node that wraps the telemetry in the rule-engine envelope
``{deviceName, deviceType, ts, values}`` and makes the device name safe for a topic, then a TbMqttNode
publishing to ``<prefix>/${deviceName}`` on the bridge's broker.

Wiring: a TbRuleChainInputNode pointing at our chain is appended to the target chain (the root chain,
or the device profile's own chain) and connected from Save Timeseries with ``Success``, so only
telemetry ThingsBoard has stored is forwarded. Existing nodes, their indexes, ids and the metadata
``version`` stay as they are; a second install finds everything in place and changes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

SCRIPT_NODE = "org.thingsboard.rule.engine.transform.TbTransformMsgNode"
MQTT_NODE = "org.thingsboard.rule.engine.mqtt.TbMqttNode"
INPUT_NODE = "org.thingsboard.rule.engine.flow.TbRuleChainInputNode"
SAVE_TIMESERIES_NODE = "org.thingsboard.rule.engine.telemetry.TbMsgTimeseriesNode"

SCRIPT_NODE_NAME = "RackTwin envelope"
MQTT_NODE_NAME = "RackTwin publish to bridge broker"
INPUT_NODE_NAME = "RackTwin bridge"
CREDENTIALS_HASH_KEY = "racktwinCredentialsSha256"

# The envelope keeps the real device name; only the copy in metadata, used by the topic pattern, is made
# safe: '/', '+' and '#' would change the topic's levels or be refused by the broker (thingsboard.md §4).
# Java's String.replace (CharSequence) replaces every occurrence and is available in TBEL.
TBEL_SCRIPT = """\
var out = {deviceName: metadata.deviceName, deviceType: metadata.deviceType, ts: parseLong(metadata.ts), values: msg};
metadata.deviceName = metadata.deviceName.replace("/", "_").replace("+", "_").replace("#", "_");
return {msg: out, metadata: metadata, msgType: msgType};"""

JS_SCRIPT = """\
var out = {deviceName: metadata.deviceName, deviceType: metadata.deviceType, ts: parseInt(metadata.ts, 10), values: msg};
metadata.deviceName = metadata.deviceName.replace(/[\\/+#]/g, "_");
return {msg: out, metadata: metadata, msgType: msgType};"""


@dataclass(frozen=True)
class BrokerTarget:
    """The bridge's broker as ThingsBoard reaches it."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    client_id: str = "thingsboard-racktwin"
    topic_prefix: str = "racktwin/telemetry"


def sanitize_device_name(name: str) -> str:
    """What the TBEL script does to a device name for the topic (used by tests and the simulator)."""
    return name.replace("/", "_").replace("+", "_").replace("#", "_")


def mqtt_credentials(broker: BrokerTarget) -> dict[str, Any]:
    if broker.username:
        return {"type": "basic", "username": broker.username, "password": broker.password or ""}
    return {"type": "anonymous"}


def _password_hash(broker: BrokerTarget) -> str:
    return hashlib.sha256((broker.password or "").encode()).hexdigest()


def forwarding_nodes(broker: BrokerTarget) -> list[dict[str, Any]]:
    """Nodes of our chain, in index order (script 0 -> mqtt 1)."""
    return [
        {
            "type": SCRIPT_NODE,
            "name": SCRIPT_NODE_NAME,
            "singletonMode": False,
            "configurationVersion": 0,
            "configuration": {"scriptLang": "TBEL", "tbelScript": TBEL_SCRIPT, "jsScript": JS_SCRIPT},
            "additionalInfo": {"description": "Wraps telemetry in the RackTwin envelope", "layoutX": 320, "layoutY": 150},
        },
        {
            "type": MQTT_NODE,
            "name": MQTT_NODE_NAME,
            "singletonMode": False,
            # Version 2 with an explicit protocolVersion: older versions get MQTT_3_1 added by the upgrader.
            "configurationVersion": 2,
            "configuration": {
                "topicPattern": broker.topic_prefix.rstrip("/") + "/${deviceName}",
                "host": broker.host,
                "port": broker.port,
                "connectTimeoutSec": 10,
                "clientId": broker.client_id,
                "appendClientIdSuffix": True,  # several TB nodes must not share one client id
                "retainedMessage": False,
                "cleanSession": True,
                "ssl": False,
                "parseToPlainText": False,
                "protocolVersion": "MQTT_3_1_1",
                "credentials": mqtt_credentials(broker),
            },
            # The password may come back masked or re-encoded; its hash tells us whether it changed.
            "additionalInfo": {
                "description": "Publishes to the RackTwin bridge's broker",
                "layoutX": 620,
                "layoutY": 150,
                CREDENTIALS_HASH_KEY: _password_hash(broker),
            },
        },
    ]


FORWARDING_CONNECTIONS = [{"fromIndex": 0, "toIndex": 1, "type": "Success"}]


def forwarding_chain(name: str) -> dict[str, Any]:
    """The RuleChain header (POST /api/ruleChain)."""
    return {
        "name": name,
        "type": "CORE",
        "root": False,
        "debugMode": False,
        "configuration": None,
        "additionalInfo": {"description": "RackTwin: forwards stored telemetry to the bridge's MQTT broker"},
    }


def forwarding_metadata(chain_id: str, broker: BrokerTarget, version: int | None = None) -> dict[str, Any]:
    """RuleChainMetaData of our chain (POST /api/ruleChain/metadata)."""
    meta: dict[str, Any] = {
        "ruleChainId": {"entityType": "RULE_CHAIN", "id": chain_id},
        "firstNodeIndex": 0,
        "nodes": forwarding_nodes(broker),
        "connections": copy.deepcopy(FORWARDING_CONNECTIONS),
        "ruleChainConnections": None,
    }
    if version is not None:
        meta["version"] = version
    return meta


def export_file(name: str, broker: BrokerTarget) -> dict[str, Any]:
    """The UI import/export file format (thingsboard.md §4), for users who import by hand."""
    chain = forwarding_chain(name)
    chain["firstRuleNodeId"] = None
    meta = forwarding_metadata("", broker)
    del meta["ruleChainId"]
    return {"ruleChain": chain, "metadata": meta}


def _comparable_node(node: dict[str, Any]) -> tuple[str, str, int, str]:
    config = copy.deepcopy(node.get("configuration") or {})
    creds = config.get("credentials")
    if isinstance(creds, dict):
        creds.pop("password", None)
    extra = (node.get("additionalInfo") or {}).get(CREDENTIALS_HASH_KEY, "") if node.get("type") == MQTT_NODE else ""
    return (
        node.get("type", ""),
        node.get("name", ""),
        int(node.get("configurationVersion") or 0),
        json.dumps(config, sort_keys=True) + extra,
    )


def forwarding_up_to_date(current: dict[str, Any] | None, broker: BrokerTarget) -> bool:
    """True if the chain's metadata already holds our nodes and connection (ids and layout ignored)."""
    if not current:
        return False
    want = [_comparable_node(n) for n in forwarding_nodes(broker)]
    have = [_comparable_node(n) for n in current.get("nodes") or []]
    conns = sorted((c.get("fromIndex"), c.get("toIndex"), c.get("type")) for c in current.get("connections") or [])
    want_conns = sorted((c["fromIndex"], c["toIndex"], c["type"]) for c in FORWARDING_CONNECTIONS)
    return have == want and conns == want_conns and current.get("firstNodeIndex") == 0


def changed_fields(current: dict[str, Any] | None, broker: BrokerTarget) -> list[str]:
    """Human-readable list of what differs in our chain, for --dry-run."""
    have = (current or {}).get("nodes") or []
    if not have:
        return ["add nodes and connection"]
    out = []
    for i, node in enumerate(forwarding_nodes(broker)):
        if i >= len(have):
            out.append(f"add node {node['name']!r}")
        elif _comparable_node(have[i]) != _comparable_node(node):
            old, new = have[i].get("configuration") or {}, node["configuration"]
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            out.append(f"update node {node['name']!r} ({', '.join(keys) or 'type/name/version/credentials'})")
    if len(have) > 2:
        out.append(f"remove {len(have) - 2} extra node(s)")
    return out or ["reset connections"]


# -- wiring into the target chain (root, or the device profile's chain) ---------------------------------


class WiringError(Exception):
    """The target chain cannot be wired automatically; the message says what to do by hand."""


def save_timeseries_indexes(meta: dict[str, Any]) -> list[int]:
    """Save Timeseries nodes fed by 'Post telemetry' (the default root chain); else all of them."""
    nodes = meta.get("nodes") or []
    ts_nodes = [i for i, n in enumerate(nodes) if n.get("type") == SAVE_TIMESERIES_NODE]
    fed = sorted({
        c["toIndex"]
        for c in meta.get("connections") or []
        if c.get("type") == "Post telemetry" and c.get("toIndex") in ts_nodes
    })
    return fed or ts_nodes


def _our_input_node(meta: dict[str, Any], chain_id: str) -> int | None:
    nodes = meta.get("nodes") or []
    for i, n in enumerate(nodes):
        if n.get("type") == INPUT_NODE and (n.get("configuration") or {}).get("ruleChainId") == chain_id:
            return i
    # A node we added earlier for a chain that was since deleted and re-created: reuse it.
    for i, n in enumerate(nodes):
        if n.get("type") == INPUT_NODE and n.get("name") == INPUT_NODE_NAME:
            return i
    return None


def input_node(chain_id: str, layout_x: int, layout_y: int) -> dict[str, Any]:
    return {
        "type": INPUT_NODE,
        "name": INPUT_NODE_NAME,
        "singletonMode": False,
        "configurationVersion": 1,
        "configuration": {"ruleChainId": chain_id, "forwardMsgToDefaultRuleChain": False},
        "additionalInfo": {"description": "Forwards stored telemetry to RackTwin", "layoutX": layout_x,
                           "layoutY": layout_y},
    }


@dataclass(frozen=True)
class WiringPlan:
    metadata: dict[str, Any] | None  # the body to POST, None if nothing changes
    changes: list[str]


def plan_wiring(target: dict[str, Any], chain_id: str) -> WiringPlan:
    """Metadata of the target chain with our input node connected after Save Timeseries, or no change.

    Only appends: existing nodes keep their list index (connections refer to indexes), their ids and the
    metadata version (optimistic locking), so the user's rules are untouched.
    """
    sources = save_timeseries_indexes(target)
    if not sources:
        raise WiringError(
            "the target rule chain has no Save Timeseries node: add a 'rule chain' node pointing at the "
            "RackTwin chain after the node that saves telemetry"
        )
    meta = copy.deepcopy(target)
    nodes = meta.setdefault("nodes", [])
    connections = meta.setdefault("connections", [])
    changes: list[str] = []
    index = _our_input_node(meta, chain_id)
    if index is None:
        first = nodes[sources[0]].get("additionalInfo") or {}
        nodes.append(input_node(chain_id, int(first.get("layoutX", 800)) + 300, int(first.get("layoutY", 150))))
        index = len(nodes) - 1
        changes.append(f"add node {INPUT_NODE_NAME!r} -> rule chain {chain_id}")
    else:
        node = nodes[index]
        config = node.get("configuration") or {}
        want = {"ruleChainId": chain_id, "forwardMsgToDefaultRuleChain": False}
        if {k: config.get(k) for k in want} != want or node.get("configurationVersion") != 1:
            node["configuration"] = {**config, **want}
            node["configurationVersion"] = 1
            changes.append(f"point node {node.get('name')!r} at rule chain {chain_id}")
    for src in sources:
        if not any(c.get("fromIndex") == src and c.get("toIndex") == index and c.get("type") == "Success"
                   for c in connections):
            connections.append({"fromIndex": src, "toIndex": index, "type": "Success"})
            changes.append(f"connect {nodes[src].get('name')!r} --Success--> {INPUT_NODE_NAME!r}")
    return WiringPlan(meta if changes else None, changes)
