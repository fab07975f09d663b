"""Names that must agree across the stack's files, checked as cross-file rules (no Docker engine needed).

Every value comes from the file or the code that defines it, with the settings compose gives each service
(compose/docker-compose.yml interpolated with compose/.env.example, each secret a distinct dummy, see
tests/test_compose.py); nothing expected is written down here except which services and files to read.

1. MQTT topic: the topics of the ThingsBoard rule chain (bridge/thingsboard/rulechain.py, built the way
   bootstrap builds it from the bootstrap service's environment) lie under the write grant of its MQTT user in
   compose/mosquitto/acl and under the bridge's subscription (the bridge service's environment, else
   bridge/config.py's default); that subscription lies under the bridge user's read grant.
2. MQTT users: every ACL user is created by compose/mosquitto/entrypoint.sh with a password from a compose/.env
   variable, and each client (the bridge, the rule chain, the mosquitto healthcheck) logs in as such a user with
   that user's password.
3. Ditto users: the nginx htpasswd that secrets-init writes (bridge/secrets.py), in the file nginx reads, holds
   the bridge's, Grafana's Ditto datasource's and bootstrap's users with their passwords; each becomes subject
   nginx:<user> (compose/ditto/nginx.conf) in the policy bootstrap and the bridge create (bridge/twin.py
   policy_body) with the right grants: the bridge WRITE on thing:/, Grafana READ only, bootstrap's admin WRITE
   on policy:/.

Each rule is a pure check function over parsed values: it runs once on the real files and once on a mutated
copy, which it must reject naming the two files that disagree.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from bridge import bootstrap
from bridge.cli import build_parser
from bridge.config import ENV_PREFIX, Settings, load_settings
from bridge.secrets import HTPASSWD_NAME, apr1, init_secrets
from bridge.thingsboard import rulechain
from bridge.thingsboard.install import broker_target
from bridge.twin import policy_body
from dashboards.common import DITTO_UID
from dashboards.datasources import datasources_file
from tests.test_compose import (
    COMPOSE_DIR,
    COMPOSE_FILE,
    ENV_EXAMPLE,
    REPO,
    load_model,
    parse_env_file,
)

# The files (labels in the messages) and services read here.
COMPOSE = "compose/docker-compose.yml"
ENV_FILE = "compose/.env.example"
ACL = "compose/mosquitto/acl"
MOSQUITTO_CONF = "compose/mosquitto/mosquitto.conf"
MOSQUITTO_ENTRYPOINT = "compose/mosquitto/entrypoint.sh"
NGINX_CONF = "compose/ditto/nginx.conf"
CONFIG = "bridge/config.py"
BOOTSTRAP = "bridge/bootstrap.py"
RULECHAIN = "bridge/thingsboard/rulechain.py"
SECRETS = "bridge/secrets.py"
TWIN = "bridge/twin.py"
DATASOURCES_YAML = "provisioning/grafana/datasources/racktwin.yaml"
DATASOURCES_PY = "dashboards/datasources.py"
BRIDGE, BOOTSTRAP_SVC, MOSQUITTO, SECRETS_INIT, NGINX, GRAFANA = (
    "bridge", "bootstrap", "mosquitto", "secrets-init", "ditto-nginx", "grafana")


# --- MQTT topic filters (MQTT 3.1.1 §4.7: '+' one level, '#' any levels incl. the parent, and wildcards in the
# first level never match topics starting with '$') -----------------------------------------------------------

WILDCARDS = ("+", "#")


def _levels(topic_filter: str) -> list[str]:
    levels = topic_filter.split("/")
    # '#' alone matches every topic with at least one level, exactly as '+/#' does.
    return ["+", "#"] if levels == ["#"] else levels


def filter_within(inner: str, outer: str) -> bool:
    """Every topic the filter ``inner`` matches is matched by ``outer``."""
    i, o = _levels(inner), _levels(outer)
    if o[0] in WILDCARDS and i[0].startswith("$"):
        return False
    for n, level in enumerate(i):
        if n >= len(o):
            return False
        if o[n] == "#":
            return True
        if level == "#":
            return False
        if o[n] != "+" and level != o[n]:
            return False
    return o[len(i):] in ([], ["#"])


def filters_intersect(a: str, b: str) -> bool:
    """Some topic is matched by both filters."""
    x, y = _levels(a), _levels(b)
    if (x[0] in WILDCARDS and y[0].startswith("$")) or (y[0] in WILDCARDS and x[0].startswith("$")):
        return False
    for n in range(max(len(x), len(y))):
        p, q = (x[n] if n < len(x) else None), (y[n] if n < len(y) else None)
        if p == "#" or q == "#":
            return True
        if p is None or q is None or (p != q and "+" not in (p, q)):
            return False
    return True


def subscription_filter(subscription: str) -> str:
    """The filter of a (possibly shared, $share/<group>/<filter>) subscription, as the ACL sees it."""
    m = re.fullmatch(r"\$share/[^/]+/(.+)", subscription)
    return m.group(1) if m else subscription


def pattern_filter(topic_pattern: str) -> str:
    """A ThingsBoard topic pattern as a filter: a level with a ${...} placeholder can be anything. (The rule
    chain's script makes the device name safe for a topic, so it is one level: rulechain.sanitize_device_name.)"""
    return "/".join("+" if "${" in level else level for level in topic_pattern.split("/"))


def pattern_samples(topic_pattern: str) -> list[str]:
    """Concrete topics the pattern yields, for a plain and a hostile device name."""
    return [re.sub(r"\$\{[^}]*\}", rulechain.sanitize_device_name(name), topic_pattern)
            for name in ("hall1-a01", "rack 7/b+c#d")]


# --- parsing ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acl:
    """A Mosquitto acl_file: ``topic`` lines per user (None: before any ``user`` line), ``pattern`` lines for all."""

    topics: Mapping[str | None, tuple[tuple[str, str], ...]]
    patterns: tuple[tuple[str, str], ...] = ()

    @property
    def users(self) -> list[str]:
        return [u for u in self.topics if u is not None]

    def grants(self, user: str, access: str) -> list[str]:
        """Topic filters on which ``user`` has ``access`` (read, write or deny)."""
        rules = [*self.topics.get(user, ()),
                 *((a, t.replace("%u", user)) for a, t in self.patterns if "%c" not in t)]
        return [t for a, t in rules if a == access or (a == "readwrite" and access in ("read", "write"))]


def parse_acl(text: str) -> Acl:
    topics: dict[str | None, list[tuple[str, str]]] = {None: []}
    patterns: list[tuple[str, str]] = []
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            user = rest
            topics.setdefault(user, [])
        elif keyword in ("topic", "pattern"):
            access, _, topic = rest.partition(" ")
            if access not in ("read", "write", "readwrite", "deny"):
                access, topic = "readwrite", rest
            (topics[user] if keyword == "topic" else patterns).append((access, topic.strip()))
        else:
            raise AssertionError(f"{ACL}: cannot read line {raw!r}")
    return Acl({u: tuple(r) for u, r in topics.items()}, tuple(patterns))


def parse_mosquitto_users(text: str) -> dict[str, str]:
    """User -> environment variable holding its password, from the entrypoint's ``mosquitto_passwd -b`` lines."""
    users = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "mosquitto_passwd":
            continue
        flags, args, rest = set(), [], iter(words[1:])
        for word in rest:
            if word.startswith("-"):
                flags.add(word)
                if word == "-H":
                    next(rest)  # the hash algorithm
            else:
                args.append(word)
        var = re.fullmatch(r"\$\{?(\w+)\}?", args[2]) if len(args) == 3 else None
        assert "-b" in flags and var and not args[1].startswith("$"), f"{MOSQUITTO_ENTRYPOINT}: cannot read {line!r}"
        users[args[1]] = var.group(1)
    return users


def env_reference(value: str) -> str | None:
    """The compose/.env variable a compose value or a provisioning ${VAR} is taken from."""
    m = re.fullmatch(r"\$\{?(\w+)(?::?[-?+][^}]*)?\}?", value)
    return m.group(1) if m else None


def nginx_subject_templates(text: str) -> set[str]:
    """The non-empty x-ditto-pre-authenticated values nginx sets (the empty one clears a client's forgery)."""
    found = re.findall(r'proxy_set_header\s+x-ditto-pre-authenticated\s+"([^"]*)"\s*;', text, re.IGNORECASE)
    return {t for t in found if t}


def nginx_user_files(text: str) -> set[str]:
    return set(re.findall(r"auth_basic_user_file\s+([^;\s]+)\s*;", text))


def ditto_subject(template: str, user: str) -> str:
    return template.replace("${remote_user}", user).replace("$remote_user", user)


def volume_location(svc: Mapping[str, Any], container_path: str) -> tuple[str, str] | None:
    """(volume or bind source, path inside it) of the mount of ``svc`` that holds ``container_path``."""
    best: tuple[str, str, int] | None = None
    for vol in svc.get("volumes", []):
        source, target = str(vol).split(":")[:2]
        inside = container_path == target or container_path.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) > best[2]):
            best = (source, container_path[len(target):].lstrip("/"), len(target))
    return best[:2] if best else None


