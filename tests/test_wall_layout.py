"""The wall on the screens it is made for, through a model of Grafana's layout (tests/grafana_layout.py) and the
real Inter font: nothing scrolls, every rack tile's text fits its tile for every state, and how large the text is
on a 55-inch screen.

1080p and 4K at 200 % scaling give the browser the same 1920 x 1080 CSS pixels; 4K at 150 % gives 2560 x 1440.
Panel headers are 32 px up to Grafana 13.0 and 40 px in 13.2, so both are checked.
"""

from __future__ import annotations

import math
import re

import pytest

from bridge.config import Settings
from bridge.simulator.run import hall_of
from bridge.twin import HUMIDITY_DECIMALS, TEMPERATURE_DECIMALS
from dashboards.panels import ROW_NAME_PX
from tests.dashboard_data import DASHBOARDS
from tests.grafana_layout import (DEFAULT_VALUES_LIMIT, FontMissing, Screen, cap_height_px, dashboard_height_px,
                                  fit_tile, panel_px, single_stat_value_px, stat_content_px, text_width, tile_grid)

WALL = DASHBOARDS["racktwin-wall"]
TILES = next(p for p in WALL["panels"] if p["title"] == "Racks (current twin state)")
SCREEN_55_INCH_HEIGHT_MM = 685.0  # a 55-inch 16:9 screen is 1218 x 685 mm
SCREENS = [
    Screen("1080p or 4K at 200 %", 1920, 1080, SCREEN_55_INCH_HEIGHT_MM / 1080),
    Screen("4K at 150 %", 2560, 1440, SCREEN_55_INCH_HEIGHT_MM / 1440),
]
HEADERS_PX = (32, 40)
KIOSK_BOTTOM_PADDING_PX = 16
RACKS = 40  # the hall the wall is made for: no scrolling, one tile each
# ISO 9241-303: characters should subtend at least 16 minutes of arc (capital letter height).
MIN_ARC = math.radians(16 / 60)


@pytest.fixture(scope="module", autouse=True)
def inter_font():
    try:
        text_width("0", 10)
    except FontMissing as exc:
        pytest.skip(f"{exc} (make deps-system installs it)")



def widest(chars: str, size: float) -> str:
    return max(chars, key=lambda ch: text_width(ch, size))


def tile_title_template() -> str:
    [title] = [p["value"] for o in TILES["fieldConfig"]["overrides"] if o["matcher"] == {"id": "byName",
               "options": "envelope"} for p in o["properties"] if p["id"] == "displayName"]
    return title


def worst_titles() -> list[str]:
    """The tile title for the demo's racks and for a 10-character name, with the widest digits the twin's values can
    have, from the generated panel itself. ${__cell_N} is column N's raw value as text (fieldDisplay.ts:
    toString), so what counts is the precision the twin stores (bridge/twin.py), not a decimals option: two
    digits before the point for a temperature, an RH up to 100."""
    columns = [c["text"] for c in TILES["targets"][0]["columns"]]
    digit = widest("0123456789", TILES["options"]["text"]["titleSize"])
    names = [r.name for r in hall_of(Settings()).racks] + ["hall12-a10"]
    out = []
    for name in names:
        for whole in (digit * 2, "100"):
            row = {"rack": name, "room": "hall1", "row": "a"}
            for col in ("tempTop", "tempBottom", "humidityTop", "humidityBottom"):
                decimals = TEMPERATURE_DECIMALS if col.startswith("temp") else HUMIDITY_DECIMALS
                # An RH of exactly 100 is the number 100, whose text has no decimals.
                row[col] = (digit * 2 if col.startswith("temp") else whole) + (
                    "." + digit * decimals if decimals and not (whole == "100" and col.startswith("hum")) else "")
            out.append(re.sub(r"\$\{__cell_(\d+)\}", lambda m: str(row[columns[int(m.group(1))]]),
                              tile_title_template()))
    return out


def state_texts() -> list[str]:
    mapping = TILES["fieldConfig"]["defaults"]["mappings"][0]["options"]
    return [m["text"] for m in mapping.values()] + [TILES["fieldConfig"]["defaults"]["noValue"]]


@pytest.mark.parametrize("screen", SCREENS, ids=lambda s: s.name)
def test_the_wall_fits_the_screen_without_scrolling(screen):
    assert dashboard_height_px(WALL["panels"]) + KIOSK_BOTTOM_PADDING_PX <= screen.css_height


