"""The parent's side of actions: check them, write them into their shared-memory rows (or
the side buffer, for leaves without a fixed size), and keep each env's last four for the
failure log. The compiled path (fastvec/_parent.pyx ``ActionWriter``) does the same in one
call for a space with one fixed leaf."""

from __future__ import annotations

import numpy as np

from fastvec import _parent
from fastvec.errors import InvalidActionError, SpaceMismatchError
from fastvec.layout import Plan, Views, check_actions, flatten, split_pickled
from fastvec.shm import put_pickle

HISTORY = 4  # actions kept per env for the failure log


class Actions:
    """Batches of actions on their way to the workers."""

    def __init__(self, plan: Plan, views: Views, single_space, num_envs: int, validate: bool,
                 max_payload_bytes: int):
        self.plan, self.views, self.space = plan, views, single_space
        self.num_envs, self.validate, self.max_payload_bytes = num_envs, validate, max_payload_bytes
        #: per fixed leaf, its last HISTORY batches (row ``step % HISTORY``)
        self.history = [np.zeros((HISTORY, *a.shape), a.dtype) for a in views.act
                        if a is not None]
        self.pickled: dict[int, dict] = {}  # env -> {leaf index: value} of the latest batch

    def release(self) -> None:
        """Drop every view of the main segment, so that its mmap can be closed."""
        self.views = None

    def compiled(self) -> _parent.ActionWriter | None:
        """The compiled action check and copy, for a space with one fixed leaf whose
        bounds it can check (see fastvec/_parent.pyx); None: the Python path."""
        leaves = self.plan.act_leaves
        if len(leaves) != 1 or leaves[0].pickled or leaves[0].path != ():
            return None
        if self.validate and _parent.bounds(leaves[0].space, leaves[0].dtype) is None:
            return None
        return _parent.ActionWriter(leaves[0], self.views.act[0], self.history[0], self.validate)

    def write(self, actions, ids: np.ndarray, step: int) -> None:
        """Check the actions of envs ``ids`` and write their fixed leaves into their
        shared-memory rows (and the history, at ``step``). Leaves without a fixed size, and
        arrays whose dtype is not the space's (gymnasium hands the env the caller's element
        type: ``np.float64`` where the space says float32), also travel per env through
        :meth:`put_pickled`."""
        flat = self._flat(actions, len(ids))
        h = step % HISTORY
        hist = iter(self.history)
        self.pickled = {}
        for k, (leaf, view, arr) in enumerate(zip(self.plan.act_leaves, self.views.act, flat)):
            if view is None or arr.dtype != leaf.dtype:
                for i, item in zip(ids, arr):
                    self.pickled.setdefault(int(i), {})[k] = item
            if view is None:
                continue
            if len(ids) == self.num_envs:
                np.copyto(view, arr, casting="unsafe")
                next(hist)[h] = view
            else:
                view[ids] = arr
                next(hist)[h][ids] = view[ids]

    def _flat(self, actions, n: int) -> list:
        try:
            flat = flatten(self.space, actions)
        except SpaceMismatchError as exc:
            raise InvalidActionError(f"actions do not have the structure of "
                                     f"{self.space} (batched): {exc}") from None
        if self.validate:
            return check_actions(self.plan.act_leaves, flat, n)
        return [split_pickled(leaf.space, a) if leaf.pickled else np.asarray(a)
                for leaf, a in zip(self.plan.act_leaves, flat)]

    def put_pickled(self, slot) -> int:
        """A step request's side-buffer part, per env: {leaf index: value} of the leaves
        that do not travel through shared memory (nothing at all in the common case)."""
        if not self.pickled:
            return 0
        payload = [self.pickled.get(i) for i in slot.env_indices]
        return put_pickle(slot.payload, payload, self.max_payload_bytes)

    def recent(self, env_indices, steps: int) -> dict:
        """{env index: its last (up to HISTORY) actions, oldest first} after ``steps``
        batches; one list of leaves per action."""
        n = min(HISTORY, steps)
        return {i: [[h[(steps - n + t) % HISTORY][i].tolist() for h in self.history]
                    for t in range(n)] for i in env_indices}
