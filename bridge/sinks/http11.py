"""A minimal HTTP/1.1 client connection for the twin-update hot path: one kept-alive socket, one request at a
time, the response read by hand.

Why not http.client: measured against nginx answering 204, http.client spent about 145 µs of CPU per request,
most of it in the email-package header parser; writing the request and reading the status line, a few
headers and the body here costs about 50 µs. At one request per message that is a tenth of the bridge's CPU.
Everything else (policies, thing creation, reads) stays on requests.

``read_response`` is pure (a binary file in, status/body/keep-alive out) and handles what a server or proxy may
send: interim 1xx answers, Content-Length, chunked bodies with extensions and trailers, bodies that end with the
connection, and HTTP/1.0 or ``Connection: close`` answers.
"""

from __future__ import annotations

import socket
import ssl
from typing import BinaryIO

MAX_LINE = 65536
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024  # a twin answer is a few KiB; more is a broken peer, not data


class ProtocolError(ValueError):
    """The peer's answer is not HTTP/1.x we can read; the connection is unusable."""


def _line(rfile: BinaryIO) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise ProtocolError("line too long")
    return line


def _exactly(rfile: BinaryIO, n: int) -> bytes:
    data = rfile.read(n)
    if len(data) < n:
        raise ConnectionError(f"connection closed {n - len(data)} bytes before the end of the answer")
    return data


def _headers(rfile: BinaryIO) -> dict[str, str]:
    """Header names lower-cased; a repeated header's values joined by ", " (RFC 9110 §5.3)."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = _line(rfile)
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise ConnectionError("connection closed inside the answer's headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise ProtocolError(f"more than {MAX_HEADERS} headers")


def _chunked(rfile: BinaryIO) -> bytes:
    parts, total = [], 0
    while True:
        size_text = _line(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            _headers(rfile)  # trailers, up to the empty line
            return b"".join(parts)
        total += size
        if total > MAX_BODY:
            raise ProtocolError("answer body too large")
        parts.append(_exactly(rfile, size))
        if _line(rfile) not in (b"\r\n", b"\n"):
            raise ProtocolError("chunk not followed by CRLF")


def read_response(rfile: BinaryIO, method: str) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of the next answer on ``rfile``."""
    while True:
        status_line = _line(rfile)
        if not status_line:
            raise ConnectionError("connection closed before an answer")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        version, status = parts[0], int(parts[1])
        headers = _headers(rfile)
        if 100 <= status < 200 and status != 101:
            continue  # interim answer (100 Continue, 103 Early Hints): the real one follows
        break
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == b"HTTP/1.0" else "close" not in tokens
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, b"", keep_alive
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return status, _chunked(rfile), keep_alive
    if "content-length" in headers:
        try:
            length = int(headers["content-length"].split(",")[0])
        except ValueError:
            raise ProtocolError(f"bad Content-Length {headers['content-length'][:20]!r}") from None
        if not 0 <= length <= MAX_BODY:
            raise ProtocolError(f"Content-Length {length} out of range")
        return status, _exactly(rfile, length), keep_alive
    body = rfile.read(MAX_BODY + 1)  # delimited by the end of the connection
    if len(body) > MAX_BODY:
        raise ProtocolError("answer body too large")
    return status, body, False


class Connection:
    """One persistent connection to ``host:port``; ``request`` raises OSError or ProtocolError when it broke."""

    def __init__(self, host: str, port: int, https: bool, timeout: float):
        self.host, self.port, self.https, self.timeout = host, port, https, timeout
        default_port = 443 if https else 80
        name = f"[{host}]" if ":" in host else host
        self.host_header = name if port == default_port else f"{name}:{port}"
        self._sock: socket.socket | None = None
        self._rfile: BinaryIO | None = None

    @property
    def open(self) -> bool:
        return self._sock is not None

    def _connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # the request goes out in one write anyway
        if self.https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self._sock, self._rfile = sock, sock.makefile("rb")

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}", f"Content-Length: {len(body)}"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} contains a line break")
            lines.append(f"{name}: {value}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        if self._sock is None:
            self._connect()
        assert self._sock is not None and self._rfile is not None
        try:
            self._sock.sendall(data)
            status, answer, keep_alive = read_response(self._rfile, method)
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status, answer

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._rfile.close()  # type: ignore[union-attr]
                self._sock.close()
            finally:
                self._sock = self._rfile = None
