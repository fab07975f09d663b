"""RQL as Eclipse Ditto parses and evaluates it, for the Ditto double. Pure functions, no I/O.

Grammar (Ditto's ``rql/parser/.../RqlPredicateParser.scala`` + ``RqlParserBase.scala``)::

    Query      = Comparison | In | Logical | Not | Exists | Empty
    Comparison = ("eq"|"ne"|"gt"|"ge"|"lt"|"le"|"like"|"ilike") "(" Property "," Literal ")"
    In         = "in" "(" Property ("," Literal)+ ")"
    Logical    = ("and"|"or") "(" Query ("," WS Query)* ")"
    Not        = "not" "(" Query ")"
    Exists     = "exists" "(" Property ")"
    Empty      = "empty" "(" Property ")"          (listed in ditto.md §2 Search)
    Literal    = Double | Long | "..." | '...' | true | false | null | time:now   (then optional WS)
    Property   = any characters except , ) " \\  (backslash escapes allowed)

Whitespace is only allowed where Ditto's grammar allows it: at the very start, after a literal and
after the comma between the sub-queries of and/or. ``eq(a, 1)`` is therefore a syntax error, as in Ditto.

Evaluation (as ditto.md and the brief describe it):
- paths are slash-separated JSON pointers into the thing JSON (``features/environment/properties/tsTop``,
  ``attributes/room``, ``thingId``); a ``*`` segment matches any key (``features/*/properties/x``);
- strings compare lexicographically, numbers numerically, booleans and null only by (in)equality;
  values of different types never compare (``eq(x,"1")`` is false for the number 1);
- a missing property makes every comparison false, ``exists`` false and ``empty`` true;
- an array property matches when any element matches (MongoDB semantics, which Ditto search inherits);
- ``like``/``ilike`` support ``*`` (any run) and ``?`` (one character).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

__all__ = [
    "RqlError",
    "RqlSyntaxError",
    "Node",
    "Comparison",
    "Logical",
    "Exists",
    "parse",
    "evaluate",
    "matches",
    "resolve",
    "SortKey",
    "SearchOptions",
    "parse_options",
    "split_top_level",
    "MISSING",
]

MISSING = object()
"""Marker for a property that is not there (distinct from JSON null)."""


class RqlError(ValueError):
    """Base class of RQL errors; the double answers 400 for these."""


class RqlSyntaxError(RqlError):
    """The text is not valid RQL. ``position`` is the 0-based offset where parsing failed."""

    def __init__(self, message: str, text: str, position: int):
        self.text = text
        self.position = position
        super().__init__(f"{message} at position {position} of {text!r}")


# ---------------------------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Comparison:
    op: str  # eq ne gt ge lt le like ilike in
    path: str
    values: tuple[Any, ...]  # one value except for "in"


@dataclass(frozen=True)
class Logical:
    op: str  # and or not
    children: tuple["Node", ...]


@dataclass(frozen=True)
class Exists:
    op: str  # exists empty
    path: str


Node = Comparison | Logical | Exists

_SINGLE_OPS = ("eq", "ne", "gt", "ge", "lt", "le", "like", "ilike")
_WS = " \n\r\t\f"
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NUMBER = re.compile(r"[+-]?(?:[1-9][0-9]*|0)(\.[0-9]+)?")
_PROPERTY_RUN = re.compile(r'[^,)"\\]*')
_STRING_RUN = {q: re.compile(f"[^{q}\\\\]*") for q in ("'", '"')}

_OPERATOR_WORD = re.compile(r"([a-z]+)\(")


# -------------------------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str, now: Callable[[], str] | None):
        self.text = text
        self.pos = 0
        self.now = now

    # -- helpers
    def fail(self, message: str) -> RqlSyntaxError:
        return RqlSyntaxError(message, self.text, self.pos)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "end of input"
            raise self.fail(f"expected {char!r}, found {found}")
        self.pos += 1

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1

    def keyword(self, names: Sequence[str]) -> str | None:
        # Every operator is a lower-case word followed by "(": the whole word must be one of ``names``.
        m = _OPERATOR_WORD.match(self.text, self.pos)
        if m is None or m.group(1) not in names:
            return None
        self.pos = m.end(1)
        return m.group(1)

    # -- grammar
    def root(self) -> Node:
        self.skip_ws()
        node = self.query()
        if self.pos != len(self.text):
            raise self.fail("unexpected trailing input")
        return node

    def query(self) -> Node:
        op = self.keyword(("and", "or", "not", "exists", "empty", "in") + _SINGLE_OPS)
        if op is None:
            raise self.fail("expected one of eq, ne, gt, ge, lt, le, like, ilike, in, exists, empty, and, or, not")
        self.expect("(")
        if op in ("and", "or"):
            children = [self.query()]
            while self.peek() == ",":
                self.pos += 1
                self.skip_ws()
                children.append(self.query())
            self.expect(")")
            return Logical(op, tuple(children))
        if op == "not":
            child = self.query()
            self.expect(")")
            return Logical("not", (child,))
        path = self.property()
        if op in ("exists", "empty"):
            self.expect(")")
            return Exists(op, path)
        values = []
        self.expect(",")
        values.append(self.literal())
        if op == "in":
            while self.peek() == ",":
                self.pos += 1
                values.append(self.literal())
        self.expect(")")
        if op in ("like", "ilike") and not isinstance(values[0], str):
            raise self.fail(f"{op} needs a string value")
        return Comparison(op, path, tuple(values))

    def property(self) -> str:
        start = self.pos
        out = []
        while self.pos < len(self.text):
            run = _PROPERTY_RUN.match(self.text, self.pos)  # up to the next , ) " or backslash
            out.append(run.group(0))
            self.pos = run.end()
            if self.text[self.pos : self.pos + 1] != "\\":
                break
            self.pos += 1
            out.append(self.escape('"'))
        path = "".join(out)
        if not path:
            self.pos = start
            raise self.fail("expected a property path")
        return path

    def escape(self, quote: str) -> str:
        ch = self.peek()
        if ch in (quote, "\\", "/"):
            self.pos += 1
            return ch
        if ch in _ESCAPES:
            self.pos += 1
            return _ESCAPES[ch]
        if ch == "u":
            digits = self.text[self.pos + 1 : self.pos + 5]
            if len(digits) == 4 and all(c in "0123456789abcdefABCDEF" for c in digits):
                self.pos += 5
                return chr(int(digits, 16))
        raise self.fail("invalid escape sequence")

    def literal(self) -> Any:
        ch = self.peek()
        value: Any
        if ch in ('"', "'"):
            self.pos += 1
            out = []
            while True:
                if self.pos >= len(self.text):
                    raise self.fail("unterminated string")
                run = _STRING_RUN[ch].match(self.text, self.pos)  # up to the closing quote or a backslash
                out.append(run.group(0))
                self.pos = run.end()
                if self.pos >= len(self.text):
                    continue
                if self.text[self.pos] == ch:
                    self.pos += 1
                    break
                self.pos += 1
                out.append(self.escape(ch))
            value = "".join(out)
        elif m := _NUMBER.match(self.text, self.pos):
            token = m.group(0)
            if m.group(1) is None and token == "-0":
                raise self.fail("-0 is not a valid number")
            self.pos = m.end()
            value = float(token) if m.group(1) else int(token)
        else:
            for word, word_value in (("true", True), ("false", False), ("null", None)):
                if self.text.startswith(word, self.pos):
                    self.pos += len(word)
                    value = word_value
                    break
            else:
                if self.text.startswith("time:now", self.pos) and self.text[self.pos + 8 : self.pos + 9] in (",", ")", *_WS):
                    self.pos += 8
                    value = self.now() if self.now else _utc_now()
                else:
                    raise self.fail("expected a literal (string, number, true, false, null)")
        self.skip_ws()
        return value


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(text: str, *, now: Callable[[], str] | None = None) -> Node:
    """Parse an RQL filter; raises :class:`RqlSyntaxError` on invalid input."""
    if not isinstance(text, str) or not text:
        raise RqlSyntaxError("empty RQL expression", str(text), 0)
    return _Parser(text, now).root()


# ------------------------------------------------------------------------------------- evaluation


def split_path(path: str) -> list[str]:
    """``/features/x/properties/y`` or ``features/x/properties/y`` -> segments."""
    return [seg for seg in path.strip("/").split("/")] if path.strip("/") else []


def resolve(doc: Any, path: str | Sequence[str]) -> Iterator[Any]:
    """All values at ``path`` (several where a segment is ``*``); nothing when the path is missing."""
    segments = split_path(path) if isinstance(path, str) else list(path)
    if "*" not in segments:  # one value at most: no recursion needed (the usual case, and a hot one)
        node = doc
        for seg in segments:
            if not isinstance(node, dict) or seg not in node:
                return iter(())
            node = node[seg]
        return iter((node,))

    def walk(node: Any, i: int) -> Iterator[Any]:
        if i == len(segments):
            yield node
            return
        if not isinstance(node, dict):
            return
        seg = segments[i]
        if seg == "*":
            for child in node.values():
                yield from walk(child, i + 1)
        elif seg in node:
            yield from walk(node[seg], i + 1)

    return walk(doc, 0)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _like_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    out = []
    for ch in pattern:
        out.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
    return re.compile("".join(out), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _compare_scalar(op: str, actual: Any, expected: Any) -> bool:
    ka, ke = _kind(actual), _kind(expected)
    if op in ("eq", "in"):
        return ka == ke and actual == expected
    if op == "ne":
        return not (ka == ke and actual == expected)
    if op in ("like", "ilike"):
        return ka == "string" and bool(_like_regex(expected, op == "ilike").fullmatch(actual))
    if ka != ke or ka not in ("number", "string"):
        return False
    if op == "gt":
        return actual > expected
    if op == "ge":
        return actual >= expected
    if op == "lt":
        return actual < expected
    if op == "le":
        return actual <= expected
    raise AssertionError(op)


def _candidates(value: Any) -> list[Any]:
    # An array matches when the array itself or one of its elements matches (MongoDB semantics).
    return [value, *value] if isinstance(value, list) else [value]


def evaluate(node: Node, doc: Any) -> bool:
    """Does ``doc`` (a thing as JSON) satisfy the parsed filter?"""
    if isinstance(node, Logical):
        if node.op == "and":
            return all(evaluate(c, doc) for c in node.children)
        if node.op == "or":
            return any(evaluate(c, doc) for c in node.children)
        return not evaluate(node.children[0], doc)
    if isinstance(node, Exists):
        values = list(resolve(doc, node.path))
        if node.op == "exists":
            return bool(values)
        return not values or any(v is None or (isinstance(v, (str, list, dict)) and len(v) == 0) for v in values)
    values = list(resolve(doc, node.path))
    if not values:
        return False  # a missing property makes every comparison false
    if node.op == "ne":
        # ne holds when no candidate equals the value
        return all(
            all(_compare_scalar("ne", c, node.values[0]) for c in _candidates(v)) for v in values
        )
    for v in values:
        for c in _candidates(v):
            for expected in node.values:
                if _compare_scalar(node.op, c, expected):
                    return True
    return False


def matches(text: str, doc: Any) -> bool:
    """Parse and evaluate in one go."""
    return evaluate(parse(text), doc)


# ------------------------------------------------------------------------------ search options


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside parentheses and double quotes."""
    parts, depth, start, in_str, i = [], 0, 0, False, 0
    while i < len(text):
        ch = text[i]
        if in_str:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise RqlSyntaxError("unbalanced ')'", text, i)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if depth != 0 or in_str:
        raise RqlSyntaxError("unbalanced parentheses or quotes", text, len(text))
    parts.append(text[start:])
    return parts


