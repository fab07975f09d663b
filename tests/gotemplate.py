"""A renderer for the subset of Go's text/template that our alert texts use, with Grafana's data, in two modes.

Rule annotations (``render``): ``$labels`` (a string map), ``$values`` (refId -> value with a float64 ``.Value``),
missingkey=invalid and the "<no value>" -> "[no value]" replacement of pkg/services/ngalert/state/template/template.go,
and Prometheus' externalURL (Grafana passes its root_url, which always ends in "/").

Notification templates (``render_notification``): a template group of ``{{ define }}`` blocks and a contact point's
setting that calls one, run on the data of grafana/alerting's templates/template_data.go (ExtendedData,
ExtendedAlert: ``Struct`` here, a map of strings ``KV`` a dict) with missingkey=zero, as prometheus/alertmanager's
template.New and grafana/alerting's executeTextString set it (a map's missing key gives ""). Build the data with
``extended_alert`` and ``extended_data``; a field they do not fill raises.

Both: ``{{ if P }}``, ``{{ else if P }}``, ``{{ else }}``, ``{{ end }}``, ``{{ P }}``; pipelines of one command (a
function call or an operand, operands may be parenthesised); the constants true, false, strings and numbers; the
functions and, eq, ne, lt, le, gt, ge, printf (``%.Nf`` only), urlquery. Notifications add ``.``, ``.Field.Chain``,
``{{ range P }}``, ``{{ define "n" }}``, ``{{ template "n" P }}``, ``{{ $v := P }}``, ``{{ $v = P }}`` (scoped as in
Go), the builtins or, not, len and Alertmanager's match (regexp.MatchString; Python's re for our plain patterns),
and ExtendedAlerts' Firing and Resolved. Everything else raises TemplateError, as does what Go rejects at run time:
comparing a float64 with an integer constant, comparing or reading a field of a missing value, reading a field a
struct does not have.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass
from decimal import Decimal


class TemplateError(Exception):
    pass


class _Missing:
    """A map's missing key under missingkey=invalid (Go's invalid reflect.Value)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


@dataclass(frozen=True)
class Value:
    """One of $values: Grafana's template.Value (its Labels are not modelled)."""
    Value: float


class Struct(dict):
    """A Go struct: reading a field it does not have is an error, unlike a map's missing key."""


class Alerts(list):
    """grafana/alerting's ExtendedAlerts, with its Firing and Resolved methods."""

    def by_status(self, status: str) -> "Alerts":
        return Alerts(a for a in self if a["Status"] == status)


@dataclass(frozen=True)
class _Mode:
    funcs: frozenset
    dot: bool  # ., fields of ., range, define, template, variables
    missing_zero: bool  # missingkey=zero: a missing key of a map (all ours map to strings) gives ""


_COMMON = {"and", "eq", "ne", "lt", "le", "gt", "ge", "printf", "urlquery"}
RULE = _Mode(frozenset(_COMMON | {"externalURL"}), dot=False, missing_zero=False)
NOTIFICATION = _Mode(frozenset(_COMMON | {"or", "not", "len", "match"}), dot=True, missing_zero=True)
EXTERNAL_URL = "http://localhost:3000/"  # Grafana's AppURL for the default GRAFANA_ROOT_URL

# ------------------------------------------------------------------------------------------- parsing

ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
TOKEN = re.compile(r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)'
                   r"|(?P<var>\$[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)|(?P<field>(?:\.[A-Za-z_]\w*)+)|(?P<dot>\.)"
                   r"|(?P<ident>[A-Za-z_]\w*))")