def effective_grants(policy: Mapping[str, Any], subject: str) -> dict[str, set[str]]:
    """Resource -> permissions the subject holds: grants of its entries minus the revokes of any of them."""
    granted: dict[str, set[str]] = {}
    revoked: dict[str, set[str]] = {}
    for entry in policy["entries"].values():
        if subject in (entry.get("subjects") or {}):
            for resource, perms in (entry.get("resources") or {}).items():
                granted.setdefault(resource, set()).update(perms.get("grant") or [])
                revoked.setdefault(resource, set()).update(perms.get("revoke") or [])
    return {r: g - revoked.get(r, set()) for r, g in granted.items()}


def env_origin(env: Mapping[str, str], field: str, service: str) -> str:
    """Where a setting of ``service`` comes from: its compose environment, else Settings' default."""
    key = f"{ENV_PREFIX}{field.upper()}"
    return f"{COMPOSE} (services.{service}: {key})" if key in env else f"{CONFIG} (Settings.{field} default)"


@contextmanager
def container_env(env: Mapping[str, str]) -> Iterator[None]:
    """The RACKTWIN_* part of os.environ as the service's container has it (Settings reads os.environ)."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith(ENV_PREFIX)}
    added = {k: v for k, v in env.items() if k.upper().startswith(ENV_PREFIX)}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
        os.environ.update(saved)


def read(label: str) -> str:
    return (REPO / label).read_text()


# --- the real stack, parsed once ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    model: dict
    raw: dict  # the compose file before interpolation
    env_vars: frozenset[str]  # defined in compose/.env.example
    acl: Acl
    mqtt_users: dict[str, str]  # user -> password variable (mosquitto entrypoint)
    bridge: Settings
    bootstrap: bootstrap.BootstrapConfig
    rule_node: dict  # the rule chain's MQTT node configuration

    def env(self, service: str) -> dict[str, str]:
        return service_env(self.model, service)

    @property
    def rule_topic_source(self) -> str:
        return (f"{RULECHAIN} (topicPattern {self.rule_node['topicPattern']!r}, prefix from "
                f"{env_origin(self.env(BOOTSTRAP_SVC), 'tb_topic_prefix', BOOTSTRAP_SVC)} via {BOOTSTRAP})")

    @property
    def bridge_topic_source(self) -> str:
        return env_origin(self.env(BRIDGE), "mqtt_topic", BRIDGE)


def service_env(model: dict, service: str) -> dict[str, str]:
    """A service's environment as its container sees it (a key without a value is empty)."""
    return {k: "" if v is None else str(v) for k, v in (model["services"][service].get("environment") or {}).items()}


