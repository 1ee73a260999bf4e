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


def test_load_balancer_waits_for_both_addresses_then_is_written_once() -> None:
    lb = spec(agentConnection="loadBalancer")
    assert agents.change(lb, None, {"mode": "nodeList"}) is None
    # the console's Service has an address, the heartbeat channel's not yet: nothing written
    assert agents.change(lb, "203.0.113.7", {"mode": "nodeList"}) is None
    change = agents.change(lb, "203.0.113.7", {"mode": "nodeList"}, "203.0.113.9")
    assert change is not None
    assert change.values["managerAddress"] == "203.0.113.7"
    assert change.values["relayAddress"] == "203.0.113.7"
    assert change.values["heartbeatAddress"] == "203.0.113.9"
    assert change.values["heartbeatPort"] == 443
    assert "203.0.113.7:443" in change.message and "203.0.113.9:443" in change.message
    assert agents.change(lb, "203.0.113.7", change.record, "203.0.113.9") is None


def test_a_new_address_or_mode_is_written_again() -> None:
    lb = spec(agentConnection="loadBalancer")
    change = agents.change(lb, "203.0.113.7", None, "203.0.113.9")
    assert change is not None
    assert agents.change(lb, "203.0.113.8", change.record, "203.0.113.9") is not None
    assert agents.change(lb, "203.0.113.7", change.record, "203.0.113.10") is not None
    assert agents.change(spec(), None, change.record) is not None
