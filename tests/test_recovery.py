"""The recovery path under real faults: replacements that cannot build, build slowly or die;
errors the user caused; recycling; bounded semaphores; and every blocking call bounded."""

from __future__ import annotations

import functools
import os
import resource
import signal
import threading
import time

import numpy as np
import posix_ipc
import pytest
from gymnasium.vector import AutoresetMode

from conftest import process_gone, replaced, wait_until
from fastvec import FastVectorEnv, RestartBudgetExceeded, UnpicklableInfoError, WorkerFailure
from fastvec.errors import ClosedEnvError, RemoteTraceback
from faults import (AlarmEnv, BuildFailsAfterFirst, CallFaultEnv, CloseFaultEnv, CounterEnv,
                    OneStepEnv, ResetFaultEnv, SlowStepEnv, UnpicklableInfoEnv)

SLACK = 3.0  # seconds on top of the configured timeouts, on a loaded 2-core machine


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    try:
        return fn(*args, **kwargs), time.monotonic() - start
    except BaseException as exc:
        exc.took = time.monotonic() - start
        raise


def kill_worker(env, w: int, sig=signal.SIGKILL) -> int:
    pid = env.health()[w]["pid"]
    os.kill(pid, sig)
    return pid


def causes(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__


# -- replacements that cannot build --------------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["raise", "exit"])
def test_replacement_that_cannot_build_raises_budget_error_within_bound(tmp_path, context, kind):
    """Before: the replacement's env_fn raised, the next step() never returned and close()
    hung too. Now every attempt is bounded and the build error is chained."""
    fns = [CounterEnv, BuildFailsAfterFirst(str(tmp_path / "m"), kind), CounterEnv]
    env = FastVectorEnv(fns, context=context, max_restarts=2, start_timeout=5.0)
    env.reset(seed=0)
    kill_worker(env, 1)
    with pytest.raises(RestartBudgetExceeded) as info:
        timed(env.step, np.zeros(3, np.int64))
    assert info.value.took < 3 * 5.0 + SLACK
    text = " ".join(str(c) for c in causes(info.value))
    assert ("Address already in use" in text) if kind == "raise" else ("exit" in text)
    assert env.closed
    with pytest.raises(ClosedEnvError):
        env.step(np.zeros(3, np.int64))
    _, took = timed(env.close)
    assert took < SLACK


def test_budget_exhausted_disable_keeps_the_others_and_a_reset_retries(tmp_path):
    marker = tmp_path / "m"
    fns = [CounterEnv, BuildFailsAfterFirst(str(marker)), CounterEnv]
    env = FastVectorEnv(fns, max_restarts=1, on_budget_exhausted="disable")
    try:
        obs, _ = env.reset(seed=0)
        last1 = obs[1].copy()
        kill_worker(env, 1)
        for t in range(5):
            prev = obs
            obs, rew, term, trunc, info = env.step(np.ones(3, np.int64))
            assert trunc[1] and rew[1] == 0 and info["_env_disabled"][1]
            np.testing.assert_array_equal(obs[1], last1)
            assert not info["_env_disabled"][[0, 2]].any()
            for i in (0, 2):  # the others go on exactly
                assert obs[i][1] in (prev[i][1] + 1, 0)
        h = env.health()
        assert h[1]["disabled"] and "Address already in use" in h[1]["disabled_reason"]
        assert not h[0]["disabled"]
        marker.unlink()  # the port is free again: a reset tries the env again
        obs, info = env.reset(seed=1)
        assert "env_disabled" not in info
        obs, rew, term, trunc, info = env.step(np.ones(3, np.int64))
        assert not trunc.any() and "env_disabled" not in info and obs[1][1] == 1
        assert not env.health()[1]["disabled"]
    finally:
        env.close()


def test_slow_build_counts_against_start_timeout_not_step_timeout(tmp_path):
    """Before: a replacement slower to build than step_timeout was flagged hung again and
    again until the budget closed the env."""
    fns = [CounterEnv, BuildFailsAfterFirst(str(tmp_path / "m"), "slow", delay=1.5)]
    env = FastVectorEnv(fns, step_timeout=0.5, start_timeout=10.0, max_restarts=2)
    try:
        env.reset(seed=0)
        kill_worker(env, 1)
        (obs, rew, term, trunc, info), took = timed(env.step, np.zeros(2, np.int64))
        assert replaced(info, 2)[1] and took < 10.0 + SLACK
        for _ in range(5):
            obs, rew, term, trunc, info = env.step(np.zeros(2, np.int64))
            assert not any(replaced(info, 2))
        assert env.health()[1]["restarts"] == 1
    finally:
        env.close()


def test_replacement_that_builds_too_slowly_is_retried_within_start_timeout(tmp_path):
    fns = [CounterEnv, BuildFailsAfterFirst(str(tmp_path / "m"), "sleep")]
    env = FastVectorEnv(fns, start_timeout=1.0, max_restarts=2)
    env.reset(seed=0)
    kill_worker(env, 1)
    with pytest.raises(RestartBudgetExceeded, match="start_timeout"):
        timed(env.step, np.zeros(2, np.int64))
    env.close()


def test_fork_failure_is_a_failed_attempt_not_a_hang(tmp_path):
    """Starting a process fails (no file descriptors left, as fork fails with ENOMEM after an
    OOM kill): before, the slot was left with no process and nothing watched it."""
    env = FastVectorEnv([CounterEnv] * 2, max_restarts=2, on_budget_exhausted="disable")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        env.reset(seed=0)
        used = {int(fd) for fd in os.listdir("/proc/self/fd")}
        lowest_free = next(fd for fd in range(3, soft) if fd not in used)
        kill_worker(env, 1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            (obs, rew, term, trunc, info), took = timed(env.step, np.zeros(2, np.int64))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert took < SLACK
        assert info["_env_disabled"][1] and trunc[1] and not trunc[0]
        assert "could not start" in env.health()[1]["disabled_reason"]
        obs, info = env.reset(seed=3)  # descriptors are back: the env comes back too
        assert "env_disabled" not in info
        env.step(np.zeros(2, np.int64))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        env.close()


# -- errors the user caused stay the user's ------------------------------------------------------


@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_env_error_in_user_reset_keeps_its_type_and_no_respawn(envs_per_worker):
    env = FastVectorEnv([ResetFaultEnv] * 2, envs_per_worker=envs_per_worker)
    try:
        env.reset(seed=0)
        with pytest.raises(ValueError, match="bad reset options") as info:
            env.reset(options={"bad": True})
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "ResetFaultEnv" in str(info.value.__cause__) or "reset" in str(info.value.__cause__)
        assert all(h["restarts"] == 0 for h in env.health())
        obs, _ = env.reset(seed=1)  # the slot is usable
        env.step(np.zeros(2, np.int64))
    finally:
        env.close()


def test_crash_in_reset_replays_it_with_the_users_options(tmp_path):
    env = FastVectorEnv([functools.partial(ResetFaultEnv, str(tmp_path / "m"))] * 2)
    try:
        env.reset(seed=0)
        obs, info = env.reset(seed=5, options={"crash": True, "level": 3})
        assert any(replaced(info, 2))  # both may race for the one-shot marker
        for i in range(2):  # the replayed reset got the user's options (infos nest dicts)
            assert info["options"]["crash"][i] and info["options"]["level"][i] == 3
    finally:
        env.close()


def test_crash_in_masked_reset_resets_and_flags_the_workers_other_envs(tmp_path):
    """envs_per_worker=2, reset_mask covers env 0 only, env 0 crashes its worker: env 1 lost
    its episode too; it must come back reset and flagged, not with its old observation."""
    env = FastVectorEnv([functools.partial(ResetFaultEnv, str(tmp_path / "m"))] * 4,
                        envs_per_worker=2, autoreset_mode=AutoresetMode.DISABLED,
                        resume="off")  # with resume, env 1 goes on: tests/test_resume.py
    try:
        env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(np.ones(4, np.int64))
        assert (obs[:, 1] == 3).all()
        mask = np.array([True, False, False, False])
        obs, info = env.reset(options={"reset_mask": mask, "crash": True})
        assert info["_worker_restarted"].tolist() == [True, True, False, False]
        assert obs[0][1] == 0 and obs[1][1] == 0  # both envs of the replaced worker were reset
        assert obs[2][1] == 3 and obs[3][1] == 3  # the others are untouched
        assert info["options"]["crash"][0] and info["options"]["_crash"].tolist() == [
            True, False, False, False]  # env 1 was reset with derived seeds, no options
        obs, *_ = env.step(np.ones(4, np.int64))
        assert obs[:, 1].tolist() == [1, 1, 4, 4]
    finally:
        env.close()


def test_env_error_in_call_keeps_its_type():
    env = FastVectorEnv([CallFaultEnv] * 2)
    try:
        env.reset(seed=0)
        with pytest.raises(KeyError, match="a call that raises"):
            env.call("oops")
        assert env.health()[0]["restarts"] == 0
        assert env.call("ping") == (0, 0)
    finally:
        env.close()


@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_worker_dying_in_a_call_is_reported_at_the_next_step_in_every_mode(mode):
    env = FastVectorEnv([CallFaultEnv] * 2, autoreset_mode=mode)
    try:
        obs, _ = env.reset(seed=0)
        obs, *_ = env.step(np.ones(2, np.int64))
        last = obs.copy()
        with pytest.raises(WorkerFailure):
            env.call("die")
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert trunc.all() and (rew == 0).all() and info["_worker_restarted"].all()
        if mode == AutoresetMode.SAME_STEP:
            assert (obs[:, 1] == 0).all()  # the next episode already started
            np.testing.assert_array_equal(np.stack(info["final_obs"]), last)
        else:
            np.testing.assert_array_equal(obs, last)
        if mode == AutoresetMode.DISABLED:
            env.reset(options={"reset_mask": np.ones(2, np.bool_)})
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert "worker_restarted" not in info and not trunc.any()
        assert (obs[:, 1] == (1 if mode != AutoresetMode.NEXT_STEP else 0)).all()
    finally:
        env.close()


class OneStepCallFaultEnv(OneStepEnv, CallFaultEnv):
    """Episodes of one step; ``call("die")`` kills the workers of the ``victim`` envs."""

    def __init__(self, victim: bool = False):
        super().__init__()
        self.victim = victim

    def die(self):
        if self.victim:
            super().die()


@pytest.mark.parametrize("how", ["between steps", "in a call"])
@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_next_step_worker_lost_between_episodes_costs_no_episode(how, envs_per_worker):
    """NEXT_STEP: a worker lost while every one of its envs had just ended its episode
    (its next step is the autoreset) loses nothing. Its replacement resets them in that
    step, which comes back as their reset step (reward 0, not done), flagged; before, it
    came back truncated, and the reset followed a step later, so a learner that skips
    the reset step (RLlib) never saw the flag and took a stale transition."""
    lost = [1] if envs_per_worker == 1 else [2, 3]  # worker 1's envs
    env = FastVectorEnv([functools.partial(OneStepCallFaultEnv, i in lost) for i in range(4)],
                        resume="off",
                        envs_per_worker=envs_per_worker)
    a = np.ones(4, np.int64)
    try:
        env.reset(seed=0)
        obs, _, term, _, _ = env.step(a)
        assert term.all()  # every env is due for its autoreset
        if how == "between steps":
            pid = kill_worker(env, 1)
            assert wait_until(lambda: process_gone(pid), 5.0)
        else:
            with pytest.raises(WorkerFailure):
                env.call("die")
        obs, rew, term, trunc, info = env.step(a)  # the reset step of all four
        assert not term.any() and not trunc.any() and (rew == 0).all()
        assert (obs[:, 1] == 0).all()  # t = 0: fresh episodes, the replaced ones too
        assert info["_worker_restarted"].tolist() == [i in lost for i in range(4)]
        assert info["worker_restart_reason"][lost[0]].startswith("died")
        obs, rew, term, trunc, info = env.step(a)  # an ordinary step again, for all four
        assert term.all() and not trunc.any() and (obs[:, 1] == 1).all()
        assert "worker_restarted" not in info
        assert [h["restarts"] for h in env.health()][1] == 1
    finally:
        env.close()


def test_next_step_worker_lost_mid_episode_still_truncates():
    env = FastVectorEnv([CounterEnv] * 2, resume="off")
    a = np.ones(2, np.int64)
    try:
        env.reset(seed=0)
        last, _, term, _, _ = env.step(a)
        assert not term.any()
        pid = kill_worker(env, 1)
        assert wait_until(lambda: process_gone(pid), 5.0)
        obs, rew, term, trunc, info = env.step(a)
        assert trunc.tolist() == [False, True] and rew[1] == 0
        np.testing.assert_array_equal(obs[1], last[1])  # the final observation, kept
        assert info["_worker_restarted"].tolist() == [False, True]
        obs, *_ = env.step(a)  # then its reset step
        assert obs[1, 1] == 0
    finally:
        env.close()


def test_unpicklable_info_is_a_usage_error_not_a_crash():
    env = FastVectorEnv([functools.partial(UnpicklableInfoEnv, 3), CounterEnv])
    try:
        env.reset(seed=0)
        env.step(np.ones(2, np.int64))
        env.step(np.ones(2, np.int64))
        with pytest.raises(UnpicklableInfoError, match="env 0"):
            env.step(np.ones(2, np.int64))
        assert env.health()[0]["restarts"] == 0
        env.step(np.ones(2, np.int64))
    finally:
        env.close()


# -- recycling -----------------------------------------------------------------------------------


def test_recycling_closes_the_old_envs_and_does_not_block(tmp_path):
    """Before: 6 steps of one-step episodes took 12 s (each recycle waited ~1 s on a worker
    never asked to exit, then SIGKILLed it: its env.close() never ran)."""
    env = FastVectorEnv([functools.partial(OneStepEnv, str(tmp_path))] * 4,
                        recycle_after_episodes=1, start_timeout=10.0)
    try:
        env.reset(seed=0)
        start = time.monotonic()
        for _ in range(6):
            obs, rew, term, trunc, info = env.step(np.ones(4, np.int64))
            assert "worker_restarted" not in info
        took = time.monotonic() - start
        recycles = sum(h["recycles"] for h in env.health())
        assert recycles >= 8 and all(h["restarts"] == 0 for h in env.health())
        assert took < 6 * 10.0  # bounded by the build time, never by a kill timeout
        assert wait_until(lambda: len(list(tmp_path.glob("closed-*"))) >= recycles, 10.0)
    finally:
        env.close()


def test_recycled_worker_that_hangs_in_close_is_killed_after_grace(tmp_path):
    env = FastVectorEnv([functools.partial(CloseFaultEnv, "sleep", os.getpid())], recycle_after_episodes=1,
                        recycle_grace=0.5, max_worker_rss=None)
    try:
        env.reset(seed=0)
        for _ in range(70):  # CounterEnv episodes end within 60 steps
            env.step(np.ones(1, np.int64))
        assert env.health()[0]["recycles"] >= 1
        assert wait_until(lambda: not env._sup.retiring, 5.0)
    finally:
        _, took = timed(env.close, timeout=1.0)
        assert took < 1.0 + SLACK


# -- bounded IPC ---------------------------------------------------------------------------------


@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_done_semaphore_stays_bounded_with_work_between_async_and_wait(envs_per_worker):
    """Before: step_async(), learner work, step_wait() left one count per step on the done
    semaphore (200 after 200 steps; at 2**31 sem_post fails and workers die)."""
    env = FastVectorEnv([CounterEnv] * 4, envs_per_worker=envs_per_worker)
    try:
        n_workers = len(env.health())
        done = posix_ipc.Semaphore(env._sup.done_sem_name)
        slots = env._sup.slots

        def replied():  # every reply, and the batch's done post, is in
            return all(s.ctl.resp_seq == s.expected for s in slots) and done.value > 0

        env.reset(seed=0)
        worst = 0
        for _ in range(200):
            env.step_async(np.ones(4, np.int64))
            # the learner's work, long enough that every reply is in before step_wait
            assert wait_until(replied, 10.0, interval=0.0002), "no reply within 10 s"
            env.step_wait()
            worst = max(worst, done.value)
        done.close()
        assert worst <= n_workers
    finally:
        env.close()


# -- the failure handler's own failures ---------------------------------------------------------


def test_reply_after_a_frozen_finding_keeps_the_healthy_worker():
    """A reply that lands after the watchdog flagged the worker but before the parent read
    the flag: the finding is void, the worker is kept, nothing counts against the budget."""
    env = FastVectorEnv([functools.partial(SlowStepEnv, 1.0)], heartbeat_interval=0.05,
                        heartbeat_timeout=0.3)
    try:
        env.reset(seed=0)
        slot = env._sup.slots[0]
        # a heartbeat that never beat is judged against start_timeout, not
        # heartbeat_timeout: on a loaded machine its thread may not have run yet
        assert wait_until(lambda: slot.ctl.heartbeat > 0, 5.0)
        env.step_async(np.ones(1, np.int64))
        pid = kill_worker(env, 0, signal.SIGSTOP)
        assert wait_until(lambda: slot.failure is not None, 5.0), (  # flagged frozen
            slot.ctl.heartbeat, env._sup.watchdog.pulse(slot),
            env._sup.watchdog.alive, slot.ctl.resp_seq, slot.expected,
            open(f"/proc/{pid}/stat").read().split()[2])
        os.kill(pid, signal.SIGCONT)
        assert wait_until(lambda: slot.ctl.resp_seq == slot.expected, 5.0)  # it answered
        obs, rew, term, trunc, info = env.step_wait()
        assert "worker_restarted" not in info and obs[0][1] == 1
        env.step(np.ones(1, np.int64))
        assert env.health()[0]["restarts"] == 0 and env.health()[0]["pid"] == pid
    finally:
        env.close()


def test_watchdog_survives_its_own_error(monkeypatch):
    env = FastVectorEnv([CounterEnv] * 2)
    try:
        calls = {"n": 0}
        real = type(env._sup.watchdog).judge

        def flaky(self, *args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected: a bug in the watchdog")
            return real(self, *args)

        monkeypatch.setattr(type(env._sup.watchdog), "judge", flaky)
        env.reset(seed=0)
        assert wait_until(lambda: calls["n"] >= 2, 5.0)
        kill_worker(env, 1)
        (obs, rew, term, trunc, info), took = timed(env.step, np.ones(2, np.int64))
        assert replaced(info, 2)[1] and took < SLACK
        assert env._sup.watchdog.alive
    finally:
        env.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_idle_worker_survives_signals_its_env_handles(context):
    env = FastVectorEnv([functools.partial(AlarmEnv, os.getpid())] * 2, context=context)
    try:
        env.reset(seed=0)
        for _ in range(20):
            time.sleep(0.02)  # idle workers get several SIGALRMs each
            obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
            assert "worker_restarted" not in info
        assert all(h["restarts"] == 0 for h in env.health())
    finally:
        env.close()


def test_replacement_started_from_a_thread_outlives_the_thread():
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: a worker replaced from a
    short-lived thread must not die with it."""
    env = FastVectorEnv([CounterEnv] * 2, context="fork")
    try:
        env.reset(seed=0)
        kill_worker(env, 1)
        out = {}
        t = threading.Thread(target=lambda: out.update(r=env.step(np.ones(2, np.int64))))
        t.start()
        t.join(30)
        assert replaced(out["r"][4], 2)[1]
        pid = env.health()[1]["pid"]
        # PR_SET_PDEATHSIG is sent as the forking thread leaves the kernel, before its task
        # entry goes: once that is gone, a worker tied to it has SIGKILL and cannot reply
        assert wait_until(lambda: not os.path.exists(f"/proc/self/task/{t.native_id}"), 10.0)
        for _ in range(5):
            obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
            assert "worker_restarted" not in info
        assert env.health()[1]["restarts"] == 1 and env.health()[1]["pid"] == pid
    finally:
        env.close()


@pytest.mark.parametrize("kind", ["sleep", "segfault"])
def test_close_is_bounded_when_env_close_hangs_or_crashes(kind):
    env = FastVectorEnv([functools.partial(CloseFaultEnv, kind, os.getpid())] * 2)
    env.reset(seed=0)
    env.step(np.ones(2, np.int64))
    _, took = timed(env.close, timeout=1.0)
    assert took < 1.0 + SLACK


def test_health_latency_after_send_recv():
    """Before: percentiles mixed in zeros for envs that were not in a recv batch."""
    env = FastVectorEnv([functools.partial(SlowStepEnv, 0.003)] * 3, batch_size=1)
    try:
        env.reset(seed=0)
        env.send(np.ones(3, np.int64))
        got = np.zeros(3, np.int64)
        for _ in range(30):
            *_, ids = env.recv()
            got[ids] += 1
            env.send(np.ones(len(ids), np.int64), ids)
        while len(env.stepping):
            *_, ids = env.recv()
            got[ids] += 1
        for h in env.health():
            lat = h["step_latency_ms"]
            assert lat["samples"] == got[h["worker"]]
            assert lat["p50"] >= 2.0  # every sample is a real 3 ms step, no zeros mixed in
    finally:
        env.close()


def test_reset_retries_a_disabled_env_even_with_no_restart_budget():
    """The failure that disabled a slot was counted when it happened: the reset that tries
    the slot again must not count it a second time (with max_restarts=0 it never started)."""
    env = FastVectorEnv([CounterEnv] * 2, max_restarts=0, on_budget_exhausted="disable")
    try:
        env.reset(seed=0)
        kill_worker(env, 0)
        obs, rew, term, trunc, info = env.step(np.zeros(2, np.int64))
        assert info["_env_disabled"][0] and env.health()[0]["restarts"] == 1
        obs, info = env.reset(options={"reset_mask": np.array([True, False])})
        assert "env_disabled" not in info and obs[0][1] == 0
        assert env.health()[0]["restarts"] == 1 and not env.health()[0]["disabled"]
    finally:
        env.close()


def test_a_signal_handlers_exception_reaches_the_caller_of_a_blocked_step():
    """A SIGTERM handler that exits (a scheduler preempting the job) or a deadline of the
    caller's must not be swallowed while step() waits on a frozen worker."""
    class Deadline(Exception):
        pass

    def handler(signum, frame):
        raise Deadline()

    env = FastVectorEnv([CounterEnv] * 2, heartbeat_timeout=10.0)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        env.reset(seed=0)
        pid = kill_worker(env, 1, signal.SIGSTOP)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Deadline) as info:
            timed(env.step, np.zeros(2, np.int64))
        assert info.value.took < 5.0  # not heartbeat_timeout=10 s later, and not lost
        os.kill(pid, signal.SIGCONT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        _, took = timed(env.close, timeout=1.0)
        assert took < 1.0 + SLACK
