// What Grafana 13.2.2's frontend makes of a panel's query result: its field config applied and the display values
// a stat panel draws (title, text, colour, data links), computed by Grafana's own packages (@grafana/data 13.2.2,
// @grafana/scenes for the dashboard's variable interpolation) rather than by our Python model of them.
//
// stdin: {"panel": <panel JSON>, "frames": [{"fields": [{"name", "type", "values"}]}],
//         "variables": {"name": "value"}, "time": {"from": "now-6h", "to": "now"}, "colors": ["<name>"]}
// stdout for a stat panel: {"values": [{"title", "text", "prefix", "suffix", "color", "links": [{"title", "href"}]}],
//                           "colors": {"<name>": "<the dark theme's colour>"}}
// for a table: {"fields": [{"name", "displayName", "texts": [...], "links": [[href, ...] per row]}], "colors"}
// after the panel's transformations.
'use strict';

// The packages are built for a browser: they load with a DOM (jsdom) and without their stylesheets.
for (const ext of ['.css', '.scss', '.svg', '.png']) {
  require.extensions[ext] = () => {};
}
const { JSDOM } = require('jsdom');
const dom = new JSDOM('<!doctype html><html><body></body></html>', { url: 'http://localhost:3000/' });
for (const name of ['window', 'document', 'navigator', 'localStorage', 'sessionStorage', 'HTMLElement', 'Element',
  'Node', 'getComputedStyle', 'CustomEvent', 'Event', 'MutationObserver']) {
  global[name] = dom.window[name];
}
class NoObserver { observe() {} unobserve() {} disconnect() {} }
global.ResizeObserver = global.window.ResizeObserver = NoObserver;
global.IntersectionObserver = global.window.IntersectionObserver = NoObserver;
global.matchMedia = global.window.matchMedia = () => ({ matches: false, addListener() {}, removeListener() {},
  addEventListener() {}, removeEventListener() {} });
global.devicePixelRatio = 1;
global.requestAnimationFrame = (cb) => setTimeout(cb, 0);
global.window.grafanaBootData = { settings: {}, user: {}, navTree: [] };

const data = require('@grafana/data');
const scenes = require('@grafana/scenes');

// Grafana's standard field options as the app registers them (public/app/core/components/OptionsUI/registry.tsx,
// getAllStandardFieldConfigs): which processor reads each option and to which fields it applies. The app is not
// an npm package, so this table is ours; the processors are Grafana's.
const always = () => true;
const numeric = (field) => field.type === data.FieldType.number;
const STANDARD_OPTIONS = [
  { id: 'unit', process: data.stringOverrideProcessor, settings: {}, shouldApply: always },
  { id: 'min', process: data.numberOverrideProcessor, settings: {}, shouldApply: numeric },
  { id: 'max', process: data.numberOverrideProcessor, settings: {}, shouldApply: numeric },
  { id: 'decimals', process: data.numberOverrideProcessor, settings: {}, shouldApply: numeric },
  { id: 'displayName', process: data.displayNameOverrideProcessor, settings: { expandTemplateVars: true },
    shouldApply: always },
  { id: 'color', process: data.identityOverrideProcessor, settings: {}, shouldApply: always },
  { id: 'noValue', process: data.stringOverrideProcessor, settings: {}, shouldApply: always },
  { id: 'links', process: data.dataLinksOverrideProcessor, settings: {}, shouldApply: always },
  { id: 'mappings', process: data.valueMappingsOverrideProcessor, settings: {}, defaultValue: [],
    shouldApply: (field) => field.type !== data.FieldType.time },
  { id: 'thresholds', process: data.thresholdsOverrideProcessor, settings: {}, shouldApply: always },
].map((item) => ({ ...item, path: item.id, name: item.id }));
data.standardFieldConfigEditorRegistry.setInit(() => STANDARD_OPTIONS);
// The transformations: Grafana's own, registered as the app does (its registry adds only editors; some
// transformers are exported under two names).
const transformers = new Map(Object.values(data.standardTransformers).map((t) => [t.id, t]));
data.standardTransformersRegistry.setInit(() => [...transformers.values()].map((transformer) => ({
  id: transformer.id, name: transformer.name, description: transformer.description, transformation: () => transformer,
})));

async function run(input) {
  const { panel } = input;
  const theme = data.createTheme({ colors: { mode: 'dark' } });
  const scene = new scenes.EmbeddedScene({
    $timeRange: new scenes.SceneTimeRange(input.time),
    $variables: new scenes.SceneVariableSet({
      variables: Object.entries(input.variables).map(([name, value]) => new scenes.ConstantVariable({ name, value })),
    }),
    body: new scenes.SceneFlexLayout({ children: [] }),
  });
  // VizPanel.interpolate: the dashboard's variables, the panel's scoped ones and Grafana's macros (__data, ...).
  const interpolate = (value, scopedVars, format) => scenes.sceneGraph.interpolate(scene, value, scopedVars, format);
  let frames = input.frames.map((frame) => data.toDataFrame({ refId: 'A', ...frame }));
  if (panel.transformations && panel.transformations.length) {  // SceneDataTransformer
    const { lastValueFrom } = require('rxjs');
    frames = await lastValueFrom(data.transformDataFrame(panel.transformations, frames, { interpolate }));
  }
  const series = data.applyFieldOverrides({
    data: frames,
    fieldConfig: panel.fieldConfig,
    fieldConfigRegistry: data.createFieldConfigRegistry({}, panel.type),
    replaceVariables: interpolate,
    theme,
    timeZone: 'browser',
  });
  const colors = {};
  for (const name of input.colors || []) {
    colors[name] = theme.visualization.getColorByName(name);
  }
  if (panel.type === 'table') {
    const [frame] = series;
    return {
      fields: (frame ? frame.fields : []).map((field) => ({
        name: field.name,
        displayName: data.getFieldDisplayName(field, frame, series),
        texts: field.values.map((v) => data.formattedValueToString(field.display(v))),
        links: field.values.map((_, i) => (field.getLinks ? field.getLinks({ valueRowIndex: i }) : [])
          .map((link) => link.href)),
      })),
      colors,
    };
  }
  // StatPanel.getValues
  const values = data.getFieldDisplayValues({
    fieldConfig: panel.fieldConfig,
    reduceOptions: panel.options.reduceOptions,
    replaceVariables: interpolate,
    theme,
    data: series,
    sparkline: false,
    timeZone: 'browser',
  });
  return {
    values: values.map((value) => ({
      title: value.display.title ?? null,
      text: value.display.text,
      prefix: value.display.prefix ?? '',
      suffix: value.display.suffix ?? '',
      color: value.display.color ?? null,
      links: (value.getLinks ? value.getLinks() : []).map((link) => ({ title: link.title, href: link.href })),
    })),
    colors,
  };
}

module.exports = { run, data, scenes };
if (require.main !== module) {
  return;
}
let text = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { text += chunk; });
process.stdin.on('end', async () => {
  const out = await run(JSON.parse(text));
  process.stdout.write(JSON.stringify(out));
  process.exit(0); // the packages leave timers behind
});