def bridge_settings(env: Mapping[str, str]) -> Settings:
    # RACKTWIN_*_FILE name files that exist in the container only (the InfluxDB token): no name checked here.
    with container_env({k: v for k, v in env.items() if not k.endswith("_FILE")}):
        return load_settings()


def rule_chain_node(bootstrap_env: Mapping[str, str]) -> tuple[bootstrap.BootstrapConfig, dict]:
    """Bootstrap's config and the MQTT node of the rule chain it installs (install_thingsboard_side's path)."""
    cfg = bootstrap.config_from_env(bootstrap_env)
    with container_env(bootstrap_env):
        settings = bootstrap.thingsboard_settings(cfg)
    [node] = [n for n in rulechain.forwarding_nodes(broker_target(settings)) if n["type"] == rulechain.MQTT_NODE]
    return cfg, node["configuration"]


@lru_cache(maxsize=1)
def stack() -> Stack:
    model, _ = load_model("demo")
    envs = {name: service_env(model, name) for name in model["services"]}
    cfg, node = rule_chain_node(envs[BOOTSTRAP_SVC])
    return Stack(
        model=model,
        raw=yaml.safe_load(COMPOSE_FILE.read_text()),
        env_vars=frozenset(parse_env_file(ENV_EXAMPLE)[0]),
        acl=parse_acl(read(ACL)),
        mqtt_users=parse_mosquitto_users(read(MOSQUITTO_ENTRYPOINT)),
        bridge=bridge_settings(envs[BRIDGE]),
        bootstrap=cfg,
        rule_node=node,
    )


@pytest.fixture(scope="module")
def real() -> Stack:
    return stack()


@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory) -> dict[str, str]:
    """User -> hash of the htpasswd `racktwin init-secrets` writes with secrets-init's environment and command."""
    svc = stack().model["services"][SECRETS_INIT]
    args = build_parser().parse_args([str(a) for a in svc["command"]])
    assert args.func.__name__ == "_cmd_init_secrets", f"{COMPOSE}: secrets-init does not run init-secrets"
    path = init_secrets(tmp_path_factory.mktemp("secrets"), stack().env(SECRETS_INIT))
    assert path.name == HTPASSWD_NAME
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if line)


# --- rule 1: the MQTT topic -----------------------------------------------------------------------------------


def check_acl_allows(acl: Acl, user: str, access: str, topic_filter: str, who: str) -> None:
    allowed = acl.grants(user, access)
    assert any(filter_within(topic_filter, grant) for grant in allowed), (
        f"{who} disagrees with {ACL}: {topic_filter!r} is not under user {user!r}'s {access} grant(s) {allowed}")
    denied = [d for d in acl.grants(user, "deny") if filters_intersect(topic_filter, d)]
    assert not denied, f"{who} disagrees with {ACL}: {topic_filter!r} overlaps user {user!r}'s deny {denied}"


