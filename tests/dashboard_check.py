"""Check a Grafana dashboard's PromQL against the metrics the farm exports.

Every query of ``deploy/grafana/ctr-farm.json`` (panel targets and ``label_values``
variables) is parsed with ``promql_parser`` (the Rust PromQL parser's Python binding)
after Grafana's variables are replaced, and walked to infer which labels each
sub-expression carries. A problem is reported when

* a selected series name is not exported (``_bucket``/``_sum``/``_count``/``_total``
  are the exported sample names, so a suffix that does not exist is caught too);
* a matcher, ``by``/``without``, ``on``/``ignoring`` or ``label_values`` names a label
  the series does not have at that point (``le`` after ``histogram_quantile``, a label
  an inner ``sum by`` dropped, ...);
* ``histogram_quantile`` gets no ``le``;
* the two sides of a one-to-one binary operation carry different labels (the panel
  would always be empty).

A :class:`Catalog` (exported sample name -> its label names) comes from the registry of
``app.metrics`` or from a real ``/metrics`` scrape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import promql_parser as pp
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

#: Labels Prometheus adds to every series it scrapes (``job``, ``instance``).
TARGET_LABELS = frozenset({"job", "instance"})
#: Aggregations that keep their input's labels (the others keep only ``by``'s).
_KEEP_LABELS = frozenset({"topk", "bottomk", "limitk", "limit_ratio"})
_SET_OPS = frozenset({"and", "or", "unless"})
_RANGE_VARS = re.compile(r"\$\{?(?:__rate_interval|__interval|__range)\}?")
_VARS = re.compile(r"\$\{?[A-Za-z_]\w*(?::\w+)?\}?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<expr>.*),)?\s*(?P<label>\w+)\s*\)\s*$", re.S)

Catalog = Mapping[str, frozenset[str]]


def registry_catalog(module: ModuleType) -> dict[str, frozenset[str]]:
    """The sample names and labels of every metric defined in ``module``."""
    out: dict[str, frozenset[str]] = {}
    for metric in vars(module).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, labels = metric._name, frozenset(metric._labelnames)
        if metric._type == "counter":
            out[name + "_total"] = labels
        elif metric._type == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


def scrape_catalog(text: str) -> dict[str, frozenset[str]]:
    """The sample names and labels seen in a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in out.items()}


def substitute(expr: str) -> str:
    """Grafana's variables -> values PromQL accepts (ranges ``5m``, the rest ``x``)."""
    return _VARS.sub("x", _RANGE_VARS.sub("5m", expr))


@dataclass(frozen=True)
class Query:
    where: str  # "panel 'title' A" or "variable job"
    expr: str  # as written in the dashboard
    label: str | None = None  # label_values(expr, label)


