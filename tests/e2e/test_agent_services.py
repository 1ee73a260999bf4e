"""End to end: the heartbeat channel's own LoadBalancer Service (TCP 443 -> 4120, passthrough)
beside the console's (443 -> 4119), and the operator writing both published addresses into the
cluster settings. The test plays the cloud's load-balancer controller: it assigns the two
Services their addresses (status.loadBalancer.ingress) as a cloud would; the addresses are from
TEST-NET-3 and nothing dials them."""

from __future__ import annotations

import json

import pytest

from tests.k8s.kubelet import MiniKubelet
from tests.support.e2e import Manager
from tests.support.nodes import query
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CONSOLE_IP = "203.0.113.10"
AGENTS_IP = "203.0.113.11"


def test_agents_get_their_own_passthrough_service_and_both_addresses_reach_the_settings(
    manager: Manager, kubelet: MiniKubelet
) -> None:
    manager.extra_spec = {"agentConnection": "loadBalancer"}
    manager.apply(nodes=1, version="0.1.0")
    wait_until(
        lambda: manager.all_online(1, "0.1.0"),
        300,
        "1 node Online",
        lambda: f"status: {manager.status()}\n",
    )
    services = f"/api/v1/namespaces/{manager.namespace}/services"
    console = manager.api.get(f"{services}/mgr-lb")
    agents = manager.api.get(f"{services}/mgr-agents")
    assert console is not None and agents is not None
    for svc, target in ((console, "https"), (agents, "heartbeat")):
        spec = svc["spec"]
        assert spec["type"] == "LoadBalancer"
        assert spec["sessionAffinity"] == "None"
        # plain TCP on the published port straight to the node's TLS port: passthrough
        assert [(p["port"], p["targetPort"], p["protocol"]) for p in spec["ports"]] == [
            (443, target, "TCP")
        ]
    # the target ports resolve to the nodes' 4119 and 4120
    sts = manager.api.get(f"/apis/apps/v1/namespaces/{manager.namespace}/statefulsets/mgr")
    assert sts is not None
    ports = {
        p["name"]: p["containerPort"]
        for c in sts["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert ports["https"] == 4119 and ports["heartbeat"] == 4120
    # no addresses yet: nothing is written for agents
    assert (
        "agentSettings" not in manager.status()
        or manager.status()["agentSettings"].get("mode") != "loadBalancer"
    )
    for name, ip in (("mgr-lb", CONSOLE_IP), ("mgr-agents", AGENTS_IP)):
        manager.api.merge_patch(
            f"{services}/{name}/status", {"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}
        )

    def written() -> dict[str, object] | None:
        rows = dict(query(manager.database_url, "SELECT key, value FROM settings"))
        wanted = {
            "manager_address": CONSOLE_IP,
            "manager_port": 443,
            "heartbeat_address": AGENTS_IP,
            "heartbeat_port": 443,
            "relay_address": CONSOLE_IP,
        }
        got = {k: rows.get(k) for k in wanted}
        return got if got == wanted else None

    wait_until(
        written, 300, "both addresses in the cluster settings", lambda: json.dumps(manager.status())
    )
    # The operator writes its status after the settings it reports: wait for it too.
    status = wait_until(
        lambda: (
            (s := manager.status()).get("agentSettings", {}).get("heartbeatAddress") == AGENTS_IP
            and s
        ),
        60,
        "the agents' address in the status",
        lambda: json.dumps(manager.status()),
    )
    assert status["loadBalancerAddress"] == CONSOLE_IP
    assert status["agentLoadBalancerAddress"] == AGENTS_IP
    assert status["agentSettings"]["heartbeatAddress"] == AGENTS_IP