def check_topic_chain(topic_pattern: str, tb_user: str, subscription: str, bridge_user: str, acl: Acl,
                      rule_src: str, bridge_src: str) -> None:
    """The rule chain may publish its topics, the bridge subscribes to them and may read what it subscribes to."""
    published, samples = pattern_filter(topic_pattern), pattern_samples(topic_pattern)
    check_acl_allows(acl, tb_user, "write", published, rule_src)
    for topic in samples:  # the same with paho's matcher on concrete topics
        assert any(topic_matches_sub(g, topic) for g in acl.grants(tb_user, "write")), (
            f"{rule_src} disagrees with {ACL}: user {tb_user!r} may not publish {topic!r}")
    bridge_filter = subscription_filter(subscription)
    assert filter_within(published, bridge_filter), (
        f"{rule_src} disagrees with {bridge_src}: the rule chain publishes {published!r}, outside the bridge's "
        f"subscription {subscription!r}")
    for topic in samples:
        assert topic_matches_sub(bridge_filter, topic), (
            f"{rule_src} disagrees with {bridge_src}: {topic!r} does not match the bridge's subscription {subscription!r}")
    check_acl_allows(acl, bridge_user, "read", bridge_filter, bridge_src)


def real_topic_chain_args(s: Stack) -> dict[str, Any]:
    return {"topic_pattern": s.rule_node["topicPattern"], "tb_user": s.rule_node["credentials"]["username"],
            "subscription": s.bridge.subscription_topic, "bridge_user": s.bridge.mqtt_username, "acl": s.acl,
            "rule_src": s.rule_topic_source, "bridge_src": s.bridge_topic_source}


def test_rule_chain_topics_reach_the_bridge_through_the_acl(real):
    check_topic_chain(**real_topic_chain_args(real))


def test_a_shared_bridge_subscription_is_checked_by_its_filter(real):
    """Several replicas subscribe as $share/<group>/<mqtt_topic>; the ACL sees the filter."""
    args = real_topic_chain_args(real)
    check_topic_chain(**{**args, "subscription": f"$share/racktwin/{args['subscription']}"})


def _acl_with(acl: Acl, user: str, rules: tuple[tuple[str, str], ...]) -> Acl:
    return dataclasses.replace(acl, topics={**acl.topics, user: rules})


@pytest.mark.parametrize("mutation, files", [
    ("acl write elsewhere", (RULECHAIN, ACL)),
    ("acl write one level only", (RULECHAIN, ACL)),
    ("acl deny", (RULECHAIN, ACL)),
    ("rule chain prefix", (RULECHAIN, ACL)),
    ("bridge topic narrower", (RULECHAIN, "bridge's source")),
    ("bridge reads less", ("bridge's source", ACL)),
])
def test_topic_chain_rejects_a_disagreement(real, mutation, files):
    args = real_topic_chain_args(real)
    tb_user, bridge_user = args["tb_user"], args["bridge_user"]
    prefix = args["topic_pattern"].rsplit("/", 1)[0]
    if mutation == "acl write elsewhere":
        args["acl"] = _acl_with(real.acl, tb_user, (("write", "elsewhere/#"),))
    elif mutation == "acl write one level only":
        args["acl"] = _acl_with(real.acl, tb_user, (("write", prefix),))
    elif mutation == "acl deny":
        args["acl"] = _acl_with(real.acl, tb_user, (*real.acl.topics[tb_user], ("deny", f"{prefix}/+")))
    elif mutation == "rule chain prefix":
        args["topic_pattern"] = "other/" + args["topic_pattern"]
    elif mutation == "bridge topic narrower":
        args["subscription"] = f"{prefix}/+/extra"
    elif mutation == "bridge reads less":
        args["acl"] = _acl_with(real.acl, bridge_user, (("read", f"{prefix}/+"),))
        args["subscription"] = f"{prefix}/#"
    with pytest.raises(AssertionError) as caught:
        check_topic_chain(**args)
    bridge_file = args["bridge_src"].split(" ")[0]  # compose's bridge environment, else bridge/config.py
    assert all((bridge_file if f == "bridge's source" else f) in str(caught.value) for f in files), str(caught.value)


def test_the_rule_chain_prefix_and_the_bridge_topic_follow_their_settings(real):
    """The topics checked above are the ones the code derives: change the setting, the topic follows."""
    bootstrap_env = {**real.env(BOOTSTRAP_SVC), f"{ENV_PREFIX}TB_TOPIC_PREFIX": "moved/here"}
    _, node = rule_chain_node(bootstrap_env)
    assert pattern_filter(node["topicPattern"]) == "moved/here/+"
    bridge = bridge_settings({**real.env(BRIDGE), f"{ENV_PREFIX}MQTT_TOPIC": "moved/here/#"})
    assert bridge.subscription_topic == "moved/here/#"
    with pytest.raises(AssertionError, match=re.escape(ACL)):
        check_topic_chain(**{**real_topic_chain_args(real), "topic_pattern": node["topicPattern"]})