@dataclass(frozen=True)
class SortKey:
    path: str
    ascending: bool


@dataclass(frozen=True)
class SearchOptions:
    size: int | None = None
    cursor: str | None = None
    sort: tuple[SortKey, ...] = ()
    limit: tuple[int, int] | None = None  # deprecated limit(offset,count)


_OPTION = re.compile(r"(size|cursor|sort|limit)\((.*)\)", re.DOTALL)


def parse_options(text: str | None) -> SearchOptions:
    """Parse Ditto's ``option=`` value: ``size(n)``, ``cursor(c)``, ``sort(+a,-b)``, ``limit(o,c)``.

    Raises :class:`RqlError` for anything else; range checks (size <= 200 etc.) are the caller's.
    """
    if text is None:
        return SearchOptions()
    size = cursor = limit = None
    sort: tuple[SortKey, ...] = ()
    seen: set[str] = set()
    for part in split_top_level(text):
        m = _OPTION.fullmatch(part)
        if not m:
            raise RqlSyntaxError(f"unknown option {part!r}", text, text.find(part))
        name, arg = m.groups()
        if name in seen:
            raise RqlError(f"option {name} given twice")
        seen.add(name)
        if name == "size":
            if not re.fullmatch(r"[0-9]+", arg):
                raise RqlError(f"size({arg}) is not a number")
            size = int(arg)
        elif name == "cursor":
            if not arg:
                raise RqlError("empty cursor")
            cursor = arg
        elif name == "limit":
            m2 = re.fullmatch(r"([0-9]+),([0-9]+)", arg)
            if not m2:
                raise RqlError(f"limit({arg}) needs two numbers")
            limit = (int(m2.group(1)), int(m2.group(2)))
        else:
            keys = []
            for item in arg.split(","):
                if len(item) < 2 or item[0] not in "+-":
                    raise RqlError(f"sort key {item!r} must start with + or -")
                keys.append(SortKey(item[1:], item[0] == "+"))
            sort = tuple(keys)
    if limit is not None and (size is not None or cursor is not None):
        raise RqlError("limit cannot be combined with size or cursor")
    return SearchOptions(size=size, cursor=cursor, sort=sort, limit=limit)
