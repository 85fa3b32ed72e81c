"""RayVectorEnv on Ray's multi-node test cluster (several raylets on this machine).

One cluster for the module: a head and two workers with one CPU each and a custom resource
per node (``node0``, ``node1``, ``node2``) to pin actors. Checked here: equivalence with
SyncVectorEnv in the three autoreset modes; a node removed mid-run and an actor SIGKILLed
(with resume: the run equal to SyncVectorEnv across them; with resume="off": their envs
flagged once, the others exact, the replacement elsewhere); an actor frozen (SIGSTOP: a
partition past ``actor_timeout``); the restart budget; call/get_attr/set_attr;
first-ready batches; and after every test no actor process, no fastvec worker and nothing
in /dev/shm left by them. Skipped as a whole without the ``ray`` extra.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from gymnasium.utils.env_checker import data_equivalence  # noqa: E402
from gymnasium.vector import AutoresetMode, SyncVectorEnv  # noqa: E402
from gymnasium.vector.utils import batch_space  # noqa: E402

import envs as test_envs  # noqa: E402
import fastvec  # noqa: E402
from conftest import wait_until  # noqa: E402
from fastvec.ray import RayVectorEnv  # noqa: E402
from faults import CounterEnv  # noqa: E402

pytestmark = pytest.mark.timeout(240)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Short deadlines: a lost actor is noticed within seconds, not minutes.
FAST = {"start_timeout": 20.0, "actor_timeout": 30.0, "heartbeat_timeout": 2.0}
_NAME = re.compile(r"^(?:sem\.)?fv(\d+)_")
# Ray's object store names semaphores after its raylet: sem.obj<pid>-..., sem.hdr<pid>-...
_RAY_SEM = re.compile(r"^sem\.(?:obj|hdr)(\d+)-")


def _ray_sems() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if _RAY_SEM.match(n)}


def _remove_dead_ray_sems(before: set[str]) -> None:
    """A raylet SIGKILLed by ``remove_node`` (the node-loss tests) cannot unlink its object
    store's semaphores, and Ray leaves them: those made since the cluster started whose
    raylet is gone are ours to remove (a clean single-node run leaves none)."""
    for name in _ray_sems() - before:
        if not psutil.pid_exists(int(_RAY_SEM.match(name).group(1))):
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except FileNotFoundError:
                pass


@pytest.fixture(scope="module")
def cluster():
    # Raylets inherit this environment: actors can unpickle the test envs by module.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = TESTS_DIR + (os.pathsep + old if old else "")
    ray_sems = _ray_sems()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
    try:
        for i in (1, 2):
            c.add_node(num_cpus=1, resources={f"node{i}": 1})
        ray.init(address=c.address, log_to_driver=False, logging_level="error")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        _remove_dead_ray_sems(ray_sems)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _fv_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if _NAME.match(n)}


def _host_processes() -> list[psutil.Process]:
    """Live actor processes of this module and the fastvec workers forked from them (a fork
    keeps its parent's title ``ray::_NodeHost...``)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "_NodeHost" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture(autouse=True)
def no_leaks():
    """Overrides conftest's check (the module's raylets are children of this process):
    after each test no actor process or fastvec worker of ours is alive, and no
    /dev/shm name made during the test by one of them (dead owner, or ours) is left."""
    before = _fv_names()
    yield

    def ours(name: str) -> bool:
        pid = int(_NAME.match(name).group(1))
        if pid == os.getpid():
            return True
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE or any(
                a.pid == os.getpid() for a in psutil.Process(pid).parents())
        except psutil.NoSuchProcess:
            return True

    assert wait_until(lambda: not _host_processes(), 15.0), \
        f"processes left: {[(p.pid, p.cmdline()) for p in _host_processes()]}"
    assert wait_until(lambda: not [n for n in _fv_names() - before if ours(n)], 5.0), \
        f"left in /dev/shm: {sorted(n for n in _fv_names() - before if ours(n))}"


def _node_of(resource: str) -> str:
    return next(nd["NodeID"] for nd in ray.nodes()
                if nd["Alive"] and resource in nd.get("Resources", {}))


def _assert_same(expected, got, what):
    assert data_equivalence(expected, got, exact=True), what


def _pids(env) -> tuple[list[int], list[int]]:
    h = env.health()
    return [a["pid"] for a in h], [w["pid"] for a in h for w in a["workers"]]


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the contract -----------------------------------------------------------------------------

EQUIV = [  # (name, env_fn, mode, envs_per_worker inside each node)
    ("raster", functools.partial(test_envs.RasterInfoEnv, max_len=20), AutoresetMode.NEXT_STEP, 1),
    ("raster", functools.partial(test_envs.RasterInfoEnv, max_len=20), AutoresetMode.SAME_STEP, 1),
    ("raster", functools.partial(test_envs.RasterInfoEnv, max_len=20), AutoresetMode.DISABLED, 1),
    ("nested", functools.partial(test_envs.NestedEnv, max_len=12), AutoresetMode.SAME_STEP, 2),
]


@pytest.mark.parametrize("name,env_fn,mode,k", EQUIV, ids=[f"{e[0]}-{e[2].name}" for e in EQUIV])
def test_equivalence_with_sync(cluster, name, env_fn, mode, k):
    """5 envs in 3 actors (2+2+1) on 3 nodes return what SyncVectorEnv returns."""
    n = 5
    env = RayVectorEnv([env_fn] * n, envs_per_actor=2, autoreset_mode=mode, envs_per_worker=k,
                       placement=[{"node0": 0.01}, {"node1": 0.01}, {"node2": 0.01}], **FAST)
    sync = SyncVectorEnv([env_fn] * n, autoreset_mode=mode)
    try:
        assert len({a["node_id"] for a in env.health()}) == 3
        assert env.single_observation_space == sync.single_observation_space
        assert env.metadata["autoreset_mode"] == mode
        actions = batch_space(sync.single_action_space, n)
        actions.seed(7)
        _assert_same(sync.reset(seed=123), env.reset(seed=123), "reset")
        episodes = 0
        for t in range(120):
            if t == 60:
                seeds = [1000 + i if i % 2 == 0 else None for i in range(n)]
                _assert_same(sync.reset(seed=seeds), env.reset(seed=seeds), "reset(seeds)")
            a = actions.sample()
            expected = sync.step(a)
            _assert_same(expected, env.step(a), f"step {t}")
            done = expected[2] | expected[3]
            episodes += int(done.sum())
            if mode == AutoresetMode.DISABLED and done.any():
                opts = {"reset_mask": done.copy()}
                _assert_same(sync.reset(options=dict(opts)), env.reset(options=dict(opts)),
                             "masked reset")
        assert episodes >= 2 * n
    finally:
        env.close()
        sync.close()


def test_registered_id_call_get_set_attr(cluster):
    env = RayVectorEnv("CartPole-v1", 3, envs_per_actor=2, **FAST)
    try:
        assert env.num_envs == 3 and len(env.health()) == 2
        env.reset(seed=0)
        assert env.get_attr("spec")[2].id == "CartPole-v1"
        env.set_attr("marker", [10, 11, 12])
        assert env.get_attr("marker") == (10, 11, 12)
        env.set_attr("marker", 5)
        assert env.call("__getattribute__", "marker") == (5, 5, 5)
        with pytest.raises(ValueError, match="use `step` directly"):
            env.call("step", 0)
    finally:
        env.close()
    attr = RayVectorEnv([functools.partial(test_envs.AttrEnv, i) for i in range(3)],
                        envs_per_actor=2, **FAST)
    try:
        attr.reset(seed=0)
        assert attr.call("add", 1, y=2) == (3, 4, 5)
        with pytest.raises(KeyError, match="boom from env"):  # the env's own exception type
            attr.call("boom")
        assert attr.call("add", 0) == (0, 1, 2)  # still usable
        with pytest.raises(fastvec.InvalidActionError):
            attr.step(np.array([0, 1, 7]))  # 7 is outside Discrete(3): nothing is sent
        obs, *_ = attr.step(np.array([0, 1, 2]))
        assert obs[:, 1].tolist() == [1, 1, 1]
    finally:
        attr.close()
    with pytest.raises(fastvec.ClosedEnvError):
        attr.step(np.array([0, 1, 2]))


def test_send_recv_first_ready_and_wait_timeout(cluster):
    fns = [functools.partial(test_envs.AttrEnv, 0, sleep=0.4), test_envs.AttrEnv]
    env = RayVectorEnv(fns, envs_per_actor=1, batch_size=1,
                       placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    try:
        env.reset(seed=0)
        env.send(np.array([1, 1]))
        assert env.stepping.tolist() == [0, 1]
        obs, rew, term, trunc, infos, ids = env.recv()
        assert ids.tolist() == [1] and obs.tolist() == [[0.0, 1.0]] and rew.tolist() == [2.0]
        env.send(np.array([2]), [1])
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.step(np.array([1, 1]))
        got = []
        while len(env.stepping):
            *_, ids = env.recv()
            got += ids.tolist()
        assert sorted(got) == [0, 1]
        env.step_async(np.array([1, 1]))
        with pytest.raises(fastvec.WaitTimeout):
            env.step_wait(timeout=0.05)  # env 0 sleeps 0.4 s; the step stays pending
        obs, *_ = env.step_wait()
        assert obs[:, 1].tolist() == [2.0, 3.0]
    finally:
        env.close()


def test_importing_fastvec_does_not_import_ray():
    code = "import sys, fastvec; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# -- survival -------------------------------------------------------------------------------------

def _flag_mask(info, n):
    return info.get("_worker_restarted", np.zeros(n, np.bool_))


def test_node_removed_mid_run(cluster):
    """The node of actor 1 crashes: its envs come back truncated once with "node_lost",
    the envs on the other node stay exact step for step, the replacement runs elsewhere."""
    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    env = RayVectorEnv([CounterEnv] * 4, placement=[{"node1": 0.01}, {"doomed": 0.01}],
                       resume="off", **FAST)
    ref = SyncVectorEnv([CounterEnv] * 4)
    rng = np.random.default_rng(0)
    try:
        obs, _ = env.reset(seed=5)
        ref.reset(seed=5)
        health = env.health()
        doomed_id = health[1]["node_id"]
        assert doomed_id == _node_of("doomed") and health[0]["node_id"] == _node_of("node1")
        for _ in range(5):
            a = rng.integers(0, 5, 4)
            got = env.step(a)
            _assert_same(ref.step(a), got, "before the crash")
            obs = got[0]  # the loss may be met by the very next step (compiled graphs)
        cluster.remove_node(doomed, allow_graceful=False)
        flagged, deadline = [], time.monotonic() + 60
        t = 0
        while time.monotonic() < deadline and not (flagged and t > flagged[0] + 3):
            a = rng.integers(0, 5, 4)
            prev = obs
            obs, rew, term, trunc, info = env.step(a)
            r_obs, r_rew, r_term, r_trunc, _ = ref.step(a)
            # the envs on the surviving node: exact, every step
            np.testing.assert_array_equal(obs[:2], r_obs[:2])
            assert rew[:2].tolist() == r_rew[:2].tolist()
            assert term[:2].tolist() == r_term[:2].tolist()
            assert trunc[:2].tolist() == r_trunc[:2].tolist()
            mask = _flag_mask(info, 4)
            if mask.any():
                flagged.append(t)
                assert mask.tolist() == [False, False, True, True]
                assert info["worker_restart_reason"][2].startswith("node_lost")
                assert trunc[2:].all() and not term[2:].any() and (rew[2:] == 0).all()
                np.testing.assert_array_equal(obs[2:], prev[2:])  # the last observation
            elif flagged and t == flagged[0] + 1:
                assert (obs[2:, 1] == 0).all() and not trunc[2:].any()  # fresh episodes
            t += 1
            time.sleep(0.02)
        assert len(flagged) == 1, f"flagged at steps {flagged}"
        h = env.health()
        assert h[1]["restarts"] == 1 and h[1]["reasons"] == {"node_lost": 1}
        assert h[1]["alive"] and h[1]["node_id"] not in (None, doomed_id)
        assert h[0]["restarts"] == 0 and h[0]["alive"]
    finally:
        env.close()
        ref.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "classic"])