# The matcher above, against paho's on every topic of a small universe ('c' is a level no filter names).
_FILTER_LEVELS, _TOPIC_LEVELS = ("a", "b", "$s", "+", "#"), ("a", "b", "c", "$s")


def _valid_filter(levels: tuple[str, ...]) -> bool:
    return "#" not in levels[:-1] and "$s" not in levels[1:]


_FILTERS = ["/".join(f) for n in (1, 2, 3) for f in itertools.product(_FILTER_LEVELS, repeat=n) if _valid_filter(f)]
_TOPICS = ["/".join(t) for n in (1, 2, 3, 4) for t in itertools.product(_TOPIC_LEVELS, repeat=n)]


def test_one_device_profile_for_the_installer_the_bridge_and_the_simulator(real):
    """The rule chain forwards one profile's telemetry, the bridge places that profile's devices and accepts their
    device type, the simulator creates its devices with it: all from TB_DEVICE_PROFILE."""
    with container_env(real.env(BOOTSTRAP_SVC)):
        installer = bootstrap.thingsboard_settings(real.bootstrap).tb_device_profile
    simulator = bridge_settings(real.env("simulator")).tb_device_profile
    assert installer == real.bridge.tb_device_profile == simulator == "rack-sensor"
    assert real.bridge.mapping.device_types == [installer]


def test_filter_matching_agrees_with_paho():
    matched = {f: frozenset(t for t in _TOPICS if topic_matches_sub(f, t)) for f in _FILTERS}
    wrong_within = [(i, o) for i in _FILTERS for o in _FILTERS if filter_within(i, o) != (matched[i] <= matched[o])]
    wrong_overlap = [(a, b) for a in _FILTERS for b in _FILTERS if filters_intersect(a, b) != bool(matched[a] & matched[b])]
    assert wrong_within == [] and wrong_overlap == []


# --- rule 2: MQTT users ---------------------------------------------------------------------------------------


def check_acl_users_are_created(acl: Acl, mqtt_users: Mapping[str, str]) -> None:
    missing = sorted(set(acl.users) - set(mqtt_users))
    assert not missing, f"{ACL} disagrees with {MOSQUITTO_ENTRYPOINT}: ACL user(s) {missing} are never created"


def check_mqtt_passwords_come_from_env(mqtt_users: Mapping[str, str], mosquitto_raw_env: Mapping[str, Any],
                                       env_vars: frozenset[str]) -> None:
    for user, var in mqtt_users.items():
        assert var in mosquitto_raw_env, (
            f"{MOSQUITTO_ENTRYPOINT} disagrees with {COMPOSE}: user {user!r}'s password ${var} is not in "
            f"services.{MOSQUITTO}.environment")
        source = env_reference(str(mosquitto_raw_env[var]))
        assert source in env_vars, (
            f"{COMPOSE} disagrees with {ENV_FILE}: services.{MOSQUITTO}.environment.{var} = "
            f"{mosquitto_raw_env[var]!r} is not a variable of compose/.env")


def check_mqtt_login(who: str, user: str | None, password: str | None, mqtt_users: Mapping[str, str],
                     mosquitto_env: Mapping[str, str], acl: Acl) -> None:
    assert user in mqtt_users, (
        f"{who} disagrees with {MOSQUITTO_ENTRYPOINT}: it logs in as MQTT user {user!r}, not one of {sorted(mqtt_users)}")
    assert user in acl.users, f"{who} disagrees with {ACL}: MQTT user {user!r} has no grants there"
    var = mqtt_users[user]
    assert password == mosquitto_env.get(var), (
        f"{who} disagrees with {MOSQUITTO_ENTRYPOINT}: its password is not ${var}, the one user {user!r} gets "
        f"(services.{MOSQUITTO} in {COMPOSE})")


def mosquitto_healthcheck(s: Stack) -> tuple[str, str, str]:
    """(user, password, topic) of the mosquitto service's healthcheck, its $VAR resolved in that container."""
    test = s.model["services"][MOSQUITTO]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", f"{COMPOSE}: mosquitto healthcheck is not CMD-SHELL"
    words = shlex.split(test[1])
    options = {word: words[i + 1] for i, word in enumerate(words[:-1]) if word.startswith("-")}
    password = options["-P"]
    var = env_reference(password)
    return options["-u"], s.env(MOSQUITTO).get(var, "") if var else password, options["-t"]


def mqtt_clients(s: Stack) -> list[tuple[str, str | None, str | None]]:
    """(who, user, password) of every client of our broker."""
    creds = s.rule_node["credentials"]
    health_user, health_password, _ = mosquitto_healthcheck(s)
    bridge_password = s.bridge.mqtt_password.get_secret_value() if s.bridge.mqtt_password else None
    return [
        (env_origin(s.env(BRIDGE), "mqtt_username", BRIDGE), s.bridge.mqtt_username, bridge_password),
        (f"{RULECHAIN} (MQTT node credentials, user {BOOTSTRAP} MQTT_TB_USER)", creds.get("username"),
         creds.get("password")),
        (f"{COMPOSE} (services.{MOSQUITTO}.healthcheck)", health_user, health_password),
    ]


