"""Where Grafana puts a dashboard's panels and a stat panel's tiles on a screen, and whether a tile's text fits:
a model of Grafana 11.0-13.2's layout, small enough to check the wall without a browser.

Sources (grafana/grafana and the @grafana/ui, @grafana/data npm releases 11.0.0, 11.6.16, 12.4.10, 13.2.3):
- public/app/core/constants.ts: grid rows of 30 px with 8 px gaps, 24 columns; react-grid-layout sizes a panel
  as round(colW * w + (w - 1) * 8) by round(30 * h + (h - 1) * 8); the dashboard body has 16 px side padding
  in kiosk mode.
- PanelChrome: a header of 32 px (40 px in 13.2; none for a panel without title), a 1 px border; stat panels
  have no content padding (setNoPadding).
- StatPanel -> VizRepeater with autoGrid, itemSpacing 3, orientation auto -> the grid of
  utils/squares.ts calculateGridDimensions; fieldDisplay.ts shows at most reduceOptions.limit values (25 unset).
- BigValueLayout: padding 12 px (8 px for tiles up to 100 px tall); explicit text.titleSize/valueSize are used
  as they are, line height 1.2, no ellipsis and no shrinking: text wraps at spaces (not at no-break spaces) and
  what does not fit spills over the neighbouring tiles. Stacked layout (title above value) unless width/height
  > 2.5; with justifyMode "center" a gap of 0.75ch separates title and value (taken at the 14 px body size).
- Automatic value size (no text.valueSize): measureText.ts calculateFontSize, min(height / 1.2, width / (width of
  the text at 14 px + 2) * 14), the unit's suffix included; with one value and no title the value gets the tile.
- Fonts: Inter, title 400, value 500; measured with the real Inter (Debian's fonts-inter) advance widths.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

GRID_ROW_PX, GRID_GAP_PX, GRID_COLUMNS = 30, 8, 24
KIOSK_SIDE_PADDING_PX = 16
PANEL_BORDER_PX = 1
STAT_ITEM_SPACING_PX = 3
DEFAULT_VALUES_LIMIT = 25
LINE_HEIGHT = 1.2
LETTER_SPACING_PX = 0.15  # body letter-spacing 0.01071em of 14 px, inherited as a length
BODY_FONT_PX = 14
INTER_DIR = Path("/usr/share/fonts/opentype/inter")


class FontMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Screen:
    name: str
    css_width: int   # the browser window in CSS pixels: a 4K screen at 200 % scaling is 1920 wide
    css_height: int
    mm_per_css_px: float  # physical size of one CSS pixel on the screen this models


def panel_px(grid_pos: dict, screen: Screen) -> tuple[float, float]:
    content_width = screen.css_width - 2 * KIOSK_SIDE_PADDING_PX
    col = (content_width - GRID_GAP_PX * (GRID_COLUMNS - 1)) / GRID_COLUMNS
    w, h = grid_pos["w"], grid_pos["h"]
    return round(col * w + (w - 1) * GRID_GAP_PX), round(GRID_ROW_PX * h + (h - 1) * GRID_GAP_PX)


def dashboard_height_px(panels: list[dict]) -> int:
    units = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    return GRID_ROW_PX * units + GRID_GAP_PX * (units - 1)


def stat_content_px(panel: dict, screen: Screen, header_px: int) -> tuple[float, float]:
    w, h = panel_px(panel["gridPos"], screen)
    header = header_px if panel.get("title") else 0
    return w - 2 * PANEL_BORDER_PX, h - header - 2 * PANEL_BORDER_PX


def _size_of_child(parent_w: float, parent_h: float, n: int) -> float:
    parts = math.ceil(math.sqrt(n * parent_w / parent_h))
    if math.floor(parts * parent_h / parent_w) * parts < n:
        return parent_h / math.ceil(parts * parent_h / parent_w)
    return parent_w / parts


@dataclass(frozen=True)
class Grid:
    columns: int
    rows: int
    tile_w: float
    tile_h: float
    last_row_w: float


def tile_grid(width: float, height: float, n: int, spacing: float = STAT_ITEM_SPACING_PX) -> Grid:
    """utils/squares.ts calculateGridDimensions."""
    square = max(_size_of_child(width, height, n), _size_of_child(height, width, n))
    columns = math.floor(width / square)
    rows = math.ceil(n / columns)
    columns = math.ceil(n / rows)
    last = columns - (columns * rows - n)
    return Grid(columns, rows, width / columns - spacing + spacing / columns,
                height / rows - spacing + spacing / rows, width / last - spacing + spacing / last)


@functools.lru_cache(maxsize=4)
def _font(weight: str):
    path = INTER_DIR / f"Inter-{weight}.otf"
    if not path.exists():
        raise FontMissing(f"{path} missing: install Debian's fonts-inter")
    from fontTools.ttLib import TTFont

    font = TTFont(str(path))
    return font.getBestCmap(), font["hmtx"], font["head"].unitsPerEm, font["OS/2"].sCapHeight


def text_width(text: str, size: float, weight: str = "Regular", letter_spacing: float = LETTER_SPACING_PX) -> float:
    cmap, hmtx, upm, _ = _font(weight)
    units = sum(hmtx[cmap[ord(ch)]][0] for ch in text)  # KeyError: a glyph Inter lacks (the browser would fall back)
    return units * size / upm + letter_spacing * len(text)


def auto_font_px(text: str, width: float, height: float, weight: str) -> float:
    """measureText.ts calculateFontSize: the text measured on a canvas at 14 px (no letter-spacing), scaled to
    the width, capped by the height over the line height."""
    measured = text_width(text, 14, weight, letter_spacing=0.0)
    return min(height / LINE_HEIGHT, width / (measured + 2) * 14)


def single_stat_value_px(panel: dict, screen: Screen, header_px: int, value_text: str) -> float:
    """The automatic value font of a stat panel showing one value and no title inside (BigValueLayout:
    WideNoChart or StackedWithNoChart; the unit's suffix is part of the measured text)."""
    width, height = stat_content_px(panel, screen, header_px)
    padding = 12 if height > 100 else 8
    return auto_font_px(value_text, width - 2 * padding, height - 2 * padding, "Medium")


def cap_height_px(size: float) -> float:
    _, _, upm, cap = _font("Regular")
    return size * cap / upm


def wrap(text: str, size: float, width: float, weight: str = "Regular") -> list[str] | None:
    """Greedy line breaking at spaces, as a browser does with white-space: normal (runs of spaces collapse);
    None when a single word is wider than ``width`` (it would spill sideways)."""
    lines: list[str] = []
    for word in (w for w in text.split(" ") if w):  # U+00A0 does not break: it stays inside its word
        if text_width(word, size, weight) > width:
            return None
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and text_width(candidate, size, weight) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


@dataclass(frozen=True)
class TileFit:
    grid: Grid
    padding: float
    title_lines: list[str] | None
    value_lines: list[str] | None
    needed_h: float
    available_w: float
    available_h: float

    @property
    def fits(self) -> bool:
        return self.title_lines is not None and self.value_lines is not None and self.needed_h <= self.available_h


def fit_tile(panel: dict, screen: Screen, header_px: int, tiles: int, title: str, value: str) -> TileFit:
    """How the stacked title-over-value text of the narrowest tile fits (the full rows are narrower)."""
    text = panel["options"]["text"]
    width, height = stat_content_px(panel, screen, header_px)
    grid = tile_grid(width, height, tiles)
    if grid.tile_w / grid.tile_h > 2.5:
        raise AssertionError("wide tile layout (title beside value) is not modelled")
    padding = 12 if grid.tile_h > 100 else 8
    avail_w, avail_h = grid.tile_w - 2 * padding, grid.tile_h - 2 * padding
    title_lines = wrap(title, text["titleSize"], avail_w)
    value_lines = wrap(value, text["valueSize"], avail_w, weight="Medium")
    needed = LINE_HEIGHT * (text["titleSize"] * len(title_lines or []) + text["valueSize"] * len(value_lines or []))
    if panel["options"].get("justifyMode") == "center":
        needed += 0.75 * text_width("0", BODY_FONT_PX)
    return TileFit(grid, padding, title_lines, value_lines, needed, avail_w, avail_h)