def test_actor_sigkill(cluster, compiled):
    env = RayVectorEnv([CounterEnv] * 4, placement=[{"node1": 0.01}, {"node2": 0.01}],
                       resume="off", compiled=compiled, **FAST)
    try:
        env.reset(seed=3)
        for _ in range(3):
            env.step(np.ones(4, np.int64))
        h = env.health()
        victim, workers = h[0]["pid"], [w["pid"] for w in h[0]["workers"]]
        os.kill(victim, signal.SIGKILL)
        obs, rew, term, trunc, info = env.step(np.ones(4, np.int64))
        assert _flag_mask(info, 4).tolist() == [True, True, False, False]
        assert info["worker_restart_reason"][0].startswith("actor_died")
        assert trunc.tolist() == [True, True, False, False] and rew[:2].tolist() == [0.0, 0.0]
        assert obs[:, 1].tolist() == [3, 3, 4, 4]
        obs, *_ = env.step(np.ones(4, np.int64))
        assert obs[:, 1].tolist() == [0, 0, 5, 5]  # the replacement's fresh episodes
        h2 = env.health()
        assert h2[0]["restarts"] == 1 and h2[0]["reasons"] == {"actor_died": 1}
        assert h2[0]["node_id"] == h[0]["node_id"] and h2[0]["pid"] != victim  # node alive
        assert wait_until(lambda: all(_dead(p) for p in workers), 5.0), "orphaned workers"
        obs, *_ = env.step(np.ones(4, np.int64))  # the replacement's graph is compiled now
        assert obs[:, 1].tolist() == [1, 1, 6, 6]
        assert [a["compiled"] for a in env.health()] == [compiled] * 2
    finally:
        env.close()


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED],
                         ids=lambda m: m.name)
