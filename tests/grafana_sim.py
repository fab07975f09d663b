"""What Grafana does to a query before it reaches InfluxDB or Ditto, and how it evaluates an alert rule,
re-implemented small enough to test the generated dashboards without a Grafana server.

Sources: grafana/grafana pkg/tsdb/influxdb/models/query.go (Build: $timeFilter -> "time >= <from>ms and
time <= <to>ms", $interval/$__interval -> gtime.FormatInterval, $__interval_ms), public/app/core/utils
rangeutil.ts (calculateInterval/roundInterval), the InfluxDB datasource's interpolateQueryExpr (multi-value
and include-all variables are regex-escaped and joined as (a|b)), the template service's ``doublequote``
format, and pkg/expr (reduce with dropNN, threshold evaluators).
"""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- intervals and macros

_ROUND_STEPS = [  # (upper bound exclusive, rounded interval), ms; rangeutil.roundInterval
    (15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000), (3500, 2000),
    (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000), (90000, 60000),
    (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000), (1500000, 1200000),
    (2700000, 1800000), (5400000, 3600000), (9000000, 7200000), (16200000, 10800000),
    (32400000, 21600000), (86400000, 43200000), (604800000, 86400000), (1814400000, 604800000),
    (3628800000, 2592000000),
]
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000, "w": 604800000}


def round_interval(ms: float) -> int:
    for bound, value in _ROUND_STEPS:
        if ms < bound:
            return value
    return 31536000000


def parse_duration_ms(text: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d|w)", text.strip())
    if not m:
        raise ValueError(f"not a Grafana interval: {text!r}")
    return int(m.group(1)) * _UNITS_MS[m.group(2)]


def calculate_interval_ms(from_ms: int, to_ms: int, max_data_points: int, min_interval: str | None) -> int:
    interval = round_interval((to_ms - from_ms) / max_data_points)
    low = parse_duration_ms(min_interval) if min_interval else 1
    return max(interval, low)


def format_interval(ms: int) -> str:
    """grafana-plugin-sdk-go gtime.FormatInterval."""
    for unit, size in (("y", 31536000000), ("w", 604800000), ("d", 86400000), ("h", 3600000), ("m", 60000),
                       ("s", 1000)):
        if ms >= size:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def at_time(query: str, now_ms: int) -> str:
    """The query as InfluxDB would run it at ``now_ms``: its now() is the moment of evaluation."""
    return query.replace("now()", f"{now_ms}ms")


def expand_macros(query: str, from_ms: int, to_ms: int, interval_ms: int) -> str:
    """models.Query.Build for a raw query, in the same replacement order."""
    text = format_interval(interval_ms)
    query = query.replace("$timeFilter", f"time >= {from_ms}ms and time <= {to_ms}ms")
    query = query.replace("$interval", text)
    query = query.replace("$__interval_ms", str(interval_ms))
    return query.replace("$__interval", text)


# --------------------------------------------------------------------------- template variables

@dataclass
class Variable:
    name: str
    values: list[str]
    multi: bool = False
    include_all: bool = False
    all_values: list[str] = field(default_factory=list)  # the options, for "All"
    all_selected: bool = False


_REGEX_SPECIAL = re.compile(r"[\\^$*+?.()|[\]{}/]")


def escape_regex(value: str) -> str:
    """@grafana/data escapeRegex."""
    return _REGEX_SPECIAL.sub(lambda m: "\\" + m.group(0), value)


def _selected(var: Variable) -> list[str]:
    return var.all_values if var.all_selected else var.values


