"""A ThingsBoard CE REST double whose wire format comes from tb-rest-client's generated models.

Every response is a tb-rest-client model (Device, PageDataDevice, RuleChain, RuleChainMetaData,
DeviceProfile, AttributeData, TsData, JwtPair, DeviceCredentials ...) serialised by the client's own
``ApiClient.sanitize_for_serialization``, so field names and nesting match what the real API documents.
Request bodies (devices, profiles, rule chains, rule-chain metadata) are deserialised into the same
models; a body with a key the model does not know, or missing a required field, is answered 400 and
recorded in ``violations`` (the test fixture fails on any).

Behaviour modelled (thingsboard.md §3-4): JWT login and ``X-Authorization: Bearer``; PageData paging
(``pageSize``, ``page``, ``type``, ``textSearch``); ``GET /api/tenant/devices?deviceName=`` (404 if
missing); server attributes; latest and ranged timeseries (strings unless ``useStrictDataTypes``);
rule chains with one root, metadata with optimistic locking on ``version`` (409), node ids kept for
nodes that carry them, TbMqttNode requiring configurationVersion 2 and protocolVersion.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from tb_rest_client import models as M
from tb_rest_client.api_client import ApiClient

_API = ApiClient()


class _Body:
    def __init__(self, data: Any):
        self.data = json.dumps(data)


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def wire(obj: Any) -> Any:
    """JSON shape of a tb-rest-client model (or list/dict of them), exactly as the client would send it."""
    return _API.sanitize_for_serialization(obj)


def check_keys(data: Any, klass: str, path: str = "$") -> None:
    """Reject keys the model does not define (the generated deserializer silently drops them)."""
    if data is None:
        return
    if klass.startswith("list["):
        if not isinstance(data, list):
            raise BadRequest(400, f"{path}: expected a list")
        for i, item in enumerate(data):
            check_keys(item, klass[5:-1], f"{path}[{i}]")
        return
    if klass.startswith("dict(") or klass in _API.NATIVE_TYPES_MAPPING:
        return
    model = getattr(M, klass, None)
    if model is None or not model.swagger_types or "get_real_child_model" in model.__dict__:
        return  # free-form JSON (JsonNode) or polymorphic: the deserializer decides
    if not isinstance(data, dict):
        raise BadRequest(400, f"{path}: expected an object for {klass}")
    known = {json_key: model.swagger_types[attr] for attr, json_key in model.attribute_map.items()}
    for key, value in data.items():
        if key not in known:
            raise BadRequest(400, f"{path}.{key}: unknown field of {klass}")
        check_keys(value, known[key], f"{path}.{key}")


def parse_model(data: Any, klass: str) -> Any:
    check_keys(data, klass)
    try:
        return _API.deserialize(_Body(data), klass)
    except (ValueError, TypeError, AttributeError) as exc:
        raise BadRequest(400, f"invalid {klass}: {exc}") from None


def _id(entity_type: str, value: str | None = None) -> dict[str, str]:
    return {"entityType": entity_type, "id": value or str(uuid.uuid4())}


def _jwt(sub: str, exp: int) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{b64({'alg': 'HS512'})}.{b64({'sub': sub, 'scopes': ['TENANT_ADMIN'], 'exp': exp})}.c2ln"


def default_root_chain_metadata() -> dict[str, Any]:
    """The tenant's default root chain (TB root_rule_chain.json): Save Timeseries is node 0."""
    def node(kind: str, name: str, version: int, config: dict, x: int, y: int) -> dict:
        return {"id": _id("RULE_NODE"), "type": f"org.thingsboard.rule.engine.{kind}", "name": name,
                "singletonMode": False, "queueName": None, "configurationVersion": version,
                "configuration": config, "additionalInfo": {"layoutX": x, "layoutY": y}, "debugMode": False}
    nodes = [
        node("telemetry.TbMsgTimeseriesNode", "Save Timeseries", 1,
             {"defaultTTL": 0, "useServerTs": False, "processingSettings": {"type": "ON_EVERY_MESSAGE"}}, 824, 156),
        node("telemetry.TbMsgAttributesNode", "Save Client Attributes", 3,
             {"scope": "CLIENT_SCOPE", "notifyDevice": False, "sendAttributesUpdatedNotification": False,
              "updateAttributesOnlyOnValueChange": True, "processingSettings": {"type": "ON_EVERY_MESSAGE"}}, 824, 52),
        node("filter.TbMsgTypeSwitchNode", "Message Type Switch", 0, {"version": 0}, 347, 149),
        node("action.TbLogNode", "Log RPC from Device", 0,
             {"scriptLang": "TBEL", "tbelScript": "return '\\nIncoming message:\\n' + JSON.stringify(msg);"}, 825, 266),
        node("action.TbLogNode", "Log Other", 0,
             {"scriptLang": "TBEL", "tbelScript": "return '\\nIncoming message:\\n' + JSON.stringify(msg);"}, 824, 378),
        node("rpc.TbSendRPCRequestNode", "RPC Call Request", 0, {"timeoutInSeconds": 60}, 824, 466),
    ]
    connections = [
        {"fromIndex": 2, "toIndex": 0, "type": "Post telemetry"},
        {"fromIndex": 2, "toIndex": 1, "type": "Post attributes"},
        {"fromIndex": 2, "toIndex": 3, "type": "RPC Request from Device"},
        {"fromIndex": 2, "toIndex": 4, "type": "Other"},
        {"fromIndex": 2, "toIndex": 5, "type": "RPC Request to Device"},
    ]
    return {"firstNodeIndex": 2, "nodes": nodes, "connections": connections, "ruleChainConnections": None}