def test_actor_sigkill_other_modes(cluster, mode):
    env = RayVectorEnv([CounterEnv] * 2, envs_per_actor=1, autoreset_mode=mode,
                       placement=[{"node1": 0.01}, {"node2": 0.01}], resume="off", **FAST)
    try:
        obs, _ = env.reset(seed=1)
        for _ in range(2):
            prev = obs
            obs, *_ = env.step(np.ones(2, np.int64))
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        prev = obs
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert _flag_mask(info, 2).tolist() == [True, False]
        assert trunc.tolist() == [True, False] and rew[0] == 0.0
        if mode == AutoresetMode.SAME_STEP:
            assert obs[0][1] == 0  # already the replacement's first observation
            np.testing.assert_array_equal(info["final_obs"][0], prev[0])
            obs, *_ = env.step(np.ones(2, np.int64))
            assert obs[:, 1].tolist() == [1, 4]
        else:
            np.testing.assert_array_equal(obs[0], prev[0])
            with pytest.raises(fastvec.FastVecError, match="reset_mask"):
                env.step(np.ones(2, np.int64))
            obs, _ = env.reset(options={"reset_mask": np.array([True, False])})
            assert obs[:, 1].tolist() == [0, 3]
            obs, *_ = env.step(np.ones(2, np.int64))
            assert obs[:, 1].tolist() == [1, 4]
    finally:
        env.close()


