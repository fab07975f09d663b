"""Ditto twin sink: one request in flight per thing, later readings merged into the next request.

Ditto is slower than the input, so each rack thing has a pending merge patch. While a request for
that thing is in flight, new readings fold into the pending patch; when the request ends the
pending patch goes next. Workers run different things concurrently over kept-alive connections.
Every PATCH carries a condition that the twin's source timestamps are not newer than ours, so an older
reading can never overwrite a newer one; a failed condition is "stale", not an error.

A reading's confirmation (and so its MQTT acknowledgement) waits for its twin update while Ditto takes updates.
Ditto has stalled when it has answered no update for ``ditto_release_after_s`` while readings wait on it, and
either a failure since then was Ditto's as a whole (no answer, 5xx, 401, 408, 424, 429) or a request has been
out that long (hung). Then the waiting readings, and every reading until Ditto answers an update again, are
confirmed at once ("released"): the broker's receive window would otherwise fill with messages waiting on Ditto
alone and stop InfluxDB's writes too. The pending updates keep the newest reading per position; one of them is
retried every second as a probe, and all of them as soon as Ditto answers. A bridge that stops or dies meanwhile
leaves those twins where Ditto last took them, until each position's next reading. A twin refused on its own
(403, 404, a condition failing) releases nothing, however quiet the traffic: its messages wait, and the
bridge-lagging alert sees them age.
"""

from __future__ import annotations

import base64
import heapq
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import quote, urlsplit

import requests

from .. import twin
from . import http11
from ..config import Settings
from ..delivery import confirm_each
from ..mapping import Position, RackLocation, SensorReading
from ..metrics import DITTO_OUTCOMES, Metrics
from ..thresholds import SILENT, SILENT_AFTER_INTERVALS

if TYPE_CHECKING:
    from .ditto_ws import DittoWebSocket

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# 424: an acknowledgement (twin-persisted) failed or timed out, i.e. Ditto could not persist it just then.
RETRY_STATUSES = {401, 403, 404, 408, 424, 429}  # and every 5xx: see retryable()
# Failures that are Ditto's as a whole, not one twin's (403 and 404 are a thing's policy or existence): with every
# 5xx and no answer at all, these can make a stall (module docstring). 401: our credentials, for every thing.
DITTO_WIDE_STATUSES = {401, 408, 424, 429}
SEARCH_PAGE_SIZE = 200  # Ditto's largest search page (ditto.md)
ADOPT_RETRY_S = 30.0  # reading the twins already in Ditto at start, while Ditto cannot answer yet
# A twin update that raised something unexpected (a bug, or a twin edited into a shape we cannot read) is retried
# this many times, reading the twin afresh each time, and then given up: its readings stay in InfluxDB.
MAX_UNEXPECTED_FAILURES = 3
# A twin position dated further ahead of our clock than this makes every reading older than it stale until then:
# a device clock running fast (mapping accepts up to ``max_future_s`` ahead), worth one warning per twin.
FUTURE_WARN_AFTER_MS = 60_000


def ditto_wide(status: int | None) -> bool:
    """No answer, a server or proxy error, or a DITTO_WIDE_STATUSES answer: Ditto's trouble, not one twin's."""
    return status is None or status >= 500 or status in DITTO_WIDE_STATUSES


def retryable(status: int | None) -> bool:
    """No answer, a server or proxy error, overload, or a policy/thing not there yet: worth waiting for."""
    return status is None or status >= 500 or status in RETRY_STATUSES


