"""The child side: one process hosting ``k`` envs, answering requests through its ring slot.

Loop: wait on the request semaphore, read the control block (csrc/ring.h), run the
handler for the opcode, write results into the ring slot the request names, complete
the block with the request's sequence number, post the shared done semaphore. Nothing is
pickled on the step path unless an env returns an info that typed columns do not cover
(fastvec/infos.py).

Start-up only builds the envs and checks their spaces; any reset, including the one that
replays a reset a failed predecessor could not finish, is an ordinary RESET request, so a
reset that raises is reported like any other reply. SIGUSR1 retires the worker (planned
recycling): it stops beating for the slot, closes its envs and exits, while its successor
already starts in the same control block.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from gymnasium.vector import AutoresetMode

from fastvec import _ring
from fastvec._stepper import InfoWriter, StepKernel, serve
from gymnasium.spaces.utils import is_space_dtype_shape_equiv

from fastvec.errors import (EnvSpacesError, PayloadTooLargeError, SpaceMismatchError,
                            UnpicklableInfoError)
from fastvec.layout import Plan, flatten, unflatten, write_leaf
from fastvec.replay import Snapshot, Start, rng_state, run_plan
from fastvec.shm import Segment, get_pickle, put_pickle

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent once at start (pickled by multiprocessing)."""

    worker_index: int
    env_indices: tuple
    env_fns: list  # CloudpickleWrapper around each env_fn
    plan: Plan
    main_name: str
    payload_name: str
    req_sem_name: str
    done_sem_name: str
    autoreset_mode: str
    owner_pid: int
    generation: int
    start_seq: int
    heartbeat_ms: int
    max_payload_bytes: int
    single_spaces: tuple  # (observation_space, action_space) the parent batched
    observation_mode: str = "same"  # "same": spaces equal env 0's; else same shape and dtype
    spin_ns: int = 0  # spin this long for the next request before blocking (Options.spin_ns)
    # Seeds for the next reset of each env (a replacement's derived seeds), or None. Under
    # NEXT_STEP the first step is that reset (the predecessor's episode ended truncated).
    pending_seeds: tuple | None = None
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits: ask for it only when the
    # main thread forks; the heartbeat thread's owner check covers every other case.
    parent_death_signal: bool = True
    # Report how each episode began (seed, or the RNG state before an unseeded reset) in
    # the reply of the request that reset the env: the parent's episode log (resume).
    report_starts: bool = False
    # Every this many steps of an episode, envs that offer get_state()/set_state() send a
    # snapshot with the reply (None: never), so that a replay starts from the last one.
    snapshot_every: int | None = None


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.mode = AutoresetMode(spec.autoreset_mode)
        self.main = Segment(spec.main_name)
        self.payload = Segment(spec.payload_name)
        self.ctl = _ring.Ctl(self.main.mm, spec.worker_index * _ring.CTL_SIZE)
        self.ctl.check()
        self.batch = _ring.Batch(self.main.mm, spec.plan.batch_offset)
        self.req_sem = _ring.SemHandle(spec.req_sem_name)
        self.done_sem = _ring.SemHandle(spec.done_sem_name)
        self.views = spec.plan.views(self.main.mm)
        self.obs_leaves = spec.plan.obs_leaves
        self.act_leaves = spec.plan.act_leaves
        self.obs_space, self.act_space = spec.single_spaces
        self.envs: list = []
        k = len(spec.env_indices)
        self.autoreset = [False] * k
        self.pending_seed: list[Any] = [None] * k
        # per env, [Start of an episode begun, Snapshot taken] for this request's reply
        self.notes: list | None = None
        self.snapshot_every = spec.snapshot_every or 0
        self.episode_steps = [0] * k  # steps of each env's episode (for snapshots)
        self.snapshottable = [False] * k
        self.handlers: dict[int, Callable[[int, int], int]] = {
            _ring.OP_RESET: self.on_reset,
            _ring.OP_STEP: self.on_step,
            _ring.OP_CALL: self.on_call,
            _ring.OP_SET_ATTR: self.on_set_attr,
            _ring.OP_CLOSE: self.on_close,
            _ring.OP_REPLAY: self.on_replay,
        }
        self.info_writer = InfoWriter(self.views)
        self.kernel = (StepKernel(self, self.views, self.obs_leaves, self.act_leaves,
                                  self.obs_space, self.act_space, self.info_writer)
                       if StepKernel.supports(self.obs_leaves, self.act_leaves, self.views)
                       else None)

    # -- start-up --------------------------------------------------------------
    def start(self, built: list | None = None) -> None:
        """Build the envs (a spare brings ``built``, made by the same env function: those
        are used first, any beyond the slot's envs closed), check their spaces, take the
        pending seeds."""
        fns = self.spec.env_fns
        built = list(built or ())
        for env in built[len(fns):]:
            env.close()
        self.envs = built[:len(fns)]
        self.envs += [fn() for fn in fns[len(self.envs):]]
        same = self.spec.observation_mode == "same"
        for j, env in enumerate(self.envs):
            i = self.spec.env_indices[j]
            if same and env.observation_space != self.obs_space:
                raise EnvSpacesError(
                    f"FastVectorEnv(..., observation_mode='same') however some of the "
                    f"sub-environments observation spaces are not equivalent: env {i} has "
                    f"{env.observation_space}, env 0 {self.obs_space}. If this is intentional, "
                    "use `observation_mode='different'` instead.")
            if not same and not is_space_dtype_shape_equiv(env.observation_space, self.obs_space):
                raise EnvSpacesError(
                    f"FastVectorEnv(..., observation_mode='different' or custom space) however "
                    f"the sub-environment's observation spaces do not share a common shape and "
                    f"dtype: env {i} has {env.observation_space}, the vector env expects "
                    f"{self.obs_space}.")
            if env.action_space != self.act_space:
                raise EnvSpacesError(
                    f"Some environments have an action space different from `{self.act_space}`: "
                    f"env {i} has {env.action_space}. In order to batch actions, the action "
                    "spaces from all environments must be equal.")
        self.snapshottable = [callable(getattr(env, "get_state", None))
                              and callable(getattr(env, "set_state", None))
                              for env in self.envs]
        if self.spec.pending_seeds is not None:
            for j, seed in enumerate(self.spec.pending_seeds):
                self.pending_seed[j] = seed
                self.autoreset[j] = self.mode == AutoresetMode.NEXT_STEP

    # -- handlers: each returns the number of reply payload bytes ----------------
    def on_reset(self, ring: int, mask: int) -> int:
        seeds, options = get_pickle(self.payload, self.ctl.req_payload_len)
        infos: list = [None] * len(self.envs)
        pobs: list = [None] * len(self.envs)
        for j in range(len(self.envs)):
            if mask >> j & 1:
                infos[j], pobs[j] = self._reset_one(j, ring, seeds[j], options[j])
            else:  # not reset: nothing of an earlier reply in this ring slot may show
                self.info_writer.write(ring, self.spec.env_indices[j], None)
        return self._put_reply(infos, pobs)

    def on_step(self, ring: int, mask: int) -> int:
        n = self.ctl.req_payload_len
        k = len(self.envs)
        if self.kernel is not None and not n and mask == (1 << k) - 1:  # fastvec/_stepper.pyx
            infos = self.kernel.step(ring)
            if infos is None and self.notes is None:
                return 0
            return self._put_reply(infos or [None] * k, [None] * k)
        v = self.views
        infos: list = [None] * len(self.envs)
        pobs: list = [None] * len(self.envs)
        pacts = get_pickle(self.payload, n) if n else None  # per env {leaf: value} or None
        for j, env in enumerate(self.envs):
            if not mask >> j & 1:
                continue  # a re-sent step after a replay: only the envs it resumed
            i = self.spec.env_indices[j]
            if self.autoreset[j]:  # NEXT_STEP: this step is the reset
                obs, info = self.reset_env(j, None)
                reward, terminated, truncated = 0.0, False, False
                self.autoreset[j] = False
            else:
                if pacts is None or pacts[j] is None:
                    action = unflatten(self.act_space, [a[i].copy() for a in v.act])
                else:
                    pa = pacts[j]
                    action = unflatten(self.act_space, [pa[k] if k in pa else a[i].copy()
                                                        for k, a in enumerate(v.act)])
                obs, reward, terminated, truncated, info = env.step(action)
                if self.snapshot_every:
                    self.stepped(j)
                if terminated or truncated:
                    self.episode_ended()
                    if self.mode == AutoresetMode.NEXT_STEP:
                        self.autoreset[j] = True
                    elif self.mode == AutoresetMode.SAME_STEP:
                        final_obs, final_info = obs, info
                        obs, reset_info = self.reset_env(j, None)
                        info = {"final_obs": final_obs, "final_info": final_info, **reset_info}
            pobs[j] = self.write_obs(i, ring, obs)
            v.reward[ring, i] = reward
            v.terminated[ring, i] = terminated
            v.truncated[ring, i] = truncated
            infos[j] = self.info_writer.write(ring, i, info)
        return self._put_reply(infos, pobs)

    def on_call(self, ring: int, mask: int) -> int:
        name, args, kwargs = get_pickle(self.payload, self.ctl.req_payload_len)
        results = []
        for env in self.envs:
            attr = env.get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return put_pickle(self.payload, results, self.spec.max_payload_bytes)

    def on_set_attr(self, ring: int, mask: int) -> int:
        name, values = get_pickle(self.payload, self.ctl.req_payload_len)
        for env, value in zip(self.envs, values):
            env.set_wrapper_attr(name, value)
        return 0

    def on_replay(self, ring: int, mask: int) -> int:
        """Rebuild the envs' episodes from the parent's log, each checked (fastvec/replay.py);
        the last observation of each goes to ring slot ``ring``."""
        plans, budget = get_pickle(self.payload, self.ctl.req_payload_len)
        deadline = time.monotonic() + (math.inf if budget is None else budget)
        out = [run_plan(self, j, ring, plan, deadline) for j, plan in enumerate(plans)]
        return put_pickle(self.payload, out, self.spec.max_payload_bytes)

    def on_close(self, ring: int, mask: int) -> int:
        envs, self.envs = self.envs, []
        for env in envs:
            env.close()
        return 0

    def retire(self, signum=None, frame=None) -> None:
        """SIGUSR1: the slot has a successor already. Touch nothing of it; close and exit."""
        _ring.stop_heartbeat()
        for env in self.envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(0)

    # -- helpers -----------------------------------------------------------------
    def episode_ended(self) -> None:
        self.ctl.episodes = self.ctl.episodes + 1
        self.ctl.rss_bytes = _rss_bytes()

    def _take_seed(self, j: int, seed):
        if seed is None and self.pending_seed[j] is not None:
            seed = self.pending_seed[j]
        self.pending_seed[j] = None
        return seed

    def reset_env(self, j: int, seed, options=None, *, user: bool = False) -> tuple:
        """Reset env ``j`` (a pending seed of a replacement stands in for None) and, with
        ``report_starts``, note how its episode began for this request's reply. An
        autoreset passes no options, as SyncVectorEnv's does."""
        env = self.envs[j]
        pending = self.pending_seed[j]
        seed = self._take_seed(j, seed)
        rng = None if seed is not None or not self.spec.report_starts else rng_state(env)
        try:
            out = env.reset(seed=seed, options=options) if user else env.reset(seed=seed)
        except BaseException:
            self.pending_seed[j] = pending  # a reset that raised began no episode
            raise
        self.episode_steps[j] = 0
        if self.spec.report_starts:
            self._note(j)[:] = [Start(seed, rng, options), None]  # a snapshot before: moot
        return out

    def _note(self, j: int) -> list:
        if self.notes is None:
            self.notes = [None] * len(self.envs)
        if self.notes[j] is None:
            self.notes[j] = [None, None]
        return self.notes[j]

    def stepped(self, j: int) -> None:
        """Env ``j`` took a step of its episode: every ``snapshot_every`` steps, a
        snapshot of it (get_state() and its RNG state) goes with the reply."""
        n = self.episode_steps[j] = self.episode_steps[j] + 1
        if self.snapshottable[j] and n % self.snapshot_every == 0:
            env = self.envs[j]
            self._note(j)[1] = Snapshot(n, env.get_state(), rng_state(env))

    def start_fresh(self, j: int, seed) -> None:
        """A replay could not resume env ``j``: its next reset starts a new episode with
        ``seed``; under NEXT_STEP and SAME_STEP that reset is its next step."""
        self.pending_seed[j] = seed
        self.autoreset[j] = self.mode != AutoresetMode.DISABLED

    def episode_over(self, j: int) -> None:
        """A replay ended on the episode's last step: NEXT_STEP resets at the next step."""
        self.autoreset[j] = self.mode == AutoresetMode.NEXT_STEP

    def logged_action(self, leaves: list, pickled: dict | None, t: int):
        """Step ``t``'s action of a replayed episode, as the env received it then."""
        values = [pickled[k] if pickled and k in pickled else leaf[t].copy()
                  for k, leaf in enumerate(leaves)]
        return unflatten(self.act_space, values)

    def _reset_one(self, j: int, ring: int, seed, options) -> tuple:
        i = self.spec.env_indices[j]
        obs, info = self.reset_env(j, seed, options, user=True)
        self.autoreset[j] = False
        return self.info_writer.write(ring, i, info), self.write_obs(i, ring, obs)

    def write_obs(self, i: int, ring: int, obs) -> list | None:
        """Write env i's observation into ring slot ``ring``; returns the values of its
        pickled leaves (None without any), which travel in the reply."""
        pickled = None
        try:
            for leaf, region, value in zip(self.obs_leaves, self.views.obs,
                                           flatten(self.obs_space, obs)):
                if region is None:
                    pickled = [] if pickled is None else pickled
                    pickled.append(value)
                else:
                    write_leaf(region[ring, i, ...], leaf, value)  # `...`: a view even for 0-d
        except SpaceMismatchError as exc:
            raise SpaceMismatchError(f"env {i} returned an observation that does not fit "
                                     f"{self.obs_space}: {exc}") from None
        return pickled

    def _put_reply(self, infos: list, pobs: list) -> int:
        """The reply's side-buffer part: ``(infos, pickled observation leaves, notes)`` per
        env (notes: [the Start of an episode begun, a Snapshot] or None), or nothing at all
        (0 bytes) when every env's info is empty, no leaf is pickled and nothing is noted."""
        notes, self.notes = self.notes, None
        if not any(infos) and not any(p is not None for p in pobs) and notes is None:
            return 0
        try:
            return put_pickle(self.payload, (infos, pobs, notes), self.spec.max_payload_bytes)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            bad = [self.spec.env_indices[j] for j, info in enumerate(infos) if info
                   and not _picklable(info)]
            raise UnpicklableInfoError(
                f"env {bad[0] if bad else self.spec.env_indices[0]} returned an info dict that "
                f"cannot be pickled ({type(exc).__name__}: {exc}); infos cross a process "
                "boundary: return plain values (numbers, strings, arrays)") from None

    # -- the loop ----------------------------------------------------------------
    def post_done(self, counted: int, epoch: int = 0) -> None:
        """Wake the parent, unless this reply is part of a batch that still owes others."""
        if not counted or self.batch.leave(epoch):
            self.done_sem.post()

    def reply_error(self, seq: int, exc: BaseException, counted: int = 0, epoch: int = 0) -> None:
        # Data that does not fit (a space, the payload limit, an info that cannot be
        # pickled) is the caller's to fix: the parent raises it and keeps this worker.
        # Anything else is a failure of the env.
        usage = isinstance(exc, (SpaceMismatchError, PayloadTooLargeError, UnpicklableInfoError))
        status = _ring.ST_MISMATCH if usage else _ring.ST_ERROR
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            pickle.loads(pickle.dumps(exc))  # some exceptions pickle but cannot be rebuilt
            n = put_pickle(self.payload, (exc, tb), self.spec.max_payload_bytes)
        except Exception:  # send the text instead
            n = put_pickle(self.payload, (None, f"{tb}\n({type(exc).__qualname__}: {exc})"),
                           self.spec.max_payload_bytes)
        self.ctl.complete(seq, status, n)
        self.post_done(counted, epoch)

    def handle(self, seq: int, in_process: bool = False) -> int:
        """Answer request ``seq``; returns its opcode. In process (context="serial") an
        interrupt (KeyboardInterrupt, SystemExit) is answered as an error and re-raised,
        so Ctrl-C reaches the caller and the request is never left unanswered."""
        ctl = self.ctl
        op = ctl.opcode
        counted = ctl.flags & _ring.REQ_COUNTED
        epoch = ctl.batch_epoch
        ctl.begin()
        try:
            n = self.handlers[op](ctl.ring_index, ctl.env_mask)
        except BaseException as exc:  # reported to the parent, which applies its policy
            self.reply_error(seq, exc, counted, epoch)
            if in_process and not isinstance(exc, Exception):
                raise
            return op
        ctl.reply(self.batch, self.done_sem, seq, _ring.ST_OK, n, counted, epoch)
        return op

    def serve(self) -> None:
        """Answer requests until CLOSE (the loop is compiled: fastvec/_stepper.pyx)."""
        serve(self)


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
    except Exception:  # noqa: BLE001 - any failure means "no"
        return False
    return True


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class InProcess:
    """A worker run inside the parent (``context="serial"``), for debugging env code: the
    same handlers over the same ring, called synchronously when a request is written, so
    a breakpoint in the env works. It stands where a process would (``pid``, ``exitcode``);
    nothing watches it, so a hang or a crash in env code is the caller's."""

    sentinel = None
    exitcode = None

    def __init__(self, spec: WorkerSpec):
        self.pid = os.getpid()
        self.worker = Worker(spec)
        ctl = self.worker.ctl
        ctl.worker_pid = self.pid
        ctl.payload_cap = self.worker.payload.size
        try:
            self.worker.start()
        except Exception as exc:  # noqa: BLE001 - reported like a process's failed start
            self.worker.reply_error(spec.start_seq, exc)
            return
        ctl.complete(spec.start_seq, _ring.ST_OK, 0)
        self.worker.done_sem.post()

    def serve_one(self) -> None:
        """Answer the request just written to the control block."""
        self.worker.req_sem.acquire(0)  # the post meant for a process: keep counts bounded
        self.worker.handle(self.worker.ctl.req_seq, in_process=True)

    def close(self) -> None:
        """Close the envs and let go of the ring (what exiting does for a process)."""
        w, self.worker = self.worker, None
        if w is None:
            return
        self.exitcode = 0
        for env in w.envs:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        w.envs = []
        if w.kernel is not None:
            w.kernel.release()
            w.kernel = None
        w.info_writer.release()
        w.views = None
        w.ctl.release()
        w.batch.release()
        w.req_sem.close()
        w.done_sem.close()
        w.main.close()
        w.payload.close()


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (importable, so it works under spawn and forkserver)."""
    # Ctrl-C goes to the whole process group; only the parent should act on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.parent_death_signal and sys.platform.startswith("linux"):
        _ring.set_parent_death_signal(signal.SIGKILL)
    run_worker(spec)


def run_worker(spec: WorkerSpec, built: list | None = None,
               build_error: BaseException | None = None) -> None:
    """Serve the slot ``spec`` names until CLOSE, then exit. A spare that adopts a slot
    (fastvec/spares.py) passes the envs it built, or the exception building them raised,
    which is then reported as this start's failure."""
    worker = Worker(spec)
    signal.signal(signal.SIGUSR1, worker.retire)
    worker.ctl.worker_pid = os.getpid()
    worker.ctl.payload_cap = worker.payload.size
    worker.ctl.start_heartbeat(spec.heartbeat_ms, spec.owner_pid)
    worker.ctl.rss_bytes = _rss_bytes()
    try:
        if build_error is not None:
            raise build_error
        worker.start(built)
    except BaseException as exc:
        worker.reply_error(spec.start_seq, exc)
        # A worker that cannot build its envs has nothing to serve: the parent reads the
        # error and kills it (or it exits with its parent, through the heartbeat thread).
        while True:
            signal.pause()
    worker.ctl.complete(spec.start_seq, _ring.ST_OK, 0)
    worker.done_sem.post()
    worker.serve()
    os._exit(0)  # skip interpreter teardown of env libraries; the parent owns all cleanup
