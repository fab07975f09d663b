"""`racktwin thingsboard install`: device profile, forwarding rule chain and its wiring. Idempotent.

Steps, each skipped when already in place:
1. the rack device profile: created if missing; if RackTwin created it (its description says so), the fields
   RackTwin sets are brought up to date and the rest (alarm rules, default rule chain, queue, dashboard, all
   that a user may have added) is kept; a profile the user made themselves is left exactly as it is;
2. the forwarding rule chain (script + MQTT node, see rulechain.py), created or brought up to date;
3. a rule-chain node after Save Timeseries in the chain the profile's devices go through: the profile's
   own default rule chain if it has one, otherwise the root chain.
``--dry-run`` reports what would change and writes nothing. Used by ``racktwin bootstrap``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from dataclasses import dataclass, field

from ..config import Settings, load_settings
from . import rulechain
from .rest import ThingsBoard

log = logging.getLogger(__name__)

PLACEHOLDER_ID = "<id of the new chain>"


@dataclass
class InstallReport:
    dry_run: bool
    changes: list[str] = field(default_factory=list)
    chain_id: str | None = None
    wired_into: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def broker_target(settings: Settings) -> rulechain.BrokerTarget:
    password = settings.tb_broker_password.get_secret_value() if settings.tb_broker_password else None
    return rulechain.BrokerTarget(
        host=settings.tb_broker_host,
        port=settings.tb_broker_port,
        username=settings.tb_broker_username,
        password=password,
        client_id=settings.tb_broker_client_id,
        topic_prefix=settings.tb_topic_prefix,
    )


OWNED_MARK = "RackTwin"  # a profile whose description starts with this was created by RackTwin
OWNED_FIELDS = ("description", "type", "transportType", "provisionType")
OWNED_PROFILE_DATA = ("configuration", "transportConfiguration", "provisionConfiguration")


def default_device_profile(name: str) -> dict:
    """A plain DEFAULT-transport profile (devices post JSON over MQTT/HTTP with access tokens)."""
    return {
        "name": name,
        "description": f"{OWNED_MARK} rack environment sensors (tempTop, tempBottom, humidityTop, humidityBottom); "
                       "kept up to date by `racktwin thingsboard install`",
        "type": "DEFAULT",
        "transportType": "DEFAULT",
        "provisionType": "DISABLED",
        "default": False,
        "profileData": {
            "configuration": {"type": "DEFAULT"},
            "transportConfiguration": {"type": "DEFAULT"},
            "provisionConfiguration": {"type": "DISABLED", "provisionDeviceSecret": None},
        },
    }


def is_ours(profile: dict) -> bool:
    return str(profile.get("description") or "").startswith(OWNED_MARK)


def _covers(current: object, wanted: object) -> bool:
    """``current`` has every non-null value of ``wanted`` (ThingsBoard may add or drop nulls and defaults)."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(v is None or _covers(current.get(k), v) for k, v in wanted.items())
    return current == wanted


def profile_changes(current: dict, wanted: dict) -> list[str]:
    """The RackTwin-owned fields of ``current`` that differ from ``wanted``."""
    changed = [f for f in OWNED_FIELDS if not _covers(current.get(f), wanted[f])]
    data = current.get("profileData") or {}
    changed += [f"profileData.{f}" for f in OWNED_PROFILE_DATA if not _covers(data.get(f), wanted["profileData"][f])]
    return changed


def updated_profile(current: dict, wanted: dict) -> dict:
    """``current`` (id and version included, for ThingsBoard's optimistic locking) with the owned fields of
    ``wanted``; everything else the profile carries is kept."""
    out = copy.deepcopy(current)
    for f in OWNED_FIELDS:
        out[f] = wanted[f]
    out["profileData"] = {**(out.get("profileData") or {}),
                          **{f: copy.deepcopy(wanted["profileData"][f]) for f in OWNED_PROFILE_DATA}}
    return out


