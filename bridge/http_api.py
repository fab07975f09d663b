"""Operating endpoints: /healthz (alive), /readyz (broker connected, sinks reachable), /metrics, and
POST /sync (run the ThingsBoard sync now, when one is configured).

``/metrics?name[]=racktwin_messages_in_flight&name[]=...`` answers only those metrics (the convention of
prometheus_client's own exposition server): a poller that needs two numbers does not make the bridge render
all of them, which costs about a millisecond of its CPU each time."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], dict[str, bool]]


class OpsServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessCheck,
                 sync_now: Callable[[], None] | None = None):
        registry_ref, readiness_ref = registry, readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path, _, query = self.path.partition("?")
                if path == "/healthz":
                    self._send(200, "application/json", b'{"status":"alive"}')
                elif path == "/readyz":
                    checks = readiness_ref()
                    ready = all(checks.values())
                    body = json.dumps({"ready": ready, "checks": checks}).encode()
                    self._send(200 if ready else 503, "application/json", body)
                elif path == "/metrics":
                    names = parse_qs(query).get("name[]")
                    source = registry_ref.restricted_registry(names) if names else registry_ref
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(source))
                else:
                    self._send(404, "text/plain", b"not found\n")

            def do_POST(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] != "/sync":
                    self._send(404, "text/plain", b"not found\n")
                elif sync_now is None:
                    self._send(409, "application/json", b'{"error":"no ThingsBoard configured (RACKTWIN_TB_URL)"}')
                else:
                    sync_now()  # wakes the sync worker; the result shows in the log and in the twins
                    self._send(202, "application/json", b'{"sync":"started"}')

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence per-request logs
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="ops-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        log.info("ops endpoints on port %d: /healthz /readyz /metrics, POST /sync", self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