def basic_auth(username: str, password: str) -> str:
    """The Authorization header value nginx's basic auth expects."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


# urllib's quote(text, safe="") keeps letters, digits and "_.-~" and percent-encodes every other byte. A twin
# update's condition is ASCII (property paths, ISO timestamps): a lookup per byte does the same for it in less
# than half the time (6 against 13 µs for a two-position condition); anything else goes through quote.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTED_ASCII = [chr(c) if chr(c) in _UNRESERVED else f"%{c:02X}" for c in range(128)]


def quote_component(text: str) -> str:
    """``urllib.parse.quote(text, safe="")``, fast for ASCII text."""
    if text.isascii():
        return "".join([_QUOTED_ASCII[b] for b in text.encode()])
    return quote(text, safe="")


class DittoError(Exception):
    def __init__(self, status: int | None, text: str):
        super().__init__(f"HTTP {status}: {text[:200]}" if status is not None else text[:200])
        self.status = status  # None: no answer (connection refused, reset, timeout): always retried
        self.of_policy = False  # refused on the shared policy, which every twin update needs first


class _KeptAliveConnection:
    """One kept-alive HTTP connection for the twin-update hot path (http11.Connection).

    Profiling showed requests' per-call machinery costing about as much CPU as the rest of the bridge per
    message, and http.client's header parsing most of what was left; see http11 for the figures.
    """

    def __init__(self, base_url: str, timeout: float, username: str, password: str):
        parts = urlsplit(base_url)
        https = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        self.auth = basic_auth(username, password)
        self._conn = http11.Connection(parts.hostname or "localhost", parts.port or (443 if https else 80), https,
                                       timeout)

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        headers = {"Authorization": self.auth, **headers}
        for attempt in (1, 2):
            reused = self._conn.open
            try:
                return self._conn.request(method, self.prefix + path, headers, body)
            except (OSError, ValueError) as exc:  # ValueError: http11.ProtocolError, a broken answer
                # A kept-alive connection the server closed while idle fails on first use: reconnect once.
                # Re-sending is safe: the update carries its newer-than condition.
                if reused and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue
                raise DittoError(None, f"{type(exc).__name__}: {exc}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


@dataclass
class _Waiter:
    ts_ms: int
    on_confirmed: Callable[[], None] | None


@dataclass
class _Thing:
    tid: str
    location: RackLocation
    ensured: bool = False
    known: dict[Position, twin.PositionState] = field(default_factory=dict)
    attributes_sent: dict[str, Any] | None = None
    devices: dict[Position, str] = field(default_factory=dict)
    pending: dict[Position, twin.PositionState] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)
    scheduled: bool = False
    attempts: int = 0
    released: bool = False  # readings acknowledged while Ditto stalled are in ``pending``, not yet in Ditto
    envelope: str | None = None  # the rack state the twin holds, as last written or read
    recheck: bool = False  # scheduled by the silence sweep, with nothing pending: mark the twin SILENT
    unexpected_failures: int = 0
    dated_ahead_told: bool = False  # warned of as dated ahead of our clock, until its next write goes through


class DittoClient:
    """Thin HTTP adapter for the few Ditto calls we make. One instance per worker thread.

    With a ``channel`` (the shared WebSocket), the hot-path twin update goes over it instead of HTTP.
    """

    def __init__(self, settings: Settings, channel: "DittoWebSocket | None" = None):
        self.channel = channel
        self.base = settings.ditto_url
        self.timeout = settings.ditto_timeout_s
        self.session = requests.Session()
        password = settings.ditto_password.get_secret_value() if settings.ditto_password else ""
        self.session.auth = (settings.ditto_username, password)
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=2, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.fast = _KeptAliveConnection(self.base, self.timeout, settings.ditto_username, password)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=self.timeout, **kwargs)

    def get_thing(self, tid: str) -> dict[str, Any] | None:
        resp = self.request(
            "GET",
            twin.thing_path(tid),
            params={"fields": f"thingId,policyId,attributes,{twin.PROPS_PATH}"},
        )
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise DittoError(resp.status_code, resp.text)
        return resp.json()

    def search_page(self, namespace: str, rql_filter: str, cursor: str | None = None) -> tuple[list[dict[str, Any]],
                                                                                            str | None]:
        """One page of the namespace's twins matching ``rql_filter`` (id, attributes, environment properties) and the
        cursor to the next page (None on the last), which needs the same filter. Ditto sorts by thingId unless told
        otherwise."""
        option = f"size({SEARCH_PAGE_SIZE})" + (f",cursor({cursor})" if cursor else "")
        resp = self.request("GET", "/api/2/search/things", params={
            "namespaces": namespace, "filter": rql_filter, "fields": f"thingId,attributes,{twin.PROPS_PATH}",
            "option": option})
        if resp.status_code != 200:
            raise DittoError(resp.status_code, resp.text)
        body = resp.json()
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise DittoError(resp.status_code, f"search answer without items: {resp.text[:200]}")
        following = body.get("cursor")
        return [item for item in items if isinstance(item, dict)], following if isinstance(following, str) else None

    def _create_only(self, path: str, body: dict[str, Any]) -> bool:
        """PUT with If-None-Match: * — True if created, False if it already existed."""
        resp = self.request(
            "PUT", path, data=json.dumps(body), headers={"Content-Type": "application/json", "If-None-Match": "*"}
        )
        if resp.status_code == 201:
            return True
        if resp.status_code == 412:
            return False
        raise DittoError(resp.status_code, resp.text)

    def create_thing(self, tid: str, body: dict[str, Any]) -> bool:
        return self._create_only(twin.thing_path(tid), body)

    def patch_thing(self, tid: str, patch: dict[str, Any], condition: str) -> int:
        """The hot path: one conditional merge per thing update, on the WebSocket channel or as a
        merge-PATCH on the kept-alive connection. Into an existing thing only (If-Match: *): a merge into a
        thing ops deleted would create it with Ditto's default policy, which Grafana cannot read; 412 then
        makes the caller read it again, and create it properly."""
        if self.channel is not None:
            status, value = self.channel.merge(tid, patch, condition)
            if status in (204, 412):
                return status
            raise DittoError(status, json.dumps(value)[:300])
        path = twin.thing_path(tid) + "?condition=" + quote_component(condition)
        body = json.dumps(patch, separators=(",", ":")).encode()
        status, data = self.fast.request("PATCH", path, body, {"Content-Type": MERGE_PATCH, "If-Match": "*"})
        if status in (204, 412):
            return status
        raise DittoError(status, data.decode(errors="replace"))

    def patch_existing(self, tid: str, patch: dict[str, Any], condition: str | None = None) -> bool:
        """Merge into a thing only if it exists (If-Match: *) and ``condition`` holds; False when either fails.

        On the kept-alive connection too: the forecast publisher sends one per changed rack position."""
        body = json.dumps(patch, separators=(",", ":")).encode()
        path = twin.thing_path(tid) + ("?condition=" + quote_component(condition) if condition else "")
        status, data = self.fast.request("PATCH", path, body, {"Content-Type": MERGE_PATCH, "If-Match": "*"})
        if status in (201, 204):
            return True
        if status == 412:
            return False
        raise DittoError(status, data.decode(errors="replace"))

    def ensure_policy(self, policy_id: str, body: dict[str, Any]) -> bool:
        return self._create_only("/api/2/policies/" + requests.utils.quote(policy_id, safe=":"), body)

    def health(self) -> bool:
        try:
            return self.session.get(self.base + "/health", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.fast.close()
        self.session.close()


class DittoUpdater:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        # Labelled children looked up once: .labels() per update was a few per cent of the bridge's CPU.
        self._lag = metrics.lag.labels("ditto")
        self._outcomes = {outcome: metrics.ditto_updates.labels(outcome) for outcome in DITTO_OUTCOMES}
        self._coalesced = 0  # counted under the lock, added to the metric by the worker that sends the update
        self._things: dict[str, _Thing] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ready: list[str] = []  # FIFO of thing ids with pending work
        self._ready_head = 0
        self._delayed: list[tuple[float, int, str]] = []  # (due, seq, tid) for backoff
        self._seq = 0
        self._busy = 0
        self._stopping = False
        self._abandon = False
        self._workers = [
            threading.Thread(target=self._work, name=f"ditto-{i}", daemon=True)
            for i in range(settings.ditto_concurrency)
        ]
        self.healthy = True
        self.policy_ready = False
        self.last_error: str | None = None
        self._last_error_kind: str | None = None
        self._refused: set[str] = set()  # twins refused (403) since Ditto last took an update
        self.channel = self._channel(settings)
        # Stall detection (module docstring): readings waiting on Ditto, since when Ditto last made progress for
        # them (an update taken, or the first of them arriving), and whether we are releasing.
        self._waiting = 0
        self._progress_at = time.monotonic()
        self._ditto_wide_failure = False  # since _progress_at
        self._requests: dict[int, float] = {}  # worker thread -> when its current update began
        self._stalled = False
        self._last_probe = 0.0
        self._watch_stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="ditto-watch", daemon=True)
        self._adopter = threading.Thread(target=self._adopt_existing, name="ditto-adopt", daemon=True)

    @staticmethod
    def _channel(settings: Settings) -> "DittoWebSocket | None":
        if settings.ditto_transport != "websocket":
            return None
        from .ditto_ws import DittoWebSocket  # only users of the WebSocket need its library loaded

        password = settings.ditto_password.get_secret_value() if settings.ditto_password else ""
        return DittoWebSocket(settings.websocket_url, settings.ditto_username, password, settings.ditto_timeout_s)

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        for worker in self._workers:
            worker.start()
        self._watcher.start()
        self._adopter.start()

    def ensure_policy(self, client: DittoClient | None = None) -> None:
        own = client is None
        client = client or DittoClient(self.settings)
        try:
            created = client.ensure_policy(
                self.settings.policy_id, twin.policy_body(self.settings.ditto_policy_subjects)
            )
            log.info("Ditto policy %s %s", self.settings.policy_id, "created" if created else "exists")
            self.policy_ready = True
        finally:
            if own:
                client.close()

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while (self._pending_work() or self._busy) and time.monotonic() < deadline:
                self._cond.wait(timeout=0.1)
            self._abandon = True
            self._cond.notify_all()
            behind = sum(1 for thing in self._things.values() if thing.released)
        self._watch_stop.set()
        if behind:  # the others' readings were not acknowledged: the broker redelivers them
            log.warning("stopping with %d twins missing readings acknowledged while Ditto was stalled: they stay "
                        "as Ditto last took them until each position's next reading", behind)
        for worker in self._workers:
            worker.join(timeout=max(0.1, deadline - time.monotonic()) + self.settings.ditto_timeout_s)
        if self.channel is not None:
            self.channel.close()

    @property
    def stalled(self) -> bool:
        """Readings are being acknowledged without their twin update (module docstring)."""
        return self._stalled

    def _count(self, outcome: str) -> None:
        (self._outcomes.get(outcome) or self.metrics.ditto_updates.labels(outcome)).inc()

    def _pending_work(self) -> bool:
        return self._ready_head < len(self._ready) or bool(self._delayed)

    # -- input -----------------------------------------------------------------------------------------

    def submit(self, reading: SensorReading, on_confirmed: Callable[[], None] | None) -> None:
        tid = twin.thing_id(self.settings.ditto_namespace, reading.rack)
        release = None
        with self._cond:
            thing = self._things.get(tid)
            if thing is None:
                thing = self._things[tid] = _Thing(tid, reading.location)
            thing.location = reading.location
            current = thing.pending.get(reading.position)
            if thing.pending:
                self._coalesced += 1
            # At an equal timestamp too: the other half of a reading sent as two messages (fields it lacks are kept).
            if current is None or reading.ts_ms >= current.ts_ms:
                thing.pending[reading.position] = twin.merge_reading(current, reading)
            if self._stalled:  # Ditto takes nothing: do not make the message wait for it (module docstring)
                release = _Waiter(reading.ts_ms, on_confirmed)
                thing.released = True
            else:
                if not self._waiting:  # nothing was waiting: Ditto is not behind yet
                    self._progress_at = time.monotonic()
                self._waiting += 1
                thing.waiters.append(_Waiter(reading.ts_ms, on_confirmed))
            if not thing.scheduled:
                thing.scheduled = True
                self._ready.append(tid)
                self._cond.notify()
        if release is not None:
            self._release([release])

    # -- workers ---------------------------------------------------------------------------------------

    def _next(self) -> str | None:
        with self._cond:
            while True:
                if self._abandon:
                    return None
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._ready.append(heapq.heappop(self._delayed)[2])
                if self._ready_head < len(self._ready):
                    tid = self._ready[self._ready_head]
                    self._ready_head += 1
                    if self._ready_head > 4096 and self._ready_head * 2 > len(self._ready):
                        del self._ready[: self._ready_head]
                        self._ready_head = 0
                    self._busy += 1
                    return tid
                if self._stopping and not self._delayed and not self._busy:
                    return None
                wait = self._delayed[0][0] - now if self._delayed else 0.5
                self._cond.wait(timeout=max(0.01, min(wait, 0.5)))

    def _work(self) -> None:
        client = DittoClient(self.settings, self.channel)
        try:
            while (tid := self._next()) is not None:
                try:
                    self._update(client, tid)
                finally:
                    with self._cond:
                        self._requests.pop(threading.get_ident(), None)
                        self._busy -= 1
                        if self._stopping:  # stop() and the idle workers wait for the last busy one; else
                            self._cond.notify_all()  # it would wake every idle worker after every update
        finally:
            client.close()

    def _update(self, client: DittoClient, tid: str) -> None:
        worker = threading.get_ident()
        with self._lock:
            self._requests[worker] = time.monotonic()
            thing = self._things[tid]
            pending, waiters = thing.pending, thing.waiters
            thing.pending, thing.waiters = {}, []
            recheck, thing.recheck = thing.recheck, False
            coalesced, self._coalesced = self._coalesced, 0
        if coalesced:
            self.metrics.coalesced.inc(coalesced)
        outcome: str | None = None
        answered = False
        try:
            if pending:
                outcome, answered = self._send(client, thing, pending)
            elif recheck:
                outcome, answered = self._send_silent(client, thing)
        except (requests.RequestException, DittoError) as exc:
            thing.recheck = recheck and not pending  # the retry marks it then (the thing is ours: no sweep races)
            self._retry_later(thing, pending, waiters, exc)
            return
        except Exception:  # noqa: BLE001 - the worker must survive it, and the rack's readings must not be
            # stranded: left pending and scheduled, they would never be sent nor their messages acknowledged
            thing.recheck = recheck and not pending
            self._failed_unexpectedly(thing, pending, waiters)
            return
        thing.unexpected_failures = 0
        if answered:  # an update found stale without a request says nothing about Ditto
            self._mark_healthy()
        if outcome is not None:
            self._count(outcome)
        now = time.time()
        for waiter in waiters:
            self._lag.observe(max(0.0, now - waiter.ts_ms / 1000))
        confirm_each([w.on_confirmed for w in waiters], self.metrics.internal_errors.inc)
        self._finish(thing, len(waiters), progress=answered, delivered=True)

    def _send(self, client: DittoClient, thing: _Thing,
              pending: dict[Position, twin.PositionState]) -> tuple[str, bool]:
        """Bring the twin up to ``pending``; returns the result label and whether Ditto answered a request (an
        update whose readings are all older than the twin needs none). Raises on retryable failure."""
        answered = not thing.ensured
        created = not thing.ensured and self._ensure_thing(client, thing)
        fresh, stale = twin.drop_stale(pending, thing.known)
        result = "ok"
        for _ in range(3):  # a failed condition means someone else wrote: re-read and try what is left
            if stale:
                self.metrics.stale.inc(len(stale))
                result = "stale"
                self._note_dated_ahead(thing, stale)
            if not fresh:
                return result, answered
            known = dict(thing.known)
            for position, state in fresh.items():
                known[position] = state
                thing.devices[position] = state.device or thing.devices.get(position, "")
            attributes = twin.attributes_for(thing.location, thing.devices)
            patch = twin.build_patch(fresh, known, None if attributes == thing.attributes_sent else attributes,
                                     (self.settings.ashrae_class, self.settings.rh_cap), self._silent_since_ms())
            envelope = patch["features"][twin.FEATURE]["properties"].get("envelope", thing.envelope)
            condition = twin.newer_than_condition(fresh)
            if envelope == SILENT:
                # Judged from positions this write does not carry: another replica may have newer readings there.
                others = [p for p in twin.POSITIONS if p not in fresh]
                condition = twin.all_of([condition, *twin.nothing_newer(thing.known, others)])
            status = client.patch_thing(thing.tid, patch, condition)
            answered = True
            if status == 204:
                thing.known = known
                thing.attributes_sent = attributes
                thing.envelope = envelope
                thing.dated_ahead_told = False
                return ("created" if created else "ok"), answered
            self._reread(client, thing)
            fresh, stale = twin.drop_stale(fresh, thing.known)
        raise DittoError(412, f"condition kept failing on {thing.tid}")

    def _note_dated_ahead(self, thing: _Thing, stale: list[Position]) -> None:
        """Readings held back by a twin position dated ahead of our clock freeze that position until then, which
        the stale counter alone does not explain: say so once per twin (until a write goes through again)."""
        if thing.dated_ahead_told:
            return
        now_ms = time.time() * 1000
        ahead = {p: thing.known[p].ts_ms - now_ms for p in stale if p in thing.known}
        ahead = {p: ms for p, ms in ahead.items() if ms > FUTURE_WARN_AFTER_MS}
        if not ahead:
            return
        thing.dated_ahead_told = True
        position, ms = max(ahead.items(), key=lambda item: item[1])
        log.warning("%s: its %s reading is dated %.0f s ahead of this bridge's clock, so older readings of it are "
                    "not written to the twin (InfluxDB gets them) until then: a device clock running fast, or this "
                    "host's clock slow?", thing.tid, position, ms / 1000)

    def _reread(self, client: DittoClient, thing: _Thing) -> None:
        """A condition failed: someone else wrote the twin; take what it holds now."""
        if not self._refresh(client, thing):
            thing.ensured = False
            raise DittoError(404, f"thing {thing.tid} vanished")

    def _refresh(self, client: DittoClient, thing: _Thing) -> bool:
        """Take what the twin holds now; False if it is not there."""
        current = client.get_thing(thing.tid)
        if current is None:
            return False
        self._take(thing, current)
        return True

    @staticmethod
    def _take(thing: _Thing, current: dict[str, Any]) -> None:
        """Our view of the twin from its JSON as Ditto holds it."""
        thing.known = twin.known_from_thing(current)
        thing.attributes_sent = current.get("attributes")
        thing.envelope = twin.envelope_of(current)
        for position, state in thing.known.items():
            if state.device:
                thing.devices.setdefault(position, state.device)
        thing.ensured = True

    # -- silent racks ----------------------------------------------------------------------------------

    def _silent_since_ms(self) -> int:
        """A position whose newest reading is older than this (epoch ms) is silent."""
        return int(time.time() * 1000) - SILENT_AFTER_INTERVALS * self.settings.reading_interval_s * 1000

    def _silent_now(self, thing: _Thing) -> bool:
        return thing.envelope != SILENT and twin.rack_state(
            thing.known, self.settings.ashrae_class, self.settings.rh_cap, self._silent_since_ms()) == SILENT

    def _judged_silent(self, thing: _Thing) -> bool:
        """``_silent_now`` for the sweeps over many twins: one edited into values we cannot judge is logged and
        counted, and left out, so the others go on."""
        try:
            return self._silent_now(thing)
        except Exception:  # noqa: BLE001 - see above
            log.exception("cannot judge whether %s is silent", thing.tid)
            self.metrics.internal_errors.inc()
            return False

    def _send_silent(self, client: DittoClient, thing: _Thing) -> tuple[str, bool]:
        """Mark the twin SILENT, on condition that it exists (never create one: ops may have deleted it) and still
        holds no newer readings than we know; else take what it holds now."""
        answered = not thing.ensured
        if not thing.ensured and not self._refresh(client, thing):
            return self._gone(thing)
        if not self._silent_now(thing):  # a reading came meanwhile, or the twin read says otherwise
            return "stale", answered
        if client.patch_existing(thing.tid, twin.silent_patch(), twin.unchanged_condition(thing.known)):
            thing.envelope = SILENT
            return "ok", True
        return ("stale", True) if self._refresh(client, thing) else self._gone(thing)

    @staticmethod
    def _gone(thing: _Thing) -> tuple[str, bool]:
        """The twin was deleted: nothing to mark, and nothing to sweep until a reading creates it again."""
        log.info("twin %s is gone: not marked silent (a new reading creates it again)", thing.tid)
        thing.known, thing.envelope, thing.ensured = {}, None, False
        return "stale", True

    def _adopt_existing(self) -> None:
        """Take the silent racks' twins Ditto already holds into the silence sweep: a rack that went quiet while no
        bridge ran sends nothing that would bring it to this one's notice, and its tile would keep its last colour
        for good. Waits 3 reporting intervals first: by then every rack still reporting (a backlog the broker held
        included) has come in by its readings, and a twin another replica keeps writing is not silent, so only
        the silent ones are taken. A failed page is tried again every ``ADOPT_RETRY_S`` (Ditto may be starting)."""
        if self._watch_stop.wait(SILENT_AFTER_INTERVALS * self.settings.reading_interval_s):
            return
        client = DittoClient(self.settings)
        adopted, cursor = 0, None
        try:
            while not self._watch_stop.is_set():
                if cursor is None:  # only the twins with a position silent by now: Ditto's index does the sifting
                    rql_filter = twin.older_than_filter(self._silent_since_ms())
                try:
                    items, following = client.search_page(self.settings.ditto_namespace, rql_filter, cursor)
                    adopted += self._adopt(items)
                    if following is None:
                        log.info("%d silent racks' twins found in Ditto at start, to be marked SILENT", adopted)
                        return
                    cursor = following
                    continue
                except (DittoError, requests.RequestException) as exc:
                    if self._watch_stop.is_set():  # the bridge is stopping: a request cut short says nothing
                        return
                    status = exc.status if isinstance(exc, DittoError) else None
                    if status == 400 and cursor is not None:  # the cursor expired: from the first page again
                        cursor = None
                    elif not retryable(status):
                        log.error("cannot read the twins already in Ditto (%s): racks silent since before this "
                                  "start are not marked SILENT", str(exc)[:200])
                        return
                    log.warning("cannot read the twins already in Ditto yet (%s); trying again in %.0f s",
                                str(exc)[:200], ADOPT_RETRY_S)
                self._watch_stop.wait(ADOPT_RETRY_S)
        except Exception:  # noqa: BLE001 - a bug here must not end the bridge
            log.exception("reading the twins already in Ditto failed: racks silent since before this start are not "
                          "marked SILENT")
            self.metrics.internal_errors.inc()
        finally:
            client.close()

    def _adopt(self, items: list[dict[str, Any]]) -> int:
        """Add the twins of one search page that are silent and that no reading has brought in; how many."""
        adopted = 0
        for item in items:
            tid = item.get("thingId")
            if not isinstance(tid, str) or tid in self._things:  # a reading brought it in: its view is newer
                continue
            thing = _Thing(tid, twin.location_of(item))
            self._take(thing, item)
            # Read by search, not through the things API: its first write reads it again (the SILENT mark drops a
            # twin deleted meanwhile; a reading's update creates it with our policy and attributes).
            thing.ensured = False
            if not self._judged_silent(thing):
                continue
            with self._cond:
                if self._things.setdefault(tid, thing) is thing:
                    adopted += 1
        return adopted

    def mark_silent_racks(self) -> int:
        """Schedule the racks that have gone silent (a position without a reading for 3 reporting intervals) for
        a SILENT mark on their twin, so the wall's tile stops showing a dead sensor's last colour. Racks with work
        scheduled are left to it: their update writes the state anyway. Returns how many were scheduled."""
        since = self._silent_since_ms()
        scheduled = 0
        with self._cond:
            for thing in self._things.values():
                # Not scheduled: no worker has the thing, so its known state is not being replaced.
                if thing.scheduled or not thing.known or not any(s.ts_ms < since for s in thing.known.values()):
                    continue
                if self._judged_silent(thing):
                    thing.recheck = thing.scheduled = True
                    self._ready.append(thing.tid)
                    scheduled += 1
            if scheduled:
                self._cond.notify_all()
        return scheduled

    def _ensure_thing(self, client: DittoClient, thing: _Thing) -> bool:
        """Read the twin, creating it (with our policy) if it is not there; True if it created it."""
        if not self.policy_ready:
            try:
                self.ensure_policy(client)
            except DittoError as exc:
                exc.of_policy = True
                raise
        current = client.get_thing(thing.tid)
        if current is None:
            attributes = twin.attributes_for(thing.location, thing.devices)
            if client.create_thing(thing.tid, twin.new_thing_body(self.settings.policy_id, attributes)):
                log.info("created twin %s", thing.tid)
                thing.known, thing.attributes_sent, thing.envelope = {}, attributes, None
                thing.ensured = True
                return True
            current = client.get_thing(thing.tid)
            if current is None:
                raise DittoError(404, f"thing {thing.tid} neither creatable nor readable")
        self._take(thing, current)
        return False

    def _give_up(self, thing: _Thing, waiters: list[_Waiter]) -> None:
        """Drop this update (its readings are in InfluxDB already) and release its messages."""
        self._count("error")
        thing.recheck = False  # a silence mark given up with the rest: the next sweep judges again
        confirm_each([w.on_confirmed for w in waiters], self.metrics.internal_errors.inc)
        self._finish(thing, len(waiters), progress=False, delivered=False)

    def _finish(self, thing: _Thing, confirmed: int, progress: bool, delivered: bool) -> None:
        """An update is over (sent, or given up): its ``confirmed`` waiting readings are done with, and the thing
        goes again if readings arrived meanwhile, else idles. ``progress``: Ditto answered it, so it has not
        stalled, and what waits out a back-off goes now. ``delivered``: the twin has all we had for it."""
        with self._cond:
            self._waiting -= confirmed
            resumed = False
            if progress:
                self._progress_at = time.monotonic()
                self._ditto_wide_failure = False
                self._refused.clear()
                resumed, self._stalled = self._stalled, False
                if resumed:  # each back-off (up to 10 s) would hold its rack's readings up again, window and all
                    self._ready.extend(tid for _, _, tid in self._delayed)
                    self._delayed.clear()
                    self._cond.notify_all()
            thing.attempts = 0
            if thing.pending:
                self._ready.append(thing.tid)
                self._cond.notify()
            else:
                thing.scheduled = False
                if delivered:
                    thing.released = False
        if resumed:
            log.info("Ditto answers twin updates again: acknowledgements wait for the twin again")

    def _failed_unexpectedly(self, thing: _Thing, pending: dict, waiters: list[_Waiter]) -> None:
        """Called from an except block: log the traceback, re-read the twin next time, retry a few times."""
        self.metrics.internal_errors.inc()
        thing.ensured = False
        thing.unexpected_failures += 1
        if thing.unexpected_failures >= MAX_UNEXPECTED_FAILURES:
            log.exception("giving up the twin update of %s after %d unexpected errors (its readings are in "
                          "InfluxDB)", thing.tid, thing.unexpected_failures)
            thing.unexpected_failures = 0
            self._give_up(thing, waiters)
            return
        log.exception("unexpected error updating the twin %s; will retry", thing.tid)
        self._count("retry")
        self._requeue(thing, pending, waiters)

    def _retry_later(self, thing: _Thing, pending: dict, waiters: list[_Waiter], exc: Exception) -> None:
        status = getattr(exc, "status", None)
        if not retryable(status) and status != 412:
            # A request Ditto will never accept (bad id, body too large): it cannot succeed by waiting.
            log.error("Ditto refused update of %s for good: %s", thing.tid, exc)
            self._give_up(thing, waiters)
            return
        self._count("retry")
        error = str(exc)
        # One line per kind of failure, not per twin: Ditto's answer names the thing.
        kind = error.replace(thing.tid, "<thing>").replace(thing.tid.split(":", 1)[-1], "<thing>")
        with self._cond:  # checked and set at once: workers failing together would each see healthy and log
            first_of_kind = self.healthy or kind != self._last_error_kind
            self.healthy = False
            self.last_error, self._last_error_kind = error, kind
        if first_of_kind:
            log.warning("Ditto update of %s failed, will retry: %s", thing.tid, error[:200])
        if status in (401, 403, 404):
            thing.ensured = False
        if ditto_wide(status) or getattr(exc, "of_policy", False):
            self._ditto_wide_failure = True
        elif status == 403:
            # One twin refused is that twin's policy; refusals of two twins with none taken meanwhile are our
            # permissions on them all (e.g. a read-only grant): a stall, or the receive window fills and
            # InfluxDB's writes stop behind them.
            with self._cond:
                self._refused.add(thing.tid)
                if len(self._refused) >= 2:
                    self._ditto_wide_failure = True
        self._requeue(thing, pending, waiters)

    def _requeue(self, thing: _Thing, pending: dict, waiters: list[_Waiter]) -> None:
        """Put a failed update back, after a back-off that grows with the thing's failures in a row; its readings
        keep waiting, unless Ditto has stalled."""
        with self._cond:
            # Fold what we failed to send back in with what arrived meanwhile; per position the newest wins,
            # whichever of the two it is (a reading that arrived meanwhile may be older than the failed one).
            for position, state in pending.items():
                other = thing.pending.get(position)
                thing.pending[position] = state if other is None else twin.newest_of(state, other)
            released: list[_Waiter] = []
            if self._stalled:  # taken by this worker when the watcher released the others: released now
                released = waiters
                self._waiting -= len(released)
                thing.released = thing.released or bool(released)
            else:
                thing.waiters = waiters + thing.waiters
            thing.attempts += 1
            delay = min(0.1 * 2 ** min(thing.attempts, 8), 10.0)
            self._seq += 1
            heapq.heappush(self._delayed, (time.monotonic() + delay, self._seq, thing.tid))
            self._cond.notify()
        self._release(released)

    def _release(self, waiters: list[_Waiter]) -> None:
        """Confirm readings whose twin update has not reached Ditto (see the module docstring)."""
        if waiters:
            self.metrics.ditto_released.inc(len(waiters))
            confirm_each([w.on_confirmed for w in waiters], self.metrics.internal_errors.inc)

    # -- stall detection -------------------------------------------------------------------------------

    def _watch(self) -> None:
        period = min(0.25, self.settings.ditto_release_after_s / 4)
        silence_every = min(30.0, float(self.settings.reading_interval_s))
        silence_due = time.monotonic() + silence_every
        while not self._watch_stop.wait(period):
            try:
                self.release_if_stalled()
                self._probe_if_stalled()
                if time.monotonic() >= silence_due and not self._stopping:
                    silence_due = time.monotonic() + silence_every
                    self.mark_silent_racks()
            except Exception:  # noqa: BLE001 - e.g. a twin edited into values we cannot judge: the watcher
                # must live on, or a stalled Ditto would hold InfluxDB's writes up for good
                log.exception("Ditto watcher: a check failed; carrying on")
                self.metrics.internal_errors.inc()

    def _probe_if_stalled(self, now: float | None = None) -> None:
        """While stalled, retry one backed-off update a second, so Ditto's return is seen within about a second."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if self._stalled and self._delayed and now - self._last_probe >= 1.0:
                self._last_probe = now
                self._ready.append(heapq.heappop(self._delayed)[2])
                self._cond.notify()

    def release_if_stalled(self, now: float | None = None) -> bool:
        """If Ditto has stalled (module docstring), release every waiting reading, and every reading from now on
        until Ditto answers an update (``_finish``). True if it did."""
        now = time.monotonic() if now is None else now
        after = self.settings.ditto_release_after_s
        with self._cond:
            if self._stalled or not self._waiting or now - self._progress_at < after:
                return False
            hung = any(now - began >= after for began in self._requests.values())
            if not (self._ditto_wide_failure or hung):  # one twin refused on its own: its messages wait
                return False
            self._stalled = True
            released: list[_Waiter] = []
            for thing in self._things.values():
                if thing.waiters:
                    released.extend(thing.waiters)
                    thing.waiters = []
                    thing.released = True
            self._waiting -= len(released)  # those in a worker's hands are released when their request ends
        log.warning("Ditto has taken no twin update for %.0f s (%s): acknowledging readings on InfluxDB's "
                    "confirmation alone until it takes one again; the twins then get the newest reading",
                    now - self._progress_at, (self.last_error or "no answer yet")[:200])
        self._release(released)
        return True

    def _mark_healthy(self) -> None:
        if self.healthy:  # the common case, read without the lock: each update that goes through comes here
            return
        with self._cond:
            recovered, self.healthy, self.last_error = not self.healthy, True, None
        if recovered:
            log.info("Ditto updates recovered")
