"""A contract double of Eclipse Ditto 3.9.6's HTTP API v2 as seen through Ditto's stock nginx.

In-process HTTP server (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive) that implements the subset
of Ditto RackTwin uses -- policies, things (incl. merge-PATCH, conditions, ETags, sub-resources),
search, whoami, /health -- and validates **every request and every response** against Ditto's OpenAPI
document (``ditto-api-2.yml``, located with :func:`tests.doubles.contracts.find_contract`) with openapi-core.

- A request that does not match the contract is recorded in :attr:`DittoDouble.violations` and refused
  (400 ``contract:request.invalid``; 404 for an unknown path, 405 for an unknown method, 415 for a
  PATCH that is not ``application/merge-patch+json``, 401 when nginx's basic auth fails first).
- A response of the double that does not match the contract is a bug in the double; it is recorded
  as a violation too (kind ``"response"``) and sent anyway.
- An operation that is in the contract but that the double does not implement is recorded (kind
  ``"unimplemented"``) and answered 501, so a test cannot pass by accident.

Behaviour follows ``shared/reference/ditto.md`` (cited as §n). Deliberate deviations:
- nginx answers a failed basic auth with an HTML page; the double answers 401 with an AdvancedError
  JSON body (and nginx's ``WWW-Authenticate`` header), as the brief asks.
- The search index is updated synchronously (Ditto's is eventually consistent, §2 Search).
- Error *codes* that ditto.md does not name are best effort; ditto.md: only ``status`` is stable API.

Spec errata applied in memory before openapi-core sees the document are listed in :data:`SPEC_ERRATA`.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from ..harness.http import QuietHTTPServer
from . import ditto_ws, rql
from .contracts import find_contract

__all__ = [
    "CONTRACT_NAME",
    "MERGE_PATCH",
    "OPENAPI_CORE_NOTES",
    "SPEC_ERRATA",
    "DittoDouble",
    "DittoError",
    "Fault",
    "Violation",
    "default_policy",
    "load_ditto_openapi",
    "measure_throughput",
    "merge_patch",
    "parse_fields",
    "project",
    "standard_policy",
    "valid_entity_id",
]

CONTRACT_NAME = "ditto-api-2.yml"
MAX_THING_BYTES = 100 * 1024  # LIMITS_THINGS_MAX_SIZE (§2 Size limits)
MAX_POLICY_BYTES = 100 * 1024
SEARCH_DEFAULT_SIZE = 25  # §2 Search
SEARCH_MAX_SIZE = 200
MERGE_PATCH = "application/merge-patch+json"
REGULAR_THING_FIELDS = ("thingId", "policyId", "definition", "attributes", "features")

# ------------------------------------------------------------------------------------- entity ids

# §2 Thing IDs: Ditto's RegexPatterns. Java's \w is ASCII-only, hence re.ASCII for the namespace.
_ENTITY_ID = re.compile(
    r"(?P<ns>|(?:[a-zA-Z]\w*)(?:[.-][a-zA-Z]\w*)*):(?P<name>[^\x00-\x1F\x7F-\xFF/]+)", re.ASCII
)
_JSON_KEY_INVALID = re.compile(r"[\x00-\x1F\x7F-\xFF/]")
_DELETION_KEY = re.compile(r"\{\{\s*~(.*)~\s*\}\}")  # Ditto's {{ ~regex~ }}: null key deletion


def _deletion_key(key: str) -> "re.Match[str] | None":
    return _DELETION_KEY.fullmatch(key) if key.startswith("{{") else None


def valid_entity_id(entity_id: str) -> bool:
    """Is ``entity_id`` a valid Ditto thing / policy id (namespace:name, at most 256 chars)?"""
    return isinstance(entity_id, str) and len(entity_id) <= 256 and bool(_ENTITY_ID.fullmatch(entity_id))


def namespace_of(entity_id: str) -> str:
    return entity_id.split(":", 1)[0]


# -------------------------------------------------------------------------------- policies helpers


def default_policy(policy_id: str, subject: str) -> dict[str, Any]:
    """The policy Ditto creates for a thing created without one (§3, ThingEnforcerActor#getDefaultPolicy)."""
    rw = {"grant": ["READ", "WRITE"], "revoke": []}
    return {
        "policyId": policy_id,
        "entries": {
            "DEFAULT": {
                "subjects": {subject: {"type": "generated"}},
                "resources": {"thing:/": dict(rw), "policy:/": dict(rw), "message:/": dict(rw)},
            }
        },
    }


def standard_policy(
    admins: Iterable[str] = ("ditto",),
    writers: Iterable[str] = ("bridge",),
    readers: Iterable[str] = ("grafana",),
    *,
    writers_manage_policy: bool = False,
) -> dict[str, Any]:
    """The shared policy of §3 (usernames, not subjects): admins manage policy and things, writers
    READ+WRITE things, readers READ things. ``writers_manage_policy`` also gives writers policy:/."""

    def entry(users: Iterable[str], resources: dict[str, list[str]]) -> dict[str, Any]:
        return {
            "subjects": {f"nginx:{u}": {"type": "nginx basic auth user"} for u in users},
            "resources": {r: {"grant": g, "revoke": []} for r, g in resources.items()},
        }

    writer_res = {"thing:/": ["READ", "WRITE"]}
    if writers_manage_policy:
        writer_res["policy:/"] = ["READ", "WRITE"]
    entries = {}
    for label, users, res in (
        ("admin", list(admins), {"policy:/": ["READ", "WRITE"], "thing:/": ["READ", "WRITE"]}),
        ("bridge", list(writers), writer_res),
        ("grafana", list(readers), {"thing:/": ["READ"]}),
    ):
        if users:
            entries[label] = entry(users, res)
    return {"entries": entries}


class _Enforcer:
    """Permission evaluation for one policy and one set of subjects (§3 "Rules that matter").

    Grants apply downwards from their resource path; a revoke on the path or an ancestor beats any grant.
    """

    __slots__ = ("grants", "revokes", "_memo")

    def __init__(self, policy: dict[str, Any] | None, subjects: Iterable[str]):
        self.grants: dict[str, dict[tuple[str, ...], set[str]]] = {}
        self.revokes: dict[str, dict[tuple[str, ...], set[str]]] = {}
        # An enforcer stands for one policy revision and one set of subjects, so its answers never change:
        # remembered, a twin update's dozen permission checks are dictionary look-ups.
        self._memo: dict[tuple[str, str, tuple[str, ...], str], bool] = {}
        subjects = set(subjects)
        if not policy:
            return
        for entry in (policy.get("entries") or {}).values():
            if not isinstance(entry, dict) or not subjects.intersection(entry.get("subjects") or {}):
                continue
            for key, perms in (entry.get("resources") or {}).items():
                rtype, _, rpath = key.partition(":")
                segs = _segments(rpath)
                self.grants.setdefault(rtype, {}).setdefault(segs, set()).update(perms.get("grant") or ())
                self.revokes.setdefault(rtype, {}).setdefault(segs, set()).update(perms.get("revoke") or ())

    def _remembered(self, check: Callable[[str, tuple[str, ...], str], bool], rtype: str, segs: tuple[str, ...],
                    perm: str) -> bool:
        key = (check.__name__, rtype, segs, perm)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 100_000:  # paths come from thing documents: bound it anyway
                self._memo.clear()
            found = self._memo[key] = check(rtype, segs, perm)
        return found

    def has(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        return self._remembered(self._has, rtype, segs, perm)

    def _has(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        grants, revokes = self.grants.get(rtype, {}), self.revokes.get(rtype, {})
        granted = False
        for i in range(len(segs) + 1):
            prefix = segs[:i]
            if perm in revokes.get(prefix, ()):
                return False
            if perm in grants.get(prefix, ()):
                granted = True
        return granted

    def has_unrestricted(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        return self._remembered(self._has_unrestricted, rtype, segs, perm)

    def _has_unrestricted(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        """Granted on ``segs`` and not revoked anywhere below it."""
        if not self.has(rtype, segs, perm):
            return False
        n = len(segs)
        return not any(
            perm in perms and len(p) > n and p[:n] == segs for p, perms in self.revokes.get(rtype, {}).items()
        )

    def has_partial(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        return self._remembered(self._has_partial, rtype, segs, perm)

    def _has_partial(self, rtype: str, segs: tuple[str, ...], perm: str) -> bool:
        """Granted on ``segs`` or on something below it."""
        if self.has(rtype, segs, perm):
            return True
        n = len(segs)
        return any(
            perm in perms and len(p) > n and p[:n] == segs and self.has(rtype, p, perm)
            for p, perms in self.grants.get(rtype, {}).items()
        )

    def view(self, rtype: str, doc: Any, perm: str = "READ", base: tuple[str, ...] = ()) -> Any:
        """The part of ``doc`` (located at ``base``) the subjects hold ``perm`` on; rql.MISSING if none."""
        if self.has_unrestricted(rtype, base, perm):
            return doc
        if isinstance(doc, dict):
            out = {}
            for key, value in doc.items():
                sub = self.view(rtype, value, perm, base + (key,))
                if sub is not rql.MISSING:
                    out[key] = sub
            if out or self.has(rtype, base, perm):
                return out
            return rql.MISSING
        return doc if self.has(rtype, base, perm) else rql.MISSING


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def _policy_problem(policy: dict[str, Any]) -> str | None:
    """Structural check of a policy's entries (the OpenAPI schema leaves entry labels unchecked)."""
    entries = policy.get("entries")
    if not isinstance(entries, dict):
        return "'entries' must be a JSON object"
    for label, entry in entries.items():
        if not isinstance(entry, dict):
            return f"entry {label!r} must be a JSON object"
        subjects, resources = entry.get("subjects"), entry.get("resources")
        if not isinstance(subjects, dict):
            return f"entry {label!r} needs a 'subjects' object"
        if not isinstance(resources, dict):
            return f"entry {label!r} needs a 'resources' object"
        for sid, sub in subjects.items():
            if ":" not in sid:
                return f"subject {sid!r} of entry {label!r} must be <issuer>:<subject>"
            if not isinstance(sub, dict) or not isinstance(sub.get("type"), str):
                return f"subject {sid!r} of entry {label!r} needs a 'type'"
        for key, perms in resources.items():
            rtype, colon, rpath = key.partition(":")
            if not colon or not rtype or not rpath.startswith("/"):
                return f"resource {key!r} of entry {label!r} must be <type>:/<path>"
            if not isinstance(perms, dict) or not isinstance(perms.get("grant"), list) or not isinstance(
                perms.get("revoke"), list
            ):
                return f"resource {key!r} of entry {label!r} needs 'grant' and 'revoke' arrays"
            for p in perms["grant"] + perms["revoke"]:
                if p not in ("READ", "WRITE", "EXECUTE"):
                    return f"unknown permission {p!r} in entry {label!r}"
    return None


def _policy_keeps_writer(policy: dict[str, Any]) -> bool:
    """PoliciesValidator: some entry with subjects holds WRITE on policy:/ (not revoked there)."""
    for entry in (policy.get("entries") or {}).values():
        if not entry.get("subjects"):
            continue
        res = (entry.get("resources") or {}).get("policy:/") or {}
        if "WRITE" in (res.get("grant") or ()) and "WRITE" not in (res.get("revoke") or ()):
            return True
    return False


# ---------------------------------------------------------------------------- JSON helpers


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch, plus Ditto's ``{{ ~regex~ }}: null`` key-deletion extension (§2)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        m = _deletion_key(key)
        if m and value is None:
            pattern = re.compile(m.group(1))
            for existing in [k for k in result if pattern.search(k)]:
                del result[existing]
    for key, value in patch.items():
        if value is None and _deletion_key(key):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    return value


def _touched_paths(patch: Any, base: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths a merge patch writes: every leaf (and every empty object) of the patch document."""
    if not isinstance(patch, dict) or not patch:
        yield base
        return
    for key, value in patch.items():
        if isinstance(value, dict) and value:
            yield from _touched_paths(value, base + (key,))
        else:
            yield base + (key,)


def _bad_json_key(value: Any, base: str = "") -> str | None:
    if isinstance(value, dict):
        for key, sub in value.items():
            if _deletion_key(key):
                continue
            if not key or _JSON_KEY_INVALID.search(key):
                return f"{base}/{key}"
            found = _bad_json_key(sub, f"{base}/{key}")
            if found:
                return found
    return None


def _get_path(doc: Any, segs: Iterable[str]) -> Any:
    for seg in segs:
        if not isinstance(doc, dict) or seg not in doc:
            return rql.MISSING
        doc = doc[seg]
    return doc


def _set_path(doc: dict[str, Any], segs: tuple[str, ...], value: Any) -> None:
    for seg in segs[:-1]:
        nxt = doc.get(seg)
        if not isinstance(nxt, dict):
            nxt = doc[seg] = {}
        doc = nxt
    doc[segs[-1]] = value


def _del_path(doc: dict[str, Any], segs: tuple[str, ...]) -> None:
    for seg in segs[:-1]:
        doc = doc[seg]
    del doc[segs[-1]]


class FieldSelectorError(ValueError):
    pass


def parse_fields(text: str) -> list[tuple[str, ...]]:
    """Ditto's field selector: ``thingId,attributes(model,location),features/*/properties/temperature``."""
    out: list[tuple[str, ...]] = []
    try:
        parts = rql.split_top_level(text)
    except rql.RqlError as exc:
        raise FieldSelectorError(str(exc)) from None
    for part in parts:
        m = re.fullmatch(r"([^()]*)\((.*)\)", part, re.DOTALL)
        if m:
            prefix = _segments(m.group(1))
            if not prefix:
                raise FieldSelectorError(f"missing field before '(' in {part!r}")
            out.extend(prefix + sub for sub in parse_fields(m.group(2)))
        elif "(" in part or ")" in part or not _segments(part):
            raise FieldSelectorError(f"invalid field {part!r}")
        else:
            out.append(_segments(part))
    return out


def project(doc: Any, pointers: list[tuple[str, ...]]) -> Any:
    """Only the selected pointers of ``doc`` (``*`` matches any key); missing ones are left out."""
    if not isinstance(doc, dict):
        return doc
    out: dict[str, Any] = {}
    for segs in pointers:
        _copy_selected(doc, out, segs)
    return out


def _copy_selected(src: dict[str, Any], dst: dict[str, Any], segs: tuple[str, ...]) -> None:
    head, rest = segs[0], segs[1:]
    for key in list(src) if head == "*" else [head]:
        if key not in src:
            continue
        if not rest:
            dst[key] = copy.deepcopy(src[key])
        elif isinstance(src[key], dict):
            created = key not in dst
            sub = dst.setdefault(key, {})
            if isinstance(sub, dict):
                _copy_selected(src[key], sub, rest)
                if created and not sub:
                    del dst[key]


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _etag_matches(header: str | None, current: str | None) -> bool:
    if header is None or current is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return any(t == "*" or t.removeprefix("W/") == current for t in tags)


def _hash_etag(value: Any) -> str:
    return '"hash:' + hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16] + '"'


# --------------------------------------------------------------------------------- the contract

SPEC_ERRATA: list[str] = [
    # Each entry: what is changed in memory, and why. The file on disk is never modified.
    "Thing._revision: type string -> integer. Ditto serialises the revision as a JSON number "
    "(things model Thing.JsonFields.REVISION is JsonFactory.newLongFieldDefinition('_revision')).",
    "NewThing.required [policyId] dropped. The same schema documents _policy and _copyPolicyFrom as "
    "alternatives, and ditto.md §2/§3 documents creating a thing without any (Ditto creates a default policy).",
    "Every application/merge-patch+json request body (PatchThing, Features, FeatureProperties, ...): $refs "
    "inlined, 'required' dropped and nested schemas made nullable. RFC 7396 patches are partial documents "
    "in which null deletes a key (ditto.md §2); PatchThing requires thingId and policyId, which would make "
    "every partial merge a violation.",
    "Request bodies of the leaf paths {attributePath} / {propertyPath} (PUT and PATCH): 'type: object' "
    "dropped. They hold any JSON value (ditto.md §2: PUT .../properties/temperature with body 24.1; the "
    "spec's own example for ?condition= sends 23.9).",
]

# Narrow accommodations of openapi-core (not spec changes):
OPENAPI_CORE_NOTES = [
    "openapi-core has no deserializer for application/merge-patch+json and would validate the raw bytes "
    "against the schema; it is registered as JSON.",
    "openapi-core's provider for the 'openIdConnect' security scheme accepts every request (with a "
    "warning). Ditto lists OpenIDConnect first in its global security, which would make the security "
    "requirement vacuous; the double maps it to 'an Authorization: Bearer token is present' (how OIDC "
    "tokens reach Ditto), so only NginxBasic (Basic) or Bearer credentials satisfy the contract.",
    "openapi-core's path templates match one segment per {param}; {attributePath}/{propertyPath} are JSON "
    "pointers of any depth, so for those the double passes the matched template (path_pattern) itself.",
    "Response bodies of requests with ?fields=: a selection legitimately leaves out thingId/policyId, which "
    "Thing marks required; 'required' errors are ignored for those responses only.",
    "Statuses Ditto/nginx produce but the operation does not document (415 for a non-merge-patch PATCH, "
    "injected 429/503/504, 202 for response-required=false) are checked against AdvancedError only.",
]


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as fh:
        return yaml.load(fh, Loader=loader)


def _resolve_refs(node: Any, spec: dict[str, Any], depth: int = 0) -> Any:
    if depth > 50:
        raise ValueError("recursive $ref in a merge-patch body schema")
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolve_refs(target, spec, depth + 1)
        return {k: _resolve_refs(v, spec, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v, spec, depth + 1) for v in node]
    return node


def _merge_patchify(schema: Any, top: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = {k: v for k, v in schema.items() if k != "required"}
    for key in ("properties",):
        if isinstance(out.get(key), dict):
            out[key] = {k: _merge_patchify(v, False) for k, v in out[key].items()}
    for key in ("additionalProperties", "items", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _merge_patchify(out[key], False)
    for key in ("allOf", "oneOf", "anyOf"):
        if isinstance(out.get(key), list):
            out[key] = [_merge_patchify(v, False) for v in out[key]]
    if not top:
        out["nullable"] = True
    return out


def _apply_errata(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    revision = dict(schemas["Thing"]["properties"]["_revision"])
    revision["type"] = "integer"
    schemas["Thing"]["properties"]["_revision"] = revision
    schemas["NewThing"].pop("required", None)
    for path, item in spec["paths"].items():
        leaf = path.endswith("{attributePath}") or path.endswith("{propertyPath}")
        for method, op in item.items():
            if not isinstance(op, dict) or "requestBody" not in op:
                continue
            body = _resolve_refs(op["requestBody"], spec)
            content = body.get("content", {})
            changed = False
            if leaf and method in ("put", "patch"):
                for media in content.values():
                    if isinstance(media.get("schema"), dict) and media["schema"].get("type") == "object":
                        media["schema"] = {k: v for k, v in media["schema"].items() if k != "type"}
                        changed = True
            if MERGE_PATCH in content:
                content[MERGE_PATCH]["schema"] = _merge_patchify(content[MERGE_PATCH].get("schema", {}), top=not leaf)
                changed = True
            if changed:
                op["requestBody"] = body


_OPENAPI_LOCK = threading.Lock()
_OPENAPI_CACHE: dict[str, tuple[Any, dict[str, Any]]] = {}


def load_ditto_openapi(path: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """(openapi_core.OpenAPI, errata-applied spec dict) for Ditto's contract; built once per process and path."""
    resolved = Path(path) if path else find_contract(CONTRACT_NAME)
    key = str(resolved.resolve())
    with _OPENAPI_LOCK:
        cached = _OPENAPI_CACHE.get(key)
        if cached:
            return cached
        from openapi_core import Config, OpenAPI
        from openapi_core.deserializing.media_types.util import json_loads
        from openapi_core.security.exceptions import SecurityProviderError
        from openapi_core.security.factories import SecurityProviderFactory
        from openapi_core.security.providers import BaseProvider

        class BearerTokenProvider(BaseProvider):
            """openIdConnect: the ID token is sent as ``Authorization: Bearer <token>``."""

            def __call__(self, parameters: Any) -> Any:
                auth = parameters.header.get("Authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise SecurityProviderError("OpenID Connect needs an Authorization: Bearer token")
                return token

        from openapi_core.validation.request.exceptions import MissingParameter
        from openapi_core.validation.request.validators import V30RequestValidator
        from openapi_core.validation.response.validators import V30ResponseValidator

        class CachedPathFinding:
            """Path finding is a pure function of (method, url); openapi-core redoes it on every call."""

            def _find_path(self, request: Any) -> Any:
                key = (request.method, request.host_url, getattr(request, "path_pattern", None) or request.path)
                cache = self.__dict__.setdefault("_found_paths", {})
                hit = cache.get(key)
                if hit is None:
                    hit = super()._find_path(request)  # type: ignore[misc]
                    if len(cache) > 8192:
                        cache.clear()
                    cache[key] = hit
                return hit

        class RequestValidator(CachedPathFinding, V30RequestValidator):
            def _get_parameter(self, parameters: Any, param: Any) -> Any:
                # Same outcome as openapi-core, minus building deserializers/casters for every optional
                # parameter the request does not carry (Ditto's operations declare ~10 each; that cost
                # dominated validation). Absent + not required is "missing" either way.
                name = (param / "name").read_str()
                location = (param / "in").read_str()
                if name not in parameters[location] and not (param / "required").read_bool(default=False):
                    raise MissingParameter(name, location)
                return super()._get_parameter(parameters, param)

        class ResponseValidator(CachedPathFinding, V30ResponseValidator):
            pass

        security = SecurityProviderFactory()
        security.PROVIDERS = {**SecurityProviderFactory.PROVIDERS, "openIdConnect": BearerTokenProvider}

        spec = _load_yaml(resolved)
        _apply_errata(spec)
        config = Config(
            extra_media_type_deserializers={MERGE_PATCH: json_loads},
            security_provider_factory=security,
            request_validator_cls=RequestValidator,
            response_validator_cls=ResponseValidator,
        )
        api = OpenAPI.from_dict(spec, config=config)
        _OPENAPI_CACHE[key] = (api, spec)
        return api, spec


# ------------------------------------------------------------------------- openapi-core adapters


class _OARequest:
    """openapi_core.protocols.Request (+ SupportsPathPattern when ``path_pattern`` is given)."""

    def __init__(self, ctx: "_Ctx", path_pattern: str | None = None, path_params: dict[str, str] | None = None):
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        self.host_url = ctx.host_url
        self.path = ctx.raw_path
        self.method = ctx.method.lower()
        self.body = ctx.body or None
        self.content_type = ctx.content_type
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(ctx.query), header=Headers(ctx.header_items), path=dict(path_params or {})
        )
        if path_pattern:
            self.path_pattern = path_pattern


class _OAResponse:
    def __init__(self, status: int, data: bytes | None, headers: list[tuple[str, str]], content_type: str):
        from werkzeug.datastructures import Headers

        self.status_code = status
        self.data = data or None
        self.headers = Headers(headers)
        self.content_type = content_type


# ------------------------------------------------------------------------------------ data types


class Violation(NamedTuple):
    """A contract violation (or unimplemented operation) the double observed."""

    method: str
    path: str
    reason: str
    kind: str = "request"  # request | response | unimplemented

    def __str__(self) -> str:
        return f"[{self.kind}] {self.method} {self.path}: {self.reason}"


@dataclass
class Fault:
    """An injected fault; see :meth:`DittoDouble.inject`."""

    status: int | None
    remaining: int | None
    until: float | None
    delay: float | None
    paths_prefix: str
    used: int = 0

    def active(self, now: float) -> bool:
        return (self.remaining is None or self.remaining > 0) and (self.until is None or now < self.until)


class DittoError(Exception):
    """An error answer in Ditto's AdvancedError shape."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        description: str | None = None,
        headers: list[tuple[str, str]] | None = None,
    ):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.description, self.headers = description, headers or []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "error": self.error, "message": self.message}
        if self.description:
            out["description"] = self.description
        return out


@dataclass
class _Ctx:
    method: str
    raw_path: str
    query: list[tuple[str, str]]
    header_items: list[tuple[str, str]]
    headers: Message
    body: bytes
    content_type: str
    host_url: str
    user: str | None = None
    subjects: list[str] = field(default_factory=list)

    @property
    def mime(self) -> str:
        return self.content_type.split(";", 1)[0].strip()

    def param(self, name: str) -> str | None:
        for key, value in self.query:
            if key == name:
                return value
        return None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json_body(self) -> Any:
        if not self.body:
            raise DittoError(400, "json.invalid", "The request body is missing; a JSON document was expected.")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DittoError(400, "json.invalid", f"Failed to parse JSON body: {exc}") from None


@dataclass
class _Resp:
    status: int
    body: Any = None  # JSON-serialisable, or None for no body
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes | None = None
    content_type: str = "application/json"
    spec_checked: bool = True  # False: status is not part of the operation's contract (body checked as AdvancedError)


_NO_BODY_STATUSES = (204, 304)
# Statuses nginx or Ditto produce for any operation although most operations do not document them:
# 202 (response-required=false), 401 (nginx basic auth), 415 (non-merge-patch PATCH), 429/5xx (overload,
# startup, injected faults). Where the operation lacks them, the body is checked against AdvancedError.
_INFRA_STATUSES = frozenset({202, 401, 415, 429, 502, 503, 504})


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------------- HTTP plumbing


class _Server(QuietHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], double: "DittoDouble"):
        self.double = double
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
            self.double.connection_count += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._open_lock:
            socks = list(self._open)
            self._open.clear()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nginx"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are dropped after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def version_string(self) -> str:
        return "nginx"

    def setup(self) -> None:
        super().setup()
        # Responses go out in one write, and Nagle must not hold back small segments behind the client's
        # delayed ACK (that costs ~40 ms per keep-alive request otherwise).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _serve(self) -> None:
        self.server.double._serve(self)  # type: ignore[attr-defined]

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = do_HEAD = do_OPTIONS = _serve


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            line = handler.rfile.readline(65537)
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while handler.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                break
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline(65537)
        return b"".join(chunks)
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length > 0 else b""


# ----------------------------------------------------------------------------------- the double

_THING_SUB = re.compile(r"/api/2/things/([^/]*)/(attributes|features|definition|policyId)(/.*)?")


class DittoDouble:
    """Eclipse Ditto 3.9.6 HTTP API v2 behind nginx basic auth, validated against the OpenAPI contract.

    ``users`` maps nginx basic-auth usernames to passwords; the Ditto subject of user ``u`` is ``nginx:u``.
    """

    def __init__(
        self,
        users: dict[str, str],
        validate: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        contract: str | Path | None = None,
        max_logged_requests: int = 10_000,
    ):
        self.users = dict(users)
        self.validate = validate
        self.host = host
        self.port = port
        self._contract = contract
        self._api: Any = None
        self._spec: dict[str, Any] | None = None
        self._query_names: dict[tuple[str, str], frozenset[str]] = {}
        self._error_validator: Any = None
        if validate:
            self._load_contract()
        self._lock = threading.RLock()
        self._validate_lock = threading.Lock()
        self.things: dict[str, dict[str, Any]] = {}
        self.thing_meta: dict[str, dict[str, Any]] = {}  # thingId -> {revision, created, modified}
        self.policies: dict[str, dict[str, Any]] = {}
        self.policy_meta: dict[str, dict[str, Any]] = {}
        self.violations: list[Violation] = []
        self.requests: deque[tuple[str, str, int]] = deque(maxlen=max_logged_requests)
        self.request_count: Counter[tuple[str, int]] = Counter()
        self.faults: list[Fault] = []
        self.connection_count = 0  # TCP connections accepted (keep-alive reuse keeps this low)
        self.ws_commands = 0  # Ditto Protocol commands answered over /ws/2
        self._enforcers: dict[tuple[str, int, tuple[str, ...]], _Enforcer] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Start serving (again, on the same port after a stop); returns the base URL."""
        if self._server is not None:
            return self.url
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"ditto-double:{self.port}", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and drop open keep-alive connections (as a crashed/stopped Ditto would)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if self._thread:
            self._thread.join(timeout=5)
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "DittoDouble":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def reset(self) -> None:
        """Forget all things, policies, recorded requests, violations and faults."""
        with self._lock:
            self.things.clear()
            self.thing_meta.clear()
            self.policies.clear()
            self.policy_meta.clear()
            self._enforcers.clear()
            self.violations.clear()
            self.requests.clear()
            self.request_count.clear()
            self.ws_commands = 0
            self.faults.clear()

    def assert_no_violations(self) -> None:
        with self._lock:
            found = list(self.violations)
        if found:
            raise AssertionError(
                f"{len(found)} Ditto contract violation(s):\n" + "\n".join(f"  {v}" for v in found)
            )

    def clear_violations(self) -> list[Violation]:
        with self._lock:
            found = list(self.violations)
            self.violations.clear()
            return found

    def seed_policy(self, policy_id: str, policy_json: dict[str, Any]) -> dict[str, Any]:
        """Store a policy directly (no HTTP, no permission checks). Returns the stored JSON."""
        if not valid_entity_id(policy_id):
            raise ValueError(f"invalid policy id {policy_id!r}")
        problem = _policy_problem(policy_json)
        if problem:
            raise ValueError(problem)
        stored = {"policyId": policy_id, **{k: copy.deepcopy(v) for k, v in policy_json.items() if k != "policyId"}}
        with self._lock:
            self._store_policy(policy_id, stored)
        return stored

    def seed_thing(self, thing_id: str, thing_json: dict[str, Any]) -> dict[str, Any]:
        """Store a thing directly (no HTTP, no permission checks). Without ``policyId`` it gets the policy
        with the thing's id, which must then exist (seed it first). Returns the stored JSON."""
        if not valid_entity_id(thing_id):
            raise ValueError(f"invalid thing id {thing_id!r}")
        stored = {"thingId": thing_id, "policyId": thing_json.get("policyId", thing_id)}
        for key in ("definition", "attributes", "features"):
            if key in thing_json:
                stored[key] = copy.deepcopy(thing_json[key])
        with self._lock:
            self._store_thing(thing_id, stored)
        return stored

    def revision(self, thing_id: str) -> int | None:
        meta = self.thing_meta.get(thing_id)
        return meta["revision"] if meta else None

    def inject(
        self,
        status: int | None = None,
        count: int | None = None,
        duration: float | None = None,
        delay: float | None = None,
        paths_prefix: str = "/api/2/things",
    ) -> Fault:
        """Answer ``status`` (429 -> ``things:thing.toomanymodifyingrequests``, 503 -> unavailable, 502 ->
        nginx's HTML page, ...) and/or sleep ``delay`` seconds first, for requests whose path starts with
        ``paths_prefix``: the next ``count`` of them, or for ``duration`` seconds, or until :meth:`clear_faults`.
        A delay without a status answers normally afterwards (simulates a slow Ditto / client timeouts)."""
        if status is None and delay is None:
            raise ValueError("inject needs a status or a delay")
        if status is not None and not (400 <= status <= 599):
            raise ValueError("status must be 4xx or 5xx")
        fault = Fault(
            status=status,
            remaining=count,
            until=time.monotonic() + duration if duration is not None else None,
            delay=delay,
            paths_prefix=paths_prefix,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    # ------------------------------------------------------------------ contract

    def _load_contract(self) -> None:
        self._api, self._spec = load_ditto_openapi(self._contract)
        from openapi_schema_validator import OAS30Validator

        self._error_validator = OAS30Validator(self._spec["components"]["schemas"]["AdvancedError"])
        names: dict[tuple[str, str], frozenset[str]] = {}
        for path, item in self._spec["paths"].items():
            common = [self._deref(p) for p in item.get("parameters", [])]
            for method, op in item.items():
                if method == "parameters" or not isinstance(op, dict):
                    continue
                params = common + [self._deref(p) for p in op.get("parameters", [])]
                names[(path, method)] = frozenset(p["name"] for p in params if p.get("in") == "query")
        self._query_names = names

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self._spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def _check_request(self, ctx: _Ctx, pattern: str | None, pparams: dict[str, str] | None) -> tuple[str | None, list[str], str | None]:
        """Validate the request. Returns (problem kind or None, reasons, matched path template)."""
        from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound, PathError
        from openapi_core.templating.security.exceptions import SecurityNotFound
        from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
        from openapi_core.validation.request.exceptions import SecurityValidationError

        oareq = _OARequest(ctx, pattern, pparams)
        with self._validate_lock:
            try:
                found = self._api.request_validator._find_path(oareq)
                template = found.path_result.pattern
            except PathError:
                found, template = None, None
            errors = list(self._api.iter_request_errors(oareq))
        kind: str | None = None
        reasons = []
        for err in errors:
            cause = err.__cause__
            reasons.append(f"{type(err).__name__}: {err}" + (f" ({cause})" if cause and str(cause) not in str(err) else ""))
            if isinstance(err, PathNotFound):
                kind = "path"
            elif isinstance(err, OperationNotFound):
                kind = kind or "method"
            elif isinstance(err, (SecurityNotFound, SecurityValidationError)) or isinstance(cause, SecurityNotFound):
                kind = kind or "security"
            elif isinstance(cause, MediaTypeNotFound):
                # Ditto's gateway (ContentTypeValidationDirective) answers 415 for these.
                kind = kind or "content-type"
            else:
                kind = kind or "invalid"
        if found is not None and template is not None:
            allowed = self._query_names.get((template, ctx.method.lower()), frozenset())
            unknown = sorted({k for k, _ in ctx.query if k not in allowed})
            if unknown:
                kind = kind or "invalid"
                reasons.append(f"query parameter(s) {unknown} not defined for {ctx.method} {template}")
            dupes = sorted(k for k, n in Counter(k for k, _ in ctx.query).items() if n > 1)
            if dupes:
                kind = kind or "invalid"
                reasons.append(f"query parameter(s) {dupes} given more than once")
        return kind, reasons, template

    def _check_response(
        self, ctx: _Ctx, resp: _Resp, data: bytes, pattern: str | None, pparams: dict[str, str] | None, request_ok: bool
    ) -> list[str]:
        from openapi_core.templating.paths.exceptions import PathError
        from openapi_core.templating.responses.exceptions import ResponseNotFound

        if not resp.spec_checked:
            return []
        reasons: list[str] = []
        if resp.status in _NO_BODY_STATUSES and data:
            reasons.append(f"status {resp.status} must not carry a body")
        if not request_ok:
            # The request itself broke the contract; the answer to it is only checked for its shape.
            return reasons + self._check_error_shape(resp)
        oareq = _OARequest(ctx, pattern, pparams)
        oaresp = _OAResponse(resp.status, data, resp.headers, resp.content_type if data else "")
        with self._validate_lock:
            errors = list(self._api.iter_response_errors(oareq, oaresp))
        fields_selected = ctx.param("fields") is not None or (ctx.method == "POST" and b"fields=" in ctx.body)
        for err in errors:
            if isinstance(err, PathError):
                continue
            if isinstance(err, ResponseNotFound) and resp.status in _INFRA_STATUSES:
                reasons.extend(self._check_error_shape(resp))
                continue
            cause = err.__cause__
            schema_errors = getattr(cause, "schema_errors", None)
            if schema_errors is not None and fields_selected:
                remaining = [e for e in schema_errors if e.validator != "required"]
                if remaining:
                    reasons.append(f"{type(err).__name__}: " + "; ".join(e.message for e in remaining))
                continue
            reasons.append(f"{type(err).__name__}: {err}" + (f" ({cause})" if cause and str(cause) not in str(err) else ""))
        return reasons

    def _check_error_shape(self, resp: _Resp) -> list[str]:
        if resp.status in _NO_BODY_STATUSES or resp.status == 202 or resp.content_type != "application/json":
            return []
        return [f"not an AdvancedError: {e.message}" for e in self._error_validator.iter_errors(resp.body)]

    # ------------------------------------------------------------------ request entry point

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        if (handler.headers.get("Upgrade") or "").lower() == "websocket":
            self._serve_websocket(handler)
            return
        try:
            body = _read_body(handler)
        except (ValueError, OSError):
            handler.close_connection = True
            return
        split = urlsplit(handler.path)
        host = handler.headers.get("Host") or f"{self.host}:{self.port}"
        ctx = _Ctx(
            method=handler.command.upper(),
            raw_path=split.path,
            query=parse_qsl(split.query, keep_blank_values=True),
            header_items=list(handler.headers.items()),
            headers=handler.headers,
            body=body,
            content_type=(handler.headers.get("Content-Type") or "").lower(),
            host_url=f"http://{host}",
        )
        try:
            resp, data, pattern, pparams = self._dispatch(ctx)
        except _Stop:
            handler.close_connection = True
            return
        self._send(handler, ctx, resp, data)

    def _note(self, ctx: _Ctx, status: int) -> None:
        with self._lock:
            self.requests.append((ctx.method, ctx.raw_path, status))
            self.request_count[(ctx.method, status)] += 1

    def _answered(self, ctx: _Ctx, resp: _Resp) -> None:
        """Called once the answer to a request or WebSocket command is out (a hook for recording subclasses)."""

    def _send(self, handler: BaseHTTPRequestHandler, ctx: _Ctx, resp: _Resp, data: bytes) -> None:
        self._note(ctx, resp.status)
        try:
            handler.send_response(resp.status)
            for key, value in resp.headers:
                handler.send_header(key, value)
            if data or resp.status not in _NO_BODY_STATUSES:
                handler.send_header("Content-Type", resp.content_type)
            # Content-Length on every response, so keep-alive framing never depends on closing the
            # connection. RFC 9110 §8.6 forbids it on 204 (and it is meaningless on 304); those two are
            # framed by their status alone, and nginx strips it there too.
            if resp.status not in _NO_BODY_STATUSES:
                handler.send_header("Content-Length", str(len(data)))
            # end_headers() without the separate body write: status line, headers and body in one send.
            handler._headers_buffer.append(b"\r\n")  # type: ignore[attr-defined]
            if ctx.method != "HEAD" and resp.status not in _NO_BODY_STATUSES:
                handler._headers_buffer.append(data)  # type: ignore[attr-defined]
            handler.flush_headers()
        except OSError:
            handler.close_connection = True
            return
        self._answered(ctx, resp)

    # ------------------------------------------------------------------ WebSocket (/ws/2, Ditto Protocol)

    def _serve_websocket(self, handler: BaseHTTPRequestHandler) -> None:
        """nginx's ``location /ws``: basic auth, then the upgrade; each text message is one command."""
        handler.close_connection = True
        split = urlsplit(handler.path)
        ctx = _Ctx("GET", split.path, [], list(handler.headers.items()), handler.headers, b"", "", "")
        problems = ditto_ws.handshake_problems(handler.headers)
        if split.path != "/ws/2":
            problems.append(f"{split.path} is not Ditto's WebSocket endpoint /ws/2")
        if problems:
            self._record(ctx, "; ".join(problems), "websocket")
            resp = self._error_resp(DittoError(400, "gateway:websocket.invalid", "; ".join(problems)))
            self._send(handler, ctx, resp, self._encode(resp))
            return
        user = self._authenticate(ctx)
        if user is None:
            resp = self._auth_failed()
            self._send(handler, ctx, resp, self._encode(resp))
            return
        handler.send_response(101, "Switching Protocols")
        handler.send_header("Upgrade", "websocket")
        handler.send_header("Connection", "Upgrade")
        handler.send_header("Sec-WebSocket-Accept", ditto_ws.accept_key(handler.headers["Sec-WebSocket-Key"]))
        handler.end_headers()
        handler.connection.settimeout(None)  # nginx keeps /ws open for a day
        authorization = handler.headers.get("Authorization") or ""
        host_url = f"http://{handler.headers.get('Host') or f'{self.host}:{self.port}'}"
        fragments: list[bytes] = []
        try:
            while (got := ditto_ws.read_frame(handler.rfile)) is not None:
                fin, opcode, masked, payload = got
                if not masked:
                    self._record(ctx, "a client frame is not masked (RFC 6455 §5.1)", "websocket")
                if opcode == ditto_ws.OP_CLOSE:
                    handler.wfile.write(ditto_ws.frame(ditto_ws.OP_CLOSE, payload[:2]))
                    return
                if opcode == ditto_ws.OP_PING:
                    handler.wfile.write(ditto_ws.frame(ditto_ws.OP_PONG, payload))
                    continue
                if opcode in (ditto_ws.OP_TEXT, ditto_ws.OP_CONT):
                    fragments.append(payload)
                    if not fin:
                        continue
                    text, fragments = b"".join(fragments).decode("utf-8", errors="replace"), []
                    reply = self._ws_command(authorization, host_url, text)
                    if reply is not None:
                        handler.wfile.write(ditto_ws.frame(ditto_ws.OP_TEXT, reply[0].encode()))
                        if reply[1] is not None:
                            self._answered(*reply[1])
                elif opcode != ditto_ws.OP_PONG:
                    self._record(ctx, f"opcode {opcode:#x}: Ditto Protocol messages are UTF-8 text", "websocket")
        except (OSError, ValueError):
            return

    def _ws_command(self, authorization: str, host_url: str, text: str) -> tuple[str, tuple[_Ctx, _Resp] | None] | None:
        """Answer one Ditto Protocol message, via the HTTP request it stands for."""
        if text.startswith(("START-SEND-", "STOP-SEND-")):
            return text.split("?", 1)[0] + ":ACK", None
        command = ditto_ws.Command(text)
        ws_ctx = _Ctx("WS", "/ws/2", [], [], Message(), text.encode(), "", host_url)
        if command.action and command.action != "merge":
            command.problems.append(f"the double implements merge commands only, not {command.action!r}")
            self._record(ws_ctx, "; ".join(command.problems), "unimplemented")
            return command.response(501, {"status": 501, "error": "double:unimplemented", "message": command.problems[-1]}), None
        if command.problems:
            self._record(ws_ctx, "; ".join(command.problems), "protocol")
            if command.correlation_id is None:
                return None  # Ditto could not address an answer either
            return command.response(400, {"status": 400, "error": "protocol:message.invalid",
                                          "message": "; ".join(command.problems)}), None
        headers = Message()
        headers["Authorization"] = authorization
        headers["Content-Type"] = MERGE_PATCH
        headers["correlation-id"] = command.correlation_id
        condition = command.headers.get("condition")
        for name in ("if-match", "if-none-match"):  # same semantics as on HTTP (Ditto's protocol specification)
            if isinstance(command.headers.get(name), str):
                headers[name] = command.headers[name]
        ctx = _Ctx(
            method="PATCH",
            raw_path=command.http_path(),
            query=[("condition", condition)] if isinstance(condition, str) else [],
            header_items=list(headers.items()),
            headers=headers,
            body=json.dumps(command.value).encode(),
            content_type=MERGE_PATCH,
            host_url=host_url,
        )
        try:
            resp, _, _, _ = self._dispatch(ctx)
        except _Stop:
            raise OSError("double stopping") from None
        self._note(ctx, resp.status)
        with self._lock:
            self.ws_commands += 1
        return command.response(resp.status, resp.body), (ctx, resp)

    def _encode(self, resp: _Resp) -> bytes:
        if resp.raw is not None:
            return resp.raw
        if resp.body is None:
            return b""
        return json.dumps(resp.body, separators=(",", ":"), ensure_ascii=False).encode()

    def _record(self, ctx: _Ctx, reason: str, kind: str) -> None:
        with self._lock:
            self.violations.append(Violation(ctx.method, ctx.raw_path + (("?" + "&".join(f"{k}={v}" for k, v in ctx.query)) if ctx.query else ""), reason, kind))

    def _dispatch(self, ctx: _Ctx) -> tuple[_Resp, bytes, str | None, dict[str, str] | None]:
        corr = ctx.header("correlation-id") or str(uuid.uuid4())
        pattern, pparams = self._path_pattern(ctx.raw_path)
        if ctx.raw_path == "/health":
            resp = self._apply_fault(ctx) or (
                _Resp(200, {"status": "UP"}) if ctx.method in ("GET", "HEAD") else _Resp(405, {"status": 405, "error": "method.notallowed", "message": "Only GET"}, [("Allow", "GET")])
            )
            if resp.status == 503 and resp.body and resp.body.get("error"):
                resp = _Resp(503, {"status": "DOWN"})
            return resp, self._encode(resp), None, None
        kind, reasons, template = (None, [], None)
        if self.validate:
            kind, reasons, template = self._check_request(ctx, pattern, pparams)
        elif not ctx.raw_path.startswith("/api/2/"):
            kind, reasons = "path", ["not part of Ditto's HTTP API v2"]
        if kind:
            self._record(ctx, "; ".join(reasons), "request")
        user = self._authenticate(ctx)
        if ctx.raw_path.startswith("/api") and user is None:
            resp = self._auth_failed()
        elif kind and kind != "security":
            resp = self._contract_error(ctx, kind, reasons)
        else:
            ctx.user, ctx.subjects = user, [f"nginx:{user}"]
            resp = self._apply_fault(ctx)
            if resp is None:
                try:
                    resp = self._route(ctx)
                except DittoError as err:
                    resp = self._error_resp(err)
                    if err.status == 501:
                        resp.spec_checked = False  # the double's own gap, already recorded
        resp.headers.append(("correlation-id", corr))
        data = self._encode(resp)
        if self.validate and ctx.raw_path.startswith("/api") and kind not in ("path", "method"):
            problems = self._check_response(ctx, resp, data, pattern, pparams, request_ok=kind is None)
            if problems:
                self._record(ctx, f"response {resp.status}: " + "; ".join(problems), "response")
        return resp, data, pattern, pparams

    def _path_pattern(self, raw_path: str) -> tuple[str | None, dict[str, str] | None]:
        """Template + raw params for JSON-pointer leaf paths openapi-core cannot match itself."""
        m = _THING_SUB.fullmatch(raw_path)
        if not m or not m.group(3):
            return None, None
        tid, top, rest = m.group(1), m.group(2), m.group(3)[1:]
        parts = rest.split("/")
        if top == "attributes" and len(parts) > 1:
            return "/api/2/things/{thingId}/attributes/{attributePath}", {"thingId": tid, "attributePath": rest}
        if top == "features" and len(parts) > 3 and parts[1] in ("properties", "desiredProperties"):
            return (
                "/api/2/things/{thingId}/features/{featureId}/" + parts[1] + "/{propertyPath}",
                {"thingId": tid, "featureId": parts[0], "propertyPath": "/".join(parts[2:])},
            )
        return None, None

    def _contract_error(self, ctx: _Ctx, kind: str, reasons: list[str]) -> _Resp:
        text = "; ".join(reasons)
        if kind == "path":
            resp = self._error_resp(DittoError(404, "contract:path.unknown", f"{ctx.raw_path} is not part of Ditto's HTTP API.", text))
        elif kind == "method":
            resp = self._error_resp(DittoError(405, "contract:method.notallowed", f"{ctx.method} is not allowed on {ctx.raw_path}.", text))
        elif kind == "content-type":
            allowed = MERGE_PATCH if ctx.method == "PATCH" else "application/json"
            if ctx.raw_path.startswith("/api/2/search"):
                allowed = "application/x-www-form-urlencoded"
            resp = self._error_resp(DittoError(
                415, "mediatype.unsupported",
                f"The Media-Type <{ctx.mime}> is not supported for this Resource.",
                f"Allowed Media-Types are: <{allowed}>.",
            ))
        else:
            resp = self._error_resp(DittoError(400, "contract:request.invalid", "The request does not match Ditto's OpenAPI contract.", text))
        return resp

    def _auth_failed(self) -> _Resp:
        """nginx's answer to a missing or wrong basic-auth login (as JSON, see the module docstring)."""
        return self._error_resp(DittoError(
            401, "gateway:authentication.failed", "Unauthorized: basic authentication failed.",
            "Send valid nginx basic-auth credentials.", [("WWW-Authenticate", 'Basic realm="Authentication required"')],
        ))

    def _error_resp(self, err: DittoError) -> _Resp:
        return _Resp(err.status, err.body(), list(err.headers))

    def _authenticate(self, ctx: _Ctx) -> str | None:
        auth = ctx.header("Authorization") or ""
        scheme, _, encoded = auth.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user if user in self.users and self.users[user] == password else None

    def _apply_fault(self, ctx: _Ctx) -> _Resp | None:
        now = time.monotonic()
        with self._lock:
            self.faults = [f for f in self.faults if f.active(now)]
            fault = next((f for f in self.faults if ctx.raw_path.startswith(f.paths_prefix)), None)
            if fault is None:
                return None
            fault.used += 1
            if fault.remaining is not None:
                fault.remaining -= 1
        if fault.delay:
            if self._stopping.wait(fault.delay):
                raise _Stop()
        if fault.status is None:
            return None
        return self._fault_response(ctx, fault.status)

    def _fault_response(self, ctx: _Ctx, status: int) -> _Resp:
        if status == 502:
            html = (
                "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
                "</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
            ).encode()
            return _Resp(502, raw=html, content_type="text/html")
        area = "policies" if ctx.raw_path.startswith("/api/2/policies") else "things"
        if ctx.raw_path.startswith("/api/2/search"):
            area = "thing-search"
        codes = {
            429: (f"{area}:{'policy' if area == 'policies' else 'thing'}.toomanymodifyingrequests",
                  "Too many modifying requests are already outstanding to the entity."),
            503: (f"{area}:{'policy' if area == 'policies' else 'thing'}.unavailable",
                  "The service is currently unavailable."),
            504: ("gateway:service.timeout", "The service did not respond within the timeout."),
        }
        error, message = codes.get(status, (f"{area}:fault.injected", f"Injected fault {status}."))
        if area == "thing-search" and status == 503:
            error = "thing-search:search.unavailable"
        return self._error_resp(DittoError(status, error, message, "Injected by the test double."))

    # ------------------------------------------------------------------ routing

    def _route(self, ctx: _Ctx) -> _Resp:
        path, method = ctx.raw_path, ctx.method
        if path == "/api/2/whoami" and method == "GET":
            return _Resp(200, {"defaultSubject": ctx.subjects[0], "subjects": list(ctx.subjects)})
        if path == "/api/2/search/things" and method in ("GET", "POST"):
            return self._search(ctx, self._search_params(ctx), count_only=False)
        if path == "/api/2/search/things/count" and method in ("GET", "POST"):
            return self._search(ctx, self._search_params(ctx), count_only=True)
        if path == "/api/2/things" and method == "GET":
            return self._multi_get(ctx)
        m = re.fullmatch(r"/api/2/policies/([^/]*)", path)
        if m and method in ("GET", "PUT", "DELETE"):
            pid = unquote(m.group(1))
            return {"GET": self._get_policy, "PUT": self._put_policy, "DELETE": self._delete_policy}[method](ctx, pid)
        m = re.fullmatch(r"/api/2/things/([^/]*)", path)
        if m and method in ("GET", "PUT", "PATCH", "DELETE"):
            tid = unquote(m.group(1))
            handler = {"GET": self._get_thing, "PUT": self._put_thing, "PATCH": self._patch_thing, "DELETE": self._delete_thing}
            return handler[method](ctx, tid)
        m = _THING_SUB.fullmatch(path)
        if m and method in ("GET", "PUT", "PATCH", "DELETE"):
            tid = unquote(m.group(1))
            segs = (m.group(2),) + tuple(unquote(s) for s in (m.group(3) or "").split("/") if s != "")
            if self._sub_supported(segs, method):
                return self._sub_resource(ctx, tid, segs)
        self._record(ctx, f"{method} {path} is in the contract but not implemented by the double", "unimplemented")
        raise DittoError(501, "double:unimplemented", f"The Ditto double does not implement {method} {path}.")

    @staticmethod
    def _sub_supported(segs: tuple[str, ...], method: str) -> bool:
        if segs[0] == "policyId":
            return len(segs) == 1 and method in ("GET", "PUT", "PATCH")
        if segs[0] == "definition":
            return len(segs) == 1
        if segs[0] == "attributes":
            return True
        # features[/fid[/properties|desiredProperties[/...]|/definition]]
        if len(segs) <= 2:
            return True
        return segs[2] in ("properties", "desiredProperties") or (segs[2] == "definition" and len(segs) == 3)

    # ------------------------------------------------------------------ storage

    def _store_thing(self, thing_id: str, thing: dict[str, Any]) -> None:
        now = _now_iso()
        meta = self.thing_meta.get(thing_id)
        if meta is None or thing_id not in self.things:
            self.thing_meta[thing_id] = {"revision": 1, "created": now, "modified": now}
        else:
            meta["revision"] += 1
            meta["modified"] = now
        self.things[thing_id] = thing

    def _store_policy(self, policy_id: str, policy: dict[str, Any]) -> None:
        now = _now_iso()
        meta = self.policy_meta.get(policy_id)
        if meta is None or policy_id not in self.policies:
            self.policy_meta[policy_id] = {"revision": 1, "created": now, "modified": now}
        else:
            meta["revision"] += 1
            meta["modified"] = now
        self.policies[policy_id] = policy
        self._enforcers = {k: v for k, v in self._enforcers.items() if k[0] != policy_id}

    def _thing_etag(self, thing_id: str) -> str | None:
        meta = self.thing_meta.get(thing_id)
        return f'"rev:{meta["revision"]}"' if meta and thing_id in self.things else None

    def _policy_etag(self, policy_id: str) -> str | None:
        meta = self.policy_meta.get(policy_id)
        return f'"rev:{meta["revision"]}"' if meta and policy_id in self.policies else None

    def _enforcer(self, policy_id: str | None, subjects: list[str]) -> _Enforcer:
        policy = self.policies.get(policy_id) if policy_id else None
        if policy is None:
            return _Enforcer(None, subjects)
        key = (policy_id, self.policy_meta[policy_id]["revision"], tuple(subjects))
        enf = self._enforcers.get(key)
        if enf is None:
            if len(self._enforcers) > 4096:
                self._enforcers.clear()
            enf = self._enforcers[key] = _Enforcer(policy, subjects)
        return enf

    def _with_specials(self, thing_id: str, view: dict[str, Any], enf: _Enforcer | None = None) -> dict[str, Any]:
        """The view plus Ditto's special fields; ``_policy`` only when ``enf`` is given (it costs a view)."""
        meta = self.thing_meta[thing_id]
        out = dict(view)
        out["thingId"] = thing_id
        out["_revision"] = meta["revision"]
        out["_created"] = meta["created"]
        out["_modified"] = meta["modified"]
        out["_namespace"] = namespace_of(thing_id)
        if enf is not None:
            pid = self.things[thing_id].get("policyId")
            policy = self.policies.get(pid) if pid else None
            if policy is not None and enf.has_partial("policy", (), "READ"):
                pview = enf.view("policy", policy)
                if pview is not rql.MISSING:
                    out["_policy"] = pview
        return out

    def _readable(self, thing_id: str, subjects: list[str], with_policy: bool = False) -> tuple[_Enforcer, dict[str, Any]] | None:
        """(enforcer, READ view incl. special fields) or None when the caller may not see the thing."""
        thing = self.things.get(thing_id)
        if thing is None:
            return None
        enf = self._enforcer(thing.get("policyId"), subjects)
        if not enf.has_partial("thing", (), "READ"):
            return None
        view = enf.view("thing", thing)
        view = view if isinstance(view, dict) else {}
        return enf, self._with_specials(thing_id, view, enf if with_policy else None)

    # ------------------------------------------------------------------ shared request logic

    @staticmethod
    def _condition(ctx: _Ctx) -> str | None:
        return ctx.param("condition") if ctx.param("condition") is not None else ctx.header("condition")

    def _check_condition(self, ctx: _Ctx, doc: dict[str, Any] | None) -> None:
        """§2 Conditional requests: 412 things:condition.failed / 400 things:condition.invalid."""
        text = self._condition(ctx)
        if text is None:
            return
        try:
            node = rql.parse(text)
        except rql.RqlError as exc:
            raise DittoError(400, "things:condition.invalid", f"The specified condition <{text}> is invalid.", str(exc)) from None
        if not rql.evaluate(node, doc or {}):
            raise DittoError(
                412, "things:condition.failed",
                f"The specified condition <{text}> does not match the state of the requested Thing.",
                "Your condition was not met; the Thing was not changed.",
            )

    @staticmethod
    def _check_write_preconditions(ctx: _Ctx, current: str | None, prefix: str, entity: str) -> None:
        if_match, if_none = ctx.header("If-Match"), ctx.header("If-None-Match")
        headers = [("ETag", current)] if current else []
        if if_match is not None and not _etag_matches(if_match, current):
            raise DittoError(412, f"{prefix}:precondition.failed",
                             f"The comparison of precondition header 'if-match' for the requested {entity} resource evaluated to false.",
                             f"The comparison of the provided header 'if-match' with value '{if_match}' with the current ETag value '{current}' evaluated to false.",
                             headers)
        if if_none is not None and _etag_matches(if_none, current):
            raise DittoError(412, f"{prefix}:precondition.failed",
                             f"The comparison of precondition header 'if-none-match' for the requested {entity} resource evaluated to false.",
                             f"The comparison of the provided header 'if-none-match' with value '{if_none}' with the current ETag value '{current}' evaluated to false.",
                             headers)

    @staticmethod
    def _check_read_preconditions(ctx: _Ctx, current: str, prefix: str, entity: str) -> _Resp | None:
        if_match, if_none = ctx.header("If-Match"), ctx.header("If-None-Match")
        if if_match is not None and not _etag_matches(if_match, current):
            raise DittoError(412, f"{prefix}:precondition.failed",
                             f"The comparison of precondition header 'if-match' for the requested {entity} resource evaluated to false.",
                             None, [("ETag", current)])
        if if_none is not None and _etag_matches(if_none, current):
            return _Resp(304, None, [("ETag", current)])
        return None

    @staticmethod
    def _fields(ctx: _Ctx) -> list[tuple[str, ...]] | None:
        text = ctx.param("fields")
        if text is None:
            return None
        try:
            return parse_fields(text)
        except FieldSelectorError as exc:
            raise DittoError(400, "json.fieldselector.invalid", f"The field selector <{text}> is invalid.", str(exc)) from None

    @staticmethod
    def _if_equal(ctx: _Ctx) -> str:
        return (ctx.header("if-equal") or "update").lower()

    @staticmethod
    def _response_not_required(ctx: _Ctx) -> bool:
        value = ctx.param("response-required") or ctx.header("response-required")
        return value is not None and value.lower() == "false"

    def _location(self, ctx: _Ctx) -> str:
        return ctx.host_url + ctx.raw_path

    def _accepted(self) -> _Resp:
        return _Resp(202, None)

    @staticmethod
    def _check_thing_id(thing_id: str) -> None:
        if not valid_entity_id(thing_id):
            raise DittoError(400, "things:id.invalid", f"Thing ID '{thing_id}' is not valid!",
                             "It must conform to the namespaced entity ID notation (see Ditto documentation)")

    @staticmethod
    def _check_policy_id(policy_id: str, prefix: str = "policies") -> None:
        if not isinstance(policy_id, str) or not valid_entity_id(policy_id):
            raise DittoError(400, f"{prefix}:id.invalid" if prefix == "policies" else "things:policy.id.notallowed",
                             f"Policy ID '{policy_id}' is not valid!",
                             "It must conform to the namespaced entity ID notation (see Ditto documentation)")

    def _check_thing_body(self, thing: dict[str, Any]) -> None:
        bad = _bad_json_key(thing)
        if bad:
            raise DittoError(400, "json.key.invalid", f"The JSON key <{bad}> is invalid.",
                             "JSON keys must not contain '/' or control characters.")
        features = thing.get("features")
        if features is not None:
            if not isinstance(features, dict) or any(not isinstance(f, dict) for f in features.values()):
                raise DittoError(400, "things:features.invalid", "Features must be a JSON object of JSON objects.")
            if "*" in features:
                raise DittoError(400, "things:feature.id.invalid", "The feature ID '*' is not allowed.")
        if "attributes" in thing and not isinstance(thing["attributes"], dict):
            raise DittoError(400, "things:attributes.invalid", "Attributes must be a JSON object.")
        if len(json.dumps(thing, separators=(",", ":"))) > MAX_THING_BYTES:
            raise DittoError(413, "things:thing.toolarge", "The size of the Thing exceeds the maximum of 100 kB.")

    # ------------------------------------------------------------------ things

    def _get_thing(self, ctx: _Ctx, thing_id: str) -> _Resp:
        self._check_thing_id(thing_id)
        fields = self._fields(ctx)
        with self._lock:
            readable = self._readable(thing_id, ctx.subjects, with_policy=_wants_policy(fields))
            if readable is None:
                raise DittoError(404, "things:thing.notfound", f"The Thing with ID '{thing_id}' could not be found or requester had insufficient permissions to access it.",
                                 "Check if the ID of your requested Thing was correct and you have sufficient permissions.")
            _, full = readable
            etag = self._thing_etag(thing_id)
        not_modified = self._check_read_preconditions(ctx, etag, "things", "Thing")
        if not_modified:
            return not_modified
        self._check_condition(ctx, full)
        body = project(full, fields) if fields is not None else {k: full[k] for k in REGULAR_THING_FIELDS if k in full}
        return _Resp(200, body, [("ETag", etag)])

    def _multi_get(self, ctx: _Ctx) -> _Resp:
        if ctx.header("Accept") and "text/event-stream" in ctx.header("Accept"):
            self._record(ctx, "server-sent events are not implemented by the double", "unimplemented")
            raise DittoError(501, "double:unimplemented", "The Ditto double does not implement SSE.")
        ids = ctx.param("ids")
        if not ids:
            raise DittoError(400, "things:ids.missing", "The query parameter 'ids' is missing.")
        fields = self._fields(ctx)
        items = []
        with self._lock:
            for tid in ids.split(","):
                self._check_thing_id(tid)
                readable = self._readable(tid, ctx.subjects, with_policy=_wants_policy(fields))
                if readable is None:
                    continue
                full = readable[1]
                items.append(project(full, fields) if fields is not None else {k: full[k] for k in REGULAR_THING_FIELDS if k in full})
        return _Resp(200, items)

    def _policy_for_new_thing(self, ctx: _Ctx, thing_id: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """Policy id of a thing being created and the policy to create with it (None: it must exist)."""
        policy_id = body.get("policyId")
        if policy_id is not None:
            self._check_policy_id(policy_id, "things")
        if "_policy" in body and "_copyPolicyFrom" in body:
            raise DittoError(400, "things:policy.invalid", "_policy and _copyPolicyFrom cannot be combined.")
        if "_policy" in body:
            inline = body["_policy"]
            if not isinstance(inline, dict):
                raise DittoError(400, "things:policy.invalid", "_policy must be a JSON object.")
            # ThingEnforcerActor.getInitialPolicy: the thing's policyId, else the inline one's, else the thingId.
            pid = policy_id or inline.get("policyId") or thing_id
            self._check_policy_id(pid, "things")
            policy = json.loads(json.dumps(inline).replace("{{ request:subjectId }}", ctx.subjects[0]))
            policy["policyId"] = pid
            problem = _policy_problem(policy)
            if problem or not _policy_keeps_writer(policy):
                raise DittoError(400, "things:policy.invalid",
                                 f"The Policy specified for the Thing with ID '{thing_id}' is invalid.",
                                 problem or "It must contain at least one Subject with the following permission(s): <[WRITE]> on resource 'policy:/'.")
            return pid, policy
        if "_copyPolicyFrom" in body:
            source = body["_copyPolicyFrom"]
            m = re.fullmatch(r"\{\{\s*ref:things/([^/]+)/policyId\s*\}\}", str(source))
            if m:
                ref_thing = self.things.get(m.group(1))
                if ref_thing is None or self._readable(m.group(1), ctx.subjects) is None:
                    raise DittoError(404, "things:thing.notfound", f"The Thing with ID '{m.group(1)}' could not be found.")
                source = ref_thing["policyId"]
            src_policy = self.policies.get(source)
            if src_policy is None or not self._enforcer(source, ctx.subjects).has_partial("policy", (), "READ"):
                raise DittoError(404, "policies:policy.notfound", f"The Policy with ID '{source}' could not be found or requester had insufficient permissions to access it.")
            pid = policy_id or thing_id
            return pid, {**copy.deepcopy(src_policy), "policyId": pid}
        if policy_id is not None:
            return policy_id, None
        return thing_id, default_policy(thing_id, ctx.subjects[0])

    def _create_thing(self, ctx: _Ctx, thing_id: str, body: dict[str, Any]) -> _Resp:
        """Create (PUT or PATCH on a missing thing). Caller holds self._lock."""
        policy_id, new_policy = self._policy_for_new_thing(ctx, thing_id, body)
        if new_policy is not None:
            if policy_id in self.policies:
                raise DittoError(400, "things:thing.notcreatable",
                                 f"The Thing with ID '{thing_id}' could not be created because a Policy with ID '{policy_id}' already exists.")
            policy_for_check = new_policy
        else:
            policy_for_check = self.policies.get(policy_id)
            if policy_for_check is None:
                raise DittoError(400, "things:thing.notcreatable",
                                 f"The Thing with ID '{thing_id}' could not be created as the Policy with ID '{policy_id}' is not existing.",
                                 "Check if the ID of the Policy you created the Thing with is correct and that the Policy is existing.")
        enf = _Enforcer(policy_for_check, ctx.subjects)
        if not enf.has_unrestricted("thing", (), "WRITE"):
            raise DittoError(403, "things:thing.notmodifiable",
                             f"The Thing with ID '{thing_id}' could not be modified as the requester had insufficient permissions to modify it ('WRITE' is required).",
                             "Check if the ID of your requested Thing was correct and you have sufficient permissions.")
        self._check_condition(ctx, None)
        thing = {"thingId": thing_id, "policyId": policy_id}
        for key in ("definition", "attributes", "features"):
            if key in body:
                thing[key] = copy.deepcopy(body[key])
        self._check_thing_body(thing)
        if new_policy is not None:
            self._store_policy(policy_id, new_policy)
        self._store_thing(thing_id, thing)
        etag = self._thing_etag(thing_id)
        if self._response_not_required(ctx):
            return self._accepted()
        return _Resp(201, copy.deepcopy(thing), [("ETag", etag), ("Location", self._location(ctx))])

    def _writable_existing(
        self, ctx: _Ctx, thing_id: str, paths: Iterable[tuple[str, ...]], resource: tuple[str, ...] = ()
    ) -> _Enforcer:
        """Unrestricted WRITE on every path the command writes, else 403 with the code of the command's
        resource (``resource``: () for the thing, e.g. ('features', 'f', 'properties') for a sub-resource)."""
        thing = self.things[thing_id]
        enf = self._enforcer(thing.get("policyId"), ctx.subjects)
        for segs in paths:
            if not enf.has_unrestricted("thing", segs, "WRITE"):
                # Ditto's ThingCommandToModifyExceptionRegistry: a modify without WRITE is a 403, READ or not.
                _, notmod = _sub_codes(resource)
                raise DittoError(403, notmod,
                                 f"The resource '/{'/'.join(resource)}' of the Thing with ID '{thing_id}' could not be modified as the requester had insufficient permissions to modify '/{'/'.join(segs)}' ('WRITE' is required).",
                                 "Check if the ID of your requested Thing was correct and you have sufficient permissions.")
        return enf

    def _check_new_policy_id(self, thing_id: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        if new.get("policyId") != old.get("policyId"):
            pid = new.get("policyId")
            self._check_policy_id(pid, "things")
            if pid not in self.policies:
                raise DittoError(400, "things:policy.id.notallowed",
                                 f"The Thing with ID '{thing_id}' could not be given the Policy ID '{pid}': the Policy does not exist.")

    def _put_thing(self, ctx: _Ctx, thing_id: str) -> _Resp:
        self._check_thing_id(thing_id)
        self._check_json_type(ctx)
        body = ctx.json_body()
        if not isinstance(body, dict):
            raise DittoError(400, "things:thing.invalid", "The Thing must be a JSON object.")
        with self._lock:
            if thing_id not in self.things:
                self._check_write_preconditions(ctx, None, "things", "Thing")
                return self._create_thing(ctx, thing_id, body)
            old = self.things[thing_id]
            self._writable_existing(ctx, thing_id, [()])
            self._check_write_preconditions(ctx, self._thing_etag(thing_id), "things", "Thing")
            if "_policy" in body or "_copyPolicyFrom" in body:
                raise DittoError(400, "things:policy.notallowed",
                                 f"The Thing with ID '{thing_id}' already exists; _policy / _copyPolicyFrom only apply on creation.")
            readable = self._readable(thing_id, ctx.subjects)
            self._check_condition(ctx, readable[1] if readable else {})
            new = {"thingId": thing_id, "policyId": body.get("policyId", old.get("policyId"))}
            for key in ("definition", "attributes", "features"):
                if key in body:
                    new[key] = copy.deepcopy(body[key])
            self._check_new_policy_id(thing_id, old, new)
            self._check_thing_body(new)
            return self._commit_modify(ctx, thing_id, old, new)

    def _commit_modify(self, ctx: _Ctx, thing_id: str, old: dict[str, Any], new: dict[str, Any]) -> _Resp:
        if self._if_equal(ctx) in ("skip", "skip-minimizing-merge") and new == old:
            etag = self._thing_etag(thing_id)
            raise DittoError(412, "things:precondition.failed",
                             "The comparison of precondition header 'if-equal' for the requested Thing resource evaluated to false.",
                             "The Thing would not change; nothing was written.", [("ETag", etag)] if etag else None)
        self._store_thing(thing_id, new)
        if self._response_not_required(ctx):
            return self._accepted()
        return _Resp(204, None, [("ETag", self._thing_etag(thing_id))])

    def _patch_thing(self, ctx: _Ctx, thing_id: str) -> _Resp:
        self._check_merge_type(ctx)
        self._check_thing_id(thing_id)
        patch = ctx.json_body()
        if not isinstance(patch, dict):
            raise DittoError(400, "things:thing.invalid", "A merge patch of a Thing must be a JSON object.")
        with self._lock:
            if thing_id not in self.things:
                self._check_write_preconditions(ctx, None, "things", "Thing")
                return self._create_thing(ctx, thing_id, _strip_nulls({k: v for k, v in patch.items() if k != "thingId"}))
            old = self.things[thing_id]
            touched = list(_touched_paths({k: v for k, v in patch.items() if k != "thingId"}))
            self._writable_existing(ctx, thing_id, touched)
            self._check_write_preconditions(ctx, self._thing_etag(thing_id), "things", "Thing")
            readable = self._readable(thing_id, ctx.subjects)
            self._check_condition(ctx, readable[1] if readable else {})
            new = merge_patch(old, {k: v for k, v in patch.items() if k != "thingId"})
            new["thingId"] = thing_id
            if new.get("policyId") is None:
                raise DittoError(400, "things:policy.id.notallowed", "The policyId of a Thing cannot be removed.")
            self._check_new_policy_id(thing_id, old, new)
            self._check_thing_body(new)
            return self._commit_modify(ctx, thing_id, old, new)

    def _delete_thing(self, ctx: _Ctx, thing_id: str) -> _Resp:
        self._check_thing_id(thing_id)
        with self._lock:
            if thing_id not in self.things:
                raise DittoError(404, "things:thing.notfound", f"The Thing with ID '{thing_id}' could not be found or requester had insufficient permissions to access it.")
            self._writable_existing(ctx, thing_id, [()])
            self._check_write_preconditions(ctx, self._thing_etag(thing_id), "things", "Thing")
            readable = self._readable(thing_id, ctx.subjects)
            self._check_condition(ctx, readable[1] if readable else {})
            del self.things[thing_id]
            del self.thing_meta[thing_id]
        if self._response_not_required(ctx):
            return self._accepted()
        return _Resp(204)

    @staticmethod
    def _check_json_type(ctx: _Ctx) -> None:
        if ctx.body and ctx.mime != "application/json":
            raise DittoError(415, "mediatype.unsupported", f"The Media-Type <{ctx.mime}> is not supported for this Resource.",
                             "Allowed Media-Types are: <application/json>.")

    @staticmethod
    def _check_merge_type(ctx: _Ctx) -> None:
        if ctx.mime != MERGE_PATCH:
            raise DittoError(415, "mediatype.unsupported", f"The Media-Type <{ctx.mime}> is not supported for this Resource.",
                             f"Allowed Media-Types are: <{MERGE_PATCH}>.")

    # ------------------------------------------------------------------ thing sub-resources

    def _sub_resource(self, ctx: _Ctx, thing_id: str, segs: tuple[str, ...]) -> _Resp:
        self._check_thing_id(thing_id)
        method = ctx.method
        notfound, notmod = _sub_codes(segs)
        if method == "PATCH":
            self._check_merge_type(ctx)
        elif method == "PUT":
            self._check_json_type(ctx)
        value: Any = rql.MISSING
        if method in ("PUT", "PATCH"):
            value = ctx.json_body()
            if segs[-1] != "policyId" and _bad_json_key(value):
                raise DittoError(400, "json.key.invalid", f"The JSON key <{_bad_json_key(value)}> is invalid.")
        fields = self._fields(ctx) if method == "GET" else None
        with self._lock:
            readable = self._readable(thing_id, ctx.subjects)
            if thing_id not in self.things or (readable is None and method == "GET"):
                raise DittoError(404, "things:thing.notfound", f"The Thing with ID '{thing_id}' could not be found or requester had insufficient permissions to access it.")
            thing = self.things[thing_id]
            current_raw = _get_path(thing, segs)
            current_view = _get_path(readable[1], segs) if readable else rql.MISSING
            if method == "GET":
                if current_view is rql.MISSING:
                    raise DittoError(404, notfound, f"The requested resource '/{'/'.join(segs)}' of the Thing with ID '{thing_id}' could not be found or requester had insufficient permissions to access it.")
                etag = _hash_etag(current_view)
                nm = self._check_read_preconditions(ctx, etag, "things", "Thing")
                if nm:
                    return nm
                self._check_condition(ctx, readable[1])
                body = project(current_view, fields) if fields is not None else current_view
                return _Resp(200, body, [("ETag", etag)])
            if method == "PATCH" and isinstance(value, dict):
                paths = [segs + p for p in _touched_paths(value)]
            else:
                paths = [segs]
            self._writable_existing(ctx, thing_id, paths, segs)
            current_etag = _hash_etag(current_raw) if current_raw is not rql.MISSING else None
            self._check_write_preconditions(ctx, current_etag, "things", "Thing")
            if segs[0] == "features" and len(segs) > 2 and not isinstance(_get_path(thing, segs[:2]), dict):
                raise DittoError(404, "things:feature.notfound", f"The Feature with ID '{segs[1]}' on the Thing with ID '{thing_id}' could not be found.")
            if method == "DELETE" and current_raw is rql.MISSING:
                raise DittoError(404, notfound, f"The resource '/{'/'.join(segs)}' of the Thing with ID '{thing_id}' could not be found.")
            self._check_condition(ctx, readable[1] if readable else {})
            new = copy.deepcopy(thing)
            if method == "DELETE":
                _del_path(new, segs)
                self._store_thing(thing_id, new)
                return self._accepted() if self._response_not_required(ctx) else _Resp(204)
            if method == "PATCH":
                new_value = merge_patch(current_raw if current_raw is not rql.MISSING else None, value)
            else:
                new_value = copy.deepcopy(value)
            if new_value is None and method == "PATCH":
                if current_raw is not rql.MISSING:
                    _del_path(new, segs)
            else:
                _set_path(new, segs, new_value)
            if segs == ("policyId",):
                self._check_new_policy_id(thing_id, thing, new)
            self._check_thing_body(new)
            created = current_raw is rql.MISSING and method == "PUT"
            if not created:
                return self._commit_modify(ctx, thing_id, thing, new)
            self._store_thing(thing_id, new)
            if self._response_not_required(ctx):
                return self._accepted()
            return _Resp(201, new_value, [("ETag", _hash_etag(new_value)), ("Location", self._location(ctx))])

    # ------------------------------------------------------------------ policies

    def _policy_notfound(self, policy_id: str) -> DittoError:
        return DittoError(404, "policies:policy.notfound",
                          f"The Policy with ID '{policy_id}' could not be found or requester had insufficient permissions to access it.",
                          "Check if the ID of your requested Policy was correct and you have sufficient permissions.")

    def _get_policy(self, ctx: _Ctx, policy_id: str) -> _Resp:
        self._check_policy_id(policy_id)
        fields = self._fields(ctx)
        with self._lock:
            policy = self.policies.get(policy_id)
            enf = self._enforcer(policy_id, ctx.subjects)
            if policy is None or not enf.has_partial("policy", (), "READ"):
                raise self._policy_notfound(policy_id)
            view = enf.view("policy", policy)
            view = dict(view) if isinstance(view, dict) else {}
            view["policyId"] = policy_id
            meta = self.policy_meta[policy_id]
            view.update({"_revision": meta["revision"], "_created": meta["created"], "_modified": meta["modified"]})
            etag = self._policy_etag(policy_id)
        nm = self._check_read_preconditions(ctx, etag, "policies", "Policy")
        if nm:
            return nm
        body = project(view, fields) if fields is not None else {k: v for k, v in view.items() if not k.startswith("_")}
        return _Resp(200, body, [("ETag", etag)])

    def _put_policy(self, ctx: _Ctx, policy_id: str) -> _Resp:
        self._check_policy_id(policy_id)
        self._check_json_type(ctx)
        body = ctx.json_body()
        if not isinstance(body, dict):
            raise DittoError(400, "policies:policy.invalid", "The Policy must be a JSON object.")
        if "policyId" in body and body["policyId"] != policy_id:
            raise DittoError(400, "policies:id.notsettable",
                             f"The Policy ID in the request body <{body['policyId']}> is not equal to the Policy ID in the request URL <{policy_id}>.")
        problem = _policy_problem(body)
        if problem:
            raise DittoError(400, "policies:policy.invalid", f"The Policy with ID '{policy_id}' is invalid.", problem)
        new = {"policyId": policy_id, **{k: copy.deepcopy(v) for k, v in body.items() if k != "policyId"}}
        if len(json.dumps(new)) > MAX_POLICY_BYTES:
            raise DittoError(413, "policies:policy.toolarge", "The size of the Policy exceeds the maximum of 100 kB.")
        if new.get("imports"):
            self._record(ctx, "policy imports are stored but not evaluated by the double", "unimplemented")
        allow_lockout = (ctx.param("allow-policy-lockout") or "").lower() == "true"
        with self._lock:
            exists = policy_id in self.policies
            if exists:
                enf = self._enforcer(policy_id, ctx.subjects)
                if not enf.has_unrestricted("policy", (), "WRITE"):
                    # PolicyCommandToModifyExceptionRegistry: ModifyPolicy without WRITE -> 403, READ or not.
                    raise DittoError(403, "policies:policy.notmodifiable",
                                     f"The Policy with ID '{policy_id}' could not be modified as the requester had insufficient permissions to modify it ('WRITE' is required).",
                                     "Check if the ID of the Policy was correct and you have sufficient permissions.")
            self._check_write_preconditions(ctx, self._policy_etag(policy_id), "policies", "Policy")
            if not exists and not allow_lockout and not _Enforcer(new, ctx.subjects).has_unrestricted("policy", (), "WRITE"):
                # PolicyCommandEnforcement.authorizeCreatePolicy; the creator must not lock itself out.
                raise DittoError(403, "policies:policy.notcreatable",
                                 f"The Policy with ID '{policy_id}' could not be created as the requester had insufficient permissions.",
                                 "Check if you have sufficient permissions in the new policy to create.")
            if not _policy_keeps_writer(new):
                raise DittoError(403, "policies:policy.modificationinvalid",
                                 f"The Policy with ID '{policy_id}' could not be modified as the resulting Policy would be invalid.",
                                 "There must always be at least one PolicyEntry with 'WRITE' permissions on resource 'policy:/'.")
            if exists and self._if_equal(ctx) in ("skip", "skip-minimizing-merge") and self.policies[policy_id] == new:
                raise DittoError(412, "policies:precondition.failed", "The Policy would not change; nothing was written.",
                                 None, [("ETag", self._policy_etag(policy_id))])
            self._store_policy(policy_id, new)
            etag = self._policy_etag(policy_id)
        if self._response_not_required(ctx):
            return self._accepted()
        if exists:
            return _Resp(204, None, [("ETag", etag)])
        return _Resp(201, copy.deepcopy(new), [("ETag", etag), ("Location", self._location(ctx))])

    def _delete_policy(self, ctx: _Ctx, policy_id: str) -> _Resp:
        self._check_policy_id(policy_id)
        with self._lock:
            enf = self._enforcer(policy_id, ctx.subjects)
            if policy_id not in self.policies or not enf.has_partial("policy", (), "READ") and not enf.has_partial("policy", (), "WRITE"):
                raise self._policy_notfound(policy_id)
            self._check_write_preconditions(ctx, self._policy_etag(policy_id), "policies", "Policy")
            if not enf.has_unrestricted("policy", (), "WRITE"):
                raise DittoError(403, "policies:policy.notmodifiable",
                                 f"The Policy with ID '{policy_id}' could not be deleted as the requester had insufficient permissions ('WRITE' is required).")
            del self.policies[policy_id]
            del self.policy_meta[policy_id]
            self._enforcers.clear()
        if self._response_not_required(ctx):
            return self._accepted()
        return _Resp(204)

    # ------------------------------------------------------------------ search

    def _search_params(self, ctx: _Ctx) -> dict[str, str]:
        if ctx.method == "GET":
            return {k: v for k, v in ctx.query}
        if ctx.mime != "application/x-www-form-urlencoded":
            raise DittoError(415, "mediatype.unsupported", f"The Media-Type <{ctx.mime}> is not supported for this Resource.",
                             "Allowed Media-Types are: <application/x-www-form-urlencoded>.")
        try:
            return dict(parse_qsl(ctx.body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(ctx.body)))
        except (ValueError, UnicodeDecodeError) as exc:
            raise DittoError(400, "contract:request.invalid", f"Malformed form body: {exc}") from None

    def _search(self, ctx: _Ctx, params: dict[str, str], count_only: bool) -> _Resp:
        filter_text = params.get("filter")
        node = None
        if filter_text is not None:
            try:
                node = rql.parse(filter_text)
            except rql.RqlError as exc:
                raise DittoError(400, "rql.expression.invalid", "The given RQL expression was invalid", str(exc)) from None
        namespaces = None
        if params.get("namespaces"):
            namespaces = {ns for ns in params["namespaces"].split(",") if ns != ""}
        try:
            options = rql.parse_options(params.get("option")) if not count_only else rql.SearchOptions()
        except rql.RqlError as exc:
            raise DittoError(400, "rql.expression.invalid", f"The given option <{params.get('option')}> is invalid.", str(exc)) from None
        fields = None
        if params.get("fields") is not None and not count_only:
            try:
                fields = parse_fields(params["fields"])
            except FieldSelectorError as exc:
                raise DittoError(400, "json.fieldselector.invalid", f"The field selector <{params['fields']}> is invalid.", str(exc)) from None
        size = options.size if options.size is not None else SEARCH_DEFAULT_SIZE
        if options.limit is not None:
            size = options.limit[1]
        if not 1 <= size <= SEARCH_MAX_SIZE:
            raise DittoError(400, "thing-search:option.invalid", f"The size must be between 1 and {SEARCH_MAX_SIZE}, was {size}.")
        sort = list(options.sort) or [rql.SortKey("thingId", True)]
        if not any(k.path.strip("/") == "thingId" for k in sort):
            sort.append(rql.SortKey("thingId", True))
        with self._lock:
            hits = []
            for tid in self.things:
                if namespaces is not None and namespace_of(tid) not in namespaces:
                    continue
                readable = self._readable(tid, ctx.subjects, with_policy=_wants_policy(fields))
                if readable is None:
                    continue
                doc = readable[1]
                if node is not None and not rql.evaluate(node, doc):
                    continue
                hits.append(doc)
        if count_only:
            return _Resp(200, len(hits))
        keyed = sorted(((_sort_key(doc, sort), doc) for doc in hits), key=functools.cmp_to_key(lambda a, b: _cmp_keys(a[0], b[0], sort)))
        fingerprint = hashlib.sha1(json.dumps([filter_text, sorted(namespaces or []), [(k.path, k.ascending) for k in sort]]).encode()).hexdigest()[:12]
        start = 0
        if options.limit is not None:
            start = options.limit[0]
        elif options.cursor is not None:
            last = _decode_cursor(options.cursor, fingerprint)
            start = next((i for i, (key, _) in enumerate(keyed) if _cmp_keys(key, last, sort) > 0), len(keyed))
        page = keyed[start : start + size]
        items = []
        for _, doc in page:
            items.append(project(doc, fields) if fields is not None else {k: doc[k] for k in REGULAR_THING_FIELDS if k in doc})
        body: dict[str, Any] = {"items": items}
        more = start + size < len(keyed)
        if options.limit is not None:
            body["nextPageOffset"] = start + size if more else -1
        elif more and page:
            body["cursor"] = _encode_cursor(page[-1][0], fingerprint)
        return _Resp(200, body)


# ---------------------------------------------------------------------------------- search helpers

_TYPE_RANK = {"missing": 0, "null": 0, "number": 1, "string": 2, "object": 3, "array": 4, "bool": 5}


def _sort_key(doc: dict[str, Any], sort: list[rql.SortKey]) -> list[list[Any]]:
    key = []
    for k in sort:
        value = next(rql.resolve(doc, k.path), rql.MISSING)
        if value is rql.MISSING or value is None:
            key.append([0, None])
        elif isinstance(value, bool):
            key.append([5, value])
        elif isinstance(value, (int, float)):
            key.append([1, value])
        elif isinstance(value, str):
            key.append([2, value])
        else:
            key.append([3 if isinstance(value, dict) else 4, json.dumps(value, sort_keys=True)])
    return key


def _cmp_keys(a: list[list[Any]], b: list[list[Any]], sort: list[rql.SortKey]) -> int:
    for (ra, va), (rb, vb), k in zip(a, b, sort):
        c = (ra > rb) - (ra < rb)
        if c == 0 and va != vb and va is not None and vb is not None:
            c = (va > vb) - (va < vb)
        if c:
            return c if k.ascending else -c
    return 0


def _encode_cursor(key: list[list[Any]], fingerprint: str) -> str:
    raw = json.dumps({"k": key, "f": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, fingerprint: str) -> list[list[Any]]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        key, fp = data["k"], data["f"]
    except (ValueError, KeyError, TypeError):
        raise DittoError(400, "thing-search:cursor.invalid", f"The cursor <{cursor}> is invalid.") from None
    if fp != fingerprint:
        raise DittoError(400, "thing-search:cursor.invalid",
                         "The cursor does not belong to this search; repeat the same filter, namespaces and sort with it.")
    return key


def _wants_policy(fields: list[tuple[str, ...]] | None) -> bool:
    return bool(fields) and any(f and f[0] == "_policy" for f in fields)


def _sub_codes(segs: tuple[str, ...]) -> tuple[str, str]:
    """(not found, not modifiable) error codes of a thing (sub-)resource path."""
    if not segs:
        return "things:thing.notfound", "things:thing.notmodifiable"
    top = segs[0]
    if top == "attributes":
        name = "attributes" if len(segs) == 1 else "attribute"
    elif top == "features":
        if len(segs) == 1:
            name = "features"
        elif len(segs) == 2:
            name = "feature"
        elif segs[2] == "definition":
            name = "feature.definition"
        elif segs[2] == "properties":
            name = "feature.properties" if len(segs) == 3 else "feature.property"
        elif segs[2] == "desiredProperties":
            name = "feature.desiredProperties" if len(segs) == 3 else "feature.desiredProperty"
        else:
            name = "feature"
    elif top == "policyId":
        name = "policyId"
    elif top == "definition":
        name = "definition"
    else:
        name = "thing"
    return f"things:{name}.notfound", f"things:{name}.notmodifiable"


# ------------------------------------------------------------------------------ throughput report


def measure_throughput(seconds: float = 2.0, threads: int = 4) -> dict[str, float]:
    """Requests/s of merge-PATCH + GET against the double, with and without contract validation."""
    import requests

    result = {}
    for validate in (True, False):
        double = DittoDouble({"bridge": "pw2", "ditto": "pw"}, validate=validate)
        url = double.start()
        try:
            double.seed_policy("bench:policy", standard_policy())
            for i in range(threads):
                double.seed_thing(f"bench:rack-{i}", {"policyId": "bench:policy", "features": {"environment": {"properties": {}}}})
            counts = [0] * threads
            deadline = time.monotonic() + seconds

            def worker(i: int) -> None:
                s = requests.Session()
                s.auth = ("bridge", "pw2")
                n = 0
                while time.monotonic() < deadline:
                    if n % 2 == 0:
                        r = s.patch(f"{url}/api/2/things/bench:rack-{i}", data=json.dumps({"features": {"environment": {"properties": {"tempTop": n}}}}),
                                    headers={"Content-Type": MERGE_PATCH})
                    else:
                        r = s.get(f"{url}/api/2/things/bench:rack-{i}", params={"fields": "features/environment/properties/tempTop"})
                    assert r.status_code in (200, 204), r.text
                    n += 1
                counts[i] = n

            workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
            t0 = time.monotonic()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            elapsed = time.monotonic() - t0
            double.assert_no_violations()
            result["validated" if validate else "unvalidated"] = sum(counts) / elapsed
        finally:
            double.stop()
    return result


if __name__ == "__main__":
    for name, rate in measure_throughput().items():
        print(f"{name}: {rate:.0f} requests/s")
