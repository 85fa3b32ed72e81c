"""The observation side of the ring: what ``reset``, ``step`` and ``recv`` hand back.

Each env's latest observation sits in one ring slot, its fixed-size leaves in the main
segment (``views.obs[k][ring, env]``) and its leaves without a fixed size, pickled by
the worker, in :attr:`ObservationRing.pickled` (``[ring][env]``: the tuple of those
leaves). A lockstep call returns one slot as a batch: a view of shared memory or one copy
(``copy=True``), through the compiled ``_parent.Results`` where the space has one fixed
leaf; first-ready batches gather rows from several slots (``_raster.gather_rows``).
"""

from __future__ import annotations

import numpy as np
from gymnasium.vector.utils import concatenate, create_empty_array

from fastvec import _parent, _raster
from fastvec.layout import Plan, Views, unflatten


class ObservationRing:
    def __init__(self, plan: Plan, views: Views, single_space, num_envs: int, depth: int,
                 copy: bool):
        self.plan, self.views, self.space = plan, views, single_space
        self.num_envs, self.depth, self.copy = num_envs, depth, copy
        self.pickled = [[None] * num_envs for _ in range(depth)]  # leaves without a size
        single_leaf = len(plan.obs_leaves) == 1 and plan.obs_leaves[0].path == ()
        self.single_leaf = single_leaf and not plan.pickled_obs
        #: step_wait's common return, compiled (one fixed observation leaf only)
        self.results = (_parent.Results(views.obs[0], views.reward, views.terminated,
                                        views.truncated, copy)
                        if self.single_leaf else None)

    def release(self) -> None:
        """Drop every view of the main segment, so that its mmap can be closed."""
        self.views = self.results = None

    def batch(self, r: int):
        """Every env's observation of ring slot ``r``, batched."""
        if self.plan.pickled_obs:
            return self.gather([r] * self.num_envs, range(self.num_envs))
        if self.single_leaf:
            region = self.views.obs[0]
            return np.array(region[r]) if self.copy else region[r]
        return unflatten(self.space, [np.array(region[r]) if self.copy else region[r]
                                      for region in self.views.obs])

    def gather(self, rings, ids):
        """The batch of envs ``ids`` whose rows sit in ring slots ``rings`` (lockstep: all
        in one slot, a view or a copy; first-ready: gathered rows)."""
        ids = list(ids)
        out = []
        one_slot = len(set(rings)) <= 1 and ids == list(range(self.num_envs))
        for k, (leaf, region) in enumerate(zip(self.plan.obs_leaves, self.views.obs)):
            if region is None:  # no fixed size: batched as gymnasium batches it
                pk = self.plan.pickled_obs.index(k)
                items = [self.pickled[r][i][pk] for r, i in zip(rings, ids)]
                out.append(concatenate(leaf.space, items, create_empty_array(leaf.space, len(ids))))
            elif one_slot:
                out.append(np.array(region[rings[0]]) if self.copy else region[rings[0]])
            else:
                rows = np.asarray(rings, np.int64) * self.num_envs + np.asarray(ids, np.int64)
                flat_rows = region.reshape(self.depth * self.num_envs, *region.shape[2:])
                gathered = np.empty((len(ids), *region.shape[2:]), region.dtype)
                _raster.gather_rows(gathered, flat_rows, rows)
                out.append(gathered)
        return unflatten(self.space, out)

    def row(self, r: int, i: int):
        """Env ``i``'s observation of ring slot ``r``, a copy (a final observation)."""
        leaves = []
        for k, region in enumerate(self.views.obs):
            if region is None:
                leaves.append(self.pickled[r][i][self.plan.pickled_obs.index(k)])
            else:
                leaves.append(np.array(region[r, i]))
        return unflatten(self.space, leaves)

    def carry(self, env_ids, r: int, env_ring: np.ndarray) -> None:
        """Copy the latest observation rows of ``env_ids`` (in slots ``env_ring[i]``)
        into ring slot ``r``."""
        for i in env_ids:
            prev = env_ring[i]
            if prev != r:
                for region in self.views.obs:
                    if region is not None:
                        region[r, i] = region[prev, i]
                self.pickled[r][i] = self.pickled[prev][i]