def test_actor_lost_before_reset_and_in_recv(cluster):
    """A reset that meets a dead actor is replayed, same seeds, by the replacement; a dead
    actor in first-ready batches comes back flagged like in step()."""
    fns = [CounterEnv] * 2
    env = RayVectorEnv(fns, envs_per_actor=1, batch_size=1, resume="off",
                       placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    ref = SyncVectorEnv(fns)
    try:
        env.reset(seed=4)
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        obs, info = env.reset(seed=9)
        _assert_same(ref.reset(seed=9)[0], obs, "replayed reset")
        assert _flag_mask(info, 2).tolist() == [False, True]
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        env.send(np.ones(2, np.int64))
        seen = {}
        while len(env.stepping):
            obs, rew, term, trunc, info, ids = env.recv()
            for j, i in enumerate(ids):
                seen[int(i)] = (obs[j].copy(), bool(trunc[j]),
                                bool(_flag_mask(info, len(ids))[j]))
        assert seen[0][1] and seen[0][2] and seen[0][0][1] == 0  # flagged, last obs (t=0)
        assert not seen[1][1] and seen[1][0][1] == 1
        env.send(np.ones(1, np.int64), [0])
        obs, rew, term, trunc, info, ids = env.recv()
        assert ids.tolist() == [0] and obs[0][1] == 0 and not trunc[0]  # fresh episode
        assert "worker_restarted" not in info
    finally:
        env.close()
        ref.close()


def _gcs_pid(cluster) -> int:
    from ray._private import ray_constants
    return cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_GCS_SERVER][0].process.pid


