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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="racktwin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the bridge (MQTT -> Ditto + InfluxDB)").set_defaults(func=_cmd_run)
    sub.add_parser("check-config", help="validate and print the effective configuration (no secrets)").set_defaults(
        func=_cmd_check_config
    )
    return parser


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
