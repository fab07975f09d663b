"""Ditto's WebSocket binding for the contract double: RFC 6455 framing and Ditto Protocol envelopes.

The double answers a Ditto Protocol command by translating it into the HTTP request it stands for
(a merge at ``path`` of thing ``<namespace>:<name>`` = ``PATCH /api/2/things/<id><path>``, the
``condition`` header = the ``condition`` query parameter) and running that through the same validated
request path as HTTP, so a command whose HTTP twin breaks the OpenAPI contract is a violation here too.
The envelope itself is checked against the protocol specification (``ditto.md`` §2, "Ditto Protocol merge
envelope"): topic ``<namespace>/<name>/things/twin/commands/<action>``, a ``headers`` object carrying a
``correlation-id``, a JSON-pointer ``path``, a ``value`` for a merge, content-type merge-patch if given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, BinaryIO
from urllib.parse import quote

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
MAX_FRAME_BYTES = 1 << 22
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TOPIC = re.compile(r"([^/]+)/([^/]+)/things/twin/commands/([a-z]+)")
MERGE_PATCH = "application/merge-patch+json"


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def handshake_problems(headers: Any) -> list[str]:
    """What is wrong with a WebSocket upgrade request (RFC 6455 §4.2.1)."""
    problems = []
    if (headers.get("Upgrade") or "").lower() != "websocket":
        problems.append("Upgrade is not websocket")
    if "upgrade" not in (headers.get("Connection") or "").lower():
        problems.append("Connection does not include Upgrade")
    if headers.get("Sec-WebSocket-Version") != "13":
        problems.append("Sec-WebSocket-Version is not 13")
    key = headers.get("Sec-WebSocket-Key") or ""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            problems.append("Sec-WebSocket-Key is not 16 bytes in base64")
    except ValueError:
        problems.append("Sec-WebSocket-Key is not base64")
    return problems


def _unmask(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(n, "little")


def read_frame(rfile: BinaryIO) -> tuple[bool, int, bool, bytes] | None:
    """(fin, opcode, masked, payload) of the next frame; None when the peer is gone."""
    head = rfile.read(2)
    if len(head) < 2:
        return None
    fin, opcode, masked, length = bool(head[0] & 0x80), head[0] & 0x0F, bool(head[1] & 0x80), head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(rfile.read(2), "big")
    elif length == 127:
        length = int.from_bytes(rfile.read(8), "big")
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes")
    mask = rfile.read(4) if masked else b""
    payload = rfile.read(length) if length else b""
    if len(payload) < length:
        return None
    return fin, opcode, masked, _unmask(payload, mask) if masked and payload else payload


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final frame (servers do not mask, RFC 6455 §5.1)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


class Command:
    """A parsed Ditto Protocol command; ``problems`` lists what breaks the protocol specification."""

    def __init__(self, text: str):
        self.problems: list[str] = []
        self.namespace = self.name = self.action = ""
        self.correlation_id: str | None = None
        self.headers: dict[str, Any] = {}
        self.path = "/"
        self.value: Any = None
        try:
            message = json.loads(text)
        except ValueError as exc:
            self.problems.append(f"not JSON: {exc}")
            return
        if not isinstance(message, dict):
            self.problems.append("not a JSON object")
            return
        topic = message.get("topic")
        m = TOPIC.fullmatch(topic) if isinstance(topic, str) else None
        if m is None:
            self.problems.append(f"topic {topic!r} is not <namespace>/<name>/things/twin/commands/<action>")
        else:
            self.namespace, self.name, self.action = m.groups()
        headers = message.get("headers")
        if not isinstance(headers, dict):
            self.problems.append("headers is not an object")
            headers = {}
        self.headers = {str(k).lower(): v for k, v in headers.items()}
        cid = self.headers.get("correlation-id")
        if isinstance(cid, str) and cid:
            self.correlation_id = cid
        else:
            self.problems.append("no correlation-id header: the answer could not be matched")
        path = message.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            self.problems.append(f"path {path!r} is not a JSON pointer")
        else:
            self.path = path
        if self.action == "merge":
            if "value" not in message:
                self.problems.append("a merge command needs a value")
            ctype = self.headers.get("content-type")
            if ctype is not None and ctype != MERGE_PATCH:
                self.problems.append(f"content-type {ctype!r} of a merge is not {MERGE_PATCH}")
        self.value = message.get("value")
        unknown = set(message) - {"topic", "headers", "path", "value", "fields", "extra", "status", "revision", "timestamp"}
        if unknown:
            self.problems.append(f"fields not in the envelope: {sorted(unknown)}")

    @property
    def thing_id(self) -> str:
        return f"{self.namespace}:{self.name}"

    def http_path(self) -> str:
        """The HTTP API path of the resource the command addresses."""
        segments = [quote(s, safe="") for s in self.path.split("/")[1:] if s != ""]
        return "/api/2/things/" + quote(self.thing_id, safe=":") + "".join("/" + s for s in segments)

    def response(self, status: int, body: Any) -> str:
        """Ditto's answer: the command's topic with its status, or an error on the ``errors`` topic."""
        headers = {"correlation-id": self.correlation_id}
        if status < 400:
            out: dict[str, Any] = {"topic": f"{self.namespace}/{self.name}/things/twin/commands/{self.action}",
                                   "headers": headers, "path": self.path, "status": status}
            if body is not None and status != 204:
                out["value"] = body
        else:
            if not isinstance(body, dict):  # e.g. nginx's HTML page: Ditto's WebSocket would send an error JSON
                body = {"status": status, "error": "gateway:service.unavailable", "message": "Upstream error."}
            out = {"topic": f"{self.namespace or '_'}/{self.name or '_'}/things/twin/errors", "headers": headers,
                   "path": "/", "value": body, "status": status}
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)
