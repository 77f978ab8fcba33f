"""A PromQL evaluator for exactly the subset the Grafana dashboard uses, over scrapes taken by a test.

Supported: selectors with label matchers (``=``, ``!=``, ``=~``, ``!~``; regexes fully anchored, as in
Prometheus), ``rate(sel[d])``, ``sum``/``avg`` with an optional ``by (labels)`` clause before the operand,
``histogram_quantile(q, v)``, the binary operators ``/`` and ``+`` (one-to-one matching on identical label
sets, or with a number), numbers and parentheses. Anything else raises ``PromQLError``, so a dashboard query
outside the subset fails its test instead of passing unchecked.

Semantics follow Prometheus where the dashboard depends on them: an instant selector takes each series' latest
sample at most ``LOOKBACK_S`` old; ``rate`` needs two samples of a series inside the range, handles counter
resets, and (unlike Prometheus) does not extrapolate to the range's edges; aggregations and functions drop
the metric name; ``histogram_quantile`` interpolates linearly inside the bucket and returns NaN for a
histogram with no observations.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

LOOKBACK_S = 300.0

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs; "__name__" holds the metric name
Vector = dict[Labels, float]


class PromQLError(ValueError):
    """The query is outside the supported subset (or malformed)."""


@dataclass
class Series:
    """Samples of one series, in time order: [(t seconds, value)]."""

    samples: list[tuple[float, float]] = field(default_factory=list)


class Store:
    """Series from several scrapes of a Prometheus text endpoint."""

    def __init__(self) -> None:
        self.series: dict[Labels, Series] = {}

    def add(self, t: float, name: str, labels: dict[str, str], value: float) -> None:
        key = tuple(sorted({**labels, "__name__": name}.items()))
        self.series.setdefault(key, Series()).samples.append((t, value))

    def add_scrape(self, t: float, text: str) -> None:
        """Parse one scrape (Prometheus text format) taken at time ``t``."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.add(t, s.name, dict(s.labels), float(s.value))

    @property
    def last_time(self) -> float:
        return max(s.samples[-1][0] for s in self.series.values())


