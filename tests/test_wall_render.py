"""The layout model's text measurement against a real browser engine: the wall's tile texts, laid out in headless
Chromium with the CSS that tests/grafana_layout.py assumes for a stat tile (Inter, line height 1.2, padding,
centred column with a 0.75ch gap), must stay inside their tiles, and the model must never count fewer lines than
Chromium wraps them into (it may count more: it ignores kerning, so it errs on the safe side).

This checks the model's font metrics and line breaking, not Grafana's own CSS, which only a running Grafana
would show (README, "Not verified yet").
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess

import pytest

from tests.grafana_layout import LETTER_SPACING_PX, LINE_HEIGHT, fit_tile
from tests.test_wall_layout import HEADERS_PX, RACKS, SCREENS, TILES, state_texts, worst_titles
from tests.test_wall_layout import inter_font  # noqa: F401 - the autouse fixture: skip without the Inter font

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (make deps-system installs it)")

SCRIPT = """
document.fonts.ready.then(() => {
  const out = [];
  for (const tile of document.querySelectorAll('.tile')) {
    const r = tile.getBoundingClientRect();
    const parts = [...tile.querySelectorAll('.title, .value')].map(el => {
      const b = el.getBoundingClientRect(), size = parseFloat(getComputedStyle(el).fontSize);
      return {top: b.top - r.top, bottom: b.bottom - r.top, left: b.left - r.left, right: b.right - r.left,
              lines: Math.round(b.height / (size * %(lh)s)), over: el.scrollWidth - el.clientWidth};
    });
    out.push({inter: document.fonts.check('14px Inter'), parts});
  }
  document.getElementById('out').textContent = JSON.stringify(out);
});
"""


def page(cases: list[dict]) -> str:
    text = TILES["options"]["text"]
    tiles = "".join(
        f'<div class="tile" style="width:{c["fit"].grid.tile_w}px;height:{c["fit"].grid.tile_h}px;'
        f'padding:{c["fit"].padding}px"><div class="box"><div class="title">{html.escape(c["title"])}</div>'
        f'<div class="value">{html.escape(c["state"])}</div></div></div>' for c in cases)
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
html {{ box-sizing: border-box }} *, *:before, *:after {{ box-sizing: inherit }}
body {{ font-family: 'Inter'; font-size: 14px; letter-spacing: {LETTER_SPACING_PX}px; margin: 0 }}
.tile {{ display: flex }}
.box {{ display: flex; flex-direction: column; flex-wrap: wrap; flex-grow: 1; justify-content: center;
        align-items: center; gap: 0.75ch }}
.title {{ font-size: {text["titleSize"]}px; line-height: {LINE_HEIGHT}; font-weight: 400; text-align: center }}
.value {{ font-size: {text["valueSize"]}px; line-height: {LINE_HEIGHT}; font-weight: 500; text-align: center }}
</style></head><body>{tiles}<pre id="out"></pre><script>{SCRIPT % {"lh": LINE_HEIGHT}}</script></body></html>"""


def render(tmp_path, cases: list[dict]) -> list[dict]:
    path = tmp_path / "tiles.html"
    path.write_text(page(cases), encoding="utf-8")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="out">([^<]*)</pre>', proc.stdout)
    assert found and found.group(1), f"chromium gave no result: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_tile_texts_fit_in_chromium_and_the_model_never_undercounts_lines(tmp_path):
    cases = [{"title": title, "state": state, "fit": fit_tile(TILES, screen, header, RACKS, title, state)}
             for screen in SCREENS for header in HEADERS_PX for title in worst_titles() for state in state_texts()]
    results = render(tmp_path, cases)
    assert len(results) == len(cases) and all(r["inter"] for r in results), "Chromium did not use Inter"
    for case, result in zip(cases, results):
        fit, (title, value) = case["fit"], result["parts"]
        where = f"{case['title']!r} / {case['state']!r} in {fit.grid.tile_w:.0f} x {fit.grid.tile_h:.0f} px"
        assert title["over"] <= 0 and value["over"] <= 0, f"{where}: a word wider than the tile"
        # The column wraps (flex-wrap, as in Grafana's BigValue): text too tall for the tile puts the value beside
        # the title instead of below it, and out of the tile sideways.
        assert value["top"] >= title["bottom"] - 0.5, f"{where}: the value went beside the title"
        inner = (fit.padding - 0.5, fit.grid.tile_w - fit.padding + 0.5, fit.grid.tile_h - fit.padding + 0.5)
        for part in (title, value):
            assert part["top"] >= inner[0] and part["left"] >= inner[0], f"{where}: {part}"
            assert part["right"] <= inner[1] and part["bottom"] <= inner[2], f"{where}: {part}"
        # None: the model already calls a word too wide for the tile, the most cautious answer it has.
        model = [math.inf if lines is None else len(lines) for lines in (fit.title_lines, fit.value_lines)]
        assert model[0] >= title["lines"] and model[1] >= value["lines"], (
            f"{where}: the model counts {model} lines, Chromium {title['lines']}/{value['lines']}")
