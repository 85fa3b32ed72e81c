"""The guard itself: verdicts tied to the request they judged, a bound on every call the
parent makes (with default options too), and the watchdog's alarm never lost.

Interleavings are forced with the watchdog's ``on_judged`` seam, never left to luck.
"""

from __future__ import annotations

import functools
import os
import signal
import threading

import numpy as np
import pytest

import fastvec.options
from conftest import replaced, wait_until
from fastvec import FastVectorEnv, InvalidActionError, WorkerFailure
from faults import CounterEnv, HangingCallEnv, OneStepEnv, SlowAtEnv
from test_shm import assert_ok, run_python


class Held:
    """Holds the watchdog between judging a slot and flagging it, until released."""

    def __init__(self, watchdog):
        self.watchdog = watchdog
        self.judged = threading.Event()
        self.release = threading.Event()
        self.verdicts: list = []
        watchdog.on_judged = self

    def __call__(self, slot, verdict):
        self.verdicts.append(verdict)
        self.judged.set()
        assert self.release.wait(30), "the test never released the watchdog"

    def let_go(self) -> None:
        """Release the held verdict and wait until the watchdog finished flagging it."""
        self.watchdog.on_judged = None
        passes = self.watchdog.passes
        self.release.set()
        assert wait_until(lambda: self.watchdog.passes >= passes + 2, 10.0)


def _ok(info) -> bool:
    return "worker_restarted" not in info


def test_hung_verdict_that_lands_after_the_reply_kills_nothing():
    """Before: the verdict was stamped with whatever request was current when flagged
    (the answered one), stayed attached, and the next step replaced a healthy worker."""
    env = FastVectorEnv([functools.partial(SlowAtEnv, at=2, seconds=1.5)], step_timeout=0.4)
    try:
        env.reset(seed=0)
        env.step(np.ones(1, np.int64))
        pid = env.health()[0]["pid"]
        held = Held(env._sup.watchdog)
        env.step_async(np.ones(1, np.int64))  # sleeps 1.5 s: judged hung after 0.4 s
        assert held.judged.wait(20)
        obs, rew, term, trunc, info = env.step_wait()  # the reply lands; verdict held
        assert _ok(info) and held.verdicts[0].reason == "hung"
        held.let_go()
        assert env._sup.slots[0].failure is None
        for _ in range(3):
            obs, rew, term, trunc, info = env.step(np.ones(1, np.int64))
            assert _ok(info) and not trunc[0]
        h = env.health()[0]
        assert h["restarts"] == 0 and h["pid"] == pid, h
    finally:
        env.close()


def test_frozen_verdict_about_an_answered_request_is_void():
    """A frozen verdict judged while the reply was on its way: SIGSTOP, judged, SIGCONT,
    the reply arrives, then the verdict is released. The worker stays."""
    env = FastVectorEnv([CounterEnv], heartbeat_interval=0.02, heartbeat_timeout=0.3)
    try:
        env.reset(seed=0)
        slot = env._sup.slots[0]
        assert wait_until(lambda: slot.ctl.heartbeat > 0, 10.0)
        pid = env.health()[0]["pid"]
        held = Held(env._sup.watchdog)
        env.step_async(np.ones(1, np.int64))
        os.kill(pid, signal.SIGSTOP)
        try:
            assert held.judged.wait(20)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_until(lambda: slot.ctl.resp_seq == slot.expected, 10.0)
        held.let_go()
        obs, rew, term, trunc, info = env.step_wait()
        assert _ok(info), info
        obs, rew, term, trunc, info = env.step(np.ones(1, np.int64))
        assert _ok(info) and env.health()[0]["pid"] == pid
    finally:
        env.close()


def test_death_verdict_stays_after_a_reply():
    """The other side of the rule: a death is never voided by a reply that came first."""
    env = FastVectorEnv([CounterEnv] * 2)
    try:
        env.reset(seed=0)
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert replaced(info, 2) == [False, True]
    finally:
        env.close()


@pytest.mark.parametrize("how", ["call", "get_attr", "set_attr", "render"])
def test_a_call_that_never_returns_raises_worker_failure(how):
    """Before: hang detection covered steps and resets only; these waited forever."""
    fns = [functools.partial(HangingCallEnv, hang_render=True, render_mode="rgb_array")] * 2
    env = FastVectorEnv(fns, step_timeout=0.5)
    try:
        env.reset(seed=0)
        pids = [h["pid"] for h in env.health()]
        done = threading.Event()
        outcome: list = []

        def run():
            try:
                if how == "call":
                    env.call("spin")
                elif how == "get_attr":
                    env.get_attr("spin")  # a bound method: fine; then call it hanging
                    env.call("spin")
                elif how == "set_attr":
                    env.set_attr("stuck", 1)
                else:
                    env.render()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)
            finally:
                done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        # bound: step_timeout, a watchdog pass, a replacement's start; far below 60 s
        assert done.wait(60), f"{how}() still blocked after 60 s"
        assert len(outcome) == 1 and isinstance(outcome[0], WorkerFailure), outcome
        assert outcome[0].reason == "hung"
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert info["_worker_restarted"].all()  # both workers hung and were replaced
        assert all(h["pid"] not in pids for h in env.health())
        assert env.call("ping") == tuple(h["pid"] for h in env.health())
    finally:
        env.close()


