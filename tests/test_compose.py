"""The compose stack, checked without a Docker engine.

- The compose file, interpolated with .env.example (secrets filled with dummies the way init-env.sh
  fills them), validates against the Compose Specification schema, in demo and in external mode.
- Policies of the stack: exact image pins, bind-mount sources exist, every ${VAR} is in .env.example,
  no host-port collisions, no literal secrets, healthchecks and memory limits, internal services
  unpublished, admin ports on loopback by default.
- The real programs load our config files: Mosquitto runs our entrypoint and mosquitto.conf (with the
  container paths moved to a temp dir and the port to a free one), nginx loads the Ditto nginx.conf
  (`nginx -t`) and, with the upstream names pointed at a local echo server, authenticates against an
  htpasswd made by `racktwin init-secrets` and sets the Ditto subject header.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
import requests
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from bridge.secrets import apr1, init_secrets
from tests.doubles.contracts import find_contract
from tests.harness.http import send_json
from tests.harness.services import free_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
EXTERNAL_FILE = COMPOSE_DIR / "docker-compose.external.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

# Exact tags from shared/reference/images.md "Recommended pins" (Grafana: 13.2.2, see the report).
EXPECTED_IMAGES = {
    "thingsboard/tb-node:4.3.1.3",
    "postgres:16.15",
    "eclipse/ditto-policies:3.9.6",
    "eclipse/ditto-things:3.9.6",
    "eclipse/ditto-things-search:3.9.6",
    "eclipse/ditto-gateway:3.9.6",
    "eclipse/ditto-ui:3.9.6",
    "mongo:7.0.40",
    "nginx:1.30.4-alpine",
    "eclipse-mosquitto:2.0.22",
    "influxdb:2.9.1",
    "grafana/grafana:13.2.2",
}
# Services that nothing outside the compose network may reach.
INTERNAL_SERVICES = {"mongodb", "policies", "things", "things-search", "gateway", "ditto-ui", "postgres", "mosquitto"}
DEMO_ONLY = {"postgres", "thingsboard-db-check", "thingsboard-install", "thingsboard", "simulator"}
SECRET_KEY = re.compile(r"(PASSWORD|PASSWD|TOKEN|SECRET)(_FILE)?$", re.IGNORECASE)


# --- Compose interpolation (the subset of the spec's syntax: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
# ${VAR:?e}, ${VAR?e}, ${VAR:+r}, ${VAR+r}) -------------------------------------------------------------

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<invalid>))"
)


class InterpolationError(ValueError):
    pass


def interpolate_str(text: str, env: dict[str, str], used: set[str]) -> str:
    def repl(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("invalid") is not None and m.group("named") is None and m.group("braced") is None:
            raise InterpolationError(f"invalid interpolation in {text!r}")
        name = m.group("named") or m.group("braced")
        used.add(name)
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op in (":-", "-"):
            return value if (value if op == ":-" else value is not None) else arg
        if op in (":?", "?"):
            if (not value) if op == ":?" else value is None:
                raise InterpolationError(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if (value if op == ":+" else value is not None) else ""
        return value or ""

    return _VAR.sub(repl, text)


def interpolate(node: Any, env: dict[str, str], used: set[str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env, used)
    if isinstance(node, list):
        return [interpolate(v, env, used) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env, used) for k, v in node.items()}
    return node


def parse_env_file(path: Path) -> tuple[dict[str, str], list[str]]:
    """(variables, names in the generated-secrets block)."""
    values, generated, in_block = {}, [], False
    for line in path.read_text().splitlines():
        if line.startswith("# >>> generated secrets"):
            in_block = True
        elif line.startswith("# <<< generated secrets"):
            in_block = False
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
            if in_block:
                generated.append(m.group(1))
    return values, generated


def example_env() -> dict[str, str]:
    values, generated = parse_env_file(ENV_EXAMPLE)
    for i, name in enumerate(generated):
        values[name] = f"Dummy{i:02d}SecretValue0123456789abcd"
    return values


def merge_override(base: dict, override: dict) -> dict:
    """Compose's merge for what our override uses: mappings merge, `ports` lists append."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_override(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + value
        else:
            out[key] = value
    return out


def load_model(mode: str = "demo", env: dict[str, str] | None = None) -> tuple[dict, set[str]]:
    env = example_env() if env is None else env
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    if mode == "external":
        raw = merge_override(raw, yaml.safe_load(EXTERNAL_FILE.read_text()))
    used: set[str] = set()
    model = interpolate(raw, env, used)
    return model, used


def active_services(model: dict, profiles: set[str]) -> dict[str, dict]:
    return {
        name: svc for name, svc in model["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & profiles
    }


def published_ports(svc: dict) -> list[tuple[str, str, str]]:
    """(host_ip, host_port, container_port) for each short-syntax port."""
    out = []
    for entry in svc.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) == 3, f"port {entry!r} must name the bind address explicitly"
        out.append((parts[0], parts[1], parts[2]))
    return out


MODES = [("demo", {"demo"}), ("external", set())]


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    return json.loads(find_contract("compose-spec.json").read_text())


# --- schema and interpolation ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["demo", "external"])
def test_compose_file_validates_against_the_compose_spec(mode, compose_schema):
    model, _ = load_model(mode)
    validator = jsonschema.Draft7Validator(compose_schema)
    errors = sorted(validator.iter_errors(model), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_every_variable_is_defined_in_env_example():
    defined, _ = parse_env_file(ENV_EXAMPLE)
    used: set[str] = set()
    for path in (COMPOSE_FILE, EXTERNAL_FILE):
        interpolate(yaml.safe_load(path.read_text()), example_env(), used)
    assert used, "no variables found: the interpolation check would prove nothing"
    assert sorted(used - set(defined)) == []


def test_missing_secret_stops_compose_with_advice():
    env = example_env()
    env["DITTO_ADMIN_PASSWORD"] = ""
    with pytest.raises(InterpolationError, match="DITTO_ADMIN_PASSWORD: run make up"):
        load_model("demo", env)


def test_env_example_leaves_every_secret_empty():
    values, generated = parse_env_file(ENV_EXAMPLE)
    secret_like = [k for k in values if SECRET_KEY.search(k)]
    assert secret_like and set(secret_like) <= set(generated), "every secret must be generated"
    assert {k: v for k, v in values.items() if k in generated and v} == {}


# --- stack policies --------------------------------------------------------------------------------------


def test_every_image_is_pinned_to_an_exact_version():
    model, _ = load_model("demo")
    images = set()
    for name, svc in model["services"].items():
        image = svc.get("image", "")
        if "build" in svc:
            assert image.startswith("racktwin/") and re.search(r":\d+\.\d+\.\d+$", image), (name, image)
            continue
        images.add(image)
        assert re.search(r":\d+\.\d+(\.\d+)*(-[a-z0-9.]+)?$", image), f"{name}: {image} is not an exact tag"
        assert not image.endswith(":latest")
    assert images == EXPECTED_IMAGES


def test_dockerfile_base_is_pinned():
    dockerfile = (COMPOSE_DIR / "bridge.Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", dockerfile, re.M) == ["python:3.12.14-slim"]
    assert re.search(r"^USER\s+10001", dockerfile, re.M), "the image must not run as root"
    assert "9108/healthz" in dockerfile


def test_bind_mount_sources_exist():
    model, _ = load_model("demo")
    checked = 0
    for name, svc in model["services"].items():
        for vol in svc.get("volumes", []):
            source, _, rest = str(vol).partition(":")
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).resolve().exists(), f"{name}: bind source {source} missing"
                # Read-only, and labelled for hosts that enforce SELinux (else: permission denied there).
                assert {"ro", "z"} <= set(rest.partition(":")[2].split(",")), f"{name}: mount {vol} needs ro,z"
                checked += 1
        if "build" in svc:
            ctx = COMPOSE_DIR / svc["build"]["context"]
            assert (ctx / svc["build"]["dockerfile"]).is_file()
    assert checked >= 5


