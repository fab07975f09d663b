"""A small double of InfluxDB 2.x's admin API: /health, orgs, buckets and authorizations (tokens).

Enough for ``racktwin bootstrap``: the admin token (``Authorization: Token <t>``) is required on every
/api/v2 call; organisations and buckets are fixed at start (as DOCKER_INFLUXDB_INIT_* would create them);
authorizations can be listed, created and deleted. Like InfluxDB 2.9 with hashed tokens, a token's value
is returned only once, in the 201 of its creation -- listings never show it -- so a client cannot pass
by reading it back. Request bodies are checked the way the server does (orgID, permissions with a known
action and resource type, bucket permissions inside the org); a bad body is refused with 400 and recorded
in ``violations``.
"""

from __future__ import annotations

import json
import secrets
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RESOURCE_TYPES = {
    "authorizations", "buckets", "dashboards", "orgs", "sources", "tasks", "telegrafs", "users", "variables",
    "scrapers", "secrets", "labels", "views", "documents", "notificationRules", "notificationEndpoints",
    "checks", "dbrp", "notebooks", "annotations", "remotes", "replications",
}


class InfluxAdminDouble:
    def __init__(self, admin_token: str, org: str = "racktwin", buckets: tuple[str, ...] = ("racktwin",)):
        self.admin_token = admin_token
        self.org = {"id": secrets.token_hex(8), "name": org}
        self.buckets = [{"id": secrets.token_hex(8), "name": b, "orgID": self.org["id"]} for b in buckets]
        self.authorizations: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, str] = {}  # authorization id -> token value (the server's secret side)
        self.mutations = 0
        self.violations: list[str] = []
        self.healthy = True
        self._lock = threading.Lock()
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                double._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                double._handle(self, "POST")

            def do_DELETE(self) -> None:  # noqa: N802
                double._handle(self, "DELETE")

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "InfluxAdminDouble":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def token_allows(self, token: str, action: str, bucket_name: str) -> bool:
        """Whether a token minted here grants ``action`` on bucket ``bucket_name``."""
        bucket = next((b for b in self.buckets if b["name"] == bucket_name), None)
        for auth_id, value in self.tokens.items():
            if value != token or bucket is None:
                continue
            for perm in self.authorizations[auth_id]["permissions"]:
                res = perm["resource"]
                if perm["action"] == action and res["type"] == "buckets" and res.get("id") in (None, bucket["id"]):
                    return True
        return False

    # --- HTTP -----------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        path = parsed.path
        if path == "/health" and method == "GET":
            status = 200 if self.healthy else 503
            return self._send(h, status, {"name": "influxdb", "status": "pass" if self.healthy else "fail"})
        if h.headers.get("Authorization") != f"Token {self.admin_token}":
            return self._send(h, 401, {"code": "unauthorized", "message": "unauthorized access"})
        with self._lock:
            if path == "/api/v2/orgs" and method == "GET":
                orgs = [self.org] if query.get("org") in (None, self.org["name"]) else []
                if query.get("org") and not orgs:
                    return self._send(h, 404, {"code": "not found", "message": "organization name not found"})
                return self._send(h, 200, {"orgs": orgs})
            if path == "/api/v2/buckets" and method == "GET":
                found = [
                    b for b in self.buckets
                    if query.get("orgID") in (None, b["orgID"]) and query.get("name") in (None, b["name"])
                ]
                return self._send(h, 200, {"buckets": found})
            if path == "/api/v2/authorizations" and method == "GET":
                listed = [
                    {**a, "token": ""} for a in self.authorizations.values()
                    if query.get("orgID") in (None, a["orgID"])
                ]
                return self._send(h, 200, {"authorizations": listed})
            if path == "/api/v2/authorizations" and method == "POST":
                return self._create(h, raw)
            if path.startswith("/api/v2/authorizations/") and method == "DELETE":
                auth_id = path.rsplit("/", 1)[1]
                if auth_id not in self.authorizations:
                    return self._send(h, 404, {"code": "not found", "message": "authorization not found"})
                del self.authorizations[auth_id]
                del self.tokens[auth_id]
                self.mutations += 1
                return self._send(h, 204, None)
        self.violations.append(f"unimplemented {method} {path}")
        return self._send(h, 404, {"code": "not found", "message": "path not found"})

    def _create(self, h: BaseHTTPRequestHandler, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            return self._bad(h, "body is not JSON")
        problem = self._body_problem(body)
        if problem:
            return self._bad(h, problem)
        auth_id = secrets.token_hex(8)
        token = secrets.token_urlsafe(48)
        auth = {
            "id": auth_id,
            "orgID": body["orgID"],
            "org": self.org["name"],
            "description": body.get("description", ""),
            "status": body.get("status", "active"),
            "permissions": body["permissions"],
        }
        self.authorizations[auth_id] = auth
        self.tokens[auth_id] = token
        self.mutations += 1
        return self._send(h, 201, {**auth, "token": token})

    def _body_problem(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be an object"
        if body.get("orgID") != self.org["id"]:
            return "orgID missing or unknown"
        if body.get("status", "active") not in ("active", "inactive"):
            return "bad status"
        perms = body.get("permissions")
        if not isinstance(perms, list) or not perms:
            return "permissions must be a non-empty list"
        for perm in perms:
            res = perm.get("resource") if isinstance(perm, dict) else None
            if not isinstance(res, dict) or perm.get("action") not in ("read", "write"):
                return f"bad permission {perm!r}"
            if res.get("type") not in RESOURCE_TYPES:
                return f"unknown resource type {res.get('type')!r}"
            if res.get("orgID") not in (None, self.org["id"]):
                return "permission outside the organisation"
            if res["type"] == "buckets" and res.get("id") and res["id"] not in {b["id"] for b in self.buckets}:
                return f"unknown bucket id {res['id']}"
        return None

    def _bad(self, h: BaseHTTPRequestHandler, message: str) -> None:
        self.violations.append(f"POST /api/v2/authorizations: {message}")
        return self._send(h, 400, {"code": "invalid", "message": message})

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        h.send_response(status)
        if body is not None:
            h.send_header("Content-Type", "application/json; charset=utf-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
