"""`make contracts`: fetch the contract files the tests validate against, at pinned commits.

The files are Ditto's OpenAPI document, the Compose Specification schema and a Grafana dashboard
JSON schema. Each download is checked against the sha256 recorded in tests/contracts/SOURCES.md,
so a user's checkout validates against exactly what our CI validated against.
"""

from __future__ import annotations

import hashlib
import sys
import urllib.request
from pathlib import Path

from tests.doubles.contracts import contract_locations

DEST = Path(__file__).resolve().parents[1] / "contracts"

CONTRACTS = {
    "ditto-api-2.yml": (
        "https://raw.githubusercontent.com/eclipse-ditto/ditto/4e3576844b73fb5e00d1b501f5d7ee6511a7fdc1/"
        "documentation/src/main/resources/openapi/ditto-api-2.yml",
        "14d0c552a89bb8c782f8da5b67f2d619b24cc105c640d23add9080c5c011f46b",
    ),
    "compose-spec.json": (
        "https://raw.githubusercontent.com/compose-spec/compose-spec/170098ba07d9f53c383a41bfd4c5166b0a4529a6/"
        "schema/compose-spec.json",
        "1f91e091f16b2dd50ab8860e02bb391d22df553d91c145eacedb1b6eff9c3f0e",
    ),
    "grafana-dashboard.jsonschema.json": (
        "https://raw.githubusercontent.com/grafana/grafana-foundation-sdk/f178d5a42a8915fdda9235e97ad93881e3f94fef/"
        "jsonschema/dashboard.jsonschema.json",
        "67451cd5b288f97e3f68eccd52ffa4f75151fc87c669b8cd93c051056b294265",
    ),
}


def fetch(name: str, url: str, sha256: str) -> str:
    """Nothing to do when a place the tests look in already holds the pinned file; else download into DEST."""
    for path in contract_locations(name):
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
            return f"{name}: present in {path.parent}, sha256 ok"
    target = DEST / name
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https URLs above
        data = resp.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{name}: sha256 {digest} does not match the pinned {sha256}; not saved")
    DEST.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"{name}: downloaded, sha256 ok"


def main() -> int:
    for name, (url, sha256) in CONTRACTS.items():
        print(fetch(name, url, sha256))
    return 0


if __name__ == "__main__":
    sys.exit(main())