@pytest.mark.parametrize("mode,profiles", MODES)
def test_no_host_port_is_published_twice(mode, profiles):
    model, _ = load_model(mode)
    seen: dict[tuple[str, str], str] = {}
    for name, svc in active_services(model, profiles).items():
        for host_ip, host_port, _ in published_ports(svc):
            for other_ip in {host_ip, "0.0.0.0"} if host_ip != "0.0.0.0" else {"0.0.0.0", "127.0.0.1"}:
                assert (other_ip, host_port) not in seen, f"{name} and {seen[(other_ip, host_port)]} share {host_port}"
            seen[(host_ip, host_port)] = name
    assert len(seen) >= (5 if "demo" in profiles else 4)


def test_published_ports_and_internal_services():
    model, _ = load_model("demo")
    services = model["services"]
    for name in INTERNAL_SERVICES:
        assert not services[name].get("ports"), f"{name} must not be published"
    binds = {name: published_ports(svc) for name, svc in services.items() if svc.get("ports")}
    assert {c for _, _, c in binds["grafana"]} == {"3000"}
    assert {c for _, _, c in binds["thingsboard"]} == {"8080", "1883"}
    assert {c for _, _, c in binds["ditto-nginx"]} == {"80"}
    assert {c for _, _, c in binds["influxdb"]} == {"8086"}
    # The demo's scenario control, which README tells users to curl from the host; no login, so loopback.
    assert {(h, c) for _, h, c in binds["simulator"]} == {("8099", "8099")}
    admin = {(n, c) for n, ports in binds.items() for ip, _, c in ports if ip == "127.0.0.1"}
    assert admin == {("thingsboard", "8080"), ("ditto-nginx", "80"), ("influxdb", "8086"), ("simulator", "8099")}
    external, _ = load_model("external")
    assert [c for _, _, c in published_ports(external["services"]["mosquitto"])] == ["1883"]


def test_no_literal_secret_in_compose_or_config_files():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, svc in raw["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment must be a mapping"
        for key, value in env.items():
            if SECRET_KEY.search(key):
                ok = re.fullmatch(r"\$\{[A-Z0-9_]+(:\?[^}]*)?\}", str(value)) or (
                    key.endswith("_FILE") and str(value).startswith("/run/racktwin/")
                )
                assert ok, f"{name}.{key} must come from compose/.env or a secrets file, not {value!r}"
    assert "${" not in json.dumps(raw["services"]["grafana"].get("healthcheck"))  # nothing leaks there
    # Known default passwords must not appear anywhere we ship (the ThingsBoard names are only used as
    # login names to rotate; the bootstrap module keeps the defaults, which is the point).
    forbidden = re.compile(r"(?i)\b(foobar|changeme|admin123|A6BgmB8IEtPTs)\b|\$apr1\$|\$7\$")
    for path in [*COMPOSE_DIR.rglob("*")]:
        if path.is_file() and path.name != ".env":
            text = path.read_text(errors="replace")
            for line in text.splitlines():
                assert not forbidden.search(line), f"{path.relative_to(REPO)}: {line.strip()}"


def test_dependencies_wait_for_health_and_one_shots():
    model, _ = load_model("demo")
    services = model["services"]
    one_shots = {n for n, s in services.items() if s.get("restart") == "no"}
    assert one_shots == {"secrets-init", "thingsboard-db-check", "thingsboard-install", "bootstrap",
                         "grafana-provisioning"}
    depended_on = set()
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            depended_on.add(dep)
            wanted = "service_completed_successfully" if dep in one_shots else "service_healthy"
            assert spec.get("condition") == wanted, f"{name} -> {dep}: {spec}"
    for dep in depended_on - one_shots:
        assert services[dep].get("healthcheck", {}).get("test"), f"{dep} is depended on but has no healthcheck"
    for name, svc in services.items():
        if name not in one_shots:
            assert svc.get("healthcheck", {}).get("test"), f"long-running {name} has no healthcheck"
        elif svc["image"].startswith("racktwin/bridge:"):
            # The bridge image's HEALTHCHECK would mark a one-shot unhealthy (it serves no /healthz).
            assert svc.get("healthcheck", {}).get("disable") is True, f"one-shot {name} inherits the image's healthcheck"


@pytest.mark.parametrize("mode,profiles", [("demo", {"demo"}), ("external", set())])
def test_every_one_shot_is_awaited_by_a_long_running_service(mode, profiles):
    """`up --wait` counts a one-shot that exited 0 as done only when a running service depends on it with
    service_completed_successfully (docker/compose#9572, #10596); otherwise `make up` fails on a healthy stack."""
    active = active_services(load_model(mode)[0], profiles)
    one_shots = {n for n, svc in active.items() if svc.get("restart") == "no"}
    long_running = {n: svc for n, svc in active.items() if n not in one_shots}
    awaited: dict[str, set[str]] = {n: set() for n in one_shots}

    def adopt(name: str, seen: set[str]) -> None:
        # A one-shot awaited by another one-shot that a running service awaits is awaited too.
        for dep, spec in (active[name].get("depends_on") or {}).items():
            if dep in one_shots and spec.get("condition") == "service_completed_successfully" and dep not in seen:
                seen.add(dep)
                adopt(dep, seen)

    for name in long_running:
        seen: set[str] = set()
        adopt(name, seen)
        for dep in seen:
            awaited[dep].add(name)
    assert one_shots and {n for n, by in awaited.items() if not by} == set()


def test_every_service_has_a_memory_limit_and_the_sum_fits_the_readme():
    model, _ = load_model("demo")
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    total = 0
    for name, svc in model["services"].items():
        limit = svc.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory") or svc.get("mem_limit")
        assert limit, f"{name} has no memory limit"
        m = re.fullmatch(r"(\d+)([kmg])", str(limit).lower())
        assert m, f"{name}: {limit}"
        if svc.get("restart") != "no":
            total += int(m.group(1)) * units[m.group(2)]
    assert total <= 8 * 2**30, f"long-running limits add up to {total / 2**30:.1f} GiB"


def test_profiles_and_modes():
    model, _ = load_model("demo")
    services = model["services"]
    assert {n for n, s in services.items() if s.get("profiles")} == DEMO_ONLY
    assert all(services[n]["profiles"] == ["demo"] for n in DEMO_ONLY)
    # In external mode nothing that runs may require a demo-only service.
    for name, svc in active_services(model, set()).items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            if dep in DEMO_ONLY:
                assert spec.get("required") is False, f"{name} requires demo-only {dep}"


def test_ditto_services_keep_the_cluster_alias_and_versions_match():
    model, _ = load_model("demo")
    for name in ("policies", "things", "things-search", "gateway"):
        svc = model["services"][name]
        assert svc["networks"]["default"]["aliases"] == ["ditto-cluster"]
        assert svc["image"].endswith(":3.9.6")
    gateway = model["services"]["gateway"]
    assert gateway["environment"]["ENABLE_PRE_AUTHENTICATION"] == "true"
    ext = (COMPOSE_DIR / "ditto" / "gateway-extension.conf").read_text()
    roles = re.search(r"expected\s*=\s*\[(.*?)\]", ext, re.S).group(1)
    assert re.findall(r'"(\w+)"', roles) == ["policies", "things", "search", "gateway"]


def test_grafana_gets_what_provisioning_interpolates():
    model, _ = load_model("demo")
    grafana = model["services"]["grafana"]
    env = set(grafana["environment"])
    provisioning = REPO / "provisioning" / "grafana"
    referenced = set()
    for path in provisioning.rglob("*.y*ml"):
        referenced |= set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)\}?", path.read_text()))
    assert referenced, "no provisioning files found"
    # GRAFANA_INFLUX_TOKEN is exported by compose/grafana/entrypoint.sh from the bootstrap's token file.
    assert sorted(referenced - env - {"GRAFANA_INFLUX_TOKEN"}) == []
    assert "GRAFANA_INFLUX_TOKEN" in (COMPOSE_DIR / "grafana" / "entrypoint.sh").read_text()
    assert grafana["environment"]["GF_PLUGINS_PREINSTALL_SYNC"] == "yesoreyeram-infinity-datasource@3.11.1"
    # The wall is dark for everyone, anonymous wall screens included, and the printed wall URL asks for it too.
    assert grafana["environment"]["GF_USERS_DEFAULT_THEME"] == "dark"
    assert "&kiosk&theme=dark" in (COMPOSE_DIR / "scripts" / "print-urls.sh").read_text()