def test_listing_nodes_is_bounded_when_the_gcs_freezes(cluster, monkeypatch):
    """ray.nodes() waits for the GCS without a deadline (seen wedged for minutes): with
    the head's GCS SIGSTOPped, building an env fails within the bound, saying what to
    check, and a replacement that would list the nodes starts anyway."""
    from fastvec.ray import placement
    assert placement.NODES_TIMEOUT_S <= 60  # the default bound
    monkeypatch.setattr(placement, "NODES_TIMEOUT_S", 1.5)
    gcs = _gcs_pid(cluster)
    os.kill(gcs, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(fastvec.FastVecError, match="did not list its nodes within 1.5 s"):
            RayVectorEnv([CounterEnv] * 2, envs_per_actor=1, **FAST)
        assert time.monotonic() - start < 10.0
        # the replacement's path: no avoidance, the pin kept
        opts = placement.actor_options({}, {"node1": 0.01}, {"a-lost-node"}, [])
        assert opts["resources"] == {"node1": 0.01} and "scheduling_strategy" not in opts
    finally:
        os.kill(gcs, signal.SIGCONT)
    assert placement.alive_nodes(30.0)  # the cluster answers again


def test_frozen_actor_counts_as_unresponsive(cluster):
    """SIGSTOP stands in for a partition: no answer within actor_timeout."""
    env = RayVectorEnv([CounterEnv] * 2, envs_per_actor=1, start_timeout=3.0, resume="off",
                       actor_timeout=4.0, placement=[{"node1": 0.01}, {"node2": 0.01}])
    try:
        env.reset(seed=0)
        victim = env.health()[0]["pid"]
        os.kill(victim, signal.SIGSTOP)
        start = time.monotonic()
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        took = time.monotonic() - start
        assert 3.9 < took < 7.0, took
        assert _flag_mask(info, 2).tolist() == [True, False]
        assert info["worker_restart_reason"][0].startswith("unresponsive")
        obs, *_ = env.step(np.ones(2, np.int64))
        assert obs[:, 1].tolist() == [0, 2]
    finally:
        env.close()


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "classic"])
def test_restart_budget(cluster, compiled):
    env = RayVectorEnv([CounterEnv] * 2, envs_per_actor=1, max_actor_restarts=1,
                       resume="off", placement=[{"node1": 0.01}, {"node2": 0.01}],
                       compiled=compiled, **FAST)
    try:
        env.reset(seed=0)
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        _, _, _, trunc, _ = env.step(np.ones(2, np.int64))
        assert trunc.tolist() == [True, False]
        env.step(np.ones(2, np.int64))
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        with pytest.raises(fastvec.RestartBudgetExceeded, match="max_actor_restarts=1") as err:
            env.step(np.ones(2, np.int64))
        assert err.value.env_indices == (0,)
        assert env.closed
        with pytest.raises(fastvec.ClosedEnvError):
            env.step(np.ones(2, np.int64))
    finally:
        env.close()
    # The last killed actor had no replacement to sweep its /dev/shm names; as after any
    # killed FastVectorEnv owner, the next FastVectorEnv on this machine removes them.
    fastvec.FastVectorEnv([CounterEnv]).close()


