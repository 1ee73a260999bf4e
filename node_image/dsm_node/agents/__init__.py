"""Agents: activation, the heartbeat channel on its own port, and the agent itself.

Node side: ``pki`` (the cluster's agent CA, certificates), ``store`` (every agent statement),
``committing`` (group commit of heartbeats), ``channel`` (the mutual-TLS listener on the heartbeat
port, on a thread of its own), ``managers`` (the manager list agents are given), ``watching``
(periodic jobs: offline agents, clock skew, pruning). The administration API is
``dsm_node.api.agents``; the ``dsm agent``/``dsm agents`` commands are ``dsm_node.cli_agents``.
Agent side: ``agent`` (one agent's behaviour, shared by ``dsm agent run`` and the simulator),
``running`` and ``simulating``. ``protocol`` is the wire format both sides share; the contract is
``docs/agent-protocol.md``.
"""
