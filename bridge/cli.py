"""`racktwin` command line: run the bridge, check the config, and the operating tools."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, effective_config, load_settings
from .logs import setup_logging

log = logging.getLogger(__name__)

EXIT_CONFIG = 2


def _cmd_run(args: argparse.Namespace) -> int:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_json)
    from .service import run

    return run(settings)


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    json.dump(effective_config(settings), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\nconfiguration is valid\n")
    return 0


def _cmd_config_reference(args: argparse.Namespace) -> int:
    from .config import config_reference_markdown

    sys.stdout.write(config_reference_markdown())
    return 0


def _cmd_init_secrets(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .secrets import SecretsError, init_secrets

    setup_logging("INFO", False)
    try:
        init_secrets(Path(args.dir), os.environ)
    except SecretsError as exc:
        print(f"racktwin init-secrets: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    from .bootstrap import BootstrapError, config_from_env, run_bootstrap

    setup_logging("INFO", False)
    try:
        run_bootstrap(config_from_env())
    except BootstrapError as exc:
        print(f"racktwin bootstrap: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="racktwin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the bridge (MQTT -> Ditto + InfluxDB)").set_defaults(func=_cmd_run)
    sub.add_parser("check-config", help="validate and print the effective configuration (no secrets)").set_defaults(
        func=_cmd_check_config
    )
    sub.add_parser("config-reference", help="print the settings table that README shows").set_defaults(
        func=_cmd_config_reference
    )
    p_secrets = sub.add_parser("init-secrets", help="write the Ditto nginx htpasswd from DITTO_*_PASSWORD (compose)")
    p_secrets.add_argument("--dir", default="/run/racktwin", help="shared secrets directory")
    p_secrets.set_defaults(func=_cmd_init_secrets)
    sub.add_parser(
        "bootstrap", help="idempotent stack set-up: Ditto policy, InfluxDB tokens, ThingsBoard (env as compose/.env)"
    ).set_defaults(func=_cmd_bootstrap)
    _add_thingsboard_commands(sub)
    return parser


# --- ThingsBoard onboarding, sync, verify, simulator (bridge/thingsboard/, bridge/simulator/) -----------


def _lazy(module: str, function: str = "main"):
    """Import the command's module only when it runs (keeps `racktwin run` free of tool imports)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        import requests

        from .thingsboard.rest import ThingsBoardError

        try:
            return getattr(importlib.import_module(module, __package__), function)(args)
        except (ThingsBoardError, requests.RequestException) as exc:
            print(f"racktwin {args.command}: {exc}", file=sys.stderr)
            return 1

    return run


def _add_thingsboard_commands(sub: argparse._SubParsersAction) -> None:
    from .simulator import run as simulator_cli
    from .thingsboard import install as install_cli, sync as sync_cli, verify as verify_cli

    p_tb = sub.add_parser("thingsboard", help="ThingsBoard onboarding")
    tb_sub = p_tb.add_subparsers(dest="tb_command", required=True, metavar="ACTION")
    p_install = tb_sub.add_parser("install", help="idempotently create the device profile and forwarding rule "
                                  "chain and wire it after Save Timeseries")
    install_cli.add_arguments(p_install)
    p_install.set_defaults(func=_lazy(".thingsboard.install"))
    p_sync = sub.add_parser("sync", help="ThingsBoard devices -> Ditto twins (+ InfluxDB backfill)")
    sync_cli.add_arguments(p_sync)
    p_sync.set_defaults(func=_lazy(".thingsboard.sync"))
    p_verify = sub.add_parser("verify", help="compare ThingsBoard, the Ditto twins and InfluxDB; exit 1 on disagreement")
    verify_cli.add_arguments(p_verify)
    p_verify.set_defaults(func=_lazy(".thingsboard.verify"))
    p_sim = sub.add_parser("simulate", help="publish a simulated data hall (scenarios switchable at run time)")
    simulator_cli.add_arguments(p_sim)
    p_sim.set_defaults(func=_lazy(".simulator.run"))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"racktwin: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