def _actor_gone(handle) -> bool:
    try:
        ray.get(handle.health.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.RayTaskError:  # reached the host after close(), before the kill
        return False
    return False


def test_close_leaves_no_actor(cluster):
    env = RayVectorEnv([CounterEnv] * 3, envs_per_actor=2, **FAST)
    env.reset(seed=0)
    env.step(np.ones(3, np.int64))
    actors, workers = _pids(env)
    assert {p.pid for p in _host_processes()} >= set(actors + workers)
    assert [n for n in _fv_names() if int(_NAME.match(n).group(1)) in actors]
    handles = [s.handle for s in env._slots]
    env.close()
    env.close()  # twice is fine
    for h in handles:  # ray.kill is asynchronous: a call may still reach the closed host
        assert wait_until(lambda: _actor_gone(h), 30.0)
    assert wait_until(lambda: all(_dead(p) for p in actors + workers), 10.0)
    assert not [n for n in _fv_names() if int(_NAME.match(n).group(1)) in actors]


# -- resume: a lost actor's episodes go on in its replacement -------------------------------------

@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.name)
def test_actor_sigkill_resumes_episodes(cluster, mode):
    """Twin of the SIGKILL tests with resume on: the run stays equal to SyncVectorEnv step
    for step (infos too, but the resumed flags) across two SIGKILLed actors."""
    n, kills = 4, {25: 0, 70: 1}  # step -> the actor killed just before it
    env = RayVectorEnv([CounterEnv] * n, autoreset_mode=mode,
                       placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    sync = SyncVectorEnv([CounterEnv] * n, autoreset_mode=mode)
    try:
        _assert_same(sync.reset(seed=11), env.reset(seed=11), "reset")
        for t in range(90):
            if t in kills:
                os.kill(env.health()[kills[t]]["pid"], signal.SIGKILL)
            a = np.random.default_rng(t).integers(0, 5, n)
            expected, got = sync.step(a), env.step(a)
            _assert_same(expected[:4], got[:4], f"step {t}")
            if t in kills:
                assert got[4]["_worker_resumed"].tolist() == [i // 2 == kills[t] for i in range(n)]
                assert got[4]["worker_resumed_reason"][2 * kills[t]].startswith("actor_died")
            _assert_same(expected[4], {k: v for k, v in got[4].items() if "resumed" not in k},
                         f"infos of step {t}")
            done = expected[2] | expected[3]
            if mode == AutoresetMode.DISABLED and done.any():
                _assert_same(sync.reset(options={"reset_mask": done.copy()}),
                             env.reset(options={"reset_mask": done.copy()}), "masked reset")
        assert [(a["restarts"], a["resumed"], a["not_resumed"]) for a in env.health()] \
            == [(1, 2, {})] * 2
    finally:
        env.close()
        sync.close()


def test_node_removed_resumes_episodes(cluster):
    """Twin of test_node_removed_mid_run with resume on: no env loses its episode."""
    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    env = RayVectorEnv([CounterEnv] * 4, placement=[{"node1": 0.01}, {"doomed": 0.01}],
                       **FAST)
    ref = SyncVectorEnv([CounterEnv] * 4)
    try:
        _assert_same(ref.reset(seed=5), env.reset(seed=5), "reset")
        flagged = []
        for t in range(40):
            if t == 5:
                doomed_id = env.health()[1]["node_id"]
                cluster.remove_node(doomed, allow_graceful=False)
            a = np.random.default_rng(t).integers(0, 5, 4)
            expected, got = ref.step(a), env.step(a)
            _assert_same(expected[:4], got[:4], f"step {t}")
            if "worker_resumed" in got[4]:
                flagged.append(t)
                assert got[4]["_worker_resumed"].tolist() == [False, False, True, True]
                assert got[4]["worker_resumed_reason"][2].startswith("node_lost")
            time.sleep(0.05)
        assert len(flagged) == 1, f"flagged at steps {flagged}"
        h = env.health()  # the replacement runs elsewhere
        assert h[1]["reasons"] == {"node_lost": 1} and h[1]["resumed"] == 2
        assert h[1]["alive"] and h[1]["node_id"] not in (None, doomed_id)
    finally:
        env.close()
        ref.close()


def test_actor_lost_in_recv_resumes_and_fallback(cluster):
    """recv: the lost actor's env comes back with its real step; an episode longer than
    max_replay_steps cannot be replayed: truncated as with resume="off", with the reason."""
    fns, pins = [CounterEnv] * 2, [{"node1": 0.01}, {"node2": 0.01}]
    env = RayVectorEnv(fns, envs_per_actor=1, batch_size=1, placement=pins, **FAST)
    ref = SyncVectorEnv(fns)
    short = RayVectorEnv(fns, envs_per_actor=1, max_replay_steps=3, placement=pins, **FAST)
    try:
        _assert_same(ref.reset(seed=4), env.reset(seed=4), "reset")
        for _ in range(3):
            _assert_same(ref.step(np.ones(2, np.int64)), env.step(np.ones(2, np.int64)), "step")
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        env.send(np.full(2, 2, np.int64))
        expected, seen = ref.step(np.full(2, 2, np.int64)), {}
        while len(env.stepping):
            obs, rew, term, trunc, info, ids = env.recv()
            for j, i in enumerate(ids):
                seen[int(i)] = (obs[j], rew[j], bool(info.get("_worker_resumed", [0])[j]))
        for i in (0, 1):
            np.testing.assert_array_equal(seen[i][0], expected[0][i])
            assert seen[i][1] == expected[1][i] and seen[i][2] == (i == 0)
        short.reset(seed=4)
        obs = [short.step(np.ones(2, np.int64))[0] for _ in range(5)][-1]
        os.kill(short.health()[0]["pid"], signal.SIGKILL)
        prev, (obs, rew, _, trunc, info) = obs, short.step(np.ones(2, np.int64))
        assert trunc.tolist() == [True, False] and rew[0] == 0.0 and "worker_resumed" not in info
        np.testing.assert_array_equal(obs[0], prev[0])
        assert re.search("not resumed: .*max_replay_steps", info["worker_restart_reason"][0])
        obs, *_ = short.step(np.ones(2, np.int64))
        assert obs[:, 1].tolist() == [0, 7]  # the replacement's fresh episode
        assert short.health()[0]["not_resumed"] == {"too long": 1}
    finally:
        env.close()
        ref.close()
        short.close()


# -- compiled graphs: the lockstep step's own failure cases ---------------------------------------

def test_compiled_equals_classic_and_falls_back_where_it_must(cluster):
    """compiled=True steps through one graph per actor and returns what the classic calls
    return; send/recv, resets and calls stay classic next to the graphs."""
    fns = [CounterEnv] * 3
    pins = [{"node1": 0.01}, {"node2": 0.01}]
    fast = RayVectorEnv(fns, placement=pins, compiled=True, batch_size=1, **FAST)
    slow = RayVectorEnv(fns, placement=pins, compiled=False, **FAST)
    try:
        assert fast.compiled and not slow.compiled
        assert [a["compiled"] for a in fast.health()] == [True, True]
        assert [a["compiled"] for a in slow.health()] == [False, False]
        _assert_same(slow.reset(seed=2), fast.reset(seed=2), "reset")
        for t in range(70):  # across episode ends (20..60 steps)
            a = np.random.default_rng(t).integers(0, 5, 3)
            _assert_same(slow.step(a), fast.step(a), f"step {t}")
        fast.send(np.ones(3, np.int64))
        while len(fast.stepping):
            fast.recv()
        assert fast.get_attr("index") == (0, 0, 0)
        fast.step(np.ones(3, np.int64))  # the graphs still answer after classic calls
    finally:
        fast.close()
        slow.close()
    with pytest.raises(ValueError, match="compiled"):
        RayVectorEnv(fns, compiled="yes", **FAST)


def test_compiled_actor_killed_mid_execute(cluster):
    """SIGKILL while the actor executes its graph: the step returns the envs truncated
    (resume off), the graph is torn down, the replacement gets a new one, and close()
    tears that down before the actors go."""
    fns = [functools.partial(test_envs.AttrEnv, 0, sleep=0.3)] * 2
    env = RayVectorEnv(fns, envs_per_actor=1, resume="off", compiled=True,
                       placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    try:
        env.reset(seed=0)
        env.step(np.ones(2, np.int64))
        victim = env.health()[0]["pid"]
        env.step_async(np.ones(2, np.int64))
        time.sleep(0.1)  # inside the env's step, on the graph's thread
        os.kill(victim, signal.SIGKILL)
        obs, rew, term, trunc, info = env.step_wait()
        assert trunc.tolist() == [True, False]
        assert info["worker_restart_reason"][0].startswith("actor_died")
        assert obs[:, 1].tolist() == [1, 2]
        obs, *_ = env.step(np.ones(2, np.int64))  # the replacement's reset, classic
        assert obs[:, 1].tolist() == [0, 3]
        obs, *_ = env.step(np.ones(2, np.int64))  # compiled again
        assert obs[:, 1].tolist() == [1, 4]
        h = env.health()
        assert [a["compiled"] for a in h] == [True, True] and h[0]["pid"] != victim
    finally:
        env.close()


def test_compiled_step_wait_timeout_keeps_the_step(cluster):
    """step_wait(timeout) on the graphs raises WaitTimeout and leaves the step pending;
    the next step_wait returns it; a step pending at close() is settled."""
    fns = [functools.partial(test_envs.AttrEnv, 0, sleep=0.4), test_envs.AttrEnv]
    env = RayVectorEnv(fns, envs_per_actor=1, compiled=True,
                       placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    try:
        env.reset(seed=0)
        env.step_async(np.array([1, 1]))
        with pytest.raises(fastvec.WaitTimeout):
            env.step_wait(timeout=0.05)
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.step_async(np.array([1, 1]))
        obs, rew, *_ = env.step_wait()
        assert obs[:, 1].tolist() == [1.0, 1.0] and rew.tolist() == [2.0, 2.0]
        obs, *_ = env.step(np.array([1, 1]))
        assert obs[:, 1].tolist() == [2.0, 2.0]
        assert [a["compiled"] for a in env.health()] == [True, True]
        env.step_async(np.array([1, 1]))
    finally:
        env.close()  # with a step in flight on the graphs


# -- compiled graphs: first-ready batches (send / recv) --------------------------------------------

class GateEnv(CounterEnv):
    """CounterEnv whose steps wait while ``<gate_dir>/hold<index>`` exists (at most 60 s):
    a slow node whose pace the test sets by a file, not by a clock. (Module level: the
    actors import it from this module, which is on their PYTHONPATH.)"""

    def __init__(self, gate_dir: str, index: int):
        super().__init__(index=index)
        self.gate_dir = gate_dir

    def step(self, action):
        path = os.path.join(self.gate_dir, f"hold{self.index}")
        deadline = time.monotonic() + 60.0
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return super().step(action)


def _gated(tmp_path, n: int) -> list:
    return [functools.partial(GateEnv, str(tmp_path), i) for i in range(n)]


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "classic"])
def test_send_recv_slow_actor_does_not_stall(cluster, tmp_path, compiled):
    """A held actor (a slow node) never stalls the others' batches: they are received and
    sent again round after round while it holds, the longest-waiting first; recv(timeout)
    raises WaitTimeout with it still stepping; released, it returns its one step. With
    compiled=True every step of send/recv went through the actors' graphs."""
    hold = tmp_path / "hold0"
    hold.touch()
    env = RayVectorEnv(_gated(tmp_path, 3), envs_per_actor=1, batch_size=1,
                       compiled=compiled, placement=[{f"node{i}": 0.01} for i in range(3)],
                       **FAST)
    try:
        env.reset(seed=3)
        base = [h["compiled_steps"] for h in env.health()]
        env.send(np.ones(3, np.int64))
        got = []
        for _ in range(10):
            obs, rew, term, trunc, info, ids = env.recv(timeout=60.0)
            assert len(ids) == 1 and ids[0] != 0
            i = int(ids[0])
            got.append(i)
            assert obs[0][1] == got.count(i)  # its own step, in order
            env.send(np.ones(1, np.int64), ids)
        assert got.count(1) >= 2 and got.count(2) >= 2, got  # neither waits behind the other
        while len(env.stepping) > 1:
            *_, ids = env.recv(timeout=60.0)
            got.append(int(ids[0]))
        assert env.stepping.tolist() == [0]
        with pytest.raises(fastvec.WaitTimeout):
            env.recv(timeout=0.05)
        assert env.stepping.tolist() == [0]
        hold.unlink()
        obs, rew, term, trunc, info, ids = env.recv(timeout=60.0)
        assert ids.tolist() == [0] and obs[0][1] == 1 and not trunc[0]
        sent = [1, got.count(1), got.count(2)]
        steps = [h["compiled_steps"] - b for h, b in zip(env.health(), base)]
        assert steps == (sent if compiled else [0, 0, 0])
        env.send(np.ones(3, np.int64))
    finally:
        env.close()  # with every env in flight (on the graphs' reader threads)


@pytest.mark.parametrize("resume", ["auto", "off"])
def test_compiled_send_recv_actor_sigkilled(cluster, tmp_path, resume):
    """SIGKILL of an actor while its graph executes a send(): its recv comes back resumed
    (its real step) or, with resume="off", truncated and flagged, as on the classic calls;
    the other actor's batches go on meanwhile; the replacement gets a graph of its own."""
    hold = tmp_path / "hold0"
    env = RayVectorEnv(_gated(tmp_path, 2), envs_per_actor=1, batch_size=1, compiled=True,
                       resume=resume, placement=[{"node1": 0.01}, {"node2": 0.01}], **FAST)
    ref = SyncVectorEnv([CounterEnv] * 2)
    try:
        _assert_same(ref.reset(seed=4), env.reset(seed=4), "reset")
        _assert_same(ref.step(np.ones(2, np.int64)), env.step(np.ones(2, np.int64)), "step")
        victim = env.health()[0]["pid"]
        hold.touch()
        env.send(np.full(2, 2, np.int64))
        expected = ref.step(np.full(2, 2, np.int64))
        obs, rew, term, trunc, info, ids = env.recv(timeout=60.0)
        assert ids.tolist() == [1] and obs[0][1] == 2
        np.testing.assert_array_equal(obs[0], expected[0][1])
        os.kill(victim, signal.SIGKILL)  # inside its step, held at the gate
        hold.unlink()  # the replacement's replay must not be held
        obs, rew, term, trunc, info, ids = env.recv(timeout=60.0)
        assert ids.tolist() == [0]
        if resume == "auto":
            np.testing.assert_array_equal(obs[0], expected[0][0])
            assert info["_worker_resumed"].tolist() == [True] and not trunc[0]
            assert info["worker_resumed_reason"][0].startswith("actor_died")
        else:
            assert trunc.tolist() == [True] and rew[0] == 0.0 and obs[0][1] == 1
            assert info["worker_restart_reason"][0].startswith("actor_died")
            env.send(np.ones(2, np.int64))  # the replacement's fresh episode (classic) next
            seen = {}                        # to a graph's step: recv waits on both kinds
            while len(env.stepping):
                obs, *_, ids = env.recv(timeout=60.0)
                seen.update((int(i), obs[j][1]) for j, i in enumerate(ids))
            assert seen == {0: 0, 1: 3}
        before = env.health()[0]["compiled_steps"]
        env.send(np.ones(2, np.int64))
        while len(env.stepping):
            env.recv(timeout=60.0)
        h = env.health()
        assert h[0]["pid"] != victim and [a["compiled"] for a in h] == [True, True]
        assert h[0]["compiled_steps"] == before + 1  # the replacement's own graph
        assert h[0]["restarts"] == 1
    finally:
        env.close()
        ref.close()
