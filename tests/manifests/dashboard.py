"""The Grafana dashboard's PromQL against the metrics the code really exports.

:func:`metric_names_in` finds the metric names of a PromQL expression without a full parser:
label matchers, grouping clauses, range selectors and strings are removed, then every remaining
identifier that is not a function call, a keyword or a number is a metric name.
:func:`exported_metric_names` builds the real collectors (agent, cloud worker, control API,
fleet gauges) and lists every series name they expose, with the suffixes Prometheus adds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def metric_names_in(expr: str) -> set[str]:
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if match.start() > 0 and text[match.start() - 1] in "$.":
            continue  # a Grafana variable ($__rate_interval) or a number's exponent part
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, expression) of every query, rows and nested panels included."""
    for panel in dashboard.get("panels") or []:
        yield from dashboard_exprs(panel)
        for target in panel.get("targets") or []:
            if "expr" in target:
                yield str(panel.get("title")), str(target["expr"])


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def _names(registry: Any) -> set[str]:
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names


def exported_metric_names() -> set[str]:
    """Every series name edgefed's collectors expose: the agent's, a cloud worker's, the
    control API's, the autoscaler's (with no pool and no monitor: only its gauges are read) and
    the fleet gauges the controller computes from its registry (here an empty in-memory one)."""
    from prometheus_client import CollectorRegistry
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from edgefed.cloud.api.metrics import HttpMetrics
    from edgefed.cloud.fleet.metrics import RegistryCollector
    from edgefed.cloud.orchestration.service import AutoscaleService
    from edgefed.cloud.registry.models import Base
    from edgefed.cloud.worker.metrics import WorkerMetrics
    from edgefed.edge.metrics import AgentMetrics

    names = _names(AgentMetrics("agent").registry)
    names |= _names(WorkerMetrics("worker", "default").registry)
    names |= _names(HttpMetrics(CollectorRegistry()).registry)
    names |= _names(AutoscaleService({}, monitor=None, scaler=None).registry)  # type: ignore[arg-type]
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    fleet = CollectorRegistry()
    fleet.register(RegistryCollector(sessionmaker(engine), "default"))
    names |= _names(fleet)
    engine.dispose()
    return names
