"""Real Mosquitto and InfluxDB (Debian packages) on free loopback ports, for tests and benchmarks.

InfluxDB from Debian is 1.6.7: it has /write and /query but not /api/v2/write, which
influxdb-client uses. ``InfluxV2Adapter`` is the thin shim in front of it: it maps a v2 write
(org, bucket ``db`` or ``db/rp``, precision, ``Authorization: Token``) onto /write and passes
/query and /ping through, so the bridge talks to it exactly as to InfluxDB 2.x.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import requests

from .http import QuietHTTPServer


class MissingService(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise MissingService(f"{name} not found: install it with 'apt-get install {package}' (make test does this on Debian)")


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on {port} within {timeout} s: {log.read_text()[-2000:]}")


class Mosquitto:
    """A real broker with persistence, so a restart keeps queued messages of persistent sessions."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "",
                 users: dict[str, str] | None = None):
        """``users``: logins (user name: password) the broker requires instead of allowing anonymous clients."""
        self.binary = _binary("mosquitto", "mosquitto")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        auth = "allow_anonymous true\n"
        if users is not None:
            passwd, passwords = _binary("mosquitto_passwd", "mosquitto"), self.workdir / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run([passwd, "-b", str(passwords), user, password], check=True, capture_output=True)
            auth = f"allow_anonymous false\npassword_file {passwords}\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + auth +
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n"
            # Started as root (CI), mosquitto would switch to user 'mosquitto', which cannot write our temp dir.
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra_conf
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=open(self.log, "ab")
        )
        _wait_port(self.port, 10, self.proc, "mosquitto", self.log)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # SIGTERM makes mosquitto save its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class InfluxD:
    """A real InfluxDB 1.x server with its own data directory and ports."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = _binary("influxd", "influxdb")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.rpc_port = free_port()
        self.conf = self.workdir / "influxdb.conf"
        self.log = self.workdir / "influxd.log"
        self.conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{self.rpc_port}"\n'
            f'[meta]\n  dir = "{self.workdir}/meta"\n'
            f'[data]\n  dir = "{self.workdir}/data"\n  wal-dir = "{self.workdir}/wal"\n'
            "  query-log-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "[monitor]\n  store-enabled = false\n"
            "[continuous_queries]\n  enabled = false\n"
        )
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "InfluxD":
        self.proc = subprocess.Popen(
            [self.binary, "-config", str(self.conf)], stdout=subprocess.DEVNULL, stderr=open(self.log, "ab")
        )
        _wait_port(self.port, 30, self.proc, "influxd", self.log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/ping", timeout=1).status_code == 204:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError("influxd did not answer /ping")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def query(self, q: str, db: str | None = None, epoch: str = "ms", timeout: float = 30) -> dict:
        params = {"q": q, "epoch": epoch}
        if db:
            params["db"] = db
        resp = requests.post(self.url + "/query", params=params, timeout=timeout)
        resp.raise_for_status()
        body = resp.json()
        for result in body.get("results", []):
            if "error" in result:
                raise RuntimeError(f"InfluxQL error for {q!r}: {result['error']}")
        return body

    def write(self, lines: list[str], db: str, timeout: float = 30) -> None:
        """Line protocol with millisecond timestamps, as the bridge writes it; anything but 204 raises."""
        resp = requests.post(self.url + "/write", params={"db": db, "precision": "ms"},
                             data="\n".join(lines).encode(), timeout=timeout)
        if resp.status_code != 204:
            raise RuntimeError(f"InfluxDB write: HTTP {resp.status_code}: {resp.text}")

    def create_db(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def rows(self, q: str, db: str) -> list[dict]:
        """Query result as a list of dicts (one per row, tags included), over all series."""
        out = []
        for result in self.query(q, db).get("results", []):
            for series in result.get("series", []) or []:
                for values in series["values"]:
                    row = dict(zip(series["columns"], values))
                    row.update(series.get("tags", {}) or {})
                    out.append(row)
        return out


class InfluxV2Adapter:
    """Serves the parts of InfluxDB 2.x's HTTP API the bridge and Grafana use, on top of InfluxDB 1.x."""

    def __init__(self, target: str, token: str | None = "test-token", port: int = 0):
        self.target = urllib.parse.urlsplit(target)
        self.token = token
        self.writes = 0
        self.fail_status: int | None = None  # fault injection: answer every write with this status
        adapter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                adapter._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                adapter._handle(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self.server = QuietHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "InfluxV2Adapter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        return self.token is None or handler.headers.get("Authorization") == f"Token {self.token}"

    def _reply(self, handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", ctype: str = "application/json"):
        handler.send_response(status)
        if body:
            handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _forward(self, method: str, path: str, body: bytes | None, ctype: str | None):
        conn = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=30)
        try:
            headers = {"Content-Type": ctype} if ctype else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type") or "application/json"
        finally:
            conn.close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(h.path)
        params = dict(urllib.parse.parse_qsl(parts.query))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        try:
            if parts.path in ("/ping", "/health"):
                status, _, _ = self._forward("GET", "/ping", None, None)
                if parts.path == "/ping":
                    return self._reply(h, 204 if status == 204 else 503)
                ok = status == 204
                return self._reply(h, 200 if ok else 503, json.dumps({"status": "pass" if ok else "fail"}).encode())
            if not self._authorized(h):
                return self._reply(h, 401, b'{"code":"unauthorized","message":"unauthorized access"}')
            if parts.path == "/api/v2/write" and h.command == "POST":
                if self.fail_status:
                    return self._reply(h, self.fail_status, b'{"code":"unavailable","message":"injected fault"}')
                bucket = params.get("bucket", "")
                db, _, rp = bucket.partition("/")
                query = {"db": db, "precision": params.get("precision", "ns")}
                if rp:
                    query["rp"] = rp
                status, resp_body, _ = self._forward("POST", "/write?" + urllib.parse.urlencode(query), body,
                                                     "text/plain; charset=utf-8")
                if status == 204:
                    self.writes += 1
                    return self._reply(h, 204)
                message = json.loads(resp_body or b"{}").get("error", resp_body.decode(errors="replace"))
                code = "not found" if status == 404 else "invalid"
                return self._reply(h, status, json.dumps({"code": code, "message": message}).encode())
            if parts.path == "/query":
                status, resp_body, ctype = self._forward(h.command, h.path, body or None,
                                                         h.headers.get("Content-Type"))
                return self._reply(h, status, resp_body, ctype)
            return self._reply(h, 404, b'{"code":"not found","message":"path not found"}')
        except (ConnectionError, OSError) as exc:
            return self._reply(h, 503, json.dumps({"code": "unavailable", "message": str(exc)}).encode())
