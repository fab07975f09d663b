"""Where the contract files (OpenAPI documents, JSON schemas) for the test doubles live."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ContractNotFound", "REPO_ROOT", "contract_locations", "find_contract"]

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV_VAR = "RACKTWIN_CONTRACTS_DIR"


class ContractNotFound(FileNotFoundError):
    """None of the places a contract file may live holds it."""


def contract_locations(name: str) -> list[Path]:
    """The candidate paths of contract ``name``, in the order they are tried."""
    places = []
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        places.append(Path(env_dir) / name)
    places.append(REPO_ROOT.parent / "shared" / "reference" / name)
    places.append(REPO_ROOT / "tests" / "contracts" / name)
    return places


def find_contract(name: str) -> Path:
    """First existing of ``$RACKTWIN_CONTRACTS_DIR/<name>``, ``<repo>/../shared/reference/<name>``,
    ``<repo>/tests/contracts/<name>``; raises :class:`ContractNotFound` naming all three otherwise."""
    for path in contract_locations(name):
        if path.is_file():
            return path
    tried = [
        f"${ENV_VAR}/{name}" + (f" ({Path(os.environ[ENV_VAR]) / name})" if os.environ.get(ENV_VAR) else " (variable not set)"),
        str(REPO_ROOT.parent / "shared" / "reference" / name),
        str(REPO_ROOT / "tests" / "contracts" / name),
    ]
    raise ContractNotFound(f"contract file {name!r} not found; looked in: " + "; ".join(tried))
