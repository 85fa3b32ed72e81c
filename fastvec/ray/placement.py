"""Where the actors go: the envs split among actors, each actor's pin (a node id it
prefers, or custom resources it needs), and the Ray options that keep a replacement off
the nodes that were lost (on the least loaded live node that offers its pin).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Mapping, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fastvec.errors import FastVecError

log = logging.getLogger("fastvec.ray")

# Bound on listing the cluster's nodes: Ray's query (ray.nodes(), Ray 2.60) waits for the
# GCS's answer without a deadline, and was seen waiting for good on a loaded machine.
NODES_TIMEOUT_S = 30.0


def alive_nodes(timeout: float | None = None) -> list[dict]:
    """The alive entries of ``ray.nodes()``, waited for at most ``timeout`` seconds
    (default ``NODES_TIMEOUT_S``) on a helper thread; FastVecError past it."""
    timeout = NODES_TIMEOUT_S if timeout is None else timeout
    box: dict = {}

    def query() -> None:
        try:
            box["nodes"] = ray.nodes()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=query, daemon=True, name="fastvec-ray-nodes")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise FastVecError(f"Ray did not list its nodes within {timeout:g} s (ray.nodes() "
                           "waits for the cluster's GCS without a deadline): check that "
                           "the head node is up and answers (`ray status`), then try again")
    if "error" in box:
        raise box["error"]
    return [nd for nd in box["nodes"] if nd.get("Alive")]


def initial_pins(num_envs: int, envs_per_actor: int | None,
                 placement: Sequence[str | Mapping[str, float]] | None) -> list:
    """One pin per actor: ``placement`` checked, or the alive nodes round-robin."""
    if envs_per_actor is not None and envs_per_actor < 1:
        raise ValueError(f"envs_per_actor must be >= 1, got {envs_per_actor}")
    if placement is not None:
        pins = [p if isinstance(p, str) else dict(p) for p in placement]
        actors = -(-num_envs // envs_per_actor) if envs_per_actor else len(pins)
        if not pins or len(pins) != actors or actors > num_envs:
            raise ValueError(f"placement has {len(pins)} entries for {actors} actors "
                             f"({num_envs} envs)")
        return pins
    nodes = [nd["NodeID"] for nd in alive_nodes()]
    if not nodes:
        raise FastVecError("the Ray cluster has no alive node")
    if envs_per_actor is None:
        return nodes[:num_envs]
    return [nodes[j % len(nodes)] for j in range(-(-num_envs // envs_per_actor))]


def actor_sizes(num_envs: int, envs_per_actor: int | None, pins: int) -> list[int]:
    """Envs per actor, in order: ``envs_per_actor`` each (the last one the rest), else
    ``num_envs`` split evenly over one actor per pin."""
    if envs_per_actor:
        return [min(envs_per_actor, num_envs - lo) for lo in range(0, num_envs, envs_per_actor)]
    return [num_envs // pins + (j < num_envs % pins) for j in range(pins)]


def actor_options(base: dict, pin: str | dict, avoid: set[str],
                  elsewhere: list[str | None]) -> dict:
    """Ray options for an actor pinned to ``pin`` that keep it off the nodes in ``avoid``;
    ``elsewhere`` lists the nodes of the other actors (the load of each node)."""
    opts = dict(base)
    nodes: list[dict] = []
    if avoid:
        try:
            nodes = alive_nodes()
        except FastVecError as exc:  # a replacement must still start: without the avoidance
            log.warning("%s; placing the replacement without avoiding the lost nodes", exc)
            avoid = set()
    if not avoid:
        if isinstance(pin, dict):
            opts["resources"] = {**opts.get("resources", {}), **pin}
        else:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin, soft=True)
        return opts
    usable = [nd for nd in nodes if nd["NodeID"] not in avoid] or nodes
    load = collections.Counter(elsewhere)
    if isinstance(pin, dict):
        offer = [nd for nd in usable
                 if all(nd.get("Resources", {}).get(k, 0) >= v for k, v in pin.items())]
        if offer:
            target = min(offer, key=lambda nd: load[nd["NodeID"]])["NodeID"]
            opts["resources"] = {**opts.get("resources", {}), **pin}
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target, soft=False)
            return opts
    elif pin not in avoid and any(nd["NodeID"] == pin for nd in usable):
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin, soft=True)
        return opts
    # The pinned node is gone and no other node offers the pin: the least loaded node.
    target = min(usable, key=lambda nd: load[nd["NodeID"]])["NodeID"] if usable else None
    if target is not None:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target, soft=True)
    return opts
