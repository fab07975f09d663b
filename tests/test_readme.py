"""README is the front door: its two commands, the CI script and the settings table must stay true."""

from __future__ import annotations

from pathlib import Path

from bridge.readme import README, with_config_reference

REPO = Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_settings_model():
    text = README.read_text(encoding="utf-8")
    assert with_config_reference(text) == text, "run `make readme` to regenerate the configuration reference"


def test_quick_start_gives_the_two_commands_and_ci_runs_the_test_one():
    text = README.read_text(encoding="utf-8")
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make up " in quick_start and "make test " in quick_start
    ci = (REPO / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_every_make_target_readme_names_exists():
    makefile = (REPO / "Makefile").read_text()
    for target in ("up", "down", "clean", "logs", "ps", "test", "dashboards", "bench", "bench-queries", "evaluate", "contracts"):
        assert f"\n{target}:" in makefile, target