def test_every_acl_user_is_created_from_env(real):
    assert real.acl.users and real.mqtt_users
    check_acl_users_are_created(real.acl, real.mqtt_users)
    check_mqtt_passwords_come_from_env(real.mqtt_users, real.raw["services"][MOSQUITTO]["environment"], real.env_vars)


@pytest.mark.parametrize("client", [0, 1, 2], ids=["bridge", "rule chain", "healthcheck"])
def test_mqtt_clients_log_in_as_acl_users(real, client):
    who, user, password = mqtt_clients(real)[client]
    check_mqtt_login(who, user, password, real.mqtt_users, real.env(MOSQUITTO), real.acl)


def test_the_healthcheck_may_read_what_it_subscribes_to(real):
    user, _, topic = mosquitto_healthcheck(real)
    check_acl_allows(real.acl, user, "read", topic, f"{COMPOSE} (services.{MOSQUITTO}.healthcheck)")


def test_mqtt_user_checks_reject_a_disagreement(real):
    missing_user = next(iter(real.acl.users))
    with pytest.raises(AssertionError, match=f"{ACL} disagrees with {MOSQUITTO_ENTRYPOINT}"):
        check_acl_users_are_created(real.acl, {u: v for u, v in real.mqtt_users.items() if u != missing_user})
    raw_env = dict(real.raw["services"][MOSQUITTO]["environment"])
    var = next(iter(real.mqtt_users.values()))
    with pytest.raises(AssertionError, match=f"{MOSQUITTO_ENTRYPOINT} disagrees with {COMPOSE}"):
        check_mqtt_passwords_come_from_env(real.mqtt_users, {k: v for k, v in raw_env.items() if k != var},
                                           real.env_vars)
    with pytest.raises(AssertionError, match=f"{COMPOSE} disagrees with {ENV_FILE}"):
        check_mqtt_passwords_come_from_env(real.mqtt_users, {**raw_env, var: "${NOT_IN_ENV_FILE}"}, real.env_vars)
    for who, user, password in mqtt_clients(real):
        others = [u for u in real.mqtt_users if u != user]
        with pytest.raises(AssertionError, match=re.escape(MOSQUITTO_ENTRYPOINT)):  # a user nobody creates
            check_mqtt_login(who, f"{user}-typo", password, real.mqtt_users, real.env(MOSQUITTO), real.acl)
        with pytest.raises(AssertionError, match=re.escape(ACL)):  # created, but without grants
            check_mqtt_login(who, user, password, real.mqtt_users, real.env(MOSQUITTO),
                             dataclasses.replace(real.acl, topics={k: v for k, v in real.acl.topics.items() if k != user}))
        swapped = {**real.mqtt_users, user: real.mqtt_users[others[0]]}  # another user's password variable
        with pytest.raises(AssertionError, match=f"{re.escape(who)} disagrees with {MOSQUITTO_ENTRYPOINT}"):
            check_mqtt_login(who, user, password, swapped, real.env(MOSQUITTO), real.acl)


def test_entrypoint_parser_reads_the_lines_it_must():
    text = 'mosquitto_passwd -c -b "$passwd" alice "$ALICE_PW"\nmosquitto_passwd -H sha512 -b f bob ${BOB_PW}  # x\n'
    assert parse_mosquitto_users(text) == {"alice": "ALICE_PW", "bob": "BOB_PW"}
    with pytest.raises(AssertionError, match=MOSQUITTO_ENTRYPOINT):
        parse_mosquitto_users('mosquitto_passwd -b "$passwd" "$WHO" "$PW"\n')


# --- rule 3: Ditto users --------------------------------------------------------------------------------------


def check_htpasswd_is_what_nginx_reads(nginx_files: set[str], nginx_svc: Mapping[str, Any], secrets_dir: str,
                                       secrets_svc: Mapping[str, Any]) -> None:
    written = volume_location(secrets_svc, f"{secrets_dir.rstrip('/')}/{HTPASSWD_NAME}")
    assert written, f"{SECRETS} disagrees with {COMPOSE}: secrets-init writes {secrets_dir} outside its volumes"
    assert nginx_files, f"{NGINX_CONF}: no auth_basic_user_file"
    for path in nginx_files:
        assert volume_location(nginx_svc, path) == written, (
            f"{NGINX_CONF} disagrees with {SECRETS}: nginx reads {path}, secrets-init writes {HTPASSWD_NAME} into "
            f"{written} (mounts in {COMPOSE})")


def check_one_subject_template(templates: set[str]) -> str:
    assert len(templates) == 1 and "remote_user" in next(iter(templates)), (
        f"{NGINX_CONF}: the authenticated locations set different or user-less Ditto subjects {templates}")
    return next(iter(templates))


