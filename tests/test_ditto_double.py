"""Tests of the Ditto contract double (tests/doubles/ditto.py) and its RQL module."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.doubles import rql
from tests.doubles.contracts import ContractNotFound, find_contract
from tests.doubles.ditto import (
    MERGE_PATCH,
    DittoDouble,
    _Resp,
    measure_throughput,
    merge_patch,
    parse_fields,
    project,
    standard_policy,
    valid_entity_id,
)

USERS = {"ditto": "pw", "bridge": "pw2", "grafana": "pw3", "eve": "pw4"}
POLICY = "dc.racks:telemetry"
RACK = "dc.racks:rack-a01"
PROPS = "features/environment/properties"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def server():
    double = DittoDouble(USERS, validate=True)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def ditto(server):
    server.reset()
    yield server
    server.assert_no_violations()


def session(ditto: DittoDouble, user: str) -> requests.Session:
    s = requests.Session()
    s.auth = (user, USERS[user])
    return s


@pytest.fixture
def admin(ditto):
    return session(ditto, "ditto")


@pytest.fixture
def bridge(ditto):
    return session(ditto, "bridge")


@pytest.fixture
def grafana(ditto):
    return session(ditto, "grafana")


@pytest.fixture
def eve(ditto):
    return session(ditto, "eve")


def url(ditto: DittoDouble, path: str) -> str:
    return ditto.url + path


def patch(s: requests.Session, ditto: DittoDouble, thing_id: str, body, **kw) -> requests.Response:
    headers = {"Content-Type": MERGE_PATCH, **kw.pop("headers", {})}
    return s.patch(url(ditto, f"/api/2/things/{thing_id}"), data=json.dumps(body), headers=headers, **kw)


def seed_rack(ditto: DittoDouble, thing_id: str = RACK, props: dict | None = None) -> None:
    if POLICY not in ditto.policies:
        ditto.seed_policy(POLICY, standard_policy())
    ditto.seed_thing(
        thing_id,
        {"policyId": POLICY, "attributes": {"room": "r1"}, "features": {"environment": {"properties": props or {}}}},
    )


def take_violations(ditto: DittoDouble, kind: str = "request") -> list:
    found = ditto.clear_violations()
    assert found, "expected a contract violation to be recorded"
    assert all(v.kind == kind for v in found), found
    return found


# ------------------------------------------------------------------------------------ contracts


def test_find_contract_order_and_error(tmp_path, monkeypatch):
    own = tmp_path / "ditto-api-2.yml"
    own.write_text("openapi: 3.0.0\n")
    monkeypatch.setenv("RACKTWIN_CONTRACTS_DIR", str(tmp_path))
    assert find_contract("ditto-api-2.yml") == own
    monkeypatch.delenv("RACKTWIN_CONTRACTS_DIR")
    assert find_contract("ditto-api-2.yml").name == "ditto-api-2.yml"
    with pytest.raises(ContractNotFound) as err:
        find_contract("no-such-contract.yml")
    text = str(err.value)
    assert "RACKTWIN_CONTRACTS_DIR" in text and "shared/reference" in text and "tests/contracts" in text


def test_entity_ids():
    assert valid_entity_id("dc.racks:rack-a01")
    assert valid_entity_id(":no-namespace")
    assert valid_entity_id("dc-x1.racks_2:rack a01")
    assert not valid_entity_id("dc-1.racks:rack")  # segments start with a letter
    assert not valid_entity_id("dc.racks")
    assert not valid_entity_id("1dc:rack")
    assert not valid_entity_id("dc:rack/a")
    assert not valid_entity_id("dc:")
    assert not valid_entity_id("dc:" + "x" * 254)


# ------------------------------------------------------------------------------------------ RQL


THING = {
    "thingId": "dc.racks:rack-a01",
    "attributes": {"room": "r1", "row": 3, "tags": ["hot", "north"], "empty": "", "nothing": None},
    "features": {
        "environment": {"properties": {"tsTop": "2026-08-18T10:00:00.000Z", "tempTop": 24.5, "ok": True}},
        "power": {"properties": {"tempTop": 40}},
    },
}


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('eq(attributes/room,"r1")', True),
        ("eq(attributes/row,3)", True),
        ("eq(attributes/row,3.0)", True),
        ('eq(attributes/row,"3")', False),  # types never compare across
        ("ne(attributes/row,4)", True),
        ("ne(attributes/missing,4)", False),  # missing property: comparisons are false
        ('gt(features/environment/properties/tsTop,"2026-08-18T09:59:59.999Z")', True),
        ('lt(features/environment/properties/tsTop,"2026-08-18T09:59:59.999Z")', False),
        ("ge(features/environment/properties/tempTop,24.5)", True),
        ("le(features/environment/properties/tempTop,24)", False),
        ('gt(attributes/room,"r0")', True),  # lexicographic
        ("gt(attributes/room,1)", False),
        ("eq(features/environment/properties/ok,true)", True),
        ("eq(attributes/nothing,null)", True),
        ("eq(attributes/missing,null)", False),
        ('in(attributes/room,"r2","r1")', True),
        ('in(attributes/room,"r2","r3")', False),
        ('like(thingId,"dc.racks:rack-a*")', True),
        ('like(thingId,"dc.racks:rack-a0?")', True),
        ('like(thingId,"DC.RACKS:*")', False),
        ('ilike(thingId,"DC.RACKS:*")', True),
        ("exists(features/environment/properties/tsTop)", True),
        ("exists(features/environment/properties/tsBottom)", False),
        ("exists(attributes/nothing)", True),
        ("empty(attributes/empty)", True),
        ("empty(attributes/nothing)", True),
        ("empty(attributes/missing)", True),
        ("empty(attributes/room)", False),
        ('eq(attributes/tags,"north")', True),  # arrays match element-wise
        ("gt(features/*/properties/tempTop,30)", True),
        ('and(eq(attributes/room,"r1"),gt(attributes/row,2))', True),
        ('and(eq(attributes/room,"r1"), gt(attributes/row,5))', False),
        ('or(not(exists(features/environment/properties/tsTop)),lt(features/environment/properties/tsTop,"2026-01-01"))', False),
        ("not(exists(features/environment/properties/tsBottom))", True),
        ('eq(attributes/room,"r\\"1")', False),
        ("  eq(attributes/row,3)", True),
    ],
)
def test_rql_evaluate(expr, expected):
    assert rql.matches(expr, THING) is expected


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "eq(attributes/row, 3)",  # Ditto allows no whitespace before a literal
        "eq(attributes/row,3) ",
        "eq(attributes/row,3",
        "eq(attributes/row)",
        "foo(attributes/row,3)",
        'eq(attributes/row,"open)',
        "eq(attributes/row,01)",
        "eq(attributes/row,1e5)",
        "eq(,3)",
        "and()",
        'like(thingId,3)',
        "eq(attributes/row,3)x",
        "in(attributes/row)",
    ],
)
def test_rql_syntax_errors(expr):
    with pytest.raises(rql.RqlSyntaxError):
        rql.parse(expr)


def test_rql_literals_and_options():
    node = rql.parse('in(p,"a\\"b",\'c\',-1,2.5,true,false,null)')
    assert node.values == ('a"b', "c", -1, 2.5, True, False, None)
    # Escapes in a property path, and a backslash just before a string's closing quote
    assert rql.parse('exists(attributes/b\\"c\\u0041)').path == 'attributes/b"cA'
    assert rql.parse('eq(p,"x\\\\")').values == ("x\\",)
    opts = rql.parse_options("size(200),cursor(abc),sort(+thingId,-attributes/x)")
    assert opts.size == 200 and opts.cursor == "abc"
    assert opts.sort == (rql.SortKey("thingId", True), rql.SortKey("attributes/x", False))
    with pytest.raises(rql.RqlError):
        rql.parse_options("size(20),limit(0,5)")
    with pytest.raises(rql.RqlError):
        rql.parse_options("sort(thingId)")
    with pytest.raises(rql.RqlError):
        rql.parse_options("page(2)")


def test_merge_patch_and_field_helpers():
    target = {"a": {"b": 1, "c": 2}, "d": [1, 2], "e": "x", "k1": 1, "k2": 2, "other": 3}
    result = merge_patch(target, {"a": {"b": None, "z": {"y": 1}}, "d": [3], "e": {"f": 1}, "{{ ~k[0-9]~ }}": None})
    assert result == {"a": {"c": 2, "z": {"y": 1}}, "d": [3], "e": {"f": 1}, "other": 3}
    assert target["a"] == {"b": 1, "c": 2}  # input untouched
    assert parse_fields("thingId,attributes(model,address/postal(city,street)),features/*/properties/t") == [
        ("thingId",), ("attributes", "model"), ("attributes", "address", "postal", "city"),
        ("attributes", "address", "postal", "street"), ("features", "*", "properties", "t"),
    ]
    assert project(THING, parse_fields("features/*/properties/tempTop")) == {
        "features": {"environment": {"properties": {"tempTop": 24.5}}, "power": {"properties": {"tempTop": 40}}}
    }
    assert project(THING, [("attributes", "missing")]) == {}


# ------------------------------------------------------------------------------- basic endpoints


def test_health_whoami_and_auth(ditto, bridge):
    assert requests.get(url(ditto, "/health")).json() == {"status": "UP"}
    who = bridge.get(url(ditto, "/api/2/whoami"))
    assert who.status_code == 200
    assert who.json() == {"defaultSubject": "nginx:bridge", "subjects": ["nginx:bridge"]}

    wrong = requests.get(url(ditto, "/api/2/whoami"), auth=("bridge", "nope"))
    assert wrong.status_code == 401 and wrong.json()["status"] == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    assert ditto.violations == []  # credentials present: the contract is met, nginx refuses them

    missing = requests.get(url(ditto, f"/api/2/things/{RACK}"))
    assert missing.status_code == 401
    assert {"status", "error", "message"} <= missing.json().keys()
    (violation,) = take_violations(ditto)
    assert "Security" in violation.reason


def test_keep_alive_reuses_one_connection(ditto, bridge):
    before = ditto.connection_count
    for _ in range(5):
        r = bridge.get(url(ditto, "/api/2/whoami"))
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(r.content))
    assert ditto.connection_count - before == 1


# ------------------------------------------------------------------------------------- policies


def test_admin_creates_and_modifies_policy(ditto, admin, bridge):
    body = standard_policy()
    r = admin.put(url(ditto, f"/api/2/policies/{POLICY}"), json=body, headers={"If-None-Match": "*"})
    assert r.status_code == 201
    assert r.headers["ETag"] == '"rev:1"' and r.headers["Location"].endswith(f"/api/2/policies/{POLICY}")
    assert r.json()["policyId"] == POLICY and r.json()["entries"] == body["entries"]

    again = admin.put(url(ditto, f"/api/2/policies/{POLICY}"), json=body, headers={"If-None-Match": "*"})
    assert again.status_code == 412 and again.json()["error"] == "policies:precondition.failed"

    modified = admin.put(url(ditto, f"/api/2/policies/{POLICY}"), json=body, headers={"If-Match": '"rev:1"'})
    assert modified.status_code == 204 and modified.headers["ETag"] == '"rev:2"'
    stale = admin.put(url(ditto, f"/api/2/policies/{POLICY}"), json=body, headers={"If-Match": '"rev:1"'})
    assert stale.status_code == 412

    got = admin.get(url(ditto, f"/api/2/policies/{POLICY}"))
    assert got.status_code == 200 and got.json()["entries"] == body["entries"]

    # the bridge holds no WRITE on policy:/ in this policy
    denied = bridge.put(url(ditto, f"/api/2/policies/{POLICY}"), json=body)
    assert denied.status_code == 403 and denied.json()["error"] == "policies:policy.notmodifiable"


def test_policy_lockout_and_ids(ditto, admin):
    without_admin = standard_policy(admins=())
    r = admin.put(url(ditto, "/api/2/policies/dc.racks:p1"), json=without_admin)
    assert r.status_code == 403 and r.json()["error"] == "policies:policy.notcreatable"
    assert "dc.racks:p1" not in ditto.policies

    # allowed with allow-policy-lockout, but someone must still keep WRITE on policy:/
    nobody_writes = standard_policy(admins=(), writers=("bridge",))
    r = admin.put(url(ditto, "/api/2/policies/dc.racks:p1"), json=nobody_writes, params={"allow-policy-lockout": "true"})
    assert r.status_code == 403 and r.json()["error"] == "policies:policy.modificationinvalid"
    r = admin.put(
        url(ditto, "/api/2/policies/dc.racks:p1"),
        json=standard_policy(admins=(), writers=("bridge",), writers_manage_policy=True),
        params={"allow-policy-lockout": "true"},
    )
    assert r.status_code == 201

    assert admin.put(url(ditto, "/api/2/policies/dc.racks:p2"), json=standard_policy()).status_code == 201
    r = admin.put(url(ditto, "/api/2/policies/dc.racks:p2"), json=nobody_writes)
    assert r.status_code == 403 and r.json()["error"] == "policies:policy.modificationinvalid"

    r = admin.put(url(ditto, "/api/2/policies/no-namespace-colon"), json=standard_policy())
    assert r.status_code == 400 and r.json()["error"] == "policies:id.invalid"
    r = admin.put(url(ditto, "/api/2/policies/dc.racks:p3"), json={"entries": {"x": {"subjects": {}}}})
    assert r.status_code == 400
    assert admin.get(url(ditto, "/api/2/policies/dc.racks:nope")).status_code == 404


# --------------------------------------------------------------------------------------- things


def test_create_thing_if_none_match(ditto, admin, bridge):
    ditto.seed_policy(POLICY, standard_policy())
    body = {"policyId": POLICY, "attributes": {"room": "r1"}, "features": {"environment": {"properties": {}}}}
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json=body, headers={"If-None-Match": "*"})
    assert r.status_code == 201
    assert r.json() == {"thingId": RACK, **body}
    assert r.headers["ETag"] == '"rev:1"' and r.headers["Location"].endswith(f"/api/2/things/{RACK}")

    changed = {**body, "attributes": {"room": "changed"}}
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json=changed, headers={"If-None-Match": "*"})
    assert r.status_code == 412 and r.json()["error"] == "things:precondition.failed"
    assert ditto.things[RACK]["attributes"] == {"room": "r1"} and ditto.revision(RACK) == 1

    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json=changed, headers={"If-Match": '"rev:1"'})
    assert r.status_code == 204 and r.headers["ETag"] == '"rev:2"'
    r = bridge.put(url(ditto, "/api/2/things/dc.racks:rack-zz"), json=body, headers={"If-Match": "*"})
    assert r.status_code == 412  # If-Match: * means update only

    r = bridge.put(url(ditto, "/api/2/things/not-an-id"), json=body)
    assert r.status_code == 400 and r.json()["error"] == "things:id.invalid"
    r = bridge.put(url(ditto, "/api/2/things/dc.racks:rack-b"), json={**body, "policyId": "dc.racks:missing"})
    assert r.status_code == 400 and "dc.racks:rack-b" not in ditto.things


def test_thing_without_policy_gets_default_policy(ditto, bridge, grafana):
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json={"attributes": {"room": "r1"}})
    assert r.status_code == 201 and r.json()["policyId"] == RACK
    policy = ditto.policies[RACK]
    assert policy["entries"]["DEFAULT"]["subjects"] == {"nginx:bridge": {"type": "generated"}}
    assert set(policy["entries"]["DEFAULT"]["resources"]) == {"thing:/", "policy:/", "message:/"}
    assert bridge.get(url(ditto, f"/api/2/policies/{RACK}")).status_code == 200
    assert grafana.get(url(ditto, f"/api/2/things/{RACK}")).status_code == 404  # §3 consequence


def test_inline_policy_and_delete(ditto, bridge, grafana):
    locked_out = {"policyId": RACK, **standard_policy(admins=(), writers=("bridge",), readers=())}
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json={"_policy": locked_out})
    assert r.status_code == 400 and r.json()["error"] == "things:policy.invalid"
    inline = {"policyId": RACK, **standard_policy(admins=(), writers=("bridge",), writers_manage_policy=True)}
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), json={"_policy": inline, "attributes": {"a": 1}})
    assert r.status_code == 201 and r.json()["policyId"] == RACK and RACK in ditto.policies
    assert grafana.get(url(ditto, f"/api/2/things/{RACK}")).status_code == 200
    assert grafana.delete(url(ditto, f"/api/2/things/{RACK}")).status_code == 403
    assert bridge.delete(url(ditto, f"/api/2/things/{RACK}")).status_code == 204
    assert RACK not in ditto.things and RACK in ditto.policies  # the policy outlives the thing
    assert bridge.get(url(ditto, f"/api/2/things/{RACK}")).status_code == 404


def test_merge_patch_semantics(ditto, bridge):
    seed_rack(ditto, props={"tempTop": 20.0, "humidityTop": 40, "old": 1, "nested": {"a": 1, "b": 2}})
    r = patch(bridge, ditto, RACK, {
        "attributes": {"row": 4},
        "features": {"environment": {"properties": {"tempTop": 21.5, "old": None, "nested": {"b": None, "c": 3}}}},
    })
    assert r.status_code == 204 and r.content == b"" and r.headers["ETag"] == '"rev:2"'
    thing = ditto.things[RACK]
    assert thing["attributes"] == {"room": "r1", "row": 4}
    assert thing["features"]["environment"]["properties"] == {"tempTop": 21.5, "humidityTop": 40, "nested": {"a": 1, "c": 3}}

    r = patch(bridge, ditto, RACK, {"features": {"environment": {"properties": {"nested": 5}}}})
    assert r.status_code == 204 and ditto.things[RACK]["features"]["environment"]["properties"]["nested"] == 5
    r = patch(bridge, ditto, RACK, {"attributes": None})
    assert r.status_code == 204 and "attributes" not in ditto.things[RACK]

    got = bridge.get(url(ditto, f"/api/2/things/{RACK}"), params={"fields": f"thingId,_revision,_modified,_created,{PROPS}/tempTop"})
    assert got.status_code == 200
    body = got.json()
    assert body["thingId"] == RACK and body["_revision"] == 4
    assert body["features"] == {"environment": {"properties": {"tempTop": 21.5}}}
    assert body["_created"] <= body["_modified"]

    created = patch(bridge, ditto, "dc.racks:rack-new", {"policyId": POLICY, "features": {"environment": {"properties": {"t": 1, "gone": None}}}})
    assert created.status_code == 201
    assert created.json()["features"] == {"environment": {"properties": {"t": 1}}}
    assert ditto.revision("dc.racks:rack-new") == 1


def test_patch_wrong_content_type_is_415(ditto, bridge):
    seed_rack(ditto)
    r = bridge.patch(url(ditto, f"/api/2/things/{RACK}"), json={"attributes": {"row": 1}})
    assert r.status_code == 415 and r.json()["error"] == "mediatype.unsupported"
    assert "row" not in ditto.things[RACK]["attributes"]
    (violation,) = take_violations(ditto)
    assert "application/json" in violation.reason
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}"), data=b'{"policyId": "x:y"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    take_violations(ditto)


def test_condition_query_and_header(ditto, bridge):
    seed_rack(ditto, props={"tsTop": "2026-08-18T10:00:00.000Z", "tempTop": 20})
    newer = f'or(not(exists({PROPS}/tsTop)),lt({PROPS}/tsTop,"2026-08-18T10:00:05.000Z"))'
    older = f'or(not(exists({PROPS}/tsTop)),lt({PROPS}/tsTop,"2026-08-18T09:59:55.000Z"))'
    body = {"features": {"environment": {"properties": {"tempTop": 25}}}}

    r = patch(bridge, ditto, RACK, body, params={"condition": older})
    assert r.status_code == 412 and r.json()["error"] == "things:condition.failed"
    assert ditto.things[RACK]["features"]["environment"]["properties"]["tempTop"] == 20 and ditto.revision(RACK) == 1

    r = patch(bridge, ditto, RACK, body, headers={"condition": older})
    assert r.status_code == 412 and ditto.revision(RACK) == 1

    r = patch(bridge, ditto, RACK, body, params={"condition": newer})
    assert r.status_code == 204 and ditto.things[RACK]["features"]["environment"]["properties"]["tempTop"] == 25

    r = patch(bridge, ditto, RACK, body, headers={"condition": 'gt(_modified,"2000-01-01T00:00:00Z")'})
    assert r.status_code == 204

    for bad in ("lt(features/x, 1)", "and(", "foo(a,1)"):
        r = patch(bridge, ditto, RACK, body, params={"condition": bad})
        assert r.status_code == 400 and r.json()["error"] == "things:condition.invalid", bad
    assert ditto.revision(RACK) == 3


def test_if_equal_skip(ditto, bridge):
    seed_rack(ditto, props={"tempTop": 20})
    same = {"features": {"environment": {"properties": {"tempTop": 20}}}}
    r = patch(bridge, ditto, RACK, same, headers={"if-equal": "skip-minimizing-merge"})
    assert r.status_code == 412 and ditto.revision(RACK) == 1
    assert patch(bridge, ditto, RACK, same).status_code == 204 and ditto.revision(RACK) == 2
    r = patch(bridge, ditto, RACK, {"features": {"environment": {"properties": {"tempTop": 21}}}}, headers={"if-equal": "skip"})
    assert r.status_code == 204


def test_get_etag_304_and_if_match(ditto, grafana):
    seed_rack(ditto)
    r = grafana.get(url(ditto, f"/api/2/things/{RACK}"))
    etag = r.headers["ETag"]
    assert r.status_code == 200 and etag == '"rev:1"'
    assert set(r.json()) == {"thingId", "policyId", "attributes", "features"}
    r = grafana.get(url(ditto, f"/api/2/things/{RACK}"), headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    assert grafana.get(url(ditto, f"/api/2/things/{RACK}"), headers={"If-Match": '"rev:9"'}).status_code == 412


def test_permissions(ditto, bridge, grafana, eve):
    seed_rack(ditto, props={"tempTop": 20})
    assert grafana.get(url(ditto, f"/api/2/things/{RACK}")).status_code == 200
    r = patch(grafana, ditto, RACK, {"features": {"environment": {"properties": {"tempTop": 99}}}})
    assert r.status_code == 403 and r.json()["error"] == "things:thing.notmodifiable"
    assert ditto.things[RACK]["features"]["environment"]["properties"]["tempTop"] == 20

    r = eve.get(url(ditto, f"/api/2/things/{RACK}"))
    assert r.status_code == 404 and r.json()["error"] == "things:thing.notfound"
    assert eve.get(url(ditto, "/api/2/search/things")).json() == {"items": []}
    assert eve.get(url(ditto, "/api/2/search/things/count")).json() == 0
    assert patch(eve, ditto, RACK, {"attributes": {"x": 1}}).status_code == 403


def test_grants_apply_downwards_and_revoke_wins(ditto, admin, bridge, grafana):
    policy = {
        "entries": {
            "admin": {"subjects": {"nginx:ditto": {"type": "t"}},
                      "resources": {"policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                                    "thing:/": {"grant": ["READ", "WRITE"], "revoke": []}}},
            "bridge": {"subjects": {"nginx:bridge": {"type": "t"}},
                       "resources": {"thing:/": {"grant": ["READ"], "revoke": []},
                                     "thing:/features": {"grant": ["WRITE"], "revoke": []}}},
            "grafana": {"subjects": {"nginx:grafana": {"type": "t"}},
                        "resources": {"thing:/": {"grant": ["READ"], "revoke": []},
                                      "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]}}},
        }
    }
    ditto.seed_policy("dc.racks:scoped", policy)
    ditto.seed_thing(RACK, {"policyId": "dc.racks:scoped", "attributes": {"room": "r1", "secret": "s3cr3t"},
                            "features": {"environment": {"properties": {"t": 1}}}})
    assert patch(bridge, ditto, RACK, {"features": {"environment": {"properties": {"t": 2}}}}).status_code == 204
    r = patch(bridge, ditto, RACK, {"attributes": {"room": "r2"}})
    assert r.status_code == 403 and r.json()["error"] == "things:thing.notmodifiable"
    r = bridge.put(url(ditto, f"/api/2/things/{RACK}/attributes/room"), json="r2")
    assert r.status_code == 403 and r.json()["error"] == "things:attribute.notmodifiable"
    assert bridge.put(url(ditto, f"/api/2/things/{RACK}"), json={"policyId": "dc.racks:scoped"}).status_code == 403

    seen = grafana.get(url(ditto, f"/api/2/things/{RACK}")).json()
    assert seen["attributes"] == {"room": "r1"}
    r = grafana.get(url(ditto, "/api/2/search/things"), params={"filter": 'eq(attributes/secret,"s3cr3t")'})
    assert r.json() == {"items": []}
    r = admin.get(url(ditto, "/api/2/search/things"), params={"filter": 'eq(attributes/secret,"s3cr3t")', "fields": "thingId"})
    assert r.json() == {"items": [{"thingId": RACK}]}


def test_sub_resources_and_multi_get(ditto, bridge, grafana):
    seed_rack(ditto, props={"tempTop": 20})
    base = url(ditto, f"/api/2/things/{RACK}")
    r = bridge.put(f"{base}/features/environment/properties/tempBottom", json=18.5)
    assert r.status_code == 201 and r.json() == 18.5
    assert bridge.put(f"{base}/features/environment/properties/tempBottom", json=19).status_code == 204
    r = bridge.put(f"{base}/features/environment/properties/nested/deep", json={"x": 1})
    assert r.status_code == 201
    assert grafana.get(f"{base}/features/environment/properties/nested/deep/x").json() == 1
    r = bridge.patch(f"{base}/features/environment/properties", data=json.dumps({"tempTop": None, "h": 40}),
                     headers={"Content-Type": MERGE_PATCH})
    assert r.status_code == 204
    assert grafana.get(f"{base}/features/environment/properties").json() == {"tempBottom": 19, "nested": {"deep": {"x": 1}}, "h": 40}
    assert bridge.delete(f"{base}/attributes/room").status_code == 204
    r = grafana.get(f"{base}/attributes/room")
    assert r.status_code == 404 and r.json()["error"] == "things:attribute.notfound"
    r = bridge.put(f"{base}/features/nope/properties/x", json=1)
    assert r.status_code == 404 and r.json()["error"] == "things:feature.notfound"
    assert grafana.get(f"{base}/policyId").json() == POLICY

    seed_rack(ditto, "dc.racks:rack-a02")
    r = grafana.get(url(ditto, "/api/2/things"), params={"ids": f"{RACK},dc.racks:rack-a02,dc.racks:gone", "fields": "thingId"})
    assert r.status_code == 200 and r.json() == [{"thingId": RACK}, {"thingId": "dc.racks:rack-a02"}]


# --------------------------------------------------------------------------------------- search


def test_search_filter_namespaces_fields_and_paging(ditto, admin, grafana):
    ditto.seed_policy(POLICY, standard_policy())
    ditto.seed_policy("dc.racks:private", standard_policy(readers=()))
    for i in range(450):
        ditto.seed_thing(f"dc.racks:rack-{i:04d}", {"policyId": POLICY, "attributes": {"idx": i, "room": f"r{i % 3}"}})
    for i in range(20):
        ditto.seed_thing(f"other.ns:rack-{i:04d}", {"policyId": POLICY, "attributes": {"idx": i}})
    for i in range(10):
        ditto.seed_thing(f"dc.racks:secret-{i}", {"policyId": "dc.racks:private", "attributes": {"idx": i}})

    search = url(ditto, "/api/2/search/things")
    params = {"namespaces": "dc.racks", "filter": "ge(attributes/idx,0)", "fields": "thingId,attributes/idx"}
    seen, pages, cursor = [], 0, None
    while True:
        option = "size(200)" + (f",cursor({cursor})" if cursor else "")
        r = grafana.get(search, params={**params, "option": option})
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        seen.extend(body["items"])
        cursor = body.get("cursor")
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 450
    assert [item["thingId"] for item in seen] == [f"dc.racks:rack-{i:04d}" for i in range(450)]
    assert seen[0] == {"thingId": "dc.racks:rack-0000", "attributes": {"idx": 0}}

    default = grafana.get(search).json()
    assert len(default["items"]) == 25 and "cursor" in default  # default size 25
    assert set(default["items"][0]) == {"thingId", "policyId", "attributes"}

    assert grafana.get(f"{search}/count", params={"namespaces": "dc.racks"}).json() == 450
    assert admin.get(f"{search}/count", params={"namespaces": "dc.racks"}).json() == 460
    assert grafana.get(f"{search}/count", params={"filter": 'eq(attributes/room,"r1")', "namespaces": "dc.racks,other.ns"}).json() == 150 + 0

    r = grafana.get(search, params={"filter": 'eq(attributes/room,"r2")', "option": "sort(-attributes/idx),size(2)", "fields": "attributes/idx"})
    assert r.json()["items"] == [{"attributes": {"idx": 449}}, {"attributes": {"idx": 446}}]

    first = grafana.get(search, params={**params, "option": "size(10)"}).json()
    r = grafana.get(search, params={"filter": "ge(attributes/idx,5)", "option": f"size(10),cursor({first['cursor']})"})
    assert r.status_code == 400 and r.json()["error"] == "thing-search:cursor.invalid"
    assert grafana.get(search, params={"option": "size(201)"}).status_code == 400
    r = grafana.get(search, params={"filter": "eq(attributes/idx,1"})
    assert r.status_code == 400 and r.json()["error"] == "rql.expression.invalid"

    form = grafana.post(search, data={"filter": "lt(attributes/idx,3)", "namespaces": "dc.racks", "fields": "thingId"})
    assert form.status_code == 200 and [i["thingId"] for i in form.json()["items"]] == [f"dc.racks:rack-{i:04d}" for i in range(3)]
    assert grafana.post(f"{search}/count", data={"filter": "lt(attributes/idx,3)"}).json() == 6


# ----------------------------------------------------------------------------- contract checks


def test_requests_that_break_the_contract_are_recorded(ditto, bridge):
    seed_rack(ditto)
    thing = url(ditto, f"/api/2/things/{RACK}")

    r = bridge.get(thing, params={"fieldz": "thingId"})  # unknown query parameter
    assert r.status_code == 400 and r.json()["error"] == "contract:request.invalid"
    assert "fieldz" in take_violations(ditto)[0].reason

    r = bridge.put(thing, json={"policyId": POLICY, "attributes": "not an object"})  # body type
    assert r.status_code == 400 and r.json()["error"] == "contract:request.invalid"
    take_violations(ditto)

    r = bridge.put(thing, json={"policyId": POLICY}, params={"response-required": "maybe"})  # bad boolean
    assert r.status_code == 400
    take_violations(ditto)

    r = bridge.put(thing, json={"policyId": POLICY}, headers={"if-equal": "sometimes"})  # header enum
    assert r.status_code == 400
    take_violations(ditto)

    r = bridge.post(thing, json={})  # wrong method
    assert r.status_code == 405
    take_violations(ditto)

    r = bridge.get(url(ditto, "/api/2/thingz"))  # wrong path
    assert r.status_code == 404
    take_violations(ditto)

    r = bridge.put(url(ditto, "/api/2/policies/dc.racks:p"))  # required body missing
    assert r.status_code == 400
    take_violations(ditto)

    assert ditto.revision(RACK) == 1  # nothing was written

    bridge.get(thing, params={"bogus": "1"})
    with pytest.raises(AssertionError, match="bogus"):
        ditto.assert_no_violations()
    ditto.clear_violations()


def test_unimplemented_operations_are_flagged(ditto, bridge):
    r = bridge.post(url(ditto, "/api/2/things"), json={"policyId": POLICY})
    assert r.status_code == 501
    assert take_violations(ditto, kind="unimplemented")


def test_responses_are_validated_too(ditto, bridge, monkeypatch):
    seed_rack(ditto)
    monkeypatch.setattr(ditto, "_get_thing", lambda ctx, tid: _Resp(200, {"thingId": tid, "policyId": 7}, [("ETag", '"rev:1"')]))
    r = bridge.get(url(ditto, f"/api/2/things/{RACK}"))
    assert r.status_code == 200  # sent anyway, but recorded as the double's bug
    (violation,) = take_violations(ditto, kind="response")
    assert "7" in violation.reason


# ----------------------------------------------------------------------------------------- faults


def test_fault_injection(ditto, bridge, admin):
    seed_rack(ditto)
    thing = url(ditto, f"/api/2/things/{RACK}")
    body = {"features": {"environment": {"properties": {"t": 1}}}}

    ditto.inject(status=503, count=2)
    assert [patch(bridge, ditto, RACK, body).status_code for _ in range(3)] == [503, 503, 204]

    ditto.inject(status=429, count=1)
    r = patch(bridge, ditto, RACK, body)
    assert r.status_code == 429 and r.json()["error"] == "things:thing.toomanymodifyingrequests"

    ditto.inject(status=503, duration=0.3)
    assert bridge.get(thing).status_code == 503
    assert admin.get(url(ditto, f"/api/2/policies/{POLICY}")).status_code == 200  # other prefix unaffected
    time.sleep(0.35)
    assert bridge.get(thing).status_code == 200

    ditto.inject(delay=1.0, count=1)
    with pytest.raises(requests.Timeout):
        bridge.get(thing, timeout=0.2)
    assert bridge.get(thing, timeout=2).status_code == 200

    ditto.inject(status=502, paths_prefix="/api")
    r = bridge.get(thing)
    assert r.status_code == 502 and r.headers["Content-Type"] == "text/html"
    ditto.clear_faults()
    ditto.inject(status=503, paths_prefix="/health", count=1)
    r = requests.get(url(ditto, "/health"))
    assert r.status_code == 503 and r.json() == {"status": "DOWN"}
    assert bridge.get(thing).status_code == 200
    assert ditto.request_count[("PATCH", 503)] == 2 and ditto.request_count[("PATCH", 429)] == 1
    assert ("PATCH", f"/api/2/things/{RACK}", 204) in ditto.requests


def test_stop_and_restart_keeps_state():
    double = DittoDouble(USERS)
    with double:
        double.seed_policy(POLICY, standard_policy())
        s = requests.Session()
        s.auth = ("bridge", "pw2")
        assert s.put(f"{double.url}/api/2/things/{RACK}", json={"policyId": POLICY}).status_code == 201
        port = double.port
        double.stop()
        with pytest.raises(requests.ConnectionError):
            s.get(f"{double.url}/api/2/things/{RACK}", timeout=2)
        assert double.start() == f"http://127.0.0.1:{port}"
        assert s.get(f"{double.url}/api/2/things/{RACK}", timeout=2).status_code == 200
        double.assert_no_violations()


def test_unvalidated_mode_still_behaves_like_ditto():
    with DittoDouble(USERS, validate=False) as double:
        double.seed_policy(POLICY, standard_policy())
        double.seed_thing(RACK, {"policyId": POLICY})
        s = requests.Session()
        s.auth = ("bridge", "pw2")
        assert s.patch(f"{double.url}/api/2/things/{RACK}", json={"attributes": {}}).status_code == 415
        assert s.get(f"{double.url}/api/2/things/{RACK}").status_code == 200


def test_throughput_report(capsys):
    rates = measure_throughput(seconds=1.0, threads=4)
    with capsys.disabled():
        print(
            f"\nDitto double throughput (merge-PATCH/GET mix, 4 keep-alive clients): "
            f"{rates['validated']:.0f} req/s validated, {rates['unvalidated']:.0f} req/s unvalidated"
        )
    assert rates["validated"] > 0 and rates["unvalidated"] > 0


# ------------------------------------------------------------------------------------ WebSocket (/ws/2)


def ws_connect(ditto: DittoDouble, user: str, password: str | None = None):
    import base64

    from websockets.sync.client import connect

    token = base64.b64encode(f"{user}:{password or USERS[user]}".encode()).decode()
    return connect(ditto.url.replace("http://", "ws://") + "/ws/2", additional_headers={"Authorization": f"Basic {token}"},
                   open_timeout=5)


def ws_merge(thing_id: str, path: str, value, cid: str, **headers) -> str:
    namespace, _, name = thing_id.partition(":")
    return json.dumps({"topic": f"{namespace}/{name}/things/twin/commands/merge",
                       "headers": {"content-type": MERGE_PATCH, "correlation-id": cid, **headers},
                       "path": path, "value": value})


def test_websocket_merge_commands_behave_like_merge_patch(ditto):
    seed_rack(ditto, props={"tsTop": "2026-01-01T00:00:00.000Z"})
    with ws_connect(ditto, "bridge") as ws:
        ws.send(ws_merge(RACK, "/features/environment/properties", {"tempTop": 24.5, "tsTop": "2026-01-02T00:00:00.000Z"},
                         "c1", condition='lt(features/environment/properties/tsTop,"2026-01-02T00:00:00.000Z")'))
        answer = json.loads(ws.recv(timeout=5))
        assert answer == {"topic": "dc.racks/rack-a01/things/twin/commands/merge", "headers": {"correlation-id": "c1"},
                          "path": "/features/environment/properties", "status": 204}
        assert ditto.things[RACK]["features"]["environment"]["properties"]["tempTop"] == 24.5
        assert ditto.revision(RACK) == 2
        # The same condition again no longer holds: an error on the errors topic, nothing written.
        ws.send(ws_merge(RACK, "/", {"features": {"environment": {"properties": {"tempTop": 1.0}}}}, "c2",
                         condition='lt(features/environment/properties/tsTop,"2026-01-02T00:00:00.000Z")'))
        answer = json.loads(ws.recv(timeout=5))
        assert answer["topic"] == "dc.racks/rack-a01/things/twin/errors" and answer["status"] == 412
        assert answer["headers"]["correlation-id"] == "c2" and answer["value"]["status"] == 412
        assert ditto.revision(RACK) == 2
        # A merge at / of a thing that does not exist creates it and answers 201 with the thing.
        ws.send(ws_merge("dc.racks:rack-new", "/", {"policyId": POLICY, "attributes": {"rack": "new"}}, "c3"))
        answer = json.loads(ws.recv(timeout=5))
        assert answer["status"] == 201 and answer["value"]["thingId"] == "dc.racks:rack-new"
        # Control messages are acknowledged as Ditto does.
        ws.send("START-SEND-EVENTS?namespaces=dc.racks")
        assert ws.recv(timeout=5) == "START-SEND-EVENTS:ACK"
    with ws_connect(ditto, "grafana") as ws:  # read-only subject: the policy refuses the write
        ws.send(ws_merge(RACK, "/attributes", {"room": "r9"}, "c4"))
        answer = json.loads(ws.recv(timeout=5))
        assert answer["status"] == 403 and answer["topic"].endswith("/things/twin/errors")
    assert ditto.things[RACK]["attributes"] == {"room": "r1"}
    assert ditto.ws_commands == 4


def test_websocket_handshake_needs_basic_auth(ditto):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        ws_connect(ditto, "bridge", password="wrong")
    assert info.value.response.status_code == 401


def test_websocket_commands_that_break_the_protocol_or_the_contract_are_recorded(ditto):
    seed_rack(ditto)
    with ws_connect(ditto, "bridge") as ws:
        ws.send(json.dumps({"topic": "dc.racks/rack-a01/things/twin/commands/merge", "headers": {}, "path": "/",
                            "value": {}}))  # no correlation-id: nothing to answer
        ws.send(json.dumps({"topic": "dc.racks:rack-a01/merge", "headers": {"correlation-id": "t"}, "path": "/",
                            "value": {}}))
        assert json.loads(ws.recv(timeout=5))["status"] == 400
        found = take_violations(ditto, kind="protocol")
        assert "correlation-id" in found[0].reason and "topic" in found[1].reason

        ws.send(ws_merge(RACK, "/attributes", {"room": "r2"}, "ct", **{"content-type": "application/json"}))
        assert json.loads(ws.recv(timeout=5))["status"] == 400
        assert "content-type" in take_violations(ditto, kind="protocol")[0].reason

        ws.send(json.dumps({"topic": "dc.racks/rack-a01/things/twin/commands/merge",
                            "headers": {"correlation-id": "nv"}, "path": "/"}))
        assert json.loads(ws.recv(timeout=5))["status"] == 400
        assert "value" in take_violations(ditto, kind="protocol")[0].reason

        # The HTTP request a command stands for is validated against the OpenAPI contract.
        ws.send(ws_merge(RACK, "/featurez/x", {"a": 1}, "p"))
        assert json.loads(ws.recv(timeout=5))["status"] == 404
        assert "featurez" in take_violations(ditto)[0].reason

        ws.send(json.dumps({"topic": "dc.racks/rack-a01/things/twin/commands/retrieve",
                            "headers": {"correlation-id": "r"}, "path": "/"}))
        assert json.loads(ws.recv(timeout=5))["status"] == 501
        assert take_violations(ditto, kind="unimplemented")
    assert ditto.revision(RACK) == 1  # nothing was written


def test_websocket_command_paths_map_to_http_paths():
    from tests.doubles.ditto_ws import Command

    command = Command(ws_merge("dc.racks:rack a1", "/features/environment/properties", {}, "x"))
    assert command.problems == [] and command.thing_id == "dc.racks:rack a1"
    assert command.http_path() == "/api/2/things/dc.racks:rack%20a1/features/environment/properties"
    assert Command(ws_merge("dc.racks:r1", "/", {}, "x")).http_path() == "/api/2/things/dc.racks:r1"