def influx_format(var: Variable) -> str:
    """InfluxDB datasource interpolateQueryExpr."""
    values = _selected(var)
    if not var.multi and not var.include_all:
        return values[0]
    escaped = [escape_regex(v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def doublequote_format(var: Variable) -> str:
    return ",".join('"' + v.replace('"', '\\"') + '"' for v in _selected(var))


def raw_format(var: Variable) -> str:
    values = _selected(var)
    return values[0] if len(values) == 1 else "{" + ",".join(values) + "}"


_VAR = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)")
BUILTIN = {"__interval", "__interval_ms", "interval", "timeFilter", "__timeFilter", "__data", "__url_time_range",
           "__cell_0", "__field", "__value"}


def interpolate(text: str, variables: dict[str, Variable], default_format: str = "influx") -> str:
    """templateSrv.replace: $var, ${var} and ${var:format}; unknown names (macros) are left alone."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        fmt = m.group(2) or default_format
        var = variables.get(name)
        if var is None:
            return m.group(0)
        if fmt == "influx":
            return influx_format(var)
        if fmt == "doublequote":
            return doublequote_format(var)
        if fmt == "raw":
            return raw_format(var)
        if fmt == "percentencode":  # encodeURIComponentStrict
            return urllib.parse.quote(raw_format(var), safe="-_.~")
        raise ValueError(f"format {fmt!r} not emulated")

    return _VAR.sub(repl, text)


def unresolved_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(3) for m in _VAR.finditer(text)}


# --------------------------------------------------------------------------- a dashboard's queries

def variables_for(dashboard: dict, selection: dict[str, list[str]], namespace: str,
                  options: dict[str, list[str]]) -> dict[str, Variable]:
    """The dashboard's template variables with ``selection`` picked: for an include-all variable an empty
    pick means "All" (``options`` are its values); constants keep their value, ``namespace`` excepted."""
    out = {}
    for var in dashboard["templating"]["list"]:
        name = var["name"]
        if var["type"] == "constant":
            out[name] = Variable(name, [namespace if name == "namespace" else var["query"]])
        elif var.get("includeAll"):
            chosen = selection.get(name, [])
            out[name] = Variable(name, chosen, multi=True, include_all=True, all_values=options[name],
                                 all_selected=not chosen)
        else:
            out[name] = Variable(name, selection[name])
    return out


def panel_range(dash: dict, panel: dict, now_ms: int) -> tuple[int, int]:
    """The absolute range Grafana queries: a panel's relative time (timeFrom) is now-X..now, else the
    dashboard's from..to, where "to" may lie ahead of now (now+30m on the rack detail, for the projection)."""
    if panel.get("timeFrom"):
        return now_ms - parse_duration_ms(panel["timeFrom"]), now_ms
    to = dash["time"]["to"]
    end = now_ms + (parse_duration_ms(to.removeprefix("now+")) if to.startswith("now+") else 0)
    return now_ms - parse_duration_ms(dash["time"]["from"].removeprefix("now-")), end


def target_query(dash: dict, panel: dict, target: dict, variables: dict[str, Variable], now_ms: int,
                 min_interval: str) -> str:
    """One InfluxDB target's query as Grafana sends it at ``now_ms``: variables, then the panel's macros."""
    frm, to = panel_range(dash, panel, now_ms)
    interval = calculate_interval_ms(frm, to, panel["maxDataPoints"], panel.get("interval") or min_interval)
    return expand_macros(interpolate(target["query"], variables), frm, to, interval)


def influx_panel_queries(dash: dict, variables: dict[str, Variable], now_ms: int,
                         min_interval: str) -> list[tuple[dict, str]]:
    """(panel, InfluxQL) for every InfluxDB target of the dashboard, as Grafana sends it at ``now_ms``."""
    return [(panel, target_query(dash, panel, target, variables, now_ms, min_interval))
            for panel in dash["panels"] for target in panel.get("targets", [])
            if target.get("datasource", {}).get("uid") == "influxdb"]


def rule_query(model: dict, relative_range: dict, now_ms: int) -> str:
    """One alert-rule query's InfluxQL as the rule evaluates it at ``now_ms`` (intervalMs 1 s by default; the
    macros are expanded as for a panel)."""
    return expand_macros(model["query"], now_ms - relative_range["from"] * 1000,
                         now_ms - relative_range["to"] * 1000, model.get("intervalMs", 1000))


def influx_rule_queries(rule: dict, now_ms: int) -> list[str]:
    """The InfluxQL of an alert rule's InfluxDB queries, as the rule evaluates them at ``now_ms``."""
    return [rule_query(item["model"], item["relativeTimeRange"], now_ms)
            for item in rule["data"] if item["datasourceUid"] == "influxdb"]


# --------------------------------------------------------------------------- InfluxQL result -> frames

@dataclass
class Frame:
    """One Grafana data frame of a time_series result: one value column of one series."""

    name: str
    labels: dict[str, str]
    times: list[int]
    values: list[float | None]


def influx_frames(body: dict) -> list[Frame]:
    frames = []
    for result in body.get("results", []):
        if "error" in result:
            raise RuntimeError(result["error"])
        for series in result.get("series", []) or []:
            columns = series["columns"]
            for i, col in enumerate(columns):
                if col == "time":
                    continue
                frames.append(Frame(col, dict(series.get("tags") or {}),
                                    [row[0] for row in series["values"]], [row[i] for row in series["values"]]))
    return frames


# --------------------------------------------------------------------------- server-side expressions

class DuplicateLabels(RuntimeError):
    pass


def reduce_frames(frames: list[Frame], reducer: str, mode: str | None,
                  replace_with: float = 0.0) -> dict[tuple, float | None]:
    """pkg/expr reduce: one number per series, keyed by its label set (duplicates are an error)."""
    out: dict[tuple, float | None] = {}
    for frame in frames:
        values = [v for v in frame.values]
        if mode == "dropNN":
            values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        elif mode == "replaceNN":
            values = [replace_with if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in values]
        elif mode is not None:
            raise ValueError(f"reduce mode {mode!r} is not supported by Grafana")
        key = tuple(sorted(frame.labels.items()))
        if key in out:
            raise DuplicateLabels(f"two series with labels {dict(key)}")
        out[key] = _reduce(values, reducer)
    return out


def _reduce(values: list, reducer: str) -> float | None:
    nums = [float(v) for v in values if v is not None]
    if reducer == "count":
        return float(len(values))
    if not nums:
        return None  # NaN in Grafana
    if reducer == "last":
        return nums[-1]
    if reducer == "mean":
        return sum(nums) / len(nums)
    if reducer == "max":
        return max(nums)
    if reducer == "min":
        return min(nums)
    if reducer == "sum":
        return sum(nums)
    raise ValueError(f"reducer {reducer!r} not emulated")


def threshold(value: float | None, kind: str, params: list[float]) -> bool:
    if value is None:
        # A NaN (an empty series after dropNN, or a null reduced) goes through the threshold as NaN, and Grafana
        # takes a NaN condition for firing (grafana/grafana issues #40392, #45952, #75594).
        return True
    a = params[0]
    b = params[1] if len(params) > 1 else None
    checks = {
        "gt": lambda: value > a, "lt": lambda: value < a, "gte": lambda: value >= a, "lte": lambda: value <= a,
        "eq": lambda: value == a, "ne": lambda: value != a,
        "within_range": lambda: a < value < b, "outside_range": lambda: value < a or value > b,
        "within_range_included": lambda: a <= value <= b, "outside_range_included": lambda: value <= a or value >= b,
    }
    return checks[kind]()


@dataclass
class RuleResult:
    state: str  # "NoData" or "Evaluated"
    firing: dict[tuple, float | None]  # label set -> reduced value, for instances whose condition holds
    values: dict[tuple, float | None]


def evaluate_rule(rule: dict, run_query) -> RuleResult:
    """Evaluate a provisioned rule's data chain; ``run_query(model, relative_range)`` returns frames."""
    nodes: dict[str, Any] = {}
    for item in rule["data"]:
        model = item["model"]
        if item["datasourceUid"] != "__expr__":
            nodes[item["refId"]] = run_query(model, item["relativeTimeRange"])
        elif model["type"] == "reduce":
            settings = model.get("settings") or {}
            nodes[item["refId"]] = reduce_frames(nodes[model["expression"]], model["reducer"], settings.get("mode"),
                                                 settings.get("replaceWithValue", 0.0))
        elif model["type"] == "threshold":
            source = nodes[model["expression"]]
            evaluator = model["conditions"][0]["evaluator"]
            nodes[item["refId"]] = {k: (1.0 if threshold(v, evaluator["type"], evaluator["params"]) else 0.0)
                                    for k, v in source.items()}
        else:
            raise ValueError(f"expression type {model['type']!r} not emulated")
    condition = nodes[rule["condition"]]
    reduced = next(nodes[i["refId"]] for i in rule["data"] if i["model"].get("type") == "reduce")
    if not condition:
        return RuleResult("NoData", {}, {})
    return RuleResult("Evaluated", {k: reduced[k] for k, v in condition.items() if v == 1.0}, reduced)


# --------------------------------------------------------------------------- gjson (Infinity backend columns)

def gjson_get(doc: Any, path: str) -> tuple[bool, Any]:
    """The subset of gjson paths the dashboards use: dot-separated keys (no wildcards/escapes)."""
    node = doc
    for key in path.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False, None
    return True, node


# --------------------------------------------------------------------------- stat panel field selection


def js_regex(pattern: str) -> re.Pattern:
    """Grafana's stringToJsRegex: "/body/flags" as written, anything else anchored as ^...$."""
    if not pattern.startswith("/"):
        return re.compile("^" + pattern + "$")
    body, flags = re.fullmatch(r"/(.*?)/([gimsy]*)", pattern, re.S).groups()
    return re.compile(body, re.I if "i" in flags else 0)


def field_display_name(panel: dict, field_name: str) -> str:
    """A field's display name once Grafana applied the panel's field config (fieldOverrides.ts, fieldState.ts):
    displayName from the defaults, then from any byName override that matches the field (by its display name so
    far or by its name), else the field's own name. Templates in it stay as written: ${__cell_N} is filled per
    value later, when the title is drawn."""
    config = panel["fieldConfig"]
    name = config["defaults"].get("displayName") or field_name
    for override in config.get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byName" and matcher["options"] in (name, field_name):
            for prop in override["properties"]:
                if prop["id"] == "displayName":
                    name = prop["value"]
    return name


def stat_fields(panel: dict, field_names: list[str]) -> list[str]:
    """The fields a stat panel shows (fieldDisplay.ts getFieldDisplayValues): reduceOptions.fields is a regex
    tested against each field's display name, not its name."""
    pattern = js_regex(panel["options"]["reduceOptions"]["fields"])
    return [name for name in field_names if pattern.search(field_display_name(panel, name))]