def check_ditto_client(who: str, user: str, password: str, htpasswd: Mapping[str, str], template: str,
                       policy: Mapping[str, Any], policy_src: str, need: Mapping[str, set[str]],
                       forbid: set[str] = frozenset()) -> None:
    assert user in htpasswd, (
        f"{who} disagrees with {SECRETS}: Ditto user {user!r} is not in the htpasswd secrets-init writes "
        f"(users {sorted(htpasswd)})")
    stored = htpasswd[user]
    assert apr1(password, stored.split("$")[2]) == stored, (
        f"{who} disagrees with {COMPOSE} (services.{SECRETS_INIT}): user {user!r}'s password is not the one "
        "its htpasswd line is made from")
    subject = ditto_subject(template, user)
    grants = effective_grants(policy, subject)
    assert grants, f"{NGINX_CONF} disagrees with {policy_src}: subject {subject!r} (user {user!r}) is in no policy entry"
    for resource, perms in need.items():
        assert perms <= grants.get(resource, set()), (
            f"{who} disagrees with {policy_src}: {subject!r} needs {sorted(perms)} on {resource}, has "
            f"{sorted(grants.get(resource, set()))}")
    extra = {r: sorted(g & forbid) for r, g in grants.items() if g & forbid}
    assert not extra, f"{who} disagrees with {policy_src}: {subject!r} must not have {extra}"


def check_policies_agree(bootstrap_policy: Mapping[str, Any], bridge_policy: Mapping[str, Any], bridge_src: str) -> None:
    """Bootstrap corrects the policy to its own on every `make up`; the bridge creates its own when missing."""
    assert bootstrap_policy == bridge_policy, (
        f"{BOOTSTRAP} disagrees with {bridge_src}: the Ditto policy bootstrap enforces differs from the one the "
        "bridge creates")


