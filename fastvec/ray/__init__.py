"""RayVectorEnv: fastvec's vector env spread over the nodes of a Ray cluster.

    driver: RayVectorEnv.step(actions)                      node j: one Ray actor (_NodeHost)
      validate, slice by actor ──▶ actor.step.remote(a_j) ──▶ FastVectorEnv (its k_j envs,
                                                               shared-memory rings, watchdog)
      ray.wait(all, deadline) ◀── one object per actor and step: (obs, rew, term, trunc, infos)
      (compiled: actor j's graph, execute / read with the same deadline; first-ready
       batches read each graph on a helper thread)
      concatenate the actors' parts (zero-copy reads of the object store, one copy into the batch)

Only batches cross the network; the rings and the watchdog that respawns a failed worker
stay inside the node. The driver watches the actors and keeps a copy of the nodes' episode
logs: one that is lost (its node crashed, its process was killed, it did not answer within
``actor_timeout``) is replaced (on another node if the node was lost), the replacement
replays its envs' episodes from the driver's log and takes the lost step again, which
returns its real results with ``infos["worker_resumed"]``; where that fails (or with
``resume="off"``) the step returns its envs truncated, reward 0, the last observation, with
``infos["worker_restarted"]`` and a reason (``"node_lost"``, ``"actor_died"``, ``"oom"``,
``"unresponsive"``), and the replacement resets them with derived seeds. Every
``ray.get`` / ``ray.wait`` has a deadline.

One module per idea:

    driver.py     RayVectorEnv: the contract of fastvec/contract.py over the actors
    options.py    its keywords, checked once: the driver's, each node's, Ray's
    host.py       _NodeHost, the actor on a node: one FastVectorEnv
    actors.py     the slots (a range of envs each) and starting / stopping their actors
    placement.py  where an actor goes, and off which lost nodes
    calls.py      deadlines on every request to an actor; Ray's errors sorted
    compiled.py   steps over Ray's Compiled Graphs, one per actor; torn down when one is lost
    failover.py   lost actors: replaced within a budget, their envs flagged in the batch
    resume.py     the driver's copy of the episode logs; a lost actor's state for its replacement
    nested.py     batched structures: slicing, joining, merging infos

Importing :mod:`fastvec` never imports this package (nor Ray); import ``fastvec.ray``.
"""

from fastvec.ray.driver import RayVectorEnv

__all__ = ["RayVectorEnv"]
