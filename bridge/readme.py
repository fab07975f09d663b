"""Keep README's generated sections true: `python -m bridge.readme` rewrites them, tests compare."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .config import config_reference_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def with_config_reference(text: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no {START} … {END} section")
    return pattern.sub(lambda _: f"{START}\n{config_reference_markdown()}{END}", text)


def main() -> int:
    text = README.read_text(encoding="utf-8")
    updated = with_config_reference(text)
    if updated != text:
        README.write_text(updated, encoding="utf-8")
        print("README.md: configuration reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