def grafana_ditto_datasources(grafana_env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(source, basicAuthUser, password as Grafana expands it) of the Ditto datasource, generated and committed."""
    out = []
    for src, provisioning in ((DATASOURCES_PY, datasources_file()), (DATASOURCES_YAML, yaml.safe_load(read(DATASOURCES_YAML)))):
        [ds] = [d for d in provisioning["datasources"] if d.get("uid") == DITTO_UID]
        assert ds.get("basicAuth") is True, f"{src}: the Ditto datasource does not use basic auth"
        var = env_reference(ds["secureJsonData"]["basicAuthPassword"])
        assert var in grafana_env, f"{src} disagrees with {COMPOSE}: ${var} is not in services.{GRAFANA}.environment"
        out.append((f"{src} (basicAuthUser)", ds["basicAuthUser"], grafana_env[var]))
    return out


def ditto_policies(s: Stack) -> list[tuple[str, dict]]:
    return [
        (f"{TWIN} policy_body with {BOOTSTRAP} BootstrapConfig.ditto_policy_subjects",
         policy_body(s.bootstrap.ditto_policy_subjects)),
        (f"{TWIN} policy_body with {env_origin(s.env(BRIDGE), 'ditto_policy_subjects', BRIDGE)}",
         policy_body(s.bridge.ditto_policy_subjects)),
    ]


def ditto_clients(s: Stack) -> list[tuple[str, str, str, dict[str, set[str]], set[str]]]:
    """(who, user, password, permissions it needs, permissions it must not have)."""
    bridge_password = s.bridge.ditto_password.get_secret_value() if s.bridge.ditto_password else ""
    return [
        (env_origin(s.env(BRIDGE), "ditto_username", BRIDGE), s.bridge.ditto_username, bridge_password,
         {"thing:/": {"READ", "WRITE"}}, set()),
        *((who, user, password, {"thing:/": {"READ"}}, {"WRITE"})
          for who, user, password in grafana_ditto_datasources(s.env(GRAFANA))),
        (f"{BOOTSTRAP} (BootstrapConfig.ditto_admin_user)", s.bootstrap.ditto_admin_user,
         s.bootstrap.ditto_admin_password, {"policy:/": {"READ", "WRITE"}}, set()),
    ]


def secrets_dir(s: Stack) -> str:
    return build_parser().parse_args([str(a) for a in s.model["services"][SECRETS_INIT]["command"]]).dir


def test_the_htpasswd_secrets_init_writes_is_the_one_nginx_reads(real):
    services = real.model["services"]
    check_htpasswd_is_what_nginx_reads(nginx_user_files(read(NGINX_CONF)), services[NGINX], secrets_dir(real),
                                       services[SECRETS_INIT])


@pytest.mark.parametrize("client", [0, 1, 2, 3], ids=["bridge", "grafana generated", "grafana committed", "admin"])
@pytest.mark.parametrize("policy", [0, 1], ids=["bootstrap policy", "bridge policy"])
def test_ditto_users_log_in_and_hold_their_grants(real, htpasswd, client, policy):
    template = check_one_subject_template(nginx_subject_templates(read(NGINX_CONF)))
    who, user, password, need, forbid = ditto_clients(real)[client]
    policy_src, body = ditto_policies(real)[policy]
    check_ditto_client(who, user, password, htpasswd, template, body, policy_src, need, forbid)


def test_bootstrap_and_the_bridge_create_the_same_policy(real):
    (_, bootstrap_policy), (bridge_src, bridge_policy) = ditto_policies(real)
    check_policies_agree(bootstrap_policy, bridge_policy, bridge_src)


def test_ditto_user_checks_reject_a_disagreement(real, htpasswd):
    template = check_one_subject_template(nginx_subject_templates(read(NGINX_CONF)))
    policy_src, policy = ditto_policies(real)[0]
    clients = ditto_clients(real)
    for who, user, password, need, forbid in clients:
        args = {"who": who, "user": user, "password": password, "htpasswd": htpasswd, "template": template,
                "policy": policy, "policy_src": policy_src, "need": need, "forbid": forbid}
        cases = [
            ({"user": f"{user}-typo"}, (who, SECRETS)),  # a datasource / setting naming a user nobody creates
            ({"htpasswd": {u: h for u, h in htpasswd.items() if u != user}}, (who, SECRETS)),
            ({"password": password + "x"}, (who, COMPOSE)),
            ({"template": template.replace("nginx:", "other:")}, (NGINX_CONF, TWIN)),  # nginx's subject prefix moved
        ]
        for mutation, files in cases:
            with pytest.raises(AssertionError) as caught:
                check_ditto_client(**{**args, **mutation})
            assert all(f in str(caught.value) for f in files), str(caught.value)
    # Grafana written into the bridge's entry: it could write twins. The bridge moved to the readers: it cannot.
    subjects = real.bootstrap.ditto_policy_subjects
    grafana_who, grafana_user = clients[1][0], clients[1][1]
    grafana_subject, bridge_subject = ditto_subject(template, grafana_user), ditto_subject(template, clients[0][1])
    writes_too = policy_body({**subjects, "bridge": [*subjects["bridge"], grafana_subject]})
    with pytest.raises(AssertionError, match=f"{re.escape(grafana_who)} disagrees with {TWIN}.*must not have"):
        check_ditto_client(*clients[1][:3], htpasswd, template, writes_too, policy_src, *clients[1][3:])
    reads_only = policy_body({**subjects, "bridge": [], "reader": [*subjects["reader"], bridge_subject]})
    with pytest.raises(AssertionError, match=f"disagrees with {TWIN}.*needs"):
        check_ditto_client(*clients[0][:3], htpasswd, template, reads_only, policy_src, *clients[0][3:])
    with pytest.raises(AssertionError, match=f"{BOOTSTRAP} disagrees with"):
        check_policies_agree(policy, reads_only, "the bridge")
    with pytest.raises(AssertionError, match=NGINX_CONF):
        check_one_subject_template({template, "other:${remote_user}"})


def test_htpasswd_location_check_rejects_a_disagreement(real):
    services = real.model["services"]
    nginx = dict(services[NGINX], volumes=[v.replace("racktwin-secrets:", "other-volume:")
                                           for v in services[NGINX]["volumes"]])
    with pytest.raises(AssertionError, match=f"{NGINX_CONF} disagrees with {SECRETS}"):
        check_htpasswd_is_what_nginx_reads(nginx_user_files(read(NGINX_CONF)), nginx, secrets_dir(real),
                                           services[SECRETS_INIT])
    with pytest.raises(AssertionError, match=f"{NGINX_CONF} disagrees with {SECRETS}"):
        check_htpasswd_is_what_nginx_reads({"/run/racktwin/other.htpasswd"}, services[NGINX], secrets_dir(real),
                                           services[SECRETS_INIT])


# --- the files read above are the ones the containers load ---------------------------------------------------


def bind_source(svc: Mapping[str, Any], container_path: str) -> Path:
    location = volume_location(svc, container_path)
    assert location and location[0].startswith("."), f"{COMPOSE}: {container_path} is not bind-mounted from the repo"
    return (COMPOSE_DIR / location[0] / location[1]).resolve()


def test_the_files_read_here_are_the_ones_the_containers_load(real):
    services = real.model["services"]
    mosquitto = services[MOSQUITTO]
    entrypoint = bind_source(mosquitto, mosquitto["entrypoint"][-1])
    assert entrypoint == REPO / MOSQUITTO_ENTRYPOINT
    conf = re.search(r"conf=\$\{MOSQUITTO_CONF:-([^}]+)\}", entrypoint.read_text()).group(1)
    assert bind_source(mosquitto, conf) == REPO / MOSQUITTO_CONF
    acl_file = re.search(r"^acl_file\s+(\S+)", read(MOSQUITTO_CONF), re.MULTILINE).group(1)
    assert bind_source(mosquitto, acl_file) == REPO / ACL
    assert bind_source(services[NGINX], "/etc/nginx/nginx.conf") == REPO / NGINX_CONF
