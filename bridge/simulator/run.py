"""`racktwin simulate`: publish a simulated data hall every N seconds, with switchable scenarios.

Run-time control (works in docker: publish the port or `docker compose exec simulator`), HTTP on
RACKTWIN_SIM_CONTROL_PORT (default 8099):
    GET    /scenarios                       active scenarios and the known kinds
    POST   /scenarios   body: hotspot:hall1-a03[,rate=8][,rise=8][@delay_s]   start one
                        (JSON {"scenario": "..."} also works; rate °C/h at the start, rise °C where it levels off)
    DELETE /scenarios/<kind>:<target>       stop one;   DELETE /scenarios   stop all
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from ..config import ConfigError, Settings, load_settings
from . import hall as model

log = logging.getLogger(__name__)


class ScenarioBoard:
    """The active scenarios, shared by the publishing loop and the control endpoint."""

    def __init__(self, hall: model.Hall):
        self.hall = hall
        self._lock = threading.Lock()
        self._active: list[model.Scenario] = []

    def add(self, spec: str, now: float | None = None) -> model.Scenario:
        scenario = model.parse_scenario(spec, self.hall, time.time() if now is None else now)
        with self._lock:
            self._active = [s for s in self._active if s.label() != scenario.label()] + [scenario]
        log.info("scenario %s starts at %s", scenario.spec(), _iso(scenario.start_ts))
        return scenario

    def remove(self, label: str | None) -> int:
        with self._lock:
            before = len(self._active)
            self._active = [s for s in self._active if label is not None and s.label() != label]
            return before - len(self._active)

    def active(self) -> list[model.Scenario]:
        with self._lock:
            return list(self._active)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def control_server(board: ScenarioBoard, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, payload: Any = None) -> None:
            data = b"" if payload is None else json.dumps(payload, indent=1).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") != "/scenarios":
                return self._reply(404, {"error": "try GET /scenarios"})
            self._reply(200, {"active": [{"scenario": s.label(), "spec": s.spec(), "since": _iso(s.start_ts)}
                                         for s in board.active()],
                              "available": model.SCENARIOS})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/scenarios":
                return self._reply(404, {"error": f"POST /scenarios with body {model.SCENARIO_SYNTAX}"})
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace").strip()
            try:
                spec = json.loads(raw)["scenario"] if raw.startswith("{") else raw
                scenario = board.add(str(spec))
            except (model.ScenarioError, KeyError, ValueError) as exc:
                return self._reply(400, {"error": str(exc)})
            self._reply(201, {"scenario": scenario.label(), "spec": scenario.spec(), "since": _iso(scenario.start_ts)})

        def do_DELETE(self) -> None:
            path = unquote(self.path).rstrip("/")
            if path == "/scenarios":
                return self._reply(200, {"stopped": board.remove(None)})
            if path.startswith("/scenarios/"):
                removed = board.remove(path[len("/scenarios/"):])
                return self._reply(200 if removed else 404, {"stopped": removed})
            self._reply(404, {"error": "DELETE /scenarios[/<kind>:<target>]"})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="sim-control", daemon=True).start()
    return server


def hall_of(settings: Settings) -> model.Hall:
    """The simulated hall the settings describe (the same racks for the simulator and the stack's bootstrap)."""
    return model.build_hall(settings.sim_racks, settings.sim_rooms, settings.sim_rows, settings.sim_seed,
                            settings.mapping.default_site)


def provision(settings: Settings, hall: model.Hall, want_tokens: bool,
              changes: list[str] | None = None) -> dict[str, str]:
    """Create missing devices, set their server attributes; return device tokens if asked. What it
    changed is appended to ``changes`` (nothing on a second run)."""
    from ..thingsboard.rest import ThingsBoard

    changes = [] if changes is None else changes
    tb = ThingsBoard.from_settings(settings)
    tokens: dict[str, str] = {}
    try:
        for rack in hall.racks:
            device = tb.device_by_name(rack.name)
            if device is None:
                device = tb.save_device({"name": rack.name, "type": settings.tb_device_profile})
                log.info("created ThingsBoard device %s", rack.name)
                changes.append(f"create device {rack.name!r}")
            attrs = {"site": hall.site, "room": rack.room, "row": rack.row, "positionInRow": rack.position_in_row}
            did = device["id"]["id"]
            current = tb.server_attributes(did)
            if any(current.get(k) != v for k, v in attrs.items()):
                tb.save_server_attributes(did, attrs)
                changes.append(f"set attributes of {rack.name!r}")
            if want_tokens:
                token = tb.device_token(did)
                if token:
                    tokens[rack.name] = token
    finally:
        tb.close()
    return tokens


def gateway_token(settings: Settings) -> str:
    if settings.sim_gateway_token is not None:
        return settings.sim_gateway_token.get_secret_value()
    from ..thingsboard.rest import ThingsBoard

    tb = ThingsBoard.from_settings(settings)
    try:
        device = tb.device_by_name(settings.sim_gateway_name)
        if device is None:
            device = tb.save_device({"name": settings.sim_gateway_name, "type": "default",
                                     "additionalInfo": {"gateway": True, "description": "RackTwin simulator"}})
            log.info("created ThingsBoard gateway device %s", settings.sim_gateway_name)
        token = tb.device_token(device["id"]["id"])
        if not token:
            raise ConfigError(f"gateway device {settings.sim_gateway_name!r} has no access token credentials")
        return token
    finally:
        tb.close()


def make_publisher(settings: Settings, hall: model.Hall):
    from .publish import DevicePublisher, EnvelopePublisher, GatewayPublisher

    names = [r.name for r in hall.racks]
    if settings.sim_mode == "envelope":
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        return EnvelopePublisher(settings.mqtt_host, settings.mqtt_port, settings.mqtt_username, password,
                                 settings.tb_topic_prefix, settings.tb_device_profile)
    if settings.sim_mode == "gateway":
        if settings.sim_provision:
            provision(settings, hall, want_tokens=False)
        return GatewayPublisher(settings.sim_tb_mqtt_host, settings.sim_tb_mqtt_port, gateway_token(settings), names,
                                settings.tb_device_profile)
    tokens = provision(settings, hall, want_tokens=True)
    missing = [n for n in names if n not in tokens]
    if missing:
        raise ConfigError(f"no access token for {len(missing)} device(s), e.g. {missing[0]!r}: device mode needs "
                          "them in ThingsBoard (RACKTWIN_SIM_PROVISION=true creates them)")
    return DevicePublisher(settings.sim_tb_mqtt_host, settings.sim_tb_mqtt_port, tokens)


def run(settings: Settings, scenarios: list[str], ticks: int | None = None,
        stop: threading.Event | None = None) -> int:
    hall = hall_of(settings)
    board = ScenarioBoard(hall)
    for spec in [*settings.sim_scenarios, *scenarios]:
        board.add(spec)
    stop = stop or threading.Event()
    publisher = make_publisher(settings, hall)
    server = control_server(board, settings.sim_control_host, settings.sim_control_port) \
        if settings.sim_control_port else None
    log.info("simulating %d racks in %d room(s), mode %s, every %.1f s%s", len(hall.racks), len(hall.rooms),
             settings.sim_mode, settings.sim_interval_s,
             f"; control on :{server.server_address[1]}" if server else "")
    if not publisher.connected.wait(30):
        log.warning("not connected after 30 s; readings are queued until the broker answers")
    sent = 0
    try:
        next_tick = time.time()
        while not stop.is_set():
            ts_ms = int(next_tick * 1000)
            readings = model.sample(hall, ts_ms / 1000, board.active())
            try:
                infos = publisher.publish(ts_ms, readings)
            except (ValueError, RuntimeError) as exc:  # queue full during a long outage: skip this round
                log.warning("round at %s not published: %s", _iso(ts_ms / 1000), exc)
                infos = []
            sent += 1
            if ticks is not None and sent >= ticks:
                for info in infos:
                    info.wait_for_publish(10)
                break
            next_tick += settings.sim_interval_s
            stop.wait(max(0.0, next_tick - time.time()))
    finally:
        publisher.close()
        if server:
            server.shutdown()
            server.server_close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--racks", type=int, help="racks in total (RACKTWIN_SIM_RACKS, default 40)")
    parser.add_argument("--rooms", type=int, help="rooms (RACKTWIN_SIM_ROOMS, default 2)")
    parser.add_argument("--rows", type=int, help="rows per room (RACKTWIN_SIM_ROWS, default 4)")
    parser.add_argument("--interval", type=float, help="seconds between reports (RACKTWIN_SIM_INTERVAL_S)")
    parser.add_argument("--mode", choices=["gateway", "device", "envelope"], help="output (RACKTWIN_SIM_MODE)")
    parser.add_argument("--seed", type=int, help="random seed (RACKTWIN_SIM_SEED)")
    parser.add_argument("--scenario", action="append", default=[], metavar=model.SCENARIO_SYNTAX,
                        help="start a scenario (repeatable): " + ", ".join(sorted(model.SCENARIOS))
                        + "; rate = °C/h at the start, rise = °C where it levels off (cooling_failure, hotspot, "
                        "humidity_excursion), e.g. cooling_failure:hall1,rate=3 (slow partial loss), "
                        "cooling_failure:hall1,rate=30 (total loss), hotspot:hall1-a03@600; see --list-scenarios")
    parser.add_argument("--control-port", type=int, help="HTTP control port, 0 = off (RACKTWIN_SIM_CONTROL_PORT)")
    parser.add_argument("--no-provision", action="store_true", help="do not create devices/attributes in ThingsBoard")
    parser.add_argument("--ticks", type=int, help="publish this many rounds and exit")
    parser.add_argument("--list-scenarios", action="store_true", help="describe the scenarios and exit")


def main(args: argparse.Namespace) -> int:
    if args.list_scenarios:
        print(f"--scenario {model.SCENARIO_SYNTAX}  (DELAY_S: seconds from now, negative = already running)")
        for kind, text in sorted(model.SCENARIOS.items()):
            target = "room" if kind in model.ROOM_SCENARIOS else "rack[/top|/bottom]"
            options = "[,rate=C_PER_H][,rise=C]" if kind in model.RAMP_DEFAULTS else ""
            print(f"{kind}:<{target}>{options}  {text}")
        return 0
    overrides = {name: value for name, value in {
        "sim_racks": args.racks, "sim_rooms": args.rooms, "sim_rows": args.rows, "sim_interval_s": args.interval,
        "sim_mode": args.mode, "sim_seed": args.seed, "sim_control_port": args.control_port,
    }.items() if value is not None}
    if args.no_provision:
        overrides["sim_provision"] = False
    settings = load_settings(**overrides)
    from ..logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return run(settings, args.scenario, args.ticks, stop)
    except model.ScenarioError as exc:
        raise ConfigError(str(exc)) from None
