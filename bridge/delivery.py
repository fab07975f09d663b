"""At-least-once bookkeeping: a message is acknowledged to the broker only when every sink confirmed it.

A ``Ticket`` counts the confirmations one MQTT message still waits for. When the count reaches
zero the ticket acknowledges the message, unless the MQTT connection it came on is gone: the broker
then redelivers it on the next session (same packet ids may be reused for other messages, so an
old ack must never be sent on a new connection).
"""

from __future__ import annotations

import threading
from typing import Callable


class Ticket:
    __slots__ = ("_remaining", "_lock", "_on_done")

    def __init__(self, parts: int, on_done: Callable[[], None]):
        self._remaining = parts
        self._lock = threading.Lock()
        self._on_done = on_done
        if parts == 0:
            on_done()

    def confirm(self) -> None:
        with self._lock:
            self._remaining -= 1
            finished = self._remaining == 0
        if finished:
            self._on_done()


class InFlight:
    """Counts unfinished messages, so shutdown can wait for them and /metrics can show them."""

    def __init__(self) -> None:
        self._count = 0
        self._cond = threading.Condition()

    def add(self) -> None:
        with self._cond:
            self._count += 1

    def remove(self) -> None:
        with self._cond:
            self._count -= 1
            if self._count == 0:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return self._count

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout=timeout)