SET = re.compile(r"^\$([A-Za-z_]\w*)\s*(:=|=)\s*(.+)$", re.DOTALL)
KEYWORDS = {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue", "nil"}


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"unsupported syntax at {text[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _go_string(literal: str) -> str:
    body = literal[1:-1]
    if "\\" in body:
        raise TemplateError(f"escapes in string literals are not supported: {literal}")
    return body


def _items(template: str) -> list[tuple[str, str]]:
    pos, items = 0, []
    for m in ACTION.finditer(template):
        if template[pos:m.start()]:
            items.append(("text", template[pos:m.start()]))
        inner = m.group(1)
        if inner.startswith(("-", "/*")) or inner.endswith("-"):
            raise TemplateError(f"trim markers and comments are not supported: {m.group(0)!r}")
        if not inner.startswith(" ") or not inner.endswith(" "):
            raise TemplateError(f"write actions as {{{{ ... }}}}: {m.group(0)!r}")
        items.append(("action", inner.strip()))
        pos = m.end()
    if "{{" in template[pos:] or "}}" in template[pos:]:
        raise TemplateError("unbalanced {{ }}")
    if template[pos:]:
        items.append(("text", template[pos:]))
    return items


class _Parser:
    def __init__(self, mode: _Mode):
        self.mode = mode

    def pipeline(self, text: str):
        node, rest = self.command(_tokens(text))
        if rest:
            raise TemplateError(f"unexpected {rest} in {text!r}")
        return node

    def command(self, tokens):
        """A command: ``fn arg...`` or a single operand; stops at ``)``."""
        if not tokens:
            raise TemplateError("empty command")
        kind, text = tokens[0]
        if kind == "ident" and text not in ("true", "false"):
            if text in KEYWORDS or text not in self.mode.funcs:
                raise TemplateError(f"unsupported function or keyword {text!r}")
            args, rest = [], tokens[1:]
            while rest and rest[0][0] != "rp":
                arg, rest = self.operand(rest)
                args.append(arg)
            return ("call", text, args), rest
        node, rest = self.operand(tokens)
        if rest and rest[0][0] != "rp":
            raise TemplateError(f"{text!r} is not a function")
        return node, rest

    def operand(self, tokens):
        kind, text = tokens[0]
        if kind == "lp":
            node, rest = self.command(tokens[1:])
            if not rest or rest[0][0] != "rp":
                raise TemplateError("unclosed (")
            return node, rest[1:]
        if kind == "str":
            return ("const", _go_string(text)), tokens[1:]
        if kind == "num":  # Go: a constant with a decimal point is a float64, without an int
            return ("const", float(text) if "." in text else int(text)), tokens[1:]
        if kind == "ident" and text in ("true", "false"):
            return ("const", text == "true"), tokens[1:]
        if kind == "var":
            name, *fields = text[1:].split(".")
            return ("var", name, fields), tokens[1:]
        if kind in ("field", "dot") and self.mode.dot:
            return ("field", text.split(".")[1:] if kind == "field" else []), tokens[1:]
        raise TemplateError(f"unsupported operand {text!r}")

    def body(self, items, top: bool = False):
        body: list = []
        while items:
            kind, text = items[0]
            if kind == "text":
                body.append(text)
                items = items[1:]
                continue
            word = text.split()[0]
            if word in ("else", "end"):
                if top:
                    raise TemplateError(f"unexpected {{{{ {text} }}}}")
                return body, items
            if word == "if":
                node, items = self.if_(text[2:], items[1:])
                body.append(node)
            elif word == "range" and self.mode.dot:
                inner, items = self.body(items[1:])
                if not items or items[0][1] != "end":
                    raise TemplateError("{{ range }} ... {{ else }} is not supported")
                body.append(("range", self.pipeline(text[len("range"):]), inner))
                items = items[1:]
            elif word == "template" and self.mode.dot:
                m = re.fullmatch(r'template\s+("[^"\\]*")(?:\s+(.+))?', text, re.DOTALL)
                if not m:
                    raise TemplateError(f"unsupported action {{{{ {text} }}}}")
                body.append(("template", _go_string(m.group(1)), self.pipeline(m.group(2)) if m.group(2) else None))
                items = items[1:]
            elif word in KEYWORDS:
                raise TemplateError(f"unsupported action {{{{ {text} }}}}")
            elif SET.match(text) and self.mode.dot:
                name, op, pipeline = SET.match(text).groups()
                body.append(("set", name, op, self.pipeline(pipeline)))
                items = items[1:]
            else:
                body.append(("out", self.pipeline(text)))
                items = items[1:]
        if not top:
            raise TemplateError("missing {{ end }}")
        return body, items

    def if_(self, condition: str, items):
        branches, otherwise = [], []
        while True:
            branch, items = self.body(items)
            branches.append((self.pipeline(condition), branch))
            text = items[0][1]
            items = items[1:]
            if text == "end":
                return ("if", branches, otherwise), items
            if text.startswith("else if "):
                condition = text[len("else if "):]
                continue
            if text != "else":
                raise TemplateError(f"unsupported action {{{{ {text} }}}}")
            otherwise, items = self.body(items)
            if not items or items[0][1] != "end":
                raise TemplateError("{{ else }} not followed by {{ end }}")
            return ("if", branches, otherwise), items[1:]

    def group(self, template: str) -> dict[str, list]:
        """A template group: its ``{{ define "name" }}`` blocks by name (text between them is not executed)."""
        items, defines = _items(template), {}
        while items:
            kind, text = items[0]
            if kind == "text":
                items = items[1:]
                continue
            m = re.fullmatch(r'define\s+("[^"\\]*")', text)
            if not m:
                raise TemplateError(f"only {{{{ define }}}} blocks at the top of a group, not {{{{ {text} }}}}")
            body, items = self.body(items[1:])
            if not items or items[0][1] != "end":
                raise TemplateError("{{ define }} not closed by {{ end }}")
            name = _go_string(m.group(1))
            if name in defines:
                raise TemplateError(f"template {name!r} defined twice")
            defines[name] = body
            items = items[1:]
        return defines


def parse(template: str) -> list:
    """A rule annotation as a list of nodes: strings, ("out", pipeline), ("if", [(pipeline, body)...], else_body)."""
    body, rest = _Parser(RULE).body(_items(template), top=True)
    assert not rest
    return body


# ------------------------------------------------------------------------------------------- evaluation

def _truth(value) -> bool:
    """Go's isTrue: false for a missing value, zero numbers (NaN is not zero), empty strings, maps and slices."""
    if value is MISSING:
        return False
    if isinstance(value, (Struct, Value)):
        return True  # a struct
    if isinstance(value, (bool, int, float, str, dict, list)):
        return bool(value) if not (isinstance(value, float) and math.isnan(value)) else True
    raise TemplateError(f"truth of {value!r}")


def _kind(value) -> str:
    if value is MISSING:
        raise TemplateError("invalid type for comparison (a missing value)")
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    raise TemplateError(f"invalid type for comparison: {value!r}")


def _compare(name: str, a, b) -> bool:
    if _kind(a) != _kind(b):
        raise TemplateError(f"{name}: incompatible types for comparison: {a!r} and {b!r}")
    if name in ("eq", "ne"):
        return (a == b) if name == "eq" else (a != b)
    if _kind(a) == "bool":
        raise TemplateError(f"{name}: invalid type for comparison")
    return {"lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[name]


def go_float(value: float) -> str:
    """A float64 as Go's fmt prints it with %v: strconv 'g', shortest digits, an exponent from 1e+06 on and
    below 1e-04 (ftoa.go: "if precision was the shortest possible, use precision 6 for this decision")."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign, digits, exp = Decimal(repr(value)).normalize().as_tuple()
    digits_s = "".join(map(str, digits))
    point = len(digits_s) + exp  # decimal point position
    x = point - 1
    if x < -4 or x >= 6:
        mantissa = digits_s[0] + ("." + digits_s[1:] if len(digits_s) > 1 else "")
        text = f"{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    elif point <= 0:
        text = "0." + "0" * -point + digits_s
    elif point >= len(digits_s):
        text = digits_s + "0" * (point - len(digits_s))
    else:
        text = digits_s[:point] + "." + digits_s[point:]
    return ("-" if sign else "") + text


def _printf(fmt: str, args: list) -> str:
    m = re.fullmatch(r"([^%]*)%\.(\d+)f([^%]*)", fmt)
    if not m or len(args) != 1:
        raise TemplateError(f"printf {fmt!r} with {len(args)} arguments is not supported")
    (arg,) = args
    if not isinstance(arg, float):
        raise TemplateError(f"printf %f of {arg!r}")  # Go would print %!f(...)
    if math.isnan(arg) or math.isinf(arg):
        text = go_float(arg)
    else:
        text = f"{arg:.{m.group(2)}f}"
    return m.group(1) + text + m.group(3)


def _sprint(value) -> str:
    """fmt.Sprint of one argument of a builtin (a missing value arrives as nil)."""
    if value is MISSING:
        return "<nil>"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TemplateError(f"printing {value!r} is not supported")


def _output(value) -> str:
    if value is MISSING:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _sprint(value)


class _Exec:
    def __init__(self, mode: _Mode, defines: dict[str, list] | None = None, external_url: str = EXTERNAL_URL):
        self.mode, self.defines, self.external_url = mode, defines or {}, external_url

    def field(self, value, name: str):
        if value is MISSING:
            raise TemplateError(f"nil pointer evaluating .{name} (a missing value)")
        if isinstance(value, Struct):
            if name not in value:
                raise TemplateError(f"can't evaluate field {name} (not modelled, or not a field)")
            return value[name]
        if isinstance(value, Alerts) and name in ("Firing", "Resolved"):
            return value.by_status(name.lower())
        if isinstance(value, dict):
            return value.get(name, "" if self.mode.missing_zero else MISSING)
        if isinstance(value, Value) and name == "Value":
            return value.Value
        raise TemplateError(f"can't evaluate field {name} in {value!r}")

    def variable(self, frames: list[dict], name: str):
        for frame in reversed(frames):
            if name in frame:
                return frame
        raise TemplateError(f"undefined variable ${name}")

    def eval(self, node, dot, frames: list[dict]):
        kind = node[0]
        if kind == "const":
            return node[1]
        if kind in ("var", "field"):
            if kind == "var":
                _, name, fields = node
                value = self.variable(frames, name)[name]
            else:
                value, fields = dot, node[1]
            for f in fields:
                value = self.field(value, f)
            return value
        _, fn, args = node
        if fn in ("and", "or"):  # Go 1.18+: stops at the first argument that decides, and returns it
            if not args:
                raise TemplateError(f"{fn} needs an argument")
            for arg in args:
                value = self.eval(arg, dot, frames)
                if _truth(value) == (fn == "or"):
                    return value
            return value
        values = [self.eval(a, dot, frames) for a in args]
        if fn in ("eq", "ne", "lt", "le", "gt", "ge"):
            if len(values) != 2:
                raise TemplateError(f"{fn} with {len(values)} arguments is not supported")
            return _compare(fn, *values)
        if fn == "not":
            if len(values) != 1:
                raise TemplateError("not takes one argument")
            return not _truth(values[0])
        if fn == "len":
            if len(values) != 1 or not isinstance(values[0], (str, list, dict)) or isinstance(values[0], Struct):
                raise TemplateError(f"len of {values!r}")
            return len(values[0].encode()) if isinstance(values[0], str) else len(values[0])
        if fn == "match":  # regexp.MatchString(pattern, s)
            if len(values) != 2 or not all(isinstance(v, str) for v in values):
                raise TemplateError(f"match needs a pattern and a string, not {values!r}")
            return re.search(values[0], values[1]) is not None
        if fn == "printf":
            if not values or not isinstance(values[0], str):
                raise TemplateError("printf needs a format")
            return _printf(values[0], values[1:])
        if fn == "externalURL":
            if values:
                raise TemplateError("externalURL takes no arguments")
            return self.external_url
        if fn == "urlquery":  # url.QueryEscape of fmt.Sprint(args)
            return urllib.parse.quote_plus("".join(_sprint(v) for v in values), safe="-_.~")
        raise TemplateError(f"unsupported function {fn}")

    def run(self, body: list, dot, frames: list[dict]) -> str:
        out = []
        for node in body:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "out":
                out.append(_output(self.eval(node[1], dot, frames)))
            elif node[0] == "set":
                _, name, op, pipeline = node
                value = self.eval(pipeline, dot, frames)
                (frames[-1] if op == ":=" else self.variable(frames, name))[name] = value
            elif node[0] == "range":
                _, pipeline, inner = node
                items = self.eval(pipeline, dot, frames)
                if not isinstance(items, list):
                    raise TemplateError(f"range over {items!r} is not supported")
                for item in items:
                    out.append(self.run(inner, item, frames + [{}]))
            elif node[0] == "template":
                _, name, pipeline = node
                if name not in self.defines:
                    raise TemplateError(f'no such template "{name}"')
                arg = self.eval(pipeline, dot, frames) if pipeline else None
                out.append(self.run(self.defines[name], arg, [{}]))
            else:
                _, branches, otherwise = node
                for condition, branch in branches:
                    if _truth(self.eval(condition, dot, frames)):
                        out.append(self.run(branch, dot, frames + [{}]))
                        break
                else:
                    out.append(self.run(otherwise, dot, frames + [{}]))
        return "".join(out)


def render(template: str, labels: dict[str, str], values: dict[str, float], external_url: str = EXTERNAL_URL) -> str:
    """What Grafana's template.Expand gives (an error raises): ``values`` maps refId -> its float value."""
    scope = {"labels": dict(labels), "values": {k: Value(float(v)) for k, v in values.items()}}
    return _Exec(RULE, external_url=external_url).run(parse(template), None, [scope]).replace(
        "<no value>", "[no value]")


# ------------------------------------------------------------------------------------------- notifications

def define_names(group: str) -> set[str]:
    """The names a template group defines."""
    return set(_Parser(NOTIFICATION).group(group))


def render_notification(group: str, text: str, data: Struct) -> str:
    """A contact point setting (``text``, e.g. ``{{ template "x" . }}``) with the templates of ``group``, run on
    ``data`` (``extended_data``) as grafana/alerting's TmplText does."""
    parser = _Parser(NOTIFICATION)
    body, rest = parser.body(_items(text), top=True)
    assert not rest
    return _Exec(NOTIFICATION, parser.group(group)).run(body, data, [{}])


def _public(kv: dict[str, str]) -> dict[str, str]:
    """removePrivateItems: without the keys that start and end with "__"."""
    return {k: v for k, v in kv.items() if not (k.startswith("__") and k.endswith("__"))}


def extended_alert(status: str, labels: dict[str, str], annotations: dict[str, str], dashboard_url: str = "",
                   silence_url: str = "", generator_url: str = "") -> Struct:
    """An ExtendedAlert as extendAlert makes it from what Grafana's state manager sent (StateToPostableAlert): the
    string fields; its times, values and org are not modelled (reading one raises)."""
    if status not in ("firing", "resolved"):
        raise ValueError(status)
    return Struct(Status=status, Labels=_public(labels), Annotations=_public(annotations), GeneratorURL=generator_url,
                  Fingerprint="", SilenceURL=silence_url, DashboardURL=dashboard_url, PanelURL="", ValueString="",
                  ImageURL="", EmbeddedImage="")


def extended_data(alerts: list[Struct], group_labels: dict[str, str], receiver: str = "",
                  external_url: str = EXTERNAL_URL) -> Struct:
    """ExtendedData for one notification of a group: status firing if any alert fires, the labels and annotations
    all alerts share (alertmanager's template.Data), grafana/alerting's ExtendData around them."""
    def common(key: str) -> dict[str, str]:
        shared = dict(alerts[0][key]) if alerts else {}
        for a in alerts[1:]:
            shared = {k: v for k, v in shared.items() if a[key].get(k) == v}
        return shared
    status = "firing" if any(a["Status"] == "firing" for a in alerts) else "resolved"
    return Struct(Receiver=receiver, Status=status, Alerts=Alerts(alerts), GroupLabels=dict(group_labels),
                  CommonLabels=common("Labels"), CommonAnnotations=common("Annotations"), ExternalURL=external_url,
                  GroupKey="")