def install(settings: Settings, dry_run: bool = False, tb: ThingsBoard | None = None) -> InstallReport:
    own = tb is None
    tb = tb or ThingsBoard.from_settings(settings)
    try:
        return _install(tb, settings, dry_run)
    finally:
        if own:
            tb.close()


def _install(tb: ThingsBoard, settings: Settings, dry_run: bool) -> InstallReport:
    report = InstallReport(dry_run=dry_run)
    broker = broker_target(settings)

    wanted = default_device_profile(settings.tb_device_profile)
    profile = tb.device_profile(settings.tb_device_profile)
    if profile is None:
        report.changes.append(f"create device profile {settings.tb_device_profile!r}")
        if not dry_run:
            profile = tb.save_device_profile(wanted)
    elif not is_ours(profile):
        log.info("device profile %r was not created by RackTwin: left as it is", settings.tb_device_profile)
    elif stale := profile_changes(profile, wanted):
        report.changes.append(f"update device profile {settings.tb_device_profile!r}: {', '.join(stale)}")
        if not dry_run:
            profile = tb.save_device_profile(updated_profile(profile, wanted))

    chain = tb.rule_chain_by_name(settings.tb_rule_chain_name)
    if chain is None:
        report.changes.append(f"create rule chain {settings.tb_rule_chain_name!r}")
        if not dry_run:
            chain = tb.save_rule_chain(rulechain.forwarding_chain(settings.tb_rule_chain_name))
    chain_id = chain["id"]["id"] if chain else PLACEHOLDER_ID
    report.chain_id = chain_id if chain else None

    current = tb.rule_chain_metadata(chain_id) if chain else None
    if not rulechain.forwarding_up_to_date(current, broker):
        report.changes += [f"rule chain {settings.tb_rule_chain_name!r}: {c}"
                           for c in rulechain.changed_fields(current, broker)]
        if not dry_run:
            tb.save_rule_chain_metadata(
                rulechain.forwarding_metadata(chain_id, broker, (current or {}).get("version"))
            )

    target = _target_chain(tb, profile)
    report.wired_into = target["name"]
    plan = rulechain.plan_wiring(tb.rule_chain_metadata(target["id"]["id"]), chain_id)
    report.changes += [f"rule chain {target['name']!r}: {c}" for c in plan.changes]
    if plan.metadata is not None and not dry_run:
        tb.save_rule_chain_metadata(plan.metadata)

    for change in report.changes:
        log.info("%s%s", "would " if dry_run else "", change)
    if not report.changes:
        log.info("ThingsBoard already set up: nothing to change")
    return report


def _target_chain(tb: ThingsBoard, profile: dict | None) -> dict:
    """The chain the profile's telemetry runs through: the profile's own, else the root chain."""
    chain_ref = (profile or {}).get("defaultRuleChainId")
    if chain_ref and chain_ref.get("id"):
        chain = tb.rule_chain(chain_ref["id"])
        if chain is not None:
            return chain
        log.warning("device profile points at rule chain %s, which does not exist; using the root chain",
                    chain_ref["id"])
    root = tb.root_rule_chain()
    if root is None:
        raise rulechain.WiringError("ThingsBoard has no root rule chain for this tenant")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")


def main(args: argparse.Namespace) -> int:
    settings = load_settings()
    try:
        report = install(settings, dry_run=args.dry_run)
    except rulechain.WiringError as exc:
        print(f"racktwin thingsboard install: {exc}", file=sys.stderr)
        return 1
    verb = "would change" if report.dry_run else "changed"
    if report.changes:
        print(f"ThingsBoard: {verb} {len(report.changes)} item(s):")
        for change in report.changes:
            print(f"  - {change}")
    else:
        print("ThingsBoard: everything in place, nothing to change")
    if report.wired_into:
        print(f"telemetry of profile {settings.tb_device_profile!r} is forwarded from rule chain "
              f"{report.wired_into!r} to {settings.tb_broker_host}:{settings.tb_broker_port} "
              f"topic {settings.tb_topic_prefix}/<device>")
    return 0