def _generated_provisioning(tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """What grafana-provisioning's command writes with ``env``: relative path -> text."""
    svc = load_model("demo")[0]["services"]["grafana-provisioning"]
    out = tmp_path / "provisioning"
    argv = [a.replace("/provisioning", str(out)) for a in svc["entrypoint"]]
    assert argv[0] == "python"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RACKTWIN_")}
    subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env={**run_env, **env}, check=True, capture_output=True)
    return {str(p.relative_to(out)): p.read_text() for p in out.rglob("*") if p.is_file()}


def _silent_rule(files: dict[str, str]) -> dict:
    rules = yaml.safe_load(files["alerting/rules.yaml"])
    return next(r for g in rules["groups"] for r in g["rules"] if r["uid"] == "racktwin-sensor-silent")


def test_grafana_provisioning_is_generated_in_the_stack_with_the_env_thresholds(tmp_path):
    model, _ = load_model("demo")
    services = model["services"]
    gen, grafana = services["grafana-provisioning"], services["grafana"]
    # Grafana reads what the one-shot wrote, after it wrote it.
    assert "grafana-provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "grafana-provisioning:/provisioning" in gen["volumes"]
    assert grafana["depends_on"]["grafana-provisioning"]["condition"] == "service_completed_successfully"
    assert grafana["depends_on"]["grafana-provisioning"]["restart"] is True  # alert rules are read at start only
    # The image carries the generator: dashboards/ copied in, grafanalib installed, /provisioning writable.
    dockerfile = (COMPOSE_DIR / "bridge.Dockerfile").read_text()
    assert "COPY dashboards ./dashboards" in dockerfile and re.search(r'pip install "\.\[[^]]*dashboards', dockerfile)
    assert re.search(r"install -d -o 10001 .*/provisioning", dockerfile)
    assert "!dashboards/" in (COMPOSE_DIR / "bridge.Dockerfile.dockerignore").read_text().splitlines()

    # With .env.example's values (the demo) the stack serves exactly the committed files; another reporting
    # interval reaches the silent-sensor rule.
    stack = _generated_provisioning(tmp_path / "example", gen["environment"])
    committed = {str(p.relative_to(REPO / "provisioning" / "grafana")): p.read_text()
                 for p in (REPO / "provisioning" / "grafana").rglob("*") if p.is_file()}
    assert stack == committed
    interval = int(parse_env_file(ENV_EXAMPLE)[0]["READING_INTERVAL_S"])
    assert gen["environment"]["RACKTWIN_READING_INTERVAL_S"] == str(interval)
    assert f"no humidity) for more than {3 * interval} s" in _silent_rule(stack)["annotations"]["summary"]
    slower = _generated_provisioning(tmp_path / "slower", {**gen["environment"], "RACKTWIN_READING_INTERVAL_S": "300"})
    assert "no humidity) for more than 900 s" in _silent_rule(slower)["annotations"]["summary"]
    # An unusable value stops the one-shot (and with it Grafana's start) with a message naming it.
    proc = subprocess.run([sys.executable, "-m", "dashboards.generate", "--out", str(tmp_path / "bad")], cwd=REPO,
                          env={**os.environ, **gen["environment"], "RACKTWIN_READING_INTERVAL_S": "ten"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "RACKTWIN_READING_INTERVAL_S must be a whole number" in proc.stderr

    # Another class in .env reaches the alert rules and the wall's colours.
    a3 = _generated_provisioning(tmp_path / "a3", {**gen["environment"], "RACKTWIN_ASHRAE_CLASS": "A3"})
    rules = yaml.safe_load(a3["alerting/rules.yaml"])
    critical = next(r for g in rules["groups"] for r in g["rules"] if r["uid"] == "racktwin-inlet-allowable")
    assert "40" in json.dumps(critical["data"]) and "A3" in critical["annotations"]["summary"]
    assert a3["dashboards/wall/racktwin-wall.json"] != stack["dashboards/wall/racktwin-wall.json"]
    # The bridge gets the same class, cap, forecast horizon and Ditto namespace as the generator.
    bridge = services["bridge"]["environment"]
    for key in ("RACKTWIN_ASHRAE_CLASS", "RACKTWIN_RH_CAP", "RACKTWIN_FORECAST_HORIZON_MIN", "RACKTWIN_DITTO_NAMESPACE",
                "RACKTWIN_READING_INTERVAL_S"):
        assert bridge[key] == gen["environment"][key]


def test_a_watchdog_url_in_env_adds_the_watchdog_and_grafana_gets_its_url(tmp_path):
    env = {**example_env(), "WATCHDOG_URL": "https://hc-ping.example.com/3f1c"}
    services = load_model("demo", env)[0]["services"]
    files = _generated_provisioning(tmp_path / "watchdog", services["grafana-provisioning"]["environment"])
    rules = yaml.safe_load(files["alerting/rules.yaml"])
    assert "racktwin-watchdog" in {r["uid"] for g in rules["groups"] for r in g["rules"]}
    referenced = set()
    for text in files.values():
        referenced |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", text))
    assert "WATCHDOG_URL" in referenced
    assert services["grafana"]["environment"]["WATCHDOG_URL"] == env["WATCHDOG_URL"]
    assert sorted(referenced - set(services["grafana"]["environment"]) - {"GRAFANA_INFLUX_TOKEN"}) == []
    assert "https://hc-ping" not in "".join(files.values())  # the URL itself stays out of the files
    # .env.example leaves it empty: no watchdog (the committed files, checked above).
    assert parse_env_file(ENV_EXAMPLE)[0]["WATCHDOG_URL"] == ""


def _constants(files: dict[str, str], dashboard: str) -> dict[str, str]:
    variables = json.loads(files[f"dashboards/{dashboard}.json"])["templating"]["list"]
    return {v["name"]: v["query"] for v in variables if v["type"] == "constant"}


def test_the_namespace_and_ui_addresses_in_env_reach_the_dashboards(tmp_path):
    # Another namespace: the wall's tiles and the rack detail must look up the bridge's things, not dc.site1's.
    env = {**example_env(), "DITTO_NAMESPACE": "fra1.hall-b", "ADMIN_HOST": "noc-host", "DITTO_HTTP_PORT": "18090",
           "FORECAST_HORIZON_MIN": "20"}
    model = load_model("demo", env)[0]["services"]
    files = _generated_provisioning(tmp_path / "demo", model["grafana-provisioning"]["environment"])
    wall, rack = _constants(files, "wall/racktwin-wall"), _constants(files, "operations/racktwin-rack")
    assert wall["namespace"] == rack["namespace"] == model["bridge"]["environment"]["RACKTWIN_DITTO_NAMESPACE"] == "fra1.hall-b"
    assert (rack["ditto"], rack["thingsboard"]) == ("http://noc-host:18090", "http://noc-host:8080")
    rules = yaml.safe_load(files["alerting/rules.yaml"])
    forecast = next(r for g in rules["groups"] for r in g["rules"] if r["uid"] == "racktwin-forecast-recommended")
    threshold = next(d["model"] for d in forecast["data"] if d["model"].get("type") == "threshold")
    assert threshold["conditions"][0]["evaluator"] == {"params": [0, 20.0], "type": "within_range"}
    # External mode: the device links go to the user's ThingsBoard.
    external = {**example_env(), "TB_MODE": "external", "TB_URL": "https://tb.example.com"}
    gen = load_model("external", external)[0]["services"]["grafana-provisioning"]
    assert _constants(_generated_provisioning(tmp_path / "external", gen["environment"]),
                      "operations/racktwin-rack")["thingsboard"] == "https://tb.example.com"
    # A namespace Ditto would refuse stops the one-shot with a message naming the variable.
    proc = subprocess.run([sys.executable, "-m", "dashboards.generate", "--out", str(tmp_path / "bad")], cwd=REPO,
                          env={**os.environ, "RACKTWIN_DITTO_NAMESPACE": "9racks"}, capture_output=True, text=True)
    assert proc.returncode == 2 and "RACKTWIN_DITTO_NAMESPACE must be a Ditto namespace" in proc.stderr


# --- init-env.sh --------------------------------------------------------------------------------------------


def init_env(target: Path) -> None:
    """compose/scripts/init-env.sh on ``target``, from the committed example."""
    subprocess.run(["bash", str(COMPOSE_DIR / "scripts" / "init-env.sh"), str(ENV_EXAMPLE), str(target)],
                   check=True, capture_output=True)


def test_init_env_generates_secrets_once_and_never_overwrites(tmp_path):
    target = tmp_path / ".env"
    init_env(target)
    assert target.stat().st_mode & 0o777 == 0o600
    first, generated = parse_env_file(target)
    _, wanted = parse_env_file(ENV_EXAMPLE)
    assert generated == wanted
    secrets_ = [first[k] for k in generated]
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", s) for s in secrets_) and len(set(secrets_)) == len(secrets_)

    # A user edit survives, a variable the example gained later is appended (generated if secret).
    text = target.read_text().replace(f"GRAFANA_HTTP_PORT={first['GRAFANA_HTTP_PORT']}", "GRAFANA_HTTP_PORT=3333")
    text = re.sub(r"^MQTT_TB_PASSWORD=.*\n", "", text, flags=re.M)
    target.write_text(text)
    os.chmod(target, 0o644)
    init_env(target)
    second, _ = parse_env_file(target)
    assert second["GRAFANA_HTTP_PORT"] == "3333"
    assert re.fullmatch(r"[A-Za-z0-9]{32}", second["MQTT_TB_PASSWORD"])
    assert {k: v for k, v in second.items() if k != "MQTT_TB_PASSWORD"} == {
        **{k: v for k, v in first.items() if k != "MQTT_TB_PASSWORD"}, "GRAFANA_HTTP_PORT": "3333"}
    assert target.stat().st_mode & 0o777 == 0o600

    before = target.read_bytes()
    init_env(target)
    assert target.read_bytes() == before


def test_printed_urls_follow_the_published_ports_and_the_admin_host(tmp_path):
    """What `make up` prints is what a user opens: each host port as compose publishes it, admin ones at
    ADMIN_HOST once they listen on every interface, and no secret."""
    target = tmp_path / ".env"
    init_env(target)
    env, generated = parse_env_file(target)

    def printed(**changes: str) -> str:
        text = target.read_text()
        for key, value in changes.items():
            text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        target.write_text(text)
        run = subprocess.run(["bash", str(COMPOSE_DIR / "scripts" / "print-urls.sh"), str(target)],
                             check=True, capture_output=True, text=True)
        assert not any(env[k] in run.stdout for k in generated if env[k]), "a secret was printed"
        return run.stdout

    model, _ = load_model("demo", env)
    loopback = printed()
    for service, url_part in (("simulator", "/scenarios"), ("ditto-nginx", "/ui/"), ("influxdb", "/")):
        (ip, host_port, _), = published_ports(model["services"][service])
        assert re.search(rf"http://{re.escape(ip)}:{host_port}{re.escape(url_part)}", loopback), (service, loopback)
    everywhere = printed(ADMIN_BIND_ADDRESS="0.0.0.0", ADMIN_HOST="noc-srv", SIM_CONTROL_PORT="18099")
    assert "http://noc-srv:18099/scenarios" in everywhere and "http://noc-srv:8090/ui/" in everywhere
    assert "127.0.0.1" not in everywhere


def test_init_env_fills_the_secrets_of_a_copied_example(tmp_path):
    """`cp .env.example .env` before the first `make up` (to set external mode): every secret is there but
    empty, and compose would refuse to start for good; init-env generates them, keeping the user's edits."""
    target = tmp_path / ".env"
    target.write_text(ENV_EXAMPLE.read_text().replace("TB_MODE=demo", "TB_MODE=external"))
    init_env(target)
    env, generated = parse_env_file(target)
    assert generated and all(re.fullmatch(r"[A-Za-z0-9]{32}", env[k]) for k in generated)
    assert env["TB_MODE"] == "external"
    assert target.read_text().count("\n") == ENV_EXAMPLE.read_text().count("\n")  # filled in place


def test_init_env_copes_with_a_file_saved_on_windows_or_without_a_final_newline(tmp_path):
    """CR LF line ends would hide every empty secret from the fill (and give compose values ending in CR); a last
    line without its newline would have the next variable glued onto it (BRIDGE_MAPPING={…}SIM_CONTROL_PORT=…)."""
    target = tmp_path / ".env"
    lines = ENV_EXAMPLE.read_text().replace("TB_MODE=demo", "TB_MODE=external").splitlines()
    lines = [line for line in lines if not line.startswith(("SIM_CONTROL_PORT=", "BRIDGE_MAPPING="))]
    lines.append('BRIDGE_MAPPING={"mode": "per_rack"}')
    target.write_bytes("\r\n".join(lines).encode())  # no newline after the last line
    init_env(target)
    assert b"\r" not in target.read_bytes()
    env, generated = parse_env_file(target)
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", env[k]) for k in generated)
    assert env["BRIDGE_MAPPING"] == '{"mode": "per_rack"}' and env["SIM_CONTROL_PORT"] == "8099"
    assert env["TB_MODE"] == "external"


def test_generated_env_satisfies_the_compose_file(tmp_path):
    target = tmp_path / ".env"
    init_env(target)
    env, _ = parse_env_file(target)
    model, _ = load_model("demo", env)
    assert model["services"]["bridge"]["environment"]["RACKTWIN_MQTT_PASSWORD"] == env["MQTT_BRIDGE_PASSWORD"]


# --- real Mosquitto ---------------------------------------------------------------------------------------------


def _mqtt_client(port: int, user: str | None, password: str | None, client_id: str) -> tuple[mqtt.Client, Any]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if user:
        client.username_pw_set(user, password)
    result: dict[str, Any] = {"messages": []}
    connected = threading.Event()

    def on_connect(c, userdata, flags, reason_code, properties):
        result["rc"] = reason_code
        connected.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, msg: result["messages"].append((msg.topic, msg.payload))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(5), "no CONNACK"
    return client, result


@pytest.fixture
def broker():
    """Our entrypoint.sh + mosquitto.conf, with container paths moved into a temp dir."""
    # Not pytest's tmp_path: its parents are 0700 and the broker drops root for the mosquitto user.
    tmp_path = Path(tempfile.mkdtemp(prefix="racktwin-mosquitto-"))
    tmp_path.chmod(0o755)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        pytest.skip("mosquitto not installed (make deps-system)")
    port = free_port()
    conf = (COMPOSE_DIR / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M)
    conf = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    conf = conf.replace("/mosquitto/auth/", f"{tmp_path}/auth/").replace("/mosquitto/data/", f"{tmp_path}/data/")
    conf = conf.replace("/racktwin/", f"{COMPOSE_DIR}/mosquitto/")
    (tmp_path / "data").mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp_path / "data", "mosquitto")
    (tmp_path / "mosquitto.conf").write_text(conf)
    env = {**os.environ, "MOSQUITTO_AUTH_DIR": f"{tmp_path}/auth", "MOSQUITTO_CONF": f"{tmp_path}/mosquitto.conf",
           "MQTT_BRIDGE_PASSWORD": "bridge-pw", "MQTT_TB_PASSWORD": "tb-pw", "MQTT_HEALTHCHECK_PASSWORD": "hc-pw",
           "PATH": f"{os.path.dirname(binary)}:{os.environ.get('PATH', '')}"}
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen(["sh", str(COMPOSE_DIR / "mosquitto" / "entrypoint.sh")], env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {(tmp_path / 'mosquitto.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.05)
    yield port, tmp_path
    proc.terminate()
    proc.wait(10)
    log.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_mosquitto_loads_our_config_and_enforces_users_and_acl(broker):
    port, workdir = broker
    anon, anon_result = _mqtt_client(port, None, None, "anon")
    assert anon_result["rc"].is_failure, "anonymous clients must be refused"
    anon.loop_stop()
    wrong, wrong_result = _mqtt_client(port, "bridge", "nope", "wrong")
    assert wrong_result["rc"].is_failure
    wrong.loop_stop()

    sub, sub_result = _mqtt_client(port, "bridge", "bridge-pw", "bridge-test")
    assert not sub_result["rc"].is_failure
    sub.subscribe("racktwin/telemetry/#", qos=1)
    pub, pub_result = _mqtt_client(port, "thingsboard", "tb-pw", "tb-test")
    assert not pub_result["rc"].is_failure
    time.sleep(0.3)
    pub.publish("racktwin/telemetry/rack-a01", b'{"ok":1}', qos=1).wait_for_publish(5)
    pub.publish("elsewhere/x", b"denied", qos=1).wait_for_publish(5)  # outside its ACL: dropped
    # The bridge user may not publish telemetry.
    sub.publish("racktwin/telemetry/rack-b01", b"forged", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not sub_result["messages"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert sub_result["messages"] == [("racktwin/telemetry/rack-a01", b'{"ok":1}')]
    for c in (sub, pub):
        c.disconnect()
        c.loop_stop()
    passwd = workdir / "auth" / "passwd"
    assert passwd.stat().st_mode & 0o077 == 0, "password file must not be readable by others"
    assert "bridge-pw" not in passwd.read_text()


# --- real nginx -------------------------------------------------------------------------------------------------


class _Echo(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_GET(self):  # noqa: N802
        _Echo.seen.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}})
        body = json.dumps({"status": "UP"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        return


def _test_nginx_conf(tmp_path: Path, upstream: str | None = None, port: int | None = None) -> Path:
    """Our nginx.conf with container paths under tmp_path. With upstream, the upstream names point
    there (nginx resolves nothing for an IP literal, so no DNS is involved)."""
    conf = (COMPOSE_DIR / "ditto" / "nginx.conf").read_text()
    for old in ("/var/log/nginx/", "/var/run/", "/run/racktwin/"):
        assert old in conf, old
        conf = conf.replace(old, f"{tmp_path}/")
    shutil.copy("/etc/nginx/mime.types", tmp_path / "mime.types")
    conf = conf.replace("/etc/nginx/mime.types", f"{tmp_path}/mime.types")
    if upstream:
        conf = conf.replace("gateway:8080", upstream).replace("ditto-ui:8080", upstream)
    if port:
        conf = re.sub(r"listen 80;", f"listen 127.0.0.1:{port};", conf)
    if os.geteuid() == 0:
        conf = "user root;\n" + conf  # workers must read files in the 0700 tmp_path
    path = tmp_path / "nginx.conf"
    path.write_text(conf)
    return path


def _nginx() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.skip("nginx not installed (make deps-system)")
    return binary


def test_nginx_accepts_the_ditto_config(tmp_path):
    conf = _test_nginx_conf(tmp_path)
    (tmp_path / "nginx.htpasswd").write_text("")
    result = subprocess.run([_nginx(), "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


NGINX_USERS = {"ditto": "admin-pw", "bridge": "bridge-pw", "grafana": "grafana-pw"}


def _start_nginx(tmp_path: Path, upstream: str) -> tuple[subprocess.Popen, str]:
    """Debian's nginx with our Ditto config and htpasswd (NGINX_USERS) in front of ``upstream``."""
    port = free_port()
    conf = _test_nginx_conf(tmp_path, upstream=upstream, port=port)
    init_secrets(tmp_path, {"DITTO_ADMIN_PASSWORD": NGINX_USERS["ditto"], "DITTO_BRIDGE_PASSWORD": NGINX_USERS["bridge"],
                            "DITTO_GRAFANA_PASSWORD": NGINX_USERS["grafana"]})
    proc = subprocess.Popen([_nginx(), "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            requests.get(base + "/health", timeout=1)
            return proc, base
        except requests.RequestException:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.fixture
def nginx_in_front_of_echo(tmp_path):
    _Echo.seen = []
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    proc, base = _start_nginx(tmp_path, f"127.0.0.1:{echo.server_address[1]}")
    _Echo.seen = []
    yield base
    proc.terminate()
    proc.wait(10)
    echo.shutdown()
    echo.server_close()


def test_nginx_carries_the_bridges_ditto_websocket(tmp_path):
    """The bridge's WebSocket channel through our nginx config (auth, upgrade) to the Ditto double."""
    from bridge.sinks.ditto import DittoError
    from bridge.sinks.ditto_ws import DittoWebSocket
    from tests.doubles.ditto import DittoDouble, standard_policy

    double = DittoDouble(NGINX_USERS)
    double.start()
    proc, base = _start_nginx(tmp_path, f"127.0.0.1:{double.port}")
    url = base.replace("http://", "ws://") + "/ws/2"
    channel = DittoWebSocket(url, "bridge", NGINX_USERS["bridge"], timeout=5)
    try:
        double.seed_policy("dc.site1:racktwin", standard_policy())
        double.seed_thing("dc.site1:rack-a01", {"policyId": "dc.site1:racktwin"})
        status, _ = channel.merge("dc.site1:rack-a01", {"attributes": {"room": "r1"}}, None)
        assert status == 204 and double.things["dc.site1:rack-a01"]["attributes"] == {"room": "r1"}
        assert double.ws_commands == 1
        with pytest.raises(DittoError) as refused:  # nginx's basic auth answers before Ditto sees anything
            DittoWebSocket(url, "bridge", "wrong", timeout=5).merge("dc.site1:rack-a01", {}, None)
        assert refused.value.status == 401 and double.ws_commands == 1
        double.assert_no_violations()
    finally:
        channel.close()
        proc.terminate()
        proc.wait(10)
        double.stop()


def test_nginx_authenticates_and_sets_the_ditto_subject(nginx_in_front_of_echo):
    base = nginx_in_front_of_echo
    assert requests.get(base + "/api/2/things", timeout=5).status_code == 401
    assert requests.get(base + "/api/2/things", auth=("grafana", "wrong"), timeout=5).status_code == 401
    assert _Echo.seen == []

    spoof = {"x-ditto-pre-authenticated": "nginx:ditto"}
    resp = requests.get(base + "/api/2/things/dc.site1:rack%20a01?fields=thingId", auth=("grafana", "grafana-pw"),
                        headers=spoof, timeout=5)
    assert resp.status_code == 200
    seen = _Echo.seen[-1]
    assert seen["headers"]["x-ditto-pre-authenticated"] == "nginx:grafana"
    assert seen["path"] == "/api/2/things/dc.site1:rack%20a01?fields=thingId"  # passed as sent
    # The server's other headers too, though the location sets headers of its own (nginx inherits none then).
    assert seen["headers"]["host"] == base.removeprefix("http://")
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"

    # /health needs no login and never carries a subject, even a forged one.
    resp = requests.get(base + "/health", headers=spoof, timeout=5)
    assert resp.status_code == 200
    assert "x-ditto-pre-authenticated" not in _Echo.seen[-1]["headers"]
    # The UI is served from /ui/ behind the same login, with the prefix stripped; unknown paths are not proxied.
    n = len(_Echo.seen)
    assert requests.get(base + "/ui/index.html", timeout=5).status_code == 401
    assert len(_Echo.seen) == n
    requests.get(base + "/ui/index.html", auth=("grafana", "grafana-pw"), timeout=5)
    assert _Echo.seen[-1]["path"] == "/index.html"
    # The UI's environment comes from nginx itself and points the UI at this server's /api, not at the UI's
    # built-in localhost:8080 (ThingsBoard here); it holds no password, so it needs no login.
    n = len(_Echo.seen)
    resp = requests.get(base + "/ui/racktwin-environments.json", timeout=5)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    assert not any(pw in resp.text for pw in NGINX_USERS.values())
    env = resp.json()["racktwin"]
    assert env["api_uri"] == base and env["mainAuth"] == "basic" and env["defaultUsernamePassword"] is None
    assert len(_Echo.seen) == n
    n = len(_Echo.seen)
    assert requests.get(base + "/devops/logging", auth=("ditto", "admin-pw"), timeout=5).status_code == 404
    assert len(_Echo.seen) == n


def test_htpasswd_hashes_match_openssl():
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    for password, salt in [("s3cret", "abcdefgh"), ("Ab1" * 11, "./09AZaz"), ("pässwort", "xy")]:
        expected = subprocess.run([openssl, "passwd", "-apr1", "-salt", salt, password],
                                  capture_output=True, text=True, check=True).stdout.strip()
        assert apr1(password, salt) == expected


def test_thingsboard_install_gate_scripts_parse():
    for script, shell in (("tb-install.sh", "bash"), ("tb-db-check.sh", "sh")):
        subprocess.run([shell, "-n", str(COMPOSE_DIR / "thingsboard" / script)], check=True)
    for script in ("mosquitto/entrypoint.sh", "grafana/entrypoint.sh"):
        subprocess.run(["sh", "-n", str(COMPOSE_DIR / script)], check=True)
    for script in ("init-env.sh", "compose.sh", "print-urls.sh", "preflight.sh", "lib.sh"):
        subprocess.run(["bash", "-n", str(COMPOSE_DIR / "scripts" / script)], check=True)


def test_tb_install_runs_only_on_an_empty_database(tmp_path):
    """tb-install.sh with /state and start-tb-node.sh faked: installed -> no install; empty -> install."""
    script = (COMPOSE_DIR / "thingsboard" / "tb-install.sh").read_text().replace("/state/", f"{tmp_path}/")
    (tmp_path / "tb-install.sh").write_text(script)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "start-tb-node.sh").write_text("#!/bin/sh\necho INSTALLING \"$INSTALL_TB\"\n")
    (fake / "start-tb-node.sh").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "INSTALL_TB": "true"}
    runs = {}
    for state in ("installed", "empty", "partial", None):
        marker = tmp_path / "tb-schema"
        marker.unlink(missing_ok=True)
        if state:
            marker.write_text(state + "\n")
        runs[state] = subprocess.run(["bash", str(tmp_path / "tb-install.sh")], env=env, capture_output=True, text=True)
    assert runs["installed"].returncode == 0 and "INSTALLING" not in runs["installed"].stdout
    assert runs["empty"].returncode == 0 and "INSTALLING true" in runs["empty"].stdout
    assert runs["partial"].returncode == 1 and "INSTALLING" not in runs["partial"].stdout
    assert "make clean" in runs["partial"].stderr  # says how to recover
    assert runs[None].returncode == 1


@pytest.mark.parametrize("schema, admins, expected", [
    ("f", None, "empty"),        # a fresh database
    ("t", "1", "installed"),     # schema and the system administrator
    ("t", "0", "partial"),       # schema without him: an interrupted install
    ("t", "fail", None),         # psql failing is an error, never "partial"
])
def test_tb_db_check_tells_empty_installed_and_interrupted_installs_apart(tmp_path, schema, admins, expected):
    """tb-db-check.sh with psql faked by the answers ThingsBoard's tables would give."""
    script = (COMPOSE_DIR / "thingsboard" / "tb-db-check.sh").read_text().replace("/state/", f"{tmp_path}/")
    (tmp_path / "tb-db-check.sh").write_text(script)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "psql").write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        f'  *to_regclass*) echo {schema} ;;\n'
        f'  *SYS_ADMIN*) [ "{admins}" = fail ] && exit 2; echo {admins} ;;\n'
        "  *) exit 3 ;;\n"
        "esac\n")
    (fake / "psql").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    run = subprocess.run(["sh", str(tmp_path / "tb-db-check.sh")], env=env, capture_output=True, text=True)
    marker = tmp_path / "tb-schema"
    if expected is None:
        assert run.returncode != 0 and not marker.exists()
    else:
        assert run.returncode == 0, run.stderr
        assert marker.read_text() == expected + "\n"


def test_grafana_entrypoint_fills_empty_receivers_and_wires_smtp(tmp_path):
    """Grafana refuses provisioned receivers without url/address: empty ones become placeholders; SMTP_HOST
    switches email on. The image's /run.sh is replaced by a script that prints the environment it gets."""
    run = tmp_path / "run.sh"
    run.write_text("#!/bin/sh\nenv\n")
    run.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "GRAFANA_RUN": str(run), "GRAFANA_INFLUX_TOKEN": "t",
            "GRAFANA_PERMISSIONS_TRIES": "0"}

    def start(**env: str) -> tuple[dict[str, str], str]:
        proc = subprocess.run(["sh", str(COMPOSE_DIR / "grafana" / "entrypoint.sh")], env={**base, **env},
                              capture_output=True, text=True, check=True)
        return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line), proc.stderr

    got, log = start(ALERT_WEBHOOK_URL="", ALERT_EMAIL_TO="")
    assert got["ALERT_WEBHOOK_URL"].startswith("http://127.0.0.1:9/") and got["ALERT_EMAIL_TO"].endswith(".invalid")
    assert "ALERT_WEBHOOK_URL is empty" in log and "GF_SMTP_ENABLED" not in got
    got, log = start(ALERT_WEBHOOK_URL="https://hooks.example/x", ALERT_EMAIL_TO="noc@example.org",
                     SMTP_HOST="smtp.example.org:587", SMTP_USER="u", SMTP_PASSWORD="p", SMTP_FROM="rt@example.org")
    assert (got["ALERT_WEBHOOK_URL"], got["ALERT_EMAIL_TO"]) == ("https://hooks.example/x", "noc@example.org")
    assert (got["GF_SMTP_ENABLED"], got["GF_SMTP_HOST"], got["GF_SMTP_PASSWORD"]) == ("true", "smtp.example.org:587", "p")
    assert log == ""
    # Half an email setup starts all the same, with a warning: recipients and no relay, a relay and no sender.
    got, log = start(ALERT_WEBHOOK_URL="https://hooks.example/x", ALERT_EMAIL_TO="noc@example.org", SMTP_HOST="")
    assert "GF_SMTP_ENABLED" not in got and got["ALERT_EMAIL_TO"] == "noc@example.org"
    assert log.count("\n") == 1 and "ALERT_EMAIL_TO is set but SMTP_HOST is empty" in log, log
    got, log = start(ALERT_WEBHOOK_URL="https://hooks.example/x", ALERT_EMAIL_TO="noc@example.org",
                     SMTP_HOST="smtp.example.org:587", SMTP_FROM="")
    assert (got["GF_SMTP_ENABLED"], got["GF_SMTP_FROM_ADDRESS"]) == ("true", "racktwin@localhost")
    assert log.count("\n") == 1 and "SMTP_HOST is set but SMTP_FROM is empty" in log, log


class _FolderPermissionsDouble(ThreadingHTTPServer):
    """Grafana's legacy folder permissions API as documented (POST /api/folders/:uid/permissions: ``items``,
    each for one role, user or team; roles Viewer/Editor, Admins cannot be set; levels 1/2/4; the items
    replace the folder's permissions). Folders exist once "provisioned"; basic auth is the admin's."""

    def __init__(self, folders: set[str], user: str, password: str, missing_first: int):
        self.folders, self.missing_first = folders, missing_first
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.permissions: dict[str, list[dict]] = {}
        self.problems: list[str] = []
        self.calls = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                double.calls += 1
                send_json(self, *double.answer(self))

        super().__init__(("127.0.0.1", 0), Handler)

    def answer(self, req: BaseHTTPRequestHandler) -> tuple[int, dict]:
        m = re.fullmatch(r"/api/folders/([^/]+)/permissions", req.path)
        raw = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        if req.headers.get("Authorization") != self.auth:
            return 401, {"message": "Unauthorized"}
        if m is None:
            self.problems.append(f"no such route {req.path}")
            return 404, {"message": "Not found"}
        if self.calls <= self.missing_first or m.group(1) not in self.folders:
            return 404, {"message": "Folder not found"}
        if (req.headers.get("Content-Type") or "").split(";")[0] != "application/json":
            self.problems.append(f"Content-Type {req.headers.get('Content-Type')}")
        try:
            body = json.loads(raw)
        except ValueError:
            self.problems.append(f"body is not JSON: {raw[:80]!r}")
            return 400, {"message": "bad request data"}
        items = body.get("items") if isinstance(body, dict) else None
        if set(body) != {"items"} or not isinstance(items, list):
            self.problems.append(f"body is not {{items: [...]}}: {body}")
            return 400, {"message": "bad request data"}
        for item in items:
            who = [k for k in ("role", "userId", "teamId") if k in item]
            if len(who) != 1 or set(item) - {"role", "userId", "teamId", "permission"}:
                self.problems.append(f"item {item}")
            elif "role" in item and item["role"] not in ("Viewer", "Editor"):
                self.problems.append(f"role {item['role']} (Admins cannot be set)")
            if item.get("permission") not in (1, 2, 4):
                self.problems.append(f"permission {item.get('permission')}")
        self.permissions[m.group(1)] = items
        return 200, {"message": "Folder permissions updated", "id": 7, "title": "RackTwin operations"}


@pytest.mark.parametrize("client", ["curl", "wget"])
def test_grafana_entrypoint_takes_the_viewer_role_off_the_operations_folder(tmp_path, client):
    """Anonymous visitors are Viewers: once Grafana has provisioned the operations folder, the entrypoint's
    background job leaves it to Editors (and Admins), with whichever of curl / wget the image has."""
    provider = yaml.safe_load((REPO / "provisioning/grafana/dashboards/racktwin.yaml").read_text())["providers"]
    folder_uids = {p["folderUid"] for p in provider if "folderUid" in p}
    double = _FolderPermissionsDouble(folder_uids, "admin", "s3cret:pw", missing_first=2)
    threading.Thread(target=double.serve_forever, daemon=True).start()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "cat", "base64", "tr", "sleep", client):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not installed")
        (bin_dir / tool).symlink_to(found)
    run = tmp_path / "run.sh"
    run.write_text("#!/bin/sh\nexec sleep 30\n")  # stands in for Grafana, which keeps running
    run.chmod(0o755)
    env = {"PATH": str(bin_dir), "GRAFANA_RUN": str(run), "GRAFANA_INFLUX_TOKEN": "t",
           "GF_SECURITY_ADMIN_USER": "admin", "GF_SECURITY_ADMIN_PASSWORD": "s3cret:pw",
           "GRAFANA_API_URL": f"http://127.0.0.1:{double.server_address[1]}", "GRAFANA_PERMISSIONS_RETRY_S": "0.2",
           "ALERT_WEBHOOK_URL": "https://hooks.example/x", "ALERT_EMAIL_TO": "noc@example.org"}
    proc = subprocess.Popen(["sh", str(COMPOSE_DIR / "grafana" / "entrypoint.sh")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not double.permissions and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
        double.shutdown()
    assert double.problems == []
    assert double.permissions == {"racktwin-operations": [{"role": "Editor", "permission": 1}]}
    assert double.calls == 3  # two 404s while Grafana has not provisioned the folder yet, then done


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("service, port", [("ditto-ui", 8080), ("grafana", 3000)])
@pytest.mark.parametrize("client", ["curl", "wget"])
def test_http_healthchecks_pass_with_either_curl_or_wget(tmp_path, service, port, client):
    """ditto-ui's base has been nginx-unprivileged's Alpine image (busybox wget, curl) and its Debian `latest`
    (curl only), Grafana's Alpine or Ubuntu: the healthcheck must pass with just one of the two tools; a
    ditto-ui that never turns healthy keeps ditto-nginx, and everything after it, from starting."""
    model, _ = load_model("demo")
    test = model["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", client):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not installed")
        (bin_dir / tool).symlink_to(found)
    command = test[1].replace(f"127.0.0.1:{port}/", f"127.0.0.1:{server.server_address[1]}/")
    assert command != test[1], "the healthcheck no longer probes the service's own port"
    try:
        up = subprocess.run(["sh", "-c", command], env={"PATH": str(bin_dir)}, capture_output=True, timeout=20)
    finally:
        server.shutdown()
        server.server_close()
    down = subprocess.run(["sh", "-c", command], env={"PATH": str(bin_dir)}, capture_output=True, timeout=20)
    assert up.returncode == 0, up.stderr
    assert down.returncode != 0


def _fake_docker(bin_dir: Path, compose_version: str = "2.29.1", running: str = "", buildx: str = "0.29.1") -> None:
    """A `docker` that answers `compose version [--short]`, `buildx version` and `ps -q`, and echoes anything else."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "buildx version" ]; then [ -n "{buildx}" ] || exit 1; '
        f'echo "github.com/docker/buildx v{buildx} 0123abc"; exit 0; fi\n'
        f'if [ "$1 $2 $3" = "compose version --short" ]; then echo {compose_version}; exit 0; fi\n'
        'if [ "$1 $2" = "compose version" ]; then echo "Docker Compose version v' + compose_version + '"; exit 0; fi\n'
        f'if [ "$1" = ps ]; then printf "%s" "{running}"; exit 0; fi\n'
        'echo "docker $*"\n')
    (bin_dir / "docker").chmod(0o755)


@pytest.mark.parametrize("version, accepted", [("2.20.3", False), ("1.29.2", False), ("2.24.0", True),
                                               ("v2.29.1", True), ("5.0.1", True), ("dev", True)])
def test_compose_wrapper_refuses_a_compose_older_than_2_24(tmp_path, version, accepted):
    """Older Compose versions reject our files with a schema error that does not name the cause; the wrapper says it."""
    scripts = tmp_path / "compose" / "scripts"
    scripts.mkdir(parents=True)
    for script in ("compose.sh", "lib.sh"):
        shutil.copy(COMPOSE_DIR / "scripts" / script, scripts / script)
    (tmp_path / "compose" / ".env").write_text("TB_MODE=demo\n")
    _fake_docker(tmp_path / "bin", version)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(scripts / "compose.sh"), "ps"], env=env, capture_output=True, text=True)
    if accepted:
        assert run.returncode == 0 and run.stdout.startswith("docker compose --project-directory"), run.stderr
    else:
        assert run.returncode == 1 and "too old" in run.stderr and "2.24" in run.stderr


def test_make_up_names_a_published_port_another_program_holds(tmp_path):
    """A port clash is reported before the start, naming the .env variable; a running RackTwin is not a clash."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    held = holder.getsockname()[1]
    free = {}
    for var in ("GRAFANA_HTTP_PORT", "DITTO_HTTP_PORT", "INFLUX_HTTP_PORT", "TB_HTTP_PORT", "MOSQUITTO_HOST_PORT"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free[var] = probe.getsockname()[1]
    env_file = tmp_path / ".env"
    script = COMPOSE_DIR / "scripts" / "preflight.sh"
    path = f"{tmp_path / 'bin'}:{os.environ['PATH']}"

    def check(mode: str, running: str = "") -> subprocess.CompletedProcess:
        env_file.write_text(f"TB_MODE={mode}\nTB_MQTT_PORT={held}\n" + "".join(f"{k}={v}\n" for k, v in free.items()))
        _fake_docker(tmp_path / "bin", running=running)
        return subprocess.run(["bash", str(script), str(env_file)], env={**os.environ, "PATH": path},
                              capture_output=True, text=True)

    try:
        clash = check("demo")
        assert clash.returncode == 1 and f"Port {held} (TB_MQTT_PORT" in clash.stderr
        assert "GRAFANA_HTTP_PORT" not in clash.stderr  # only the one that is taken
        assert check("demo", running="abc123\n").returncode == 0  # our own containers hold it
        assert check("external").returncode == 0  # no ThingsBoard container: its MQTT port is not published
        free["MOSQUITTO_HOST_PORT"] = held
        external = check("external")
        assert external.returncode == 1 and "MOSQUITTO_HOST_PORT" in external.stderr
    finally:
        holder.close()


def test_docker_gives_the_bridge_time_to_drain_on_stop():
    """`docker compose stop` sends SIGTERM, then SIGKILL after the grace period: the bridge's shutdown (waiting
    for in-flight readings, then stopping its sinks, 2 s each) must fit in it."""
    from bridge.config import Settings

    model, _ = load_model("demo")
    grace = model["services"]["bridge"].get("stop_grace_period", "10s")
    seconds = int(re.fullmatch(r"(\d+)s", grace).group(1))
    assert seconds >= Settings.model_fields["shutdown_timeout_s"].default + 3 * 2.0 + 5, grace


def test_make_up_refuses_configuration_the_containers_cannot_read(tmp_path):
    """Containers read the bind-mounted configuration as non-root users: a clone made under umask 077 is caught
    before the start, naming the files (the Ditto gateway would silently skip its extension file)."""
    compose = tmp_path / "compose"
    for part in ("scripts", "thingsboard", "mosquitto", "ditto", "grafana"):
        shutil.copytree(COMPOSE_DIR / part, compose / part)
    env_file = tmp_path / ".env"
    env_file.write_text("TB_MODE=demo\n")
    _fake_docker(tmp_path / "bin", buildx="0.29.1")

    def preflight() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(compose / "scripts" / "preflight.sh"), str(env_file)],
                              env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
                              capture_output=True, text=True)

    assert preflight().returncode == 0, preflight().stderr
    private = compose / "ditto" / "gateway-extension.conf"
    private.chmod(0o600)
    (compose / "grafana").chmod(0o700)
    refused = preflight()
    assert refused.returncode == 1
    assert str(private) in refused.stderr and str(compose / "grafana") in refused.stderr
    assert "chmod -R o+rX" in refused.stderr
    private.chmod(0o644)
    (compose / "grafana").chmod(0o755)
    assert preflight().returncode == 0


@pytest.mark.parametrize("buildx, warned", [("0.29.1", False), ("0.17.0", False), ("0.12.1", True), ("", True)])
def test_make_up_warns_when_buildx_is_missing_or_too_old(tmp_path, buildx, warned):
    """Recent Compose releases refuse `up --build` without Buildx 0.17+; the preflight says so first."""
    env_file = tmp_path / ".env"
    env_file.write_text("TB_MODE=demo\n")  # no ports set: nothing to check there
    _fake_docker(tmp_path / "bin", buildx=buildx)
    run = subprocess.run(["bash", str(COMPOSE_DIR / "scripts" / "preflight.sh"), str(env_file)],
                         env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
                         capture_output=True, text=True)
    assert run.returncode == 0  # a warning only: older Compose releases build without Buildx
    assert ("Buildx 0.17+" in run.stderr) == warned, run.stderr
