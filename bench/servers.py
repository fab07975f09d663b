"""The bench's sinks, each in its own process so they do not share a GIL with the bench driver or the bridge.

``python -m bench.servers ditto [--validate]``: the Ditto contract double (tests/doubles/ditto.py); users come
from the JSON in env BENCH_DITTO_USERS.
``python -m bench.servers influx --target URL``: the InfluxDB v2 adapter (tests/harness/services.py) in front
of a real influxd; token from env BENCH_INFLUX_TOKEN.

Both record, at the moment they confirm a write, how old the written readings are (now - source ts): the
latency from the reading's source timestamp to sink confirmation, measured at the sink itself.
Protocol: the first stdout line is ``{"url": ...}``; then one command per stdin line, one JSON line back:
``stats`` (counters and latencies since the last reset), ``reset``, ``seed <n>`` (ditto: a policy and n
things for the capacity run), ``delay <seconds>`` (ditto: answer every twin request that much later, as a
remote or busy Ditto would; 0 answers at once again). EOF on stdin stops the server.
"""

from __future__ import annotations

import argparse
import email.parser
import http.client
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from typing import Any

from tests.doubles.ditto import DittoDouble, standard_policy
from tests.harness.services import InfluxV2Adapter

READING_MEASUREMENT = b"rack_environment,"
CAPACITY_POLICY = "bench:policy"


def _iso_to_epoch_s(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")


def fast_parse_headers(fp, _class=http.client.HTTPMessage):  # noqa: ANN001, ANN201 - http.client's signature
    """http.client.parse_headers without the email package's feed parser, for well-formed header blocks (the
    same message object; anything unusual, e.g. folded lines, goes to the stdlib parser). The bench's servers
    use it so that the sinks' own CPU does not crowd out the bridge's on a shared machine: the double spent a
    fifth of its time in header parsing."""
    lines = http.client._read_headers(fp)
    msg = _class()
    for raw in lines:
        if raw in (b"\r\n", b"\n", b""):
            break
        line = raw.decode("iso-8859-1")
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            return email.parser.Parser(_class=_class).parsestr(b"".join(lines).decode("iso-8859-1"))
        msg[name] = value.lstrip(" \t").rstrip("\r\n")
    return msg


class RecordingDitto(DittoDouble):
    """Per successful merge-PATCH of a twin's environment: now - tsTop / tsBottom of the values written."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.latencies: list[float] = []
        self.patches = Counter()  # "reading" (environment feature) / "other" (e.g. forecast)

    def _answered(self, ctx, resp) -> None:  # noqa: ANN001 - the double's own signature
        # The answer (HTTP response or WebSocket message) is out: this is the confirmation.
        if ctx.method != "PATCH" or resp.status not in (201, 204):
            return
        now = time.time()
        try:
            props = json.loads(ctx.body)["features"]["environment"]["properties"]
        except (ValueError, KeyError, TypeError):
            self.patches["other"] += 1
            return
        self.patches["reading"] += 1
        for key in ("tsTop", "tsBottom"):
            if key in props:
                self.latencies.append(now - _iso_to_epoch_s(props[key]))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            requests = {f"{m} {s}": n for (m, s), n in self.request_count.items()}
        return {"requests": requests, "requests_total": sum(requests.values()), "patches": dict(self.patches),
                "ws_commands": self.ws_commands, "latencies": list(self.latencies)}

    def reset_stats(self) -> None:
        with self._lock:
            self.request_count.clear()
            self.ws_commands = 0
            self.patches.clear()
            self.latencies = []

    def seed(self, n: int) -> None:
        self.seed_policy(CAPACITY_POLICY, standard_policy())
        for i in range(n):
            self.seed_thing(f"bench:cap-{i}", {"policyId": CAPACITY_POLICY,
                                               "features": {"environment": {"properties": {}}}})


class RecordingInflux(InfluxV2Adapter):
    """Per rack_environment point that influxd confirmed: now - the point's timestamp (ms precision)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.latencies: list[float] = []
        self.points = 0
        self.other_points = 0
        self._lock = threading.Lock()

    def _forward(self, method: str, path: str, body: bytes | None, ctype: str | None):  # noqa: ANN202
        status, resp_body, resp_ctype = super()._forward(method, path, body, ctype)
        if status == 204 and path.startswith("/write") and body:
            now_ms = time.time() * 1000
            ages, other = [], 0
            for line in body.split(b"\n"):
                if line.startswith(READING_MEASUREMENT):
                    ages.append((now_ms - int(line.rsplit(b" ", 1)[1])) / 1000)
                elif line:
                    other += 1
            with self._lock:
                self.latencies.extend(ages)
                self.points += len(ages)
                self.other_points += other
        return status, resp_body, resp_ctype

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"writes": self.writes, "points": self.points, "other_points": self.other_points,
                    "latencies": list(self.latencies)}

    def reset_stats(self) -> None:
        with self._lock:
            self.writes = 0
            self.points = self.other_points = 0
            self.latencies = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    sub = parser.add_subparsers(dest="kind", required=True)
    ditto = sub.add_parser("ditto")
    ditto.add_argument("--validate", action="store_true", help="validate every request/response (slower)")
    influx = sub.add_parser("influx")
    influx.add_argument("--target", required=True, help="influxd base URL")
    args = parser.parse_args(argv)
    http.client.parse_headers = fast_parse_headers  # this process only serves the bench (http.server looks it up)

    if args.kind == "ditto":
        server: Any = RecordingDitto(json.loads(os.environ["BENCH_DITTO_USERS"]), validate=args.validate)
        url = server.start()
    else:
        server = RecordingInflux(args.target, token=os.environ["BENCH_INFLUX_TOKEN"]).start()
        url = server.url
    print(json.dumps({"url": url}), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "stats":
            reply: dict[str, Any] = server.stats()
        elif command == "reset":
            server.reset_stats()
            reply = {"ok": True}
        elif command == "seed" and args.kind == "ditto":
            server.seed(int(arg))
            reply = {"ok": True}
        elif command == "delay" and args.kind == "ditto":
            server.clear_faults()
            if float(arg) > 0:
                server.inject(delay=float(arg))
            reply = {"ok": True}
        else:
            reply = {"error": f"unknown command {line.strip()!r}"}
        print(json.dumps(reply), flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
