"""A renderer for the subset of Go's text/template that our alert annotations use, with Grafana's data:
``$labels`` (a string map), ``$values`` (refId -> value with a float64 ``.Value``), missingkey=invalid and the
"<no value>" -> "[no value]" replacement of pkg/services/ngalert/state/template/template.go.

Supported: ``{{ if P }}``, ``{{ else if P }}``, ``{{ else }}``, ``{{ end }}``, ``{{ P }}``; pipelines of one
command (a function call or an operand, operands may be parenthesised); the functions and, eq, ne, lt, le, gt,
ge, printf (``%.Nf`` only), urlquery, and Prometheus' externalURL (Grafana passes its root_url, which always ends in
"/"). Everything else raises TemplateError, as does what Go rejects at run time: comparing a float64 with an integer
constant, comparing or reading a field of a missing value.
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


# ------------------------------------------------------------------------------------------- parsing

ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
TOKEN = re.compile(r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)'
                   r"|(?P<var>\$[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)|(?P<ident>[A-Za-z_]\w*))")
FUNCS = {"and", "eq", "ne", "lt", "le", "gt", "ge", "printf", "urlquery", "externalURL"}
EXTERNAL_URL = "http://localhost:3000/"  # Grafana's AppURL for the default GRAFANA_ROOT_URL
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


def _parse_pipeline(text: str):
    if "|" in text or ":=" in text or "=" in text.replace('"="', ""):
        raise TemplateError(f"unsupported pipeline {text!r}")
    tokens = _tokens(text)
    node, rest = _parse_command(tokens)
    if rest:
        raise TemplateError(f"unexpected {rest} in {text!r}")
    return node


def _parse_command(tokens):
    """A command: ``fn arg...`` or a single operand; stops at ``)``."""
    if not tokens:
        raise TemplateError("empty command")
    kind, text = tokens[0]
    if kind == "ident":
        if text in KEYWORDS or text not in FUNCS:
            raise TemplateError(f"unsupported function or keyword {text!r}")
        args, rest = [], tokens[1:]
        while rest and rest[0][0] != "rp":
            arg, rest = _parse_operand(rest)
            args.append(arg)
        return ("call", text, args), rest
    node, rest = _parse_operand(tokens)
    if rest and rest[0][0] != "rp":
        raise TemplateError(f"{text!r} is not a function")
    return node, rest


def _parse_operand(tokens):
    kind, text = tokens[0]
    if kind == "lp":
        node, rest = _parse_command(tokens[1:])
        if not rest or rest[0][0] != "rp":
            raise TemplateError("unclosed (")
        return node, rest[1:]
    if kind == "str":
        return ("const", _go_string(text)), tokens[1:]
    if kind == "num":  # Go: a constant with a decimal point is a float64, without an int
        return ("const", float(text) if "." in text else int(text)), tokens[1:]
    if kind == "var":
        name, *fields = text[1:].split(".")
        return ("var", name, fields), tokens[1:]
    raise TemplateError(f"unsupported operand {text!r}")


def _go_string(literal: str) -> str:
    body = literal[1:-1]
    if "\\" in body:
        raise TemplateError(f"escapes in string literals are not supported: {literal}")
    return body


def parse(template: str) -> list:
    """The template as a list of nodes: strings, ("out", pipeline), ("if", [(pipeline, body)...], else_body)."""
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
    body, rest = _parse_list(items, top=True)
    assert not rest
    return body


def _parse_list(items, top: bool = False):
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
            node, items = _parse_if(text[2:], items[1:])
            body.append(node)
        elif word in KEYWORDS:
            raise TemplateError(f"unsupported action {{{{ {text} }}}}")
        else:
            body.append(("out", _parse_pipeline(text)))
            items = items[1:]
    if not top:
        raise TemplateError("missing {{ end }}")
    return body, items


def _parse_if(condition: str, items):
    branches, otherwise = [], []
    while True:
        branch, items = _parse_list(items)
        branches.append((_parse_pipeline(condition), branch))
        text = items[0][1]
        items = items[1:]
        if text == "end":
            return ("if", branches, otherwise), items
        if text.startswith("else if "):
            condition = text[len("else if "):]
            continue
        if text != "else":
            raise TemplateError(f"unsupported action {{{{ {text} }}}}")
        otherwise, items = _parse_list(items)
        if not items or items[0][1] != "end":
            raise TemplateError("{{ else }} not followed by {{ end }}")
        return ("if", branches, otherwise), items[1:]


# ------------------------------------------------------------------------------------------- evaluation

def _truth(value) -> bool:
    """Go's isTrue: false for a missing value, zero numbers (NaN is not zero), empty strings and maps."""
    if value is MISSING:
        return False
    if isinstance(value, (bool, int, float, str, dict)):
        return bool(value) if not (isinstance(value, float) and math.isnan(value)) else True
    if isinstance(value, Value):
        return True  # a struct
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


def _eval(node, scope: dict):
    kind = node[0]
    if kind == "const":
        return node[1]
    if kind == "var":
        _, name, fields = node
        if name not in scope:
            raise TemplateError(f"undefined variable ${name}")
        value = scope[name]
        for f in fields:
            if value is MISSING:
                raise TemplateError(f"nil pointer evaluating .{f} (a missing value)")
            if isinstance(value, dict):
                value = value.get(f, MISSING)
            elif isinstance(value, Value) and f == "Value":
                value = value.Value
            else:
                raise TemplateError(f"can't evaluate field {f} in {value!r}")
        return value
    _, fn, args = node
    if fn == "and":  # Go 1.18+: stops at the first false argument and returns it, else the last
        if not args:
            raise TemplateError("and needs an argument")
        for arg in args:
            value = _eval(arg, scope)
            if not _truth(value):
                return value
        return value
    values = [_eval(a, scope) for a in args]
    if fn in ("eq", "ne", "lt", "le", "gt", "ge"):
        if len(values) != 2:
            raise TemplateError(f"{fn} with {len(values)} arguments is not supported")
        return _compare(fn, *values)
    if fn == "printf":
        if not values or not isinstance(values[0], str):
            raise TemplateError("printf needs a format")
        return _printf(values[0], values[1:])
    if fn == "externalURL":
        if values:
            raise TemplateError("externalURL takes no arguments")
        return scope["__external_url__"]
    if fn == "urlquery":  # url.QueryEscape of fmt.Sprint(args)
        return urllib.parse.quote_plus("".join(_sprint(v) for v in values), safe="-_.~")
    raise TemplateError(f"unsupported function {fn}")


def _output(value) -> str:
    if value is MISSING:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _sprint(value)


def _run(body: list, scope: dict) -> str:
    out = []
    for node in body:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            out.append(_output(_eval(node[1], scope)))
        else:
            _, branches, otherwise = node
            for condition, branch in branches:
                if _truth(_eval(condition, scope)):
                    out.append(_run(branch, scope))
                    break
            else:
                out.append(_run(otherwise, scope))
    return "".join(out)


def render(template: str, labels: dict[str, str], values: dict[str, float], external_url: str = EXTERNAL_URL) -> str:
    """What Grafana's template.Expand gives (an error raises): ``values`` maps refId -> its float value."""
    scope = {"labels": dict(labels), "values": {k: Value(float(v)) for k, v in values.items()},
             "__external_url__": external_url}
    return _run(parse(template), scope).replace("<no value>", "[no value]")
