"""When the operator writes the agent connection settings to the managers (``reconcile/agents``)."""

from __future__ import annotations

from typing import Any

from dsm_operator.reconcile import agents
from dsm_operator.reconcile.specs import ManagerSpec


def spec(**kw: Any) -> ManagerSpec:
    return ManagerSpec.parse(
        {
            "version": "1.0.0",
            "database": {"secretRef": {"name": "db"}},
            "masterKey": {"localSecretRef": {"name": "mk"}},
            **kw,
        }
    )


def test_node_list_is_written_once() -> None:
    first = agents.change(spec(), None, None)
    assert first is not None
    assert set(first.values.values()) == {None}  # every override cleared
    assert first.record == {"mode": "nodeList"}
    assert agents.change(spec(), None, first.record) is None


def test_load_balancer_waits_for_an_address_then_is_written_once() -> None:
    lb = spec(agentConnection="loadBalancer")
    assert agents.change(lb, None, {"mode": "nodeList"}) is None
    change = agents.change(lb, "203.0.113.7", {"mode": "nodeList"})
    assert change is not None
    assert change.values["managerAddress"] == "203.0.113.7"
    assert change.values["heartbeatPort"] == 443
    assert "203.0.113.7:443" in change.message
    assert agents.change(lb, "203.0.113.7", change.record) is None


def test_a_new_address_or_mode_is_written_again() -> None:
    lb = spec(agentConnection="loadBalancer")
    change = agents.change(lb, "203.0.113.7", None)
    assert change is not None
    assert agents.change(lb, "203.0.113.8", change.record) is not None
    assert agents.change(spec(), None, change.record) is not None
