"""The alert rules (deploy/k8s/monitoring) are well formed and watch series the gateway exposes.

There is no promtool here: promql-parser (Python bindings of a Rust port of Prometheus' own
parser) parses every expression, and the metric names and labels each one selects are checked
against what the gateway's modules register in prometheus_client's default registry, the
registry its metrics endpoint serves.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import promql_parser as pq
from prometheus_client import REGISTRY, Gauge

import channels
import gateway
from gateway.domain.models import ConnectionStatus
from gateway.observability.metrics import GRPC_CODE_NAMES, WorkerGauge
from gateway.plugins import ChannelRegistry
from gateway.web.app import WebDeps, create_web_app
from tests.deploy import k8s

RULES = k8s.MONITORING / "prometheusrule.yaml"
# Series names as prometheus_client exposes each type: a counter `x` is `x_total` (and
# `x_created`), a histogram `x` is `x_bucket`, `x_count`, `x_sum`, `x_created`, and so on.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
# Labels Prometheus gives every scraped series: the target's, as the Prometheus Operator's
# ServiceMonitor relabelling sets them.
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
)
# Series Prometheus writes itself for every target.
SCRAPE_SERIES = frozenset({"up"})
SEVERITIES = {"critical", "warning", "info"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


@cache
def exposed() -> dict[str, frozenset[str]]:
    """Every series name the gateway exposes, with the label names it may carry."""
    return {name: labels for name, (labels, _) in _registered().items() if name in _series()}


@cache
def _series() -> frozenset[str]:
    return frozenset(name for name, (_, is_series) in _registered().items() if is_series)


@cache
def families() -> dict[str, frozenset[str]]:
    """Metric names as the code declares them (a histogram's family name, say): how prose
    may name a metric."""
    return {name: labels for name, (labels, _) in _registered().items()}


@cache
def _registered() -> dict[str, tuple[frozenset[str], bool]]:
    """Family and series names, their label names, and whether the name is a series."""
    for package in (gateway, channels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__"):
                importlib.import_module(info.name)
    names: dict[str, tuple[frozenset[str], bool]] = {}
    # The registry has no public list of its collectors; a labelled metric with no child yet
    # shows its label names only on the collector.
    for collector in list(REGISTRY._collector_to_names):
        declared = frozenset(getattr(collector, "_labelnames", ()))
        # describe() names a metric whether or not this process has set it (a WorkerGauge
        # is collected only once set); collect() adds the labels its samples carry.
        described = getattr(collector, "describe", None)
        declared_families = list(described()) if described is not None else []
        for family in [*declared_families, *collector.collect()]:
            seen = {label for sample in family.samples for label in sample.labels}
            names.setdefault(family.name, (declared | seen, False))
            for suffix in SUFFIXES[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                if family.type == "summary" and not suffix:
                    extra = {"quantile"}
                names[family.name + suffix] = (declared | seen | extra, True)
    for name in SCRAPE_SERIES:
        names[name] = (frozenset(), True)
    return names


def rules() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in k8s.docs(RULES, "PrometheusRule"):
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                yield group["name"], rule


def _name(selector: Any) -> str:
    if selector.name:
        return str(selector.name)
    for m in selector.matchers.matchers:
        if m.name == "__name__" and m.op == pq.MatchOp.Equal:
            return str(m.value)
    raise AssertionError(f"{selector}: a selector without a metric name")


def _nodes(expr: Any) -> list[Any]:
    found: list[Any] = []
    pq.walk(expr, lambda node: found.append(node))
    return found


def selectors(expr: Any) -> list[Any]:
    return [node for node in _nodes(expr) if isinstance(node, pq.VectorSelector)]


def _labels_of(selector: Any) -> frozenset[str]:
    return families()[_name(selector)] | TARGET_LABELS


def _is_scalar(expr: Any) -> bool:
    if isinstance(expr, pq.NumberLiteral):
        return True
    if isinstance(expr, pq.ParenExpr | pq.UnaryExpr):
        return _is_scalar(expr.expr)
    if isinstance(expr, pq.BinaryExpr):
        return _is_scalar(expr.lhs) and _is_scalar(expr.rhs)
    return False


def output_labels(expr: Any) -> frozenset[str]:
    """The label names the expression's result series may carry (what {{ $labels.x }} sees)."""
    if isinstance(expr, pq.VectorSelector):
        return _labels_of(expr)
    if isinstance(expr, pq.MatrixSelector):
        return _labels_of(expr.vector_selector)
    if isinstance(expr, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return output_labels(expr.expr)
    if isinstance(expr, pq.AggregateExpr):
        modifier = expr.modifier
        if modifier is None:
            return frozenset()
        if modifier.type == pq.AggModifierType.By:
            return frozenset(modifier.labels)
        return output_labels(expr.expr) - set(modifier.labels)
    if isinstance(expr, pq.BinaryExpr):
        if _is_scalar(expr.lhs):
            return output_labels(expr.rhs)
        # One-to-one matching keeps the left side's labels; group_left(...) copies more.
        copied = (expr.modifier.group_labels or []) if expr.modifier else []
        return output_labels(expr.lhs) | set(copied)
    if isinstance(expr, pq.Call):
        name = expr.func.name
        vectors = [
            a for a in expr.args if not _is_scalar(a) and not isinstance(a, pq.StringLiteral)
        ]
        if name == "histogram_quantile":
            return output_labels(vectors[0]) - {"le"}
        if name == "absent":
            return frozenset(m.name for m in expr.args[0].matchers.matchers)
        return output_labels(vectors[0]) if vectors else frozenset()
    return frozenset()


def _sidecar_routes() -> set[str]:
    app = create_web_app(WebDeps(store=None, channels=ChannelRegistry(()), max_body_bytes=1024))  # type: ignore[arg-type]
    return {resource.canonical for resource in app.router.resources()}


def _alternatives(matcher: Any) -> list[str]:
    """The values a matcher accepts, when it is a literal or a plain alternation."""
    value = str(matcher.value)
    if matcher.op in (pq.MatchOp.Equal, pq.MatchOp.NotEqual):
        return [value]
    if re.fullmatch(r"[\w/{}-]+(\|[\w/{}-]+)*", value):
        return value.split("|")
    return []


@cache
def closed_label_values() -> dict[str, set[str]]:
    """Label values the code, the deployment or the monitor defines as closed sets."""
    monitor = k8s.one(k8s.MONITORING / "servicemonitor.yaml", "ServiceMonitor")
    selected = [
        svc["metadata"]["name"]
        for svc in k8s.docs(k8s.K8S / "service.yaml", "Service")
        if k8s.matches(monitor["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    ]
    return {
        "grpc_code": set(GRPC_CODE_NAMES.values()),
        "status@switchboard_connections": {status.value for status in ConnectionStatus},
        "route": _sidecar_routes(),
        "container": set(k8s.containers(k8s.deployment())),
        "job": set(selected),  # the job label is the Service's name
        "endpoint": {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]},
    }


def check_selector(selector: Any, where: str, *, prose: bool = False) -> None:
    """The selector names a series the gateway exposes (or, in prose, a metric it declares),
    with labels that series has and values that occur."""
    name = _name(selector)
    known_names = families() if prose else exposed()
    assert name in known_names, f"{where}: {name} is not a series the gateway exposes"
    allowed = _labels_of(selector) | {"__name__"}
    for matcher in selector.matchers.matchers:
        assert matcher.name in allowed, f"{where}: {name} has no label {matcher.name}"
        values = closed_label_values()
        known = values.get(f"{matcher.name}@{name}", values.get(matcher.name))
        if known is not None:
            for value in _alternatives(matcher):
                assert value in known, f"{where}: {matcher.name}={value!r} never occurs"


def test_the_rule_file_is_a_prometheus_rule_with_rules() -> None:
    [doc] = k8s.load(RULES)
    assert (doc["apiVersion"], doc["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    groups = [group["name"] for group in doc["spec"]["groups"]]
    assert len(groups) == len(set(groups)), "group names are unique"
    names = [rule.get("alert") or rule.get("record") for _, rule in rules()]
    assert names
    assert len(names) == len(set(names)), "rule names are unique"


def test_every_rule_is_well_formed() -> None:
    for group, rule in rules():
        where = f"{group}/{rule.get('alert') or rule.get('record')}"
        assert set(rule) <= RULE_KEYS, f"{where}: unknown keys {set(rule) - RULE_KEYS}"
        assert ("alert" in rule) != ("record" in rule), f"{where}: an alert or a recording rule"
        assert isinstance(rule["expr"], str), where
        assert rule["expr"].strip(), where
        if "record" in rule:
            assert re.fullmatch(r"[a-zA-Z_]\w*(:\w+)+", rule["record"]), (
                f"{where}: level:metric:ops"
            )
            assert not {"for", "annotations"} & set(rule), where
            continue
        assert re.fullmatch(r"Switchboard[A-Z][A-Za-z0-9]+", rule["alert"]), where
        assert {"for", "labels", "annotations"} <= set(rule), f"{where}: for, labels, annotations"
        assert pq.parse_duration(rule["for"]).total_seconds() > 0, f"{where}: a `for` duration"
        assert rule["labels"]["severity"] in SEVERITIES, where
        assert all(isinstance(v, str) for v in rule["labels"].values()), where
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), f"{where}: a summary"
        assert annotations.get("description", "").strip(), f"{where}: a description"
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), f"{where}: unbalanced template"


def test_every_expression_parses_and_selects_real_series_and_labels() -> None:
    for group, rule in rules():
        where = f"{group}/{rule.get('alert') or rule.get('record')}"
        expr = pq.parse(rule["expr"])  # ValueError on a syntax error
        found = selectors(expr)
        assert found, f"{where}: selects no series"
        for selector in found:
            check_selector(selector, where)
        # Every aggregation keeps labels its input has (a typo silently yields one series).
        for node in _nodes(expr):
            if isinstance(node, pq.AggregateExpr) and node.modifier is not None:
                available = frozenset().union(*(_labels_of(s) for s in selectors(node.expr)))
                missing = set(node.modifier.labels) - available
                assert not missing, f"{where}: aggregates by {missing}, which no input has"
            if isinstance(node, pq.Call) and node.func.name == "histogram_quantile":
                buckets = selectors(node.args[1])
                assert buckets, where
                assert all(_name(s).endswith("_bucket") for s in buckets), where
                inner = [n for n in _nodes(node.args[1]) if isinstance(n, pq.AggregateExpr)]
                assert all(
                    "le" in n.modifier.labels
                    for n in inner
                    if n.modifier and n.modifier.type == pq.AggModifierType.By
                ), f"{where}: the quantile's aggregation drops le"


def test_annotations_name_real_series_and_only_labels_the_result_has() -> None:
    # A series named in prose, with matchers when given (a quoted value may hold braces).
    mention = re.compile(r'\b((?:switchboard|grpc_server)_\w+)(\{(?:[^}"]|"[^"]*")*\})?')
    for group, rule in rules():
        where = f"{group}/{rule.get('alert') or rule.get('record')}"
        result = output_labels(pq.parse(rule["expr"]))
        for text in rule.get("annotations", {}).values():
            for used in re.findall(r"\$labels\.(\w+)", text):
                assert used in result, f"{where}: {{{{ $labels.{used} }}}} is never set"
            for name, matchers in mention.findall(text):
                for selector in selectors(pq.parse(name + matchers)):
                    check_selector(selector, f"{where} (annotation)", prose=True)


def test_unlabelled_gauges_are_exposed_only_by_the_process_that_sets_them() -> None:
    # A plain unlabelled gauge is exposed at 0 from import on by every process that imports
    # its module, whether or not it ever sets it (the http container runs neither the
    # refresh nor the send worker): an alert on it would read that 0. A WorkerGauge is
    # exposed once set, by the process whose worker sets it.
    exposed()  # every module imported
    plain = [
        collector._name
        for collector in list(REGISTRY._collector_to_names)
        if isinstance(collector, Gauge)
        and not isinstance(collector, WorkerGauge)
        and not collector._labelnames
        and collector._name.startswith("switchboard_")
    ]
    assert plain == []
    workers = [
        collector
        for collector in list(REGISTRY._collector_to_names)
        if isinstance(collector, WorkerGauge)
    ]
    assert {c._name for c in workers} >= {
        "switchboard_token_nearest_expiry_seconds",
        "switchboard_outbound_queue_depth",
    }
