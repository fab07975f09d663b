"""At-least-once bookkeeping: a message is acknowledged to the broker only when every sink confirmed it (the
Ditto updater confirms without the twin once Ditto has stalled: the twin is current state, InfluxDB the record).

A ``Ticket`` counts the confirmations one MQTT message still waits for. When the count reaches
zero the ticket acknowledges the message, unless the MQTT connection it came on is gone: the broker
then redelivers it on the next session (same packet ids may be reused for other messages, so an
old ack must never be sent on a new connection).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)


def confirm_each(callbacks: Iterable[Callable[[], None] | None], on_error: Callable[[], None]) -> None:
    """Call every confirmation. One that raises is logged and counted (``on_error``) and keeps neither the rest
    nor the sink's thread from going on: else its rack would be stranded and, its messages never acknowledged,
    the broker's receive window would fill and stop the whole bridge."""
    for callback in callbacks:
        if callback is None:
            continue
        try:
            callback()
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("confirming a delivery failed")
            on_error()


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
    """Unfinished messages, so shutdown can wait for them and /metrics can show how many there are and how
    long the oldest has waited (a sink that hangs shows there, while the lag of what got through looks fine)."""

    def __init__(self) -> None:
        self._since: dict[int, float] = {}  # token -> monotonic time it arrived; insertion order = arrival
        self._tokens = itertools.count()
        self._cond = threading.Condition()

    def add(self) -> int:
        """Register a message; give the returned token to ``remove``."""
        with self._cond:
            token = next(self._tokens)
            self._since[token] = time.monotonic()
            return token

    def remove(self, token: int) -> None:
        with self._cond:
            del self._since[token]
            if not self._since:
                self._cond.notify_all()

    @property
    def count(self) -> int:
        return len(self._since)

    def oldest_age_s(self) -> float:
        """Seconds the oldest unfinished message has waited; 0 when none is."""
        with self._cond:
            oldest = next(iter(self._since.values()), None)
        return 0.0 if oldest is None else max(0.0, time.monotonic() - oldest)

    def wait_empty(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._since, timeout=timeout)