def test_default_options_bound_a_hung_call(monkeypatch):
    """step_timeout='auto' (the default) bounds a call too. The floor is 60 s; the test
    lowers it (the watchdog runs in this process) to prove the rule, not the constant."""
    monkeypatch.setattr(fastvec.options, "AUTO_HANG_FLOOR", 1.0)
    env = FastVectorEnv([HangingCallEnv])
    try:
        assert env.options.step_timeout == "auto"
        env.reset(seed=0)
        with pytest.raises(WorkerFailure) as err:
            env.call("spin")
        assert err.value.reason == "hung" and "step_timeout='auto'" in err.value.detail
    finally:
        env.close()


def test_auto_bound_learns_a_slow_workers_pace(monkeypatch):
    """'auto' is 20x the slowest request seen: after 0.2 s steps the bound is about 4 s,
    so a 1.5 s step (over the 1 s floor set here, under the learned bound) is left alone,
    and the bound then grows to 20x 1.5 s."""
    monkeypatch.setattr(fastvec.options, "AUTO_HANG_FLOOR", 1.0)
    env = FastVectorEnv([functools.partial(SlowAtEnv, at=10**6, seconds=1.5, pace=0.2)])
    try:
        env.reset(seed=0)
        wd, slot = env._sup.watchdog, env._sup.slots[0]
        assert wd.hang_bound(slot) == 1.0  # nothing learned yet: the floor
        for _ in range(50):  # until the watchdog has seen a 0.2 s step complete
            env.step(np.ones(1, np.int64))
            if wd.hang_bound(slot) > 3.0:
                break
        assert wd.hang_bound(slot) > 3.0
        env.call("__setattr__", "at", env.get_attr("t")[0] + 1)  # the next step: 1.5 s
        obs, rew, term, trunc, info = env.step(np.ones(1, np.int64))
        assert _ok(info) and env.health()[0]["restarts"] == 0
        assert wait_until(lambda: wd.hang_bound(slot) >= 20 * 1.4, 5.0), wd.pulse(slot)
    finally:
        env.close()


def test_close_after_invalid_action_still_closes_every_env(tmp_path):
    """Before: the compiled writer declined after `expected` was recorded, so every worker
    looked busy and close() skipped their env.close()."""
    env = FastVectorEnv([functools.partial(OneStepEnv, close_dir=str(tmp_path))] * 2)
    env.reset(seed=0)
    pids = {h["pid"] for h in env.health()}
    with pytest.raises(InvalidActionError):
        env.step(np.array([1, 99]))
    env.close()
    closed = {int(p.name.split("-")[1]) for p in tmp_path.glob("closed-*")}
    assert pids <= closed, (pids, closed)


def test_masked_reset_keeps_the_alarm_of_a_worker_it_did_not_wait_for():
    """Before: the reset's wait cleared the watchdog's alarm although the dead worker was
    outside its mask, so the next step slept a whole slice before looking at it."""
    env = FastVectorEnv([CounterEnv] * 2)
    try:
        env.reset(seed=0)
        env.step(np.ones(2, np.int64))  # the compiled step path exists
        slot = env._sup.slots[1]
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        assert wait_until(lambda: slot.failure is not None, 10.0)
        env.reset(seed=1, options={"reset_mask": np.array([True, False])})
        assert env._sup.dispatch.alarm_raised(), "the alarm for worker 1 was cleared unseen"
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert replaced(info, 2) == [False, True]
    finally:
        env.close()


_CLOSE_UNDER_A_WAIT = """
import functools, threading, time
import numpy as np
from conftest import wait_until
from faults import HangingCallEnv, SlowAtEnv
from fastvec import FastVectorEnv
from fastvec.errors import ClosedEnvError

env = FastVectorEnv([{env}] * 2, spin_us=0)
env.reset(seed=0)
env.{warm}
out = []

def run():
    try:
        env.{call}
    except BaseException as exc:
        out.append(exc)

t = threading.Thread(target=run)
t.start()
assert wait_until(lambda: env._waiting == 1, 10.0)
time.sleep(0.2)  # let it reach its sleep in C (it proves nothing either way)
began = time.monotonic()
env.close()
t.join(10.0)
assert not t.is_alive(), "the waiting thread never returned"
print("closed in", round(time.monotonic() - began, 2), "s;", [type(e).__name__ for e in out])
assert len(out) == 1 and isinstance(out[0], ClosedEnvError), out
print("OK")
"""


@pytest.mark.parametrize("env_fn, warm, call", [
    ("functools.partial(SlowAtEnv, at=2, seconds=2.0)", "step(np.ones(2, np.int64))",
     "step(np.ones(2, np.int64))"),
    ("HangingCallEnv", "reset(seed=1)", "set_attr('stuck', 1)"),
])
def test_close_from_another_thread_while_a_call_sleeps(env_fn, warm, call):
    """Before: close() released the control blocks and semaphores that a step or call was
    sleeping on without the GIL, and the process crashed (SIGSEGV). Now the sleeping call
    wakes with ClosedEnvError and close() returns within its bound. In a child process,
    so that a regression fails this test instead of killing the suite."""
    script = _CLOSE_UNDER_A_WAIT.format(env=env_fn, warm=warm, call=call)
    assert_ok(run_python(script, timeout=120))  # tests/ importable, not the source tree