def queries(dashboard: Mapping[str, Any]) -> Iterator[Query]:
    """Every PromQL query of the dashboard: panel targets, then query variables."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield Query(f"panel {panel['title']!r} {target.get('refId')}", target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = _LABEL_VALUES.match(text)
        assert found, f"variable {var['name']}: only label_values(...) queries are checked"
        yield Query(f"variable {var['name']}", found["expr"] or "", found["label"])


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def problems(query: Query, catalog: Catalog) -> list[str]:
    """What is wrong with ``query`` against ``catalog`` (empty: nothing)."""
    check = _Check(catalog)
    if query.expr.strip():
        try:
            expr = pp.parse(substitute(query.expr))
        except ValueError as exc:
            return [f"{query.where}: does not parse: {exc}"]
        labels = check.labels(expr)
    else:  # label_values(label): any exported series
        labels = frozenset().union(*catalog.values()) | TARGET_LABELS
    if query.label is not None and query.label not in (labels or ()):
        check.found.append(f"label_values: no label {query.label!r}")
    return [f"{query.where}: {p}" for p in check.found]


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, pp.VectorSelector) and node.name:
            names.add(node.name)

    pp.walk(pp.parse(substitute(expr)), visit)
    return names


@dataclass
class _Check:
    catalog: Catalog
    found: list[str] = field(default_factory=list)
    #: An unknown series was met: its labels are unknown, so label checks would only
    #: repeat that problem.
    unknown: bool = False

    def need(self, wanted: Any, have: frozenset[str], what: str) -> None:
        missing = sorted(set(wanted) - have)
        if missing and not self.unknown:
            self.found.append(f"{what}: no label {missing} (has {sorted(have)})")

    def labels(self, node: Any) -> frozenset[str] | None:
        """The label names ``node``'s series carry; None for a scalar or string."""
        if isinstance(node, pp.VectorSelector):
            return self.selector(node)
        if isinstance(node, pp.MatrixSelector):
            return self.labels(node.vector_selector)
        if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
            return self.labels(node.expr)
        if isinstance(node, pp.Call):
            return self.call(node)
        if isinstance(node, pp.AggregateExpr):
            return self.aggregate(node)
        if isinstance(node, pp.BinaryExpr):
            return self.binary(node)
        return None  # NumberLiteral, StringLiteral

    def selector(self, node: pp.VectorSelector) -> frozenset[str]:
        name = node.name
        if name not in self.catalog:
            self.found.append(f"series {name!r} is not exported")
            self.unknown = True
            return TARGET_LABELS
        have = self.catalog[name] | TARGET_LABELS
        self.need({m.name for m in node.matchers.matchers}, have, f"{name}{{...}}")
        return have

    def call(self, node: pp.Call) -> frozenset[str] | None:
        args = [self.labels(a) for a in node.args]
        vectors = [a for a in args if a is not None]
        out = frozenset().union(*vectors) if vectors else None
        name = node.func.name
        if name == "histogram_quantile":
            self.need({"le"}, out or frozenset(), "histogram_quantile")
            return (out or frozenset()) - {"le"}
        if name == "vector":
            return frozenset()
        if name == "scalar":
            return None
        return out

    def aggregate(self, node: pp.AggregateExpr) -> frozenset[str]:
        inner = self.labels(node.expr) or frozenset()
        if node.param is not None:
            self.labels(node.param)
        modifier = node.modifier
        if modifier is None:
            return inner if str(node.op) in _KEEP_LABELS else frozenset()
        self.need(modifier.labels, inner, f"{node.op} {modifier}")
        if modifier.type == pp.AggModifierType.By:
            return frozenset(modifier.labels)
        return inner - set(modifier.labels)

    def binary(self, node: pp.BinaryExpr) -> frozenset[str] | None:
        lhs, rhs = self.labels(node.lhs), self.labels(node.rhs)
        if lhs is None or rhs is None:  # vector op scalar: the vector's labels
            return lhs if rhs is None else rhs
        op, modifier = str(node.op), node.modifier
        matching = modifier.matching if modifier is not None else None
        if matching is not None:  # on: both sides need them; ignoring: one at least
            on = matching.type == pp.LabelModifierType.Include
            self.need(matching.labels, lhs & rhs if on else lhs | rhs, f"{op} {matching}")
        if op in _SET_OPS:
            return lhs | rhs if op == "or" else lhs
        card = modifier.card if modifier is not None else None
        if card == pp.VectorMatchCardinality.OneToMany:
            return rhs
        if card == pp.VectorMatchCardinality.ManyToOne:
            return lhs
        if self.unknown:
            return lhs
        if matching is None and lhs != rhs:
            self.found.append(f"{op}: the sides carry {sorted(lhs)} and {sorted(rhs)}: no match")
        elif matching is not None and matching.type == pp.LabelModifierType.Exclude:
            ignored = set(matching.labels)
            if lhs - ignored != rhs - ignored:
                self.found.append(f"{op} {matching}: the sides still differ: no match")
        return lhs


def groupings(expr: str) -> set[tuple[str, frozenset[str]]]:
    """(series name, ``by`` labels) of every ``by`` aggregation in ``expr``."""
    out: set[tuple[str, frozenset[str]]] = set()

    def visit(node: Any) -> None:
        modifier = getattr(node, "modifier", None)
        by = modifier is not None and modifier.type == pp.AggModifierType.By
        if isinstance(node, pp.AggregateExpr) and by:
            for name in metric_names(str(node.expr)):
                out.add((name, frozenset(modifier.labels)))

    pp.walk(pp.parse(substitute(expr)), visit)
    return out
