// A stat panel's tiles drawn by Grafana 13.2.2's own components (@grafana/ui VizRepeater, BigValue,
// DataLinksContextMenu) in a browser, composed as Grafana's StatPanel composes them
// (public/app/plugins/panel/stat/StatPanel.tsx: VizRepeater with autoGrid and itemSpacing 3, one BigValue per
// display value). Bundled by esbuild and loaded by tests/test_grafana_frontend.py into headless Chromium.
//
// window.RACKTWIN: [{width, height, options: <the panel's options>, values: [{display, links: [href]}]}], one
// panel each. Result, as JSON in <pre id="out">: per panel, per tile its box and the boxes of its text runs (one
// per line), each with its font size; and whether Inter was the font used.
import React from 'react';
import { createRoot } from 'react-dom/client';
import { createTheme, getDisplayValueAlignmentFactors } from '@grafana/data';
import { BigValue, DataLinksContextMenu, GlobalStyles, ThemeContext, VizRepeater } from '@grafana/ui';

const theme = createTheme({ colors: { mode: 'dark' } });

function displayValues(input) {
  return input.values.map((v, i) => ({
    name: '', display: v.display, field: {}, hasLinks: v.links.length > 0, rowIndex: i,
    getLinks: () => v.links.map((href) => ({ href, title: 'Rack detail', target: undefined, origin: {} })),
  }));
}

function Tile({ value, alignmentFactors, width, height, count, menu, options }) {
  return (
    <div className="racktwin-tile" style={{ width, height }}>
      <BigValue
        value={value.display}
        count={count}
        colorMode={options.colorMode}
        graphMode={options.graphMode}
        justifyMode={options.justifyMode}
        textMode={options.textMode}
        alignmentFactors={alignmentFactors}
        text={options.text}
        width={width}
        height={height}
        theme={theme}
        onClick={menu.openMenu}
        className={menu.targetClassName}
        disableWideLayout={!options.wideLayout}
        percentChangeColorMode={options.percentChangeColorMode}
      />
    </div>
  );
}

function StatPanel({ input }) {
  const { options } = input;
  const renderValue = (props) => {
    if (props.value.hasLinks) {
      return (
        <DataLinksContextMenu links={props.value.getLinks}>
          {(api) => <Tile {...props} menu={api} options={options} />}
        </DataLinksContextMenu>
      );
    }
    return <Tile {...props} menu={{}} options={options} />;
  };
  const values = displayValues(input);
  return (
    <VizRepeater
      getValues={() => values}
      getAlignmentFactors={getDisplayValueAlignmentFactors}
      renderValue={renderValue}
      width={input.width}
      height={input.height}
      source={{}}
      itemSpacing={3}
      autoGrid={true}
      orientation={options.orientation}
    />
  );
}

function measureTiles(panelElement) {
  const panel = panelElement.getBoundingClientRect();
  const tiles = [...panelElement.querySelectorAll('.racktwin-tile')].map((tile) => {
    const box = tile.getBoundingClientRect();
    const runs = [];
    const walker = document.createTreeWalker(tile, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (!node.textContent.trim()) {
        continue;
      }
      const range = document.createRange();
      range.selectNodeContents(node);
      const size = parseFloat(getComputedStyle(node.parentElement).fontSize);
      for (const r of range.getClientRects()) {
        runs.push({ text: node.textContent, size, left: r.left - box.left, right: r.right - box.left,
          top: r.top - box.top, bottom: r.bottom - box.top });
      }
    }
    return { left: box.left - panel.left, top: box.top - panel.top, width: box.width, height: box.height, runs };
  });
  return { width: panel.width, height: panel.height, tiles };
}

const panels = window.RACKTWIN.map((input) => {
  const element = document.createElement('div');
  element.className = 'racktwin-panel';
  element.style.cssText = `width:${input.width}px;height:${input.height}px;position:relative;margin-bottom:8px`;
  document.getElementById('panels').appendChild(element);
  return element;
});
// Grafana's global styles (body font, sizes, letter spacing) and its theme, as the app provides them.
createRoot(document.getElementById('styles')).render(
  <ThemeContext.Provider value={theme}><GlobalStyles /></ThemeContext.Provider>
);
window.RACKTWIN.forEach((input, i) => createRoot(panels[i]).render(
  <ThemeContext.Provider value={theme}><StatPanel input={input} /></ThemeContext.Provider>
));
document.fonts.ready.then(() => setTimeout(() => {
  const font = getComputedStyle(document.querySelector('.racktwin-tile *') || document.body).fontFamily;
  document.getElementById('out').textContent = JSON.stringify({
    panels: panels.map(measureTiles), font, inter: document.fonts.check('14px Inter'),
  });
}, 300));