# -- parsing ----------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""\s*(?:
    (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)
  | (?P<duration>\[\d+[smhd]\])
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
)""", re.VERBOSE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AGGREGATIONS = ("sum", "avg")
FUNCTIONS = ("rate", "histogram_quantile")


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise PromQLError(f"cannot read {expr[pos:pos + 20]!r} at {pos} in {expr!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


@dataclass
class Node:
    kind: str  # number, selector, rate, agg, quantile, binop
    args: tuple = ()


class Parser:
    """Recursive descent: ``+`` binds looser than ``/`` (as in PromQL); both are left-associative."""

    def __init__(self, expr: str) -> None:
        self.expr, self.tokens, self.i = expr, tokenize(expr), 0

    def parse(self) -> Node:
        node = self.additive()
        if self.i != len(self.tokens):
            raise PromQLError(f"unsupported {self.tokens[self.i][1]!r} in {self.expr!r}")
        return node

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            want = value or kind
            raise PromQLError(f"expected {want!r}, got {tok[1] if tok else 'end'!r} in {self.expr!r}")
        self.i += 1
        return tok[1]

    def additive(self) -> Node:
        node = self.multiplicative()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in "+-":
            if tok[1] != "+":
                raise PromQLError(f"operator {tok[1]!r} is not supported (only / and +) in {self.expr!r}")
            self.i += 1
            node = Node("binop", ("+", node, self.multiplicative()))
        return node

    def multiplicative(self) -> Node:
        node = self.primary()
        while (tok := self.peek()) is not None and tok[0] == "op" and tok[1] in "*/%^":
            if tok[1] != "/":
                raise PromQLError(f"operator {tok[1]!r} is not supported (only / and +) in {self.expr!r}")
            self.i += 1
            node = Node("binop", ("/", node, self.primary()))
        return node

    def primary(self) -> Node:
        tok = self.peek()
        if tok is None:
            raise PromQLError(f"unexpected end of {self.expr!r}")
        kind, value = tok
        if kind == "number":
            self.i += 1
            return Node("number", (float(value),))
        if value == "(":
            self.i += 1
            node = self.additive()
            self.take(")")
            return node
        if kind != "ident":
            raise PromQLError(f"unsupported {value!r} in {self.expr!r}")
        nxt = self.tokens[self.i + 1][1] if self.i + 1 < len(self.tokens) else None
        if value in AGGREGATIONS:
            return self.aggregation()
        if nxt == "(" or value in FUNCTIONS:
            if value not in FUNCTIONS:
                raise PromQLError(f"function {value!r} is not supported in {self.expr!r}")
            return self.function()
        if value in ("by", "without", "offset", "bool", "on", "ignoring", "group_left", "group_right"):
            raise PromQLError(f"{value!r} is not supported here in {self.expr!r}")
        sel = self.selector()
        if (tok := self.peek()) is not None and tok[0] == "duration":
            raise PromQLError(f"a range selector is supported only inside rate() in {self.expr!r}")
        return sel

    def selector(self) -> Node:
        name = self.take(kind="ident")
        matchers = [("__name__", "=", name)]
        if (tok := self.peek()) is not None and tok[1] == "{":
            self.i += 1
            while self.peek() is not None and self.peek()[1] != "}":
                label = self.take(kind="ident")
                op = self.take(kind="op")
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"matcher {op!r} in {self.expr!r}")
                raw = self.take(kind="string")[1:-1]
                matchers.append((label, op, re.sub(r"\\(.)", r"\1", raw)))
                if self.peek() is not None and self.peek()[1] == ",":
                    self.i += 1
            self.take("}")
        return Node("selector", tuple(matchers))

    def function(self) -> Node:
        name = self.take(kind="ident")
        self.take("(")
        if name == "rate":
            sel = self.selector()
            dur = self.take(kind="duration")
            self.take(")")
            return Node("rate", (sel, int(dur[1:-2]) * _UNITS[dur[-2]]))
        q = self.additive()
        if q.kind != "number":
            raise PromQLError(f"histogram_quantile needs a number first in {self.expr!r}")
        self.take(",")
        arg = self.additive()
        self.take(")")
        return Node("quantile", (q.args[0], arg))

    def aggregation(self) -> Node:
        op = self.take(kind="ident")
        by: tuple[str, ...] | None = None
        if (tok := self.peek()) is not None and tok[1] == "by":
            self.i += 1
            self.take("(")
            labels = []
            while self.peek() is not None and self.peek()[1] != ")":
                labels.append(self.take(kind="ident"))
                if self.peek() is not None and self.peek()[1] == ",":
                    self.i += 1
            self.take(")")
            by = tuple(labels)
        elif tok is not None and tok[1] == "without":
            raise PromQLError(f"'without' is not supported in {self.expr!r}")
        self.take("(")
        arg = self.additive()
        self.take(")")
        if (tok := self.peek()) is not None and tok[1] in ("by", "without"):
            raise PromQLError(f"a trailing {tok[1]!r} clause is not supported in {self.expr!r}")
        return Node("agg", (op, by, arg))


def parse(expr: str) -> Node:
    return Parser(expr).parse()


# -- evaluation -------------------------------------------------------------------------------------
def _matches(labels: dict[str, str], matchers) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and (re.fullmatch(value, have) is not None) != (op == "=~"):
            return False
    return True


def _drop_name(labels: Labels) -> Labels:
    return tuple(kv for kv in labels if kv[0] != "__name__")


def _rate(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    window = [(t, v) for t, v in samples if start < t <= end]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return None
    increase, prev = 0.0, window[0][1]
    for _, v in window[1:]:
        increase += v - prev if v >= prev else v  # a counter reset starts again from 0
        prev = v
    return increase / (window[-1][0] - window[0][0])


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' bucketQuantile over (upper bound, cumulative count) pairs."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total <= 0 or math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    i = next(i for i, (_, c) in enumerate(buckets) if c >= rank)
    if i == len(buckets) - 1:
        return buckets[-2][0]
    lo, prev = (0.0, 0.0) if i == 0 else buckets[i - 1]
    hi, count = buckets[i]
    if i == 0 and hi <= 0:
        return hi
    return lo + (hi - lo) * ((rank - prev) / (count - prev)) if count > prev else hi


def evaluate(expr: str | Node, store: Store, at: float | None = None) -> Vector | float:
    """The query's instant value at time ``at`` (default: the last scrape): a vector or a number."""
    node = parse(expr) if isinstance(expr, str) else expr
    at = store.last_time if at is None else at
    kind, args = node.kind, node.args
    if kind == "number":
        return args[0]
    if kind == "selector":
        out: Vector = {}
        for key, s in store.series.items():
            if _matches(dict(key), args):
                recent = [v for t, v in s.samples if at - LOOKBACK_S < t <= at]
                if recent:
                    out[key] = recent[-1]
        return out
    if kind == "rate":
        sel, range_s = args
        out = {}
        for key, s in store.series.items():
            if _matches(dict(key), sel.args):
                r = _rate(s.samples, at - range_s, at)
                if r is not None:
                    out[_drop_name(key)] = r
        return out
    if kind == "agg":
        op, by, arg = args
        vec = _vector(evaluate(arg, store, at), node)
        groups: dict[Labels, list[float]] = {}
        for key, v in vec.items():
            labels = dict(key)
            group = tuple(sorted((k, labels[k]) for k in (by or ()) if k in labels))
            groups.setdefault(group, []).append(v)
        return {g: (sum(vs) if op == "sum" else sum(vs) / len(vs)) for g, vs in groups.items()}
    if kind == "quantile":
        q, arg = args
        vec = _vector(evaluate(arg, store, at), node)
        groups: dict[Labels, list[tuple[float, float]]] = {}
        for key, v in vec.items():
            labels = dict(key)
            if "le" not in labels:
                continue  # Prometheus ignores series without an le label here
            group = tuple(sorted((k, x) for k, x in labels.items() if k not in ("le", "__name__")))
            groups.setdefault(group, []).append((float(labels["le"]), v))
        return {g: _quantile(q, b) for g, b in groups.items()}
    if kind == "binop":
        op, left, right = args
        a, b = evaluate(left, store, at), evaluate(right, store, at)
        fn = (lambda x, y: x + y) if op == "+" else _divide
        if isinstance(a, float) and isinstance(b, float):
            return fn(a, b)
        if isinstance(a, float):
            return {_drop_name(k): fn(a, v) for k, v in b.items()}
        if isinstance(b, float):
            return {_drop_name(k): fn(v, b) for k, v in a.items()}
        bb = {_drop_name(k): v for k, v in b.items()}
        return {_drop_name(k): fn(v, bb[_drop_name(k)]) for k, v in a.items() if _drop_name(k) in bb}
    raise PromQLError(f"cannot evaluate {kind}")  # pragma: no cover - the parser builds only the kinds above


def _vector(value: Vector | float, node: Node) -> Vector:
    if isinstance(value, float):
        raise PromQLError(f"{node.kind} needs a vector, got a number")
    return value


def _divide(x: float, y: float) -> float:
    if y == 0:
        return math.nan if x == 0 or math.isnan(x) else math.copysign(math.inf, x)
    return x / y
