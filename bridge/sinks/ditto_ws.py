"""Ditto's WebSocket channel for twin updates: Ditto Protocol merge commands, answers matched by correlation-id.

Ditto documents the WebSocket (``/ws/2``, behind nginx's basic auth) as the higher-throughput path: no HTTP
request line and headers per update, one connection for all things. The updater's workers share one
channel; each sends its thing's merge command and waits for the answer with the same correlation-id, so
the rule "one update in flight per thing" and the newer-than condition work exactly as over HTTP.
A dropped connection fails every command waiting on it (the updater retries them, the condition makes a
resend safe) and the next command reconnects.

Nothing here waits without a limit. A send into a peer that stopped reading would block in the socket write
for good, holding the library's connection lock (so its keep-alive pings and its reader stop too): the socket
gets the channel's timeout, and a write that outlasts it breaks the connection. A peer that reads but answers
nothing costs each command its timeout; after ``TIMEOUTS_BEFORE_RECONNECT`` of them in a row the connection is
dropped and the next command opens a new one.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import ClientConnection, connect

from .ditto import MERGE_PATCH, DittoError, basic_auth

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # a twin answer is a few KiB; anything near this is a bug on one side
TIMEOUTS_BEFORE_RECONNECT = 3


def merge_command(thing_id: str, patch: dict[str, Any], condition: str | None, correlation_id: str) -> str:
    """The Ditto Protocol merge of ``patch`` into the whole thing (path ``/``), as WebSocket text; into an existing
    thing only (``if-match: *``, as on HTTP)."""
    namespace, _, name = thing_id.partition(":")
    headers = {"content-type": MERGE_PATCH, "correlation-id": correlation_id, "if-match": "*"}
    if condition:
        headers["condition"] = condition
    return json.dumps(
        {"topic": f"{namespace}/{name}/things/twin/commands/merge", "headers": headers, "path": "/", "value": patch},
        separators=(",", ":"),
    )


def answer_of(message: Any) -> tuple[str, int | None, Any] | None:
    """(correlation-id, status, value) of a Ditto Protocol response; None for anything else (events, acks)."""
    if not isinstance(message, dict):
        return None
    headers = message.get("headers")
    cid = headers.get("correlation-id") if isinstance(headers, dict) else None
    if not isinstance(cid, str):
        return None
    status = message.get("status")
    return cid, status if isinstance(status, int) else None, message.get("value")


@dataclass
class _Call:
    connection: ClientConnection
    done: threading.Event = field(default_factory=threading.Event)
    status: int | None = None
    value: Any = None
    error: DittoError | None = None


class DittoWebSocket:
    """One WebSocket to Ditto, shared by threads; ``merge`` blocks until Ditto answers or ``timeout``."""

    def __init__(self, url: str, username: str, password: str, timeout: float):
        self.url = url
        self.timeout = timeout
        self._auth = basic_auth(username, password)
        self._lock = threading.Lock()
        self._connection: ClientConnection | None = None
        self._calls: dict[str, _Call] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._timeouts_in_a_row = 0

    def merge(self, thing_id: str, patch: dict[str, Any], condition: str | None) -> tuple[int, Any]:
        """Send one merge command; returns (status, value) of Ditto's answer. Raises DittoError when the
        channel cannot be opened, drops, or no answer comes within the timeout (status None: retryable)."""
        cid = f"racktwin-{next(self._ids)}"
        text = merge_command(thing_id, patch, condition, cid)
        with self._lock:
            connection = self._open()
            call = self._calls[cid] = _Call(connection)
        try:
            connection.send(text)
        except (ConnectionClosed, OSError) as exc:
            self._drop(connection, f"{type(exc).__name__}: {exc}")
        if not call.done.wait(self.timeout):
            with self._lock:
                self._calls.pop(cid, None)
                self._timeouts_in_a_row += 1
                silent = self._timeouts_in_a_row >= TIMEOUTS_BEFORE_RECONNECT
            if silent:
                self._drop(connection, f"no answer to {TIMEOUTS_BEFORE_RECONNECT} commands in a row")
            raise DittoError(None, f"TimeoutError: no answer to a merge of {thing_id} within {self.timeout:g} s")
        if call.error is not None:
            raise call.error
        if call.status is None:
            raise DittoError(None, f"answer without a status to a merge of {thing_id}")
        return call.status, call.value

    def _open(self) -> ClientConnection:
        """The open connection, or a new one (caller holds the lock)."""
        if self._closed:
            raise DittoError(None, "the WebSocket channel is closed")
        if self._connection is not None:
            return self._connection
        try:
            connection = connect(
                self.url,
                additional_headers={"Authorization": self._auth},
                open_timeout=self.timeout,
                close_timeout=1.0,
                compression=None,  # small JSON on a LAN: deflate costs more CPU than it saves
                max_size=MAX_MESSAGE_BYTES,
                legacy=True,  # websockets 17: a plain connection object, the behaviour we rely on
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace") if exc.response.body else ""
            raise DittoError(status, f"WebSocket handshake refused: {body}") from None
        except (InvalidHandshake, InvalidURI, OSError, TimeoutError) as exc:
            raise DittoError(None, f"{type(exc).__name__}: {exc}") from None
        # The library leaves its socket blocking: a write into a peer that stopped reading would never return.
        connection.socket.settimeout(self.timeout)
        log.info("Ditto WebSocket connected: %s", self.url)
        self._connection = connection
        self._timeouts_in_a_row = 0
        threading.Thread(target=self._receive, args=(connection,), name="ditto-ws-receive", daemon=True).start()
        return connection

    def _receive(self, connection: ClientConnection) -> None:
        reason = "closed by Ditto"
        try:
            while True:
                text = connection.recv()
                try:
                    answer = answer_of(json.loads(text))
                except ValueError:
                    log.warning("Ditto sent a WebSocket message that is not JSON: %.200r", text)
                    continue
                if answer is None:
                    continue  # events or other traffic we did not ask for
                cid, status, value = answer
                with self._lock:
                    call = self._calls.pop(cid, None)
                    self._timeouts_in_a_row = 0
                if call is not None:
                    call.status, call.value = status, value
                    call.done.set()
        except ConnectionClosed as exc:
            reason = f"closed: {exc}"
        except Exception as exc:  # noqa: BLE001 - whatever breaks the connection fails its calls, never the bridge
            reason = f"{type(exc).__name__}: {exc}"
        self._drop(connection, reason)

    def _drop(self, connection: ClientConnection, reason: str) -> None:
        """Forget a broken connection and fail the commands waiting on it."""
        with self._lock:
            if self._connection is connection:
                self._connection = None
                if not self._closed:
                    log.warning("Ditto WebSocket lost (%s); reconnecting on the next update", reason)
            failed = [cid for cid, call in self._calls.items() if call.connection is connection]
            calls = [self._calls.pop(cid) for cid in failed]
        for call in calls:
            call.error = DittoError(None, f"WebSocket {reason}")
            call.done.set()
        connection.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
