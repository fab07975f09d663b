"""Small helpers for the tests' own HTTP doubles (stdlib http.server handlers)."""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that prints no traceback when a client drops its connection mid-request: the
    fault tests SIGKILL bridges on purpose. Any other error in a handler is still printed."""

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001 - socketserver's signature
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    """Answer with ``body`` as JSON and an exact Content-Length (clients keep the connection alive)."""
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
