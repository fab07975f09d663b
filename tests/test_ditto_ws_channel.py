"""The WebSocket channel against peers that misbehave at the TCP level, which the Ditto double never does: one
that stops reading (a send must not block for good) and one that reads but never answers (the channel must
give up on that connection, not time out forever on it)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from bridge.sinks.ditto import DittoError
from bridge.sinks.ditto_ws import TIMEOUTS_BEFORE_RECONNECT, DittoWebSocket
from tests.doubles import ditto_ws

TIMEOUT_S = 1.0


class StubbornPeer:
    """Accepts WebSocket connections, completes each handshake, then either never reads again
    (``reads=False``) or reads and discards every frame without answering."""

    def __init__(self, reads: bool):
        self.reads = reads
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}/ws/2"
        self.connections: list[socket.socket] = []
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if not self.reads:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip().decode() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + ditto_ws.accept_key(key).encode() + b"\r\n\r\n")
        if not self.reads:
            self.stop.wait()  # TCP stays up with a zero window: every byte sent to us stays queued
            return
        with conn.makefile("rb") as stream:
            try:
                while ditto_ws.read_frame(stream) is not None and not self.stop.is_set():
                    pass
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def peer(request):
    stub = StubbornPeer(reads=request.param)
    yield stub
    stub.close()


def merge_in_thread(channel: DittoWebSocket, thing: str, size: int, results: dict) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            channel.merge(thing, {"attributes": {"blob": "x" * size}}, None)
            results[thing] = ("answered", time.monotonic() - started)
        except DittoError as exc:
            results[thing] = (str(exc), time.monotonic() - started)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("peer", [False], indirect=True)
def test_a_peer_that_stops_reading_fails_the_sends_within_the_timeout_and_close_returns(peer):
    channel = DittoWebSocket(peer.url, "bridge", "secret", TIMEOUT_S)
    results: dict = {}
    # 16 MB fills the socket buffers (the peer reads nothing), so that send blocks in the socket write; the
    # small ones queue behind the library's connection lock.
    threads = [merge_in_thread(channel, "dc.test:big", 16_000_000, results)]
    time.sleep(0.2)
    threads += [merge_in_thread(channel, f"dc.test:small-{i}", 100, results) for i in range(3)]
    for thread in threads:
        thread.join(timeout=6 * TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), f"a merge still blocked: {results}"
    assert set(results) == {"dc.test:big", *(f"dc.test:small-{i}" for i in range(3))}
    assert all(outcome != "answered" and took < 4 * TIMEOUT_S for outcome, took in results.values()), results
    closer = threading.Thread(target=channel.close, daemon=True)
    closer.start()
    closer.join(timeout=4 * TIMEOUT_S)
    assert not closer.is_alive(), "close() blocked on the stuck connection (SIGTERM would hang the bridge)"


@pytest.mark.parametrize("peer", [True], indirect=True)
def test_a_peer_that_never_answers_gets_a_new_connection_after_some_timeouts_in_a_row(peer):
    channel = DittoWebSocket(peer.url, "bridge", "secret", TIMEOUT_S / 2)
    try:
        for i in range(TIMEOUTS_BEFORE_RECONNECT):
            with pytest.raises(DittoError, match="no answer"):
                channel.merge(f"dc.test:rack-{i}", {}, None)
        assert len(peer.connections) == 1  # timeouts alone, until the limit, keep the connection
        with pytest.raises(DittoError, match="no answer"):
            channel.merge("dc.test:rack-next", {}, None)
        assert len(peer.connections) == 2  # the silent one was dropped and the next command reconnected
    finally:
        channel.close()