class ThingsBoardDouble:
    """One tenant with a tenant administrator; ``.url`` after ``start()``."""

    def __init__(self, username: str = "tenant@racktwin.test", password: str = "tenant-secret"):
        self.username, self.password = username, password
        self._lock = threading.RLock()
        self.tokens: set[str] = set()
        self.devices: dict[str, M.Device] = {}  # id -> Device
        self.tokens_by_device: dict[str, str] = {}
        self.attributes: dict[str, dict[str, tuple[int, Any]]] = {}  # device id -> key -> (ts, value)
        self.telemetry: dict[str, dict[str, list[tuple[int, Any]]]] = {}  # device id -> key -> [(ts, v)]
        self.profiles: dict[str, M.DeviceProfile] = {}
        self.chains: dict[str, M.RuleChain] = {}
        self.metadata: dict[str, M.RuleChainMetaData] = {}
        self.writes: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.delay_s = 0.0  # each answer this much later, as a busy or distant ThingsBoard gives it
        self._add_profile("default", default=True)
        root = self._add_chain("Root Rule Chain", root=True)
        self._set_metadata(root, default_root_chain_metadata())
        self.root_id = root
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "ThingsBoardDouble":
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _go(self, method: str) -> None:
                double._handle(self, method)

            def do_GET(self) -> None:
                self._go("GET")

            def do_POST(self) -> None:
                self._go("POST")

            def do_DELETE(self) -> None:
                self._go("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def assert_no_violations(self) -> None:
        assert not self.violations, f"requests the real ThingsBoard would refuse: {self.violations}"

    # -- test setup helpers -----------------------------------------------------------------------------

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    def _add_profile(self, name: str, default: bool = False) -> str:
        pid = str(uuid.uuid4())
        self.profiles[pid] = M.DeviceProfile(
            id=M.DeviceProfileId(id=pid, entity_type="DEVICE_PROFILE"), name=name, type="DEFAULT",
            transport_type="DEFAULT", provision_type="DISABLED", default=default, created_time=_now(), version=1,
            profile_data=M.DeviceProfileData(configuration={"type": "DEFAULT"},
                                             transport_configuration={"type": "DEFAULT"}),
        )
        return pid

    def _add_chain(self, name: str, root: bool = False) -> str:
        cid = str(uuid.uuid4())
        self.chains[cid] = M.RuleChain(id=M.RuleChainId(id=cid, entity_type="RULE_CHAIN"), name=name, type="CORE",
                                       root=root, debug_mode=False, created_time=_now(), version=1)
        self._set_metadata(cid, {"firstNodeIndex": None, "nodes": [], "connections": [], "ruleChainConnections": None},
                           version=1)
        return cid

    def _set_metadata(self, cid: str, data: dict[str, Any], version: int | None = None) -> None:
        data = copy.deepcopy(data)
        for node in data["nodes"]:
            node.setdefault("id", _id("RULE_NODE"))
            node["ruleChainId"] = _id("RULE_CHAIN", cid)
        if data.get("firstNodeIndex") is None:
            data["firstNodeIndex"] = -1 if not data["nodes"] else 0
        data["ruleChainId"] = _id("RULE_CHAIN", cid)
        data["version"] = version if version is not None else (self.metadata[cid].version + 1
                                                                  if cid in self.metadata else 1)
        self.metadata[cid] = parse_model(data, "RuleChainMetaData")

    def add_device(self, name: str, device_type: str = "rack-sensor", token: str | None = None,
                   attributes: dict[str, Any] | None = None) -> str:
        with self._lock:
            if not any(p.name == device_type for p in self.profiles.values()):
                self._add_profile(device_type)
            did = str(uuid.uuid4())
            profile = next(p for p in self.profiles.values() if p.name == device_type)
            self.devices[did] = M.Device(id=M.DeviceId(id=did, entity_type="DEVICE"), name=name, type=device_type,
                                         created_time=_now(), device_profile_id=profile.id, version=1,
                                         additional_info={})
            self.tokens_by_device[did] = token or uuid.uuid4().hex[:20]
            if attributes:
                self.set_attributes(name, attributes)
            return did

    def device_id(self, name: str) -> str:
        return next(did for did, d in self.devices.items() if d.name == name)

    def set_attributes(self, name: str, values: dict[str, Any]) -> None:
        with self._lock:
            store = self.attributes.setdefault(self.device_id(name), {})
            for key, value in values.items():
                store[key] = (_now(), value)

    def add_telemetry(self, name: str, ts_ms: int, values: dict[str, Any]) -> None:
        with self._lock:
            series = self.telemetry.setdefault(self.device_id(name), {})
            for key, value in values.items():
                series.setdefault(key, []).append((ts_ms, value))
                series[key].sort(key=lambda p: p[0])

    def chain_by_name(self, name: str) -> M.RuleChain | None:
        return next((c for c in self.chains.values() if c.name == name), None)

    def metadata_json(self, cid: str) -> dict[str, Any]:
        return wire(self.metadata[cid])

    def replace_root_metadata(self, data: dict[str, Any]) -> None:
        """Install user rules in the root chain (as if edited in the UI)."""
        with self._lock:
            self._set_metadata(self.root_id, data)

    # -- HTTP -------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.requests.append((method, parsed.path))
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                return self._send(h, 400, {"status": 400, "message": "Invalid request body", "errorCode": 31})
            try:
                if parsed.path == "/api/auth/login" and method == "POST":
                    status, payload = self._login(body)
                else:
                    auth = h.headers.get("X-Authorization", "")
                    if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                        status, payload = 401, {"status": 401, "message": "Token has expired", "errorCode": 11}
                    else:
                        if method != "GET":
                            self.writes.append((method, parsed.path))
                        status, payload = self._route(method, parsed.path, query, body)
            except BadRequest as exc:
                if exc.status == 400:
                    self.violations.append(f"{method} {parsed.path}: {exc}")
                status, payload = exc.status, {"status": exc.status, "message": str(exc), "errorCode": 31}
        self._send(h, status, payload)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _login(self, body: Any) -> tuple[int, Any]:
        request = parse_model(body, "LoginRequest")
        if request.username != self.username or request.password != self.password:
            return 401, {"status": 401, "message": "Invalid username or password", "errorCode": 10}
        token = _jwt(self.username, int(time.time()) + 9000)
        token += "." + uuid.uuid4().hex[:6]  # unique per login
        self.tokens.add(token)
        return 200, wire(M.JwtPair(token=token, refresh_token=_jwt(self.username, int(time.time()) + 604800),
                                   scope="TENANT_ADMIN"))

    def _route(self, method: str, path: str, q: dict[str, str], body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if path == "/api/tenant/devices" and method == "GET":
            if "deviceName" in q:
                found = next((d for d in self.devices.values() if d.name == q["deviceName"]), None)
                if found is None:
                    raise BadRequest(404, "Requested item wasn't found!")
                return 200, wire(found)
            items = [d for d in self.devices.values() if not q.get("type") or d.type == q["type"]]
            return 200, self._page(items, q, M.PageDataDevice)
        if path == "/api/device" and method == "POST":
            return 200, self._save_device(body, q.get("accessToken"))
        if parts[:2] == ["api", "device"] and len(parts) == 4 and parts[3] == "credentials" and method == "GET":
            did = self._known_device(parts[2])
            return 200, wire(M.DeviceCredentials(
                id=M.DeviceCredentialsId(id=str(uuid.uuid5(uuid.NAMESPACE_URL, did))),
                device_id=self.devices[did].id, credentials_type="ACCESS_TOKEN",
                credentials_id=self.tokens_by_device[did], created_time=self.devices[did].created_time))
        if parts[:4] == ["api", "plugins", "telemetry", "DEVICE"] and len(parts) >= 6:
            return self._telemetry(method, self._known_device(parts[4]), parts[5:], q, body)
        if path == "/api/deviceProfiles" and method == "GET":
            items = [p for p in self.profiles.values() if _matches(p.name, q)]
            return 200, self._page(items, q, M.PageDataDeviceProfile)
        if path == "/api/deviceProfile" and method == "POST":
            return 200, self._save_profile(body)
        if path == "/api/ruleChains" and method == "GET":
            items = [c for c in self.chains.values() if _matches(c.name, q) and (not q.get("type") or c.type == q["type"])]
            return 200, self._page(items, q, M.PageDataRuleChain)
        if path == "/api/ruleChain" and method == "POST":
            return 200, self._save_chain(body)
        if path == "/api/ruleChain/metadata" and method == "POST":
            return 200, self._save_metadata(body)
        if parts[:2] == ["api", "ruleChain"] and len(parts) in (3, 4) and method == "GET":
            if parts[2] not in self.chains:
                raise BadRequest(404, "Requested item wasn't found!")
            if len(parts) == 3:
                return 200, wire(self.chains[parts[2]])
            if parts[3] == "metadata":
                return 200, wire(self.metadata[parts[2]])
        raise BadRequest(404, f"no route {method} {path}")

    def _known_device(self, did: str) -> str:
        if did not in self.devices:
            raise BadRequest(404, "Requested item wasn't found!")
        return did

    def _page(self, items: list, q: dict[str, str], page_class: type) -> dict[str, Any]:
        try:
            size, page = int(q["pageSize"]), int(q["page"])
        except (KeyError, ValueError):
            raise BadRequest(400, "pageSize and page are required integers") from None
        if size < 1 or page < 0:
            raise BadRequest(400, "pageSize must be > 0 and page >= 0")
        items = [i for i in items if _matches(getattr(i, "name", ""), q)]
        reverse = q.get("sortOrder") == "DESC"
        items.sort(key=lambda i: (getattr(i, "name", "") if q.get("sortProperty", "name") == "name"
                                  else getattr(i, "created_time", 0)), reverse=reverse)
        chunk = items[page * size:(page + 1) * size]
        total_pages = (len(items) + size - 1) // size
        return wire(page_class(data=chunk, total_pages=total_pages, total_elements=len(items),
                               has_next=(page + 1) * size < len(items)))

    def _save_device(self, body: Any, token: str | None) -> Any:
        device = parse_model(body, "Device")
        if not device.name:
            raise BadRequest(400, "Device name should be specified")
        if device.id is not None:
            did = self._known_device(device.id.id)
        else:
            if any(d.name == device.name for d in self.devices.values()):
                raise BadRequest(400, "Device with such name already exists!")
            return wire(self.devices[self.add_device(device.name, device.type or "default", token)])
        stored = self.devices[did]
        stored.label, stored.additional_info = device.label, device.additional_info
        stored.version = (stored.version or 0) + 1
        return wire(stored)

    def _save_profile(self, body: Any) -> Any:
        profile = parse_model(body, "DeviceProfile")
        if not profile.name:
            raise BadRequest(400, "Device profile name should be specified!")
        pid = profile.id.id if profile.id else str(uuid.uuid4())
        if profile.id is None and any(p.name == profile.name for p in self.profiles.values()):
            raise BadRequest(400, "Device profile with such name already exists!")
        stored = self.profiles.get(pid)
        if profile.id is not None and stored is None:
            raise BadRequest(404, "Requested item wasn't found!")
        if stored is not None and profile.version is not None and profile.version != stored.version:
            raise BadRequest(409, "Device profile was updated by another user (version mismatch)")
        profile.id = M.DeviceProfileId(id=pid, entity_type="DEVICE_PROFILE")
        profile.created_time = stored.created_time if stored else _now()
        profile.version = (stored.version or 0) + 1 if stored else 1
        self.profiles[pid] = profile
        return wire(profile)

    def _save_chain(self, body: Any) -> Any:
        chain = parse_model(body, "RuleChain")
        if chain.id is None:
            if chain.root:
                raise BadRequest(400, "a new rule chain cannot be saved as root")
            cid = self._add_chain(chain.name)
            stored = self.chains[cid]
            stored.additional_info, stored.debug_mode = chain.additional_info, chain.debug_mode
            return wire(stored)
        if chain.id.id not in self.chains:
            raise BadRequest(404, "Requested item wasn't found!")
        stored = self.chains[chain.id.id]
        stored.name, stored.additional_info = chain.name, chain.additional_info
        return wire(stored)

    def _save_metadata(self, body: Any) -> Any:
        meta = parse_model(body, "RuleChainMetaData")
        if meta.rule_chain_id is None or meta.rule_chain_id.id not in self.chains:
            raise BadRequest(404, "Rule chain not found")
        cid = meta.rule_chain_id.id
        current = self.metadata[cid]
        if meta.version is not None and meta.version != current.version:
            raise BadRequest(409, "Rule chain metadata was updated by another user (version mismatch)")
        nodes = body["nodes"]
        known_ids = {n.id.id for n in current.nodes if n.id}
        for i, node in enumerate(nodes):
            if not node.get("type") or not node.get("name"):
                raise BadRequest(400, f"node {i}: type and name are required")
            if not isinstance(node.get("configuration"), dict):
                raise BadRequest(400, f"node {i}: configuration must be an object")
            if node.get("id") and node["id"].get("id") not in known_ids:
                raise BadRequest(400, f"node {i}: unknown rule node id {node['id']}")
            if node["type"] == "org.thingsboard.rule.engine.mqtt.TbMqttNode":
                if node.get("configurationVersion") != 2 or "protocolVersion" not in node["configuration"]:
                    raise BadRequest(400, f"node {i}: TbMqttNode needs configurationVersion 2 and protocolVersion")
            if node["type"] == "org.thingsboard.rule.engine.flow.TbRuleChainInputNode":
                target = node["configuration"].get("ruleChainId")
                if target not in self.chains:
                    raise BadRequest(400, f"node {i}: rule chain {target} does not exist")
        for conn in body["connections"]:
            if not (0 <= conn["fromIndex"] < len(nodes) and 0 <= conn["toIndex"] < len(nodes)):
                raise BadRequest(400, f"connection {conn} refers to a missing node")
        first = body.get("firstNodeIndex")
        if nodes and not (0 <= first < len(nodes)):
            raise BadRequest(400, f"firstNodeIndex {first} out of range")
        self._set_metadata(cid, {k: v for k, v in body.items() if k not in ("version", "ruleChainId")})
        return wire(self.metadata[cid])

    def _telemetry(self, method: str, did: str, rest: list[str], q: dict[str, str], body: Any) -> tuple[int, Any]:
        if method == "GET" and rest == ["values", "attributes", "SERVER_SCOPE"]:
            keys = set(q["keys"].split(",")) if q.get("keys") else None
            rows = [M.AttributeData(last_update_ts=ts, key=k, value=v)
                    for k, (ts, v) in sorted(self.attributes.get(did, {}).items()) if keys is None or k in keys]
            return 200, wire(rows)
        if method == "POST" and rest in (["attributes", "SERVER_SCOPE"], ["SERVER_SCOPE"]):
            if not isinstance(body, dict):
                raise BadRequest(400, "attributes must be a JSON object")
            store = self.attributes.setdefault(did, {})
            for key, value in body.items():
                store[key] = (_now(), value)
            return 200, None
        if method == "GET" and rest == ["values", "timeseries"]:
            series = self.telemetry.get(did, {})
            keys = q["keys"].split(",") if q.get("keys") else sorted(series)
            strict = q.get("useStrictDataTypes") == "true"
            out: dict[str, list] = {}
            for key in keys:
                points = series.get(key, [])
                if "startTs" in q:
                    lo, hi = int(q["startTs"]), int(q.get("endTs", 2**62))
                    points = [p for p in points if lo <= p[0] <= hi]
                    if q.get("orderBy", "DESC") == "DESC":
                        points = points[::-1]
                    points = points[: int(q.get("limit", 100))]
                else:
                    points = points[-1:]
                if points:
                    out[key] = [M.TsData(ts=ts, value=v if strict else str(v)) for ts, v in points]
            return 200, wire(out)
        raise BadRequest(404, f"no telemetry route {rest}")


def _matches(name: str | None, q: dict[str, str]) -> bool:
    text = q.get("textSearch")
    return not text or text.lower() in (name or "").lower()


def _now() -> int:
    return int(time.time() * 1000)
