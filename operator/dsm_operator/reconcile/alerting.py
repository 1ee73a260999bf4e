"""The alert rules of a ``DeepSecurityManager``, narrowed to that resource, for its PrometheusRule.

The rules are ``prometheus-rules.yaml`` beside this module: a copy of the repository's
``monitoring/prometheus-rules.yaml`` (the file for a plain Prometheus; a test keeps the two equal).
There every selector is written ``dsm_metric{...}`` with braces; here each one gets the matchers of
this resource inside its braces: the nodes' metrics those of the Service the ServiceMonitor
scrapes (``namespace``, ``service``), the operator's own metrics the resource's ``namespace`` and
``name``. Without that, every resource's PrometheusRule would alert on every cluster Prometheus
sees, once per resource.

Pure: text in, data out.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Mapping
from importlib import resources
from typing import Any

import yaml

_SELECTOR = re.compile(r"\b(dsm_[a-z_]+)\{")


@functools.cache
def _rule_groups() -> list[dict[str, Any]]:
    text = resources.files(__package__).joinpath("prometheus-rules.yaml").read_text()
    groups: list[dict[str, Any]] = yaml.safe_load(text)["groups"]
    return groups


def _matchers(labels: Mapping[str, str]) -> str:
    # json.dumps quotes and escapes a string the way PromQL's double-quoted strings expect
    return ",".join(f"{key}={json.dumps(value)}" for key, value in sorted(labels.items()))


def narrow(expr: str, nodes: Mapping[str, str], operator: Mapping[str, str]) -> str:
    """``expr`` with ``nodes`` matchers added to every ``dsm_*{`` selector and ``operator``
    matchers to every ``dsm_operator_*{`` selector."""

    def add(m: re.Match[str]) -> str:
        metric = m.group(1)
        extra = _matchers(operator if metric.startswith("dsm_operator_") else nodes)
        closes = expr[m.end() : m.end() + 1] == "}"
        return f"{metric}{{{extra}{'' if closes else ','}"

    return _SELECTOR.sub(add, expr)


def rule_groups(namespace: str, service: str, name: str) -> list[dict[str, Any]]:
    """The rule groups for the resource ``namespace/name`` whose nodes are scraped through
    ``service``."""
    groups = copy.deepcopy(_rule_groups())
    nodes = {"namespace": namespace, "service": service}
    operator = {"namespace": namespace, "name": name}
    for group in groups:
        group["name"] = f"{group['name']}.{namespace}.{name}"
        for rule in group["rules"]:
            rule["expr"] = narrow(rule["expr"], nodes, operator)
    return groups
