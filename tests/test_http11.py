"""The hot path's HTTP/1.1 client: answers as servers and proxies send them, and a kept-alive connection
against a real server (Debian's nginx when installed, else Python's http.server)."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bridge.sinks.http11 import Connection, ProtocolError, read_response
from tests.harness.services import free_port


def answer(raw: bytes, method: str = "PATCH") -> tuple[int, bytes, bool]:
    return read_response(io.BytesIO(raw), method)


def test_content_length_body_and_keep_alive():
    raw = b'HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"thingId":1}NEXT'
    assert answer(raw) == (201, b'{"thingId":1}', True)


def test_no_content_needs_no_length():
    assert answer(b"HTTP/1.1 204 No Content\r\nETag: \"rev:2\"\r\n\r\n") == (204, b"", True)


def test_chunked_body_with_extensions_and_trailers():
    raw = (b"HTTP/1.1 412 Precondition Failed\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=x\r\n{\"a\":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert answer(raw) == (412, b'{"a": 1}', True)


def test_interim_answers_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    assert answer(raw) == (204, b"", True)


def test_connection_close_and_http_1_0():
    assert answer(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno") == (
        503, b"no", False)
    assert answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")[2] is False
    assert answer(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok")[2] is True


def test_body_up_to_the_end_of_the_connection():
    assert answer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\n\r\n<html>bad</html>") == (
        502, b"<html>bad</html>", False)


def test_repeated_headers_are_joined():
    raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert answer(raw)[2] is False


@pytest.mark.parametrize("raw, error", [
    (b"", ConnectionError),
    (b"HTTP/1.1 204 No Content\r\nETag: x\r\n", ConnectionError),  # closed inside the headers
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", ConnectionError),
    (b"SSH-2.0-OpenSSH_9.2\r\n", ProtocolError),
    (b"HTTP/1.1 2000 OK\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ProtocolError),
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", ProtocolError),
])
def test_broken_answers_raise(raw, error):
    with pytest.raises(error):
        answer(raw)


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str, dict, bytes, int]] = []

    def do_PATCH(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.command, self.path, dict(self.headers), body, id(self.connection)))
        data = b'{"ok":true}'
        self.send_response(201)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_kept_alive_requests_arrive_whole_on_one_connection():
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = Connection("127.0.0.1", server.server_address[1], https=False, timeout=5)
    try:
        for i in range(3):
            status, body = conn.request("PATCH", f"/api/2/things/dc:r{i}?condition=x", {
                "Authorization": "Basic eDp5", "Content-Type": "application/merge-patch+json"}, b'{"n":%d}' % i)
            assert (status, body) == (201, b'{"ok":true}')
        with pytest.raises(ValueError):
            conn.request("PATCH", "/x", {"X-Evil": "a\r\nInjected: 1"}, b"")
    finally:
        conn.close()
        server.shutdown()
    assert [s[1] for s in _Recorder.seen] == [f"/api/2/things/dc:r{i}?condition=x" for i in range(3)]
    assert [s[3] for s in _Recorder.seen] == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    assert len({s[4] for s in _Recorder.seen}) == 1  # one connection for all three
    headers = _Recorder.seen[0][2]
    assert headers["Host"] == f"127.0.0.1:{server.server_address[1]}"
    assert headers["Authorization"] == "Basic eDp5" and headers["Content-Type"] == "application/merge-patch+json"


class _ChunkedUpstream(BaseHTTPRequestHandler):
    """An upstream that streams its answer (no Content-Length): nginx passes it on chunked."""

    protocol_version = "HTTP/1.1"
    answered = 0

    def do_PATCH(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Counted before answering: once the last chunk is out, the client may look before this thread goes on.
        _ChunkedUpstream.answered += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for part in (b'{"thingId":', b'"dc:r1"}'):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(shutil.which("nginx") is None and not shutil.which("/usr/sbin/nginx"), reason="nginx missing")
def test_against_nginx_chunked_and_closing_answers(tmp_path):
    """nginx is what sits in front of Ditto: its 204s, its chunked proxied bodies and its closing a kept-alive
    connection after keepalive_requests."""
    port = free_port()
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
worker_processes 1; daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off; client_body_temp_path {tmp_path}/body; proxy_temp_path {tmp_path}/proxy;
  fastcgi_temp_path {tmp_path}/f; uwsgi_temp_path {tmp_path}/u; scgi_temp_path {tmp_path}/s;
  keepalive_requests 3;
  server {{
    listen 127.0.0.1:{port};
    location /nothing {{ return 204; }}
    location /chunked {{ proxy_pass http://127.0.0.1:{upstream.server_address[1]}; proxy_http_version 1.1; }}
  }}
}}
""")
    proc = subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        conn = Connection("127.0.0.1", port, https=False, timeout=5)
        results = [conn.request("PATCH", "/nothing", {}, b"{}") for _ in range(2)]
        assert results == [(204, b""), (204, b"")] and conn.open
        assert conn.request("PATCH", "/chunked", {}, b"{}") == (200, b'{"thingId":"dc:r1"}')
        assert _ChunkedUpstream.answered == 1
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # what nginx sent is chunked
            raw.sendall(b"PATCH /chunked HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            seen = b""
            while chunk := raw.recv(4096):
                seen += chunk
        assert b"transfer-encoding: chunked" in seen.lower()
        assert not conn.open  # the third request of keepalive_requests 3: nginx said Connection: close
        assert conn.request("PATCH", "/nothing", {}, b"{}") == (204, b"")  # and the next one reconnects
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.shutdown()