@pytest.mark.parametrize("header", HEADERS_PX)
@pytest.mark.parametrize("screen", SCREENS, ids=lambda s: s.name)
def test_every_rack_tile_shows_its_text_inside_the_tile(screen, header):
    assert TILES["options"]["reduceOptions"].get("limit", DEFAULT_VALUES_LIMIT) >= RACKS  # 25 unless told otherwise
    titles, states = worst_titles(), state_texts()
    assert len(titles) == 2 * (RACKS + 1) and {"VERY HUMID", "OK", "no twin"} <= set(states)
    for title in titles:
        for state in states:
            fit = fit_tile(TILES, screen, header, RACKS, title, state)
            assert fit.fits, (f"{screen.name}, {header} px header: {title!r} / {state!r} needs "
                              f"{fit.needed_h:.0f} px of {fit.available_h:.0f} ({fit.title_lines}, {fit.value_lines})")


def test_the_layout_model_finds_an_overflow():
    """The wall's tiles before this check: 16/28 px text in 11 grid rows. Their titles took four or five lines and
    overflowed into the next row of tiles at 1080p; the model must see that."""
    before = dict(TILES, gridPos=dict(TILES["gridPos"], h=11),
                  options=dict(TILES["options"], text={"titleSize": 16, "valueSize": 28}))
    fit = fit_tile(before, SCREENS[0], 40, RACKS, "hall1-a01  ▲24.3° ▼21.1°  40/45 %RH", "OK")
    assert not fit.fits and len(fit.title_lines) == 4
    assert tile_grid(*stat_content_px(before, SCREENS[0], 40), RACKS).columns == 14


def test_the_state_word_is_legible_across_a_room_and_the_numbers_at_a_desk():
    """On a 55-inch screen at 1080p (or 4K at 200 %): the state word and its colour from about 2.5 m, the tile's
    numbers from about 1.5 m (16 minutes of arc); the README states these distances."""
    text = TILES["options"]["text"]
    state_m, title_m = (legible_from_m(text[k], SCREENS[0]) for k in ("valueSize", "titleSize"))
    assert state_m >= 2.3 and title_m >= 1.3, (state_m, title_m)


@pytest.mark.parametrize("screen", SCREENS, ids=lambda s: s.name)
def test_heat_grid_rows_too_thin_for_names_hide_them(screen):
    """Grafana writes every state-timeline row's name at 12 px, however thin the row (no thinning, no minimum):
    where even the whole panel height split into one row per rack gives less, the names must be hidden."""
    grids = [p for p in WALL["panels"] if p["type"] == "state-timeline"]
    assert len(grids) == 3  # top, bottom, top − bottom
    for panel in grids:
        _, height = panel_px(panel["gridPos"], screen)
        hidden = any(o["matcher"] == {"id": "byType", "options": "number"}
                     and {"id": "custom.axisPlacement", "value": "hidden"} in o["properties"]
                     for o in panel["fieldConfig"]["overrides"])
        assert hidden == (height / RACKS < ROW_NAME_PX), (screen.name, panel["title"], height / RACKS)
        assert "axisPlacement" not in panel["fieldConfig"]["defaults"].get("custom", {})  # the time axis stays
        assert panel["options"]["showValue"] == "never"  # in-cell text would spill over rows just as well


def legible_from_m(font_px: float, screen: Screen) -> float:
    return cap_height_px(font_px) * screen.mm_per_css_px / 1000 / math.tan(MIN_ARC)


@pytest.mark.parametrize("header", HEADERS_PX)
def test_the_summary_numbers_are_legible_from_across_the_room(header):
    """The top row (hottest inlet, racks outside the envelope, silent and stuck sensors, largest top - bottom):
    Grafana sizes each value to its panel; on a 55-inch 1080p screen they must read from 5 m and more."""
    summary = [p for p in WALL["panels"] if p["type"] == "stat" and p["gridPos"]["y"] == 0]
    assert len(summary) == 6
    for panel in summary:
        defaults = panel["fieldConfig"]["defaults"]
        assert panel["options"]["textMode"] == "value" and "valueSize" not in panel["options"].get("text", {})
        text = "33.0 °C" if defaults["unit"] == "celsius" else "12"  # a hot inlet, or a two-digit count
        distance = legible_from_m(single_stat_value_px(panel, SCREENS[0], header, text), SCREENS[0])
        assert distance >= 5.0, (panel["title"], distance)
