"""The public contract of FastVectorEnv: gymnasium's VectorEnv API, misuse errors, bad
actions, bad observations, unsupported spaces, start-up failures, payloads, timeouts."""

from __future__ import annotations

import functools
import multiprocessing
import os
from contextlib import closing

import gymnasium as gym
import numpy as np
import psutil
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import batch_space

import envs as test_envs
import fastvec
from conftest import worker_children
from fastvec import FastVectorEnv
from fastvec.errors import RemoteTraceback

pytestmark = pytest.mark.timeout(60)


def attr_fns(n, **kw):
    return [functools.partial(test_envs.AttrEnv, index=i, **kw) for i in range(n)]


def fast_env(fns, **kw):
    kw.setdefault("context", "fork")
    return FastVectorEnv(fns, **kw)


def cartpole():
    return gym.make("CartPole-v1")


def pendulum():
    return gym.make("Pendulum-v1")


# -- metadata, render, spaces ------------------------------------------------------------


@pytest.mark.parametrize("given", [*AutoresetMode, *(m.value for m in AutoresetMode)],
                         ids=str)
def test_metadata_autoreset_mode_is_the_enum(given):
    with closing(fast_env([cartpole] * 2, autoreset_mode=given)) as env:
        mode = AutoresetMode(given)
        assert env.metadata["autoreset_mode"] is mode
        assert env.autoreset_mode is mode
        assert env.metadata["render_fps"] == gym.make("CartPole-v1").metadata["render_fps"]


def test_metadata_is_a_copy_of_the_env_metadata():
    with closing(fast_env(attr_fns(2))) as env:
        assert "autoreset_mode" not in test_envs.AttrEnv.metadata
        assert env.metadata["render_modes"] == ["rgb_array"]


def test_render_mode_and_render():
    fns = attr_fns(3, render_mode="rgb_array")
    sync = SyncVectorEnv(fns)
    with closing(fast_env(fns, envs_per_worker=2)) as env:
        assert env.render_mode == "rgb_array" == sync.render_mode
        env.reset(seed=0)
        frames = env.render()
        assert isinstance(frames, tuple) and len(frames) == 3
        assert data_equivalence(frames, sync.render(), exact=True)
    sync.close()
    with closing(fast_env(attr_fns(2))) as env:
        assert env.render_mode is None


def test_render_cartpole_rgb_array():
    pytest.importorskip("pygame", reason="CartPole's rgb_array rendering needs pygame")
    fns = [functools.partial(gym.make, "CartPole-v1", render_mode="rgb_array")] * 2
    sync = SyncVectorEnv(fns)
    with closing(fast_env(fns)) as env:
        assert env.render_mode == "rgb_array"
        env.reset(seed=3)
        sync.reset(seed=3)
        frames = env.render()
        assert len(frames) == 2 and frames[0].shape == (400, 600, 3)
        assert data_equivalence(frames, sync.render(), exact=True)
    sync.close()


SPACE_ENVS = {
    "cartpole": cartpole,
    "pendulum": pendulum,
    "nested": test_envs.NestedEnv,
    "raster": test_envs.RasterInfoEnv,
    "attr": test_envs.AttrEnv,
}


@pytest.mark.parametrize("name", list(SPACE_ENVS))
def test_batched_spaces_equal_sync(name):
    fns = [SPACE_ENVS[name]] * 3
    sync = SyncVectorEnv(fns)
    with closing(fast_env(fns, envs_per_worker=2)) as env:
        assert env.num_envs == 3
        assert env.single_observation_space == sync.single_observation_space
        assert env.single_action_space == sync.single_action_space
        assert env.observation_space == sync.observation_space
        assert env.action_space == sync.action_space
    sync.close()


# -- call, get_attr, set_attr ---------------------------------------------------------------


def test_call_get_attr_set_attr():
    with closing(fast_env(attr_fns(3), envs_per_worker=2)) as env:
        env.reset(seed=10)
        assert env.call("add", 1, y=2) == (3, 4, 5)
        env.call_async("add", 10)
        assert env.call_wait(timeout=10) == (10, 11, 12)
        assert env.call("index") == (0, 1, 2)  # a non-callable attribute is returned
        assert env.get_attr("index") == (0, 1, 2)
        assert env.np_random_seed == (10, 11, 12)

        env.set_attr("value", 7)
        assert env.get_attr("value") == (7, 7, 7)
        env.set_attr("value", [1, 2, 3])
        assert env.get_attr("value") == (1, 2, 3)
        env.set_attr("value", (4, {"a": 5}, np.arange(3)))
        got = env.get_attr("value")
        assert got[0] == 4 and got[1] == {"a": 5}
        np.testing.assert_array_equal(got[2], np.arange(3))

        pids = env.call("pid")
        assert len(set(pids)) == 2 and os.getpid() not in pids  # two workers, not the parent
        env.step(np.array([0, 1, 2]))
        assert env.get_attr("t") == (1, 1, 1)


def test_set_attr_wrong_length_raises_and_env_keeps_working():
    with closing(fast_env(attr_fns(3))) as env:
        with pytest.raises(ValueError):
            env.set_attr("value", [1, 2])
        assert env.get_attr("index") == (0, 1, 2)


@pytest.mark.parametrize("name", ["reset", "step", "close"])
def test_call_of_reset_step_close_is_refused(name):
    with closing(fast_env(attr_fns(2))) as env:
        with pytest.raises(ValueError):
            env.call(name)
        assert env.get_attr("index") == (0, 1)


def test_call_that_raises_reraises_with_remote_traceback():
    with closing(fast_env(attr_fns(2))) as env:
        with pytest.raises(KeyError, match="boom from env 0") as info:
            env.call("boom")
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "Traceback" in str(cause) and "boom" in str(cause)
        assert env.call("add", 1) == (1, 2)


# -- async pairs ----------------------------------------------------------------------------


def test_reset_async_wait_and_step_async_wait_match_sync():
    fns = [cartpole] * 3
    sync = SyncVectorEnv(fns)
    with closing(fast_env(fns, envs_per_worker=2)) as env:
        env.reset_async(seed=42)
        assert data_equivalence(env.reset_wait(timeout=10), sync.reset(seed=42), exact=True)
        env.reset_async(seed=[1, 2, 3], options=None)
        assert data_equivalence(env.reset_wait(), sync.reset(seed=[1, 2, 3]), exact=True)
        for a in ([0, 1, 0], [1, 1, 1], [0, 0, 1]):
            env.step_async(np.array(a))
            got = env.step_wait(timeout=10)
            assert data_equivalence(got, sync.step(np.array(a)), exact=True)
    sync.close()


def test_reset_argument_errors_match_sync():
    with closing(fast_env(attr_fns(3))) as env:
        with pytest.raises(ValueError):
            env.reset(seed=[1, 2])
        with pytest.raises(TypeError):
            env.reset(options={"reset_mask": [True, False, True]})
        with pytest.raises(TypeError):
            env.reset(options={"reset_mask": np.array([1, 0, 1])})
        with pytest.raises(ValueError):
            env.reset(options={"reset_mask": np.zeros(3, bool)})
        with pytest.raises(ValueError):
            env.reset(options={"reset_mask": np.ones(2, bool)})
        obs, _ = env.reset(seed=0)
        assert obs.shape == (3, 2)


# -- misuse ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["step_wait", "reset_wait", "call_wait"])
def test_wait_without_async_raises_no_async_call_error(wait):
    with closing(fast_env(attr_fns(2))) as env:
        env.reset(seed=0)
        with pytest.raises(fastvec.NoAsyncCallError) as info:
            getattr(env, wait)()
        assert isinstance(info.value, gym.error.NoAsyncCallError)
        assert isinstance(info.value, fastvec.FastVecError)
        env.step(np.array([0, 1]))  # still usable


@pytest.mark.parametrize("second", ["step_async", "reset_async", "call_async", "step", "reset",
                                    "call", "set_attr", "get_attr"])
def test_call_while_step_pending_raises_already_pending(second):
    args = {"step_async": (np.array([0, 1]),), "step": (np.array([0, 1]),),
            "reset_async": (), "reset": (), "call_async": ("add", 1), "call": ("add", 1),
            "set_attr": ("value", 1), "get_attr": ("index",)}[second]
    with closing(fast_env(attr_fns(2))) as env:
        env.reset(seed=0)
        env.step_async(np.array([1, 2]))
        with pytest.raises(fastvec.AlreadyPendingCallError) as info:
            getattr(env, second)(*args)
        assert isinstance(info.value, gym.error.AlreadyPendingCallError)
        # the pending step is unaffected
        obs, rew, *_ = env.step_wait()
        np.testing.assert_array_equal(obs, [[0, 1], [1, 1]])
        np.testing.assert_array_equal(rew, [2.0, 3.0])
        obs, *_ = env.step(np.array([0, 0]))
        np.testing.assert_array_equal(obs, [[0, 2], [1, 2]])


def test_wrong_wait_while_pending_raises_no_async_call_error():
    with closing(fast_env(attr_fns(2))) as env:
        env.reset(seed=0)
        env.step_async(np.array([0, 0]))
        with pytest.raises(fastvec.NoAsyncCallError):
            env.reset_wait()
        with pytest.raises(fastvec.NoAsyncCallError):
            env.call_wait()
        env.step_wait()


CLOSED_CALLS = {
    "step": lambda e: e.step(np.array([0, 0])),
    "step_async": lambda e: e.step_async(np.array([0, 0])),
    "step_wait": lambda e: e.step_wait(),
    "reset": lambda e: e.reset(),
    "reset_async": lambda e: e.reset_async(),
    "reset_wait": lambda e: e.reset_wait(),
    "call": lambda e: e.call("add", 1),
    "call_async": lambda e: e.call_async("add", 1),
    "call_wait": lambda e: e.call_wait(),
    "get_attr": lambda e: e.get_attr("index"),
    "set_attr": lambda e: e.set_attr("value", 1),
    "render": lambda e: e.render(),
    "health": lambda e: e.health(),
}


def test_calls_after_close_raise_closed_env_error():
    env = fast_env(attr_fns(2))
    env.reset(seed=0)
    env.close()
    assert env.closed
    for name, fn in CLOSED_CALLS.items():
        with pytest.raises(fastvec.ClosedEnvError) as info:
            fn(env)
        assert isinstance(info.value, gym.error.ClosedEnvironmentError), name


def test_close_is_idempotent():
    env = fast_env(attr_fns(2))
    env.reset(seed=0)
    env.close()
    env.close()
    env.close(terminate=True)
    env.close_extras()
    assert env.closed


@pytest.mark.parametrize("terminate", [False, True])
def test_close_with_a_pending_step(terminate):
    env = fast_env(attr_fns(2))
    env.reset(seed=0)
    env.step_async(np.array([0, 1]))
    env.close(terminate=terminate)
    assert env.closed


def test_context_manager():
    with fast_env(attr_fns(2)) as env:
        env.reset(seed=0)
        env.step(np.array([0, 1]))
    assert env.closed
    with pytest.raises(ZeroDivisionError):
        with fast_env(attr_fns(2)) as env2:
            1 / 0
    assert env2.closed


@pytest.mark.parametrize("kwargs", [
    {"ring_depth": 1}, {"envs_per_worker": 0}, {"on_failure": "ignore"},
    {"heartbeat_interval": 0}, {"step_timeout": -1}, {"observation_mode": "invalid"},
        {"on_budget_exhausted": "ignore"},
])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        fast_env(attr_fns(2), **kwargs)
    assert not worker_children()


def test_no_env_fns_is_refused():
    with pytest.raises(ValueError):
        fast_env([])


# -- make_vec and gymnasium.make_vec ----------------------------------------------------------


def test_fastvec_make_vec():
    env = fastvec.make_vec("CartPole-v1", 3)
    with closing(env):
        assert isinstance(env, FastVectorEnv) and env.num_envs == 3
        assert env.single_observation_space == gym.make("CartPole-v1").observation_space
        obs, infos = env.reset(seed=0)
        assert obs.shape == (3, 4)
        obs, rew, term, trunc, infos = env.step(np.array([0, 1, 0]))
        np.testing.assert_array_equal(rew, [1.0, 1.0, 1.0])


def test_fastvec_make_vec_passes_env_and_vector_kwargs():
    env = fastvec.make_vec("CartPole-v1", 3, max_episode_steps=3,
                           vector_kwargs={"envs_per_worker": 2, "context": "fork"})
    with closing(env):
        assert len(env.health()) == 2
        env.reset(seed=0)
        for _ in range(3):
            _, _, term, trunc, _ = env.step(np.array([0, 1, 0]))
        assert (term | trunc).all()
        assert trunc.any()


def test_gymnasium_make_vec_reaches_fastvec_through_vector_entry_point():
    env_id = "FastvecTest/CartPole-v1"
    gym.register(env_id, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=500,
                 vector_entry_point=fastvec.vector_entry_point("CartPole-v1"))
    try:
        env = gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point",
                           envs_per_worker=2, context="fork")
        with closing(env):
            assert isinstance(env.unwrapped, FastVectorEnv)
            assert env.num_envs == 3
            assert len(env.unwrapped.health()) == 2
            obs, _ = env.reset(seed=1)
            assert obs.shape == (3, 4)
            env.step(np.array([1, 0, 1]))
        # with no mode given, gymnasium prefers the vector entry point
        env = gym.make_vec(env_id, num_envs=2)
        with closing(env):
            assert isinstance(env.unwrapped, FastVectorEnv)
    finally:
        del gym.registry[env_id]


# -- bad actions ------------------------------------------------------------------------------


def _nested_actions(n, seed=0):
    space = batch_space(test_envs.nested_act_space(), n)
    space.seed(seed)
    return space.sample()


def _nested_with(mutate):
    def build(n):
        a = _nested_actions(n)
        mutate(a)
        return a
    return build


def _set_pick(a, i, value):
    pick = list(a["pick"])
    pick[i] = value
    a["pick"] = tuple(pick)


# NestedEnv without 0-d observation leaves: the actions are what these cases are about.
nested = functools.partial(test_envs.NestedEnv, scalars=False)

BAD_ACTIONS = {
    "discrete-shape-long": (cartpole, lambda n: np.zeros(n + 1, np.int64)),
    "discrete-shape-2d": (cartpole, lambda n: np.zeros((n, 1), np.int64)),
    "discrete-float-dtype": (cartpole, lambda n: np.zeros(n, np.float64)),
    "discrete-str-dtype": (cartpole, lambda n: np.array(["a"] * n)),
    "discrete-too-big": (cartpole, lambda n: np.array([0, 2, 1])),
    "discrete-negative": (cartpole, lambda n: np.array([0, 0, -1])),
    "box-shape": (pendulum, lambda n: np.zeros(n, np.float32)),
    "box-complex-dtype": (pendulum, lambda n: np.zeros((n, 1), np.complex64)),
    "box-too-big": (pendulum, lambda n: np.array([[0.0], [2.5], [0.0]], np.float32)),
    "box-too-small": (pendulum, lambda n: np.array([[-2.01], [0.0], [0.0]], np.float32)),
    "box-nan": (pendulum, lambda n: np.array([[0.0], [np.nan], [0.0]], np.float32)),
    "nested-multibinary-2": (nested, _nested_with(
        lambda a: a["sub"].__setitem__("flags", np.full((3, 2, 2), 2, np.int8)))),
    "nested-multidiscrete-range": (nested, _nested_with(
        lambda a: a["md"].__setitem__(1, [1, 5]))),
    "nested-discrete-start": (nested, _nested_with(
        lambda a: _set_pick(a, 0, np.array([-2, 0, 1])))),
    "nested-box-shape": (nested, _nested_with(
        lambda a: a.__setitem__("move", np.zeros((3, 3), np.float32)))),
    "nested-missing-key": (nested, _nested_with(lambda a: a.pop("md"))),
    "nested-tuple-length": (nested, _nested_with(
        lambda a: a.__setitem__("pick", a["pick"][:1]))),
    "nested-not-a-dict": (nested, lambda n: np.zeros(n)),
}


@pytest.mark.parametrize("case", list(BAD_ACTIONS))
def test_bad_actions_raise_before_anything_is_sent(case):
    make, bad = BAD_ACTIONS[case]
    n = 3
    fns = [make] * n
    sync = SyncVectorEnv(fns)
    with closing(fast_env(fns, envs_per_worker=2)) as env:
        assert data_equivalence(env.reset(seed=5), sync.reset(seed=5), exact=True)
        before = [h["requests"] for h in env.health()]
        with pytest.raises(fastvec.InvalidActionError) as info:
            env.step(bad(n))
        assert isinstance(info.value, ValueError)
        assert [h["requests"] for h in env.health()] == before, "nothing may be sent"
        # the env keeps working, and no env moved
        space = batch_space(env.single_action_space, n)
        space.seed(1)
        for _ in range(3):
            a = space.sample()
            assert data_equivalence(env.step(a), sync.step(a), exact=True)
    sync.close()


def test_bad_action_via_step_async_leaves_no_pending_call():
    with closing(fast_env([cartpole] * 2)) as env:
        env.reset(seed=0)
        with pytest.raises(fastvec.InvalidActionError):
            env.step_async(np.array([0, 5]))
        with pytest.raises(fastvec.NoAsyncCallError):
            env.step_wait()
        env.step(np.array([0, 1]))


def test_valid_actions_of_castable_dtypes_are_accepted():
    sync = SyncVectorEnv([pendulum] * 3)
    with closing(fast_env([pendulum] * 3)) as env:
        env.reset(seed=0)
        sync.reset(seed=0)
        a = np.array([[1], [0], [-2]], np.int64)  # ints are a valid Box action, and reach
        assert data_equivalence(env.step(a), sync.step(a), exact=True)  # the env as ints
        a = [[0.5], [0.0], [-0.5]]  # nested lists too
        assert data_equivalence(env.step(a), sync.step(np.array(a)), exact=True)
    sync.close()


# -- observations that do not fit -------------------------------------------------------------


@pytest.mark.parametrize("envs_per_worker", [1, 2])
@pytest.mark.parametrize("kind", ["shape", "dtype"])
def test_observation_mismatch_in_step_names_the_env_and_env_stays_usable(kind, envs_per_worker):
    fns = [functools.partial(test_envs.AttrEnv, index=i,
                             bad_obs_at=2 if i == 1 else None, bad_kind=kind)
           for i in range(3)]
    with closing(fast_env(fns, envs_per_worker=envs_per_worker)) as env:
        env.reset(seed=0)
        env.step(np.array([0, 0, 0]))
        with pytest.raises(fastvec.SpaceMismatchError, match=r"\benv 1\b") as info:
            env.step(np.array([0, 0, 0]))
        assert isinstance(info.value, ValueError)
        obs, rew, term, trunc, _ = env.step(np.array([1, 1, 1]))
        np.testing.assert_array_equal(obs, [[0, 3], [1, 3], [2, 3]])
        np.testing.assert_array_equal(rew, [4.0, 4.0, 4.0])
        obs, _ = env.reset(seed=1)
        np.testing.assert_array_equal(obs, [[0, 0], [1, 0], [2, 0]])


def test_observation_mismatch_in_reset_names_the_env_and_env_stays_usable():
    fns = [functools.partial(test_envs.AttrEnv, index=i, bad_obs_at=0 if i == 2 else None)
           for i in range(3)]
    with closing(fast_env(fns, envs_per_worker=2)) as env:
        with pytest.raises(fastvec.SpaceMismatchError, match=r"\benv 2\b"):
            env.reset(seed=0)
        env.set_attr("bad_obs_at", None)
        obs, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs, [[0, 0], [1, 0], [2, 0]])
        obs, *_ = env.step(np.array([0, 1, 2]))
        np.testing.assert_array_equal(obs, [[0, 1], [1, 1], [2, 1]])


def test_observation_of_an_equal_dtype_with_another_format_letter_is_accepted():
    """np.longlong == np.int64 for numpy; an env returning one for a Box of the other must
    step like SyncVectorEnv (which stores it with numpy), not fail in the copy kernel."""
    sync = SyncVectorEnv([test_envs.LongLongEnv] * 2)
    with closing(fast_env([test_envs.LongLongEnv] * 2, max_restarts=0)) as env:
        assert data_equivalence(env.reset(seed=0), sync.reset(seed=0), exact=True)
        a = np.array([0, 1])
        assert data_equivalence(env.step(a), sync.step(a), exact=True)
    sync.close()


def test_env_with_a_different_space_is_refused_at_construction():
    fns = [test_envs.AttrEnv,
           functools.partial(test_envs.SpaceEnv, spaces.Box(0, 1, (3,), np.float32))]
    with pytest.raises(RuntimeError, match=r"\benv 1\b") as info:  # as gymnasium
        fast_env(fns)
    assert isinstance(info.value, fastvec.EnvSpacesError)
    assert not worker_children()


# -- spaces without a fixed size: pickled leaves -----------------------------------------------


PICKLED = {
    "Text": (spaces.Text(5), None),
    "Sequence": (spaces.Sequence(spaces.Box(0, 1, (2,))), None),
    "Graph": (spaces.Graph(spaces.Box(0, 1, (2,)), spaces.Discrete(3)), None),
    "Text-in-Dict": (spaces.Dict({"a": spaces.Box(0, 1, (2,)), "b": spaces.Text(3)}), None),
    "Sequence-in-Tuple": (spaces.Tuple((spaces.Discrete(2),
                                        spaces.Sequence(spaces.Discrete(2)))), None),
    "Text-action": (spaces.Box(0, 1, (2,)), spaces.Text(4)),
    "OneOf": (spaces.OneOf([spaces.Discrete(3), spaces.Box(0, 1, (2,))]),
              spaces.Dict({"a": spaces.Discrete(3), "b": spaces.Text(2)})),
}


@pytest.mark.parametrize("envs_per_worker", [1, 2])
@pytest.mark.parametrize("case", list(PICKLED))
def test_spaces_without_fixed_size_match_sync_step_for_step(case, envs_per_worker):
    """Leaves without a fixed size travel pickled through the side buffer and are batched
    as gymnasium batches them; fixed leaves beside them stay in shared memory."""
    obs_space, act_space = PICKLED[case]
    fn = functools.partial(test_envs.SpaceEnv, obs_space, act_space)
    env = fast_env([fn] * 3, envs_per_worker=envs_per_worker)
    ref = SyncVectorEnv([fn] * 3)
    try:
        assert env.observation_space == ref.observation_space
        assert env.action_space == ref.action_space
        obs, info = env.reset(seed=11)
        ref_obs, ref_info = ref.reset(seed=11)
        assert data_equivalence(obs, ref_obs) and data_equivalence(info, ref_info)
        ref.action_space.seed(5)
        for _ in range(4):
            actions = ref.action_space.sample()
            got = env.step(actions)
            want = ref.step(actions)
            for g, w in zip(got, want):
                assert data_equivalence(g, w), case
            assert got[0] in env.observation_space
    finally:
        env.close()
        ref.close()


# -- failures at start-up ---------------------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_env_fn_raising_in_worker_chains_remote_traceback(context):
    fns = [test_envs.AttrEnv, test_envs.RaisingFactory("no such map: moon")]
    with pytest.raises(fastvec.FastVecError) as info:
        FastVectorEnv(fns, context=context)
    err = info.value
    assert "no such map: moon" in str(err)
    assert isinstance(err, fastvec.WorkerFailure) and err.env_index == 1
    cause = err.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "Traceback" in str(cause) and "RuntimeError: no such map: moon" in str(cause)
    assert "RaisingFactory" in str(cause) or "__call__" in str(cause)


def test_unpicklable_exception_at_start_is_reported_not_a_type_error():
    """An exception that pickles but does not unpickle (two-argument __init__) must still
    come back as a fastvec error with the remote traceback, not as a TypeError."""
    with pytest.raises(fastvec.FastVecError) as info:
        fast_env([test_envs.AttrEnv, test_envs.TwoArgFactory()])
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "TwoArgError" in str(cause) and "unpicklable failure" in str(cause)


def test_unpicklable_exception_in_step_is_handled_like_any_env_exception():
    fns = [functools.partial(test_envs.StepRaisesEnv, raise_at=2, kind="twoarg", index=i)
           for i in range(2)]
    with closing(fast_env(fns)) as env:
        env.reset(seed=0)
        env.step(np.array([0, 0]))
        obs, rew, term, trunc, infos = env.step(np.array([0, 0]))  # on_failure="respawn"
        assert trunc.all()
        assert infos["worker_restarted"].all()
        assert "TwoArgError" in infos["worker_restart_reason"][0]
        env.step(np.array([0, 0]))  # still usable


def test_after_the_restart_budget_is_spent_the_env_is_closed_for_good():
    """RestartBudgetExceeded leaves a slot without a process: later calls must say the env
    is broken for good (ClosedEnvError), not that a call is still pending."""
    fns = [functools.partial(test_envs.StepRaisesEnv, raise_at=1, index=i) for i in range(2)]
    env = fast_env(fns, max_restarts=0)
    try:
        env.reset(seed=0)
        with pytest.raises(fastvec.RestartBudgetExceeded):
            env.step(np.array([0, 0]))
        with pytest.raises(fastvec.ClosedEnvError):
            env.step(np.array([0, 0]))
        with pytest.raises(fastvec.ClosedEnvError):
            env.reset(seed=0)
    finally:
        env.close()
    assert env.closed


# -- payloads ---------------------------------------------------------------------------------


FIVE_MB = 5 << 20


@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_large_info_payload_arrives_intact(envs_per_worker):
    fns = attr_fns(3, info_bytes=FIVE_MB, reset_info_bytes=FIVE_MB)
    with closing(fast_env(fns, envs_per_worker=envs_per_worker)) as env:
        _, infos = env.reset(seed=0)
        for i in range(3):
            np.testing.assert_array_equal(infos["blob"][i], test_envs.blob_expected(FIVE_MB, i))
        for t in range(1, 4):
            _, _, _, _, infos = env.step(np.array([0, 1, 2]))
            assert infos["_blob"].all()
            for i in range(3):
                np.testing.assert_array_equal(infos["blob"][i],
                                              test_envs.blob_expected(FIVE_MB, i + t))
        # and back: a call whose argument and result are large
        big = np.random.default_rng(0).random(FIVE_MB // 8)
        for got in env.call("echo", big):
            np.testing.assert_array_equal(got, big)


def test_call_argument_over_max_payload_raises_and_env_stays_usable():
    with closing(fast_env(attr_fns(2), max_payload_bytes=1 << 20)) as env:
        env.reset(seed=0)
        with pytest.raises(fastvec.PayloadTooLargeError):
            env.call("echo", np.zeros(FIVE_MB // 8))
        assert env.call("add", 1) == (1, 2)
        obs, *_ = env.step(np.array([0, 0]))
        np.testing.assert_array_equal(obs, [[0, 1], [1, 1]])


def test_info_over_max_payload_raises_payload_too_large():
    env = fast_env(attr_fns(2, info_bytes=2 << 20), max_payload_bytes=1 << 20)
    try:
        env.reset(seed=0)
        with pytest.raises(fastvec.PayloadTooLargeError):
            env.step(np.array([0, 0]))
    finally:
        env.close()
    assert env.closed


def test_env_stays_closable_after_worker_side_payload_error():
    env = fast_env(attr_fns(2, info_bytes=2 << 20), max_payload_bytes=1 << 20)
    env.reset(seed=0)
    try:
        env.step(np.array([0, 0]))
    except fastvec.FastVecError:
        pass
    env.close()
    assert env.closed and not worker_children()


# -- timeouts ---------------------------------------------------------------------------------


def test_step_wait_timeout_then_wait_again_gets_the_right_results():
    with closing(fast_env(attr_fns(2, sleep=0.5))) as env:
        env.reset(seed=0)
        env.step_async(np.array([1, 2]))
        with pytest.raises(fastvec.WaitTimeout) as info:
            env.step_wait(timeout=0.05)
        assert isinstance(info.value, multiprocessing.TimeoutError)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.step_async(np.array([0, 0]))
        obs, rew, term, trunc, _ = env.step_wait()
        np.testing.assert_array_equal(obs, [[0, 1], [1, 1]])
        np.testing.assert_array_equal(rew, [2.0, 3.0])
        # not desynchronised afterwards
        obs, rew, *_ = env.step(np.array([0, 0]))
        np.testing.assert_array_equal(obs, [[0, 2], [1, 2]])
        np.testing.assert_array_equal(rew, [2.0, 2.0])


def test_call_wait_timeout_then_wait_again():
    with closing(fast_env(attr_fns(2, sleep=0.5))) as env:
        env.reset(seed=0)
        env.step_async(np.array([0, 0]))
        with pytest.raises(fastvec.WaitTimeout):
            env.step_wait(timeout=0)
        env.step_wait()
        env.call_async("add", 5)
        assert env.call_wait(timeout=30) == (5, 6)


def test_close_after_a_timed_out_step():
    env = fast_env(attr_fns(2, sleep=0.5))
    env.reset(seed=0)
    env.step_async(np.array([0, 0]))
    with pytest.raises(fastvec.WaitTimeout):
        env.step_wait(timeout=0.01)
    env.close()
    assert env.closed


# -- health -----------------------------------------------------------------------------------


def test_health_reports_one_dict_per_worker():
    with closing(fast_env(attr_fns(5), envs_per_worker=2)) as env:
        env.reset(seed=0)
        for _ in range(3):
            env.step(np.zeros(5, np.int64))
        health = env.health()
        assert isinstance(health, list) and len(health) == 3
        assert [h["envs"] for h in health] == [[0, 1], [2, 3], [4]]
        children = {p.pid for p in psutil.Process().children()}
        for w, h in enumerate(health):
            assert h["worker"] == w
            assert h["alive"] is True and h["pid"] in children
            assert h["restarts"] == 0 and h["generation"] == 0 and h["last_failure"] is None
            assert h["requests"] >= 4  # start, reset, three steps
            assert isinstance(h["heartbeat"], int)
            assert isinstance(h["rss_bytes"], int)
            assert set(h["step_latency_ms"]) >= {"p50", "p90", "p99", "max", "samples"}


# -- observation_mode, as gymnasium defines it -----------------------------------------------------


@pytest.mark.parametrize("mode", ["different", "pair"])
def test_observation_mode_different_and_a_space_pair(mode):
    from gymnasium.vector.utils import batch_differing_spaces
    sps = [spaces.Box(0, i, (3,), np.float32) for i in (1, 2, 3)]
    fns = [functools.partial(test_envs.SpaceEnv, sp) for sp in sps]
    observation_mode = "different" if mode == "different" else (
        batch_differing_spaces(sps), sps[0])
    ref = SyncVectorEnv(fns, observation_mode=observation_mode)
    with closing(fast_env(fns, observation_mode=observation_mode)) as env:
        assert env.observation_space == ref.observation_space == batch_differing_spaces(sps)
        assert env.single_observation_space == sps[0]
        assert data_equivalence(env.reset(seed=4), ref.reset(seed=4))
        a = np.array([0, 1, 0])
        assert data_equivalence(env.step(a), ref.step(a))
    ref.close()


def test_observation_mode_same_refuses_differing_spaces_with_a_runtime_error():
    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(0, i, (2,))) for i in (1, 2)]
    with pytest.raises(RuntimeError, match="observation_mode='different'"):
        fast_env(fns)
    with pytest.raises(ValueError, match="Invalid `observation_mode`"):
        fast_env(fns, observation_mode="invalid")


def test_a_scalar_action_for_a_batch_is_a_type_error():
    with closing(fast_env([cartpole] * 4)) as env:
        env.reset(seed=0)
        with pytest.raises(TypeError):
            env.step(0)
        env.step(np.zeros(4, np.int64))  # nothing was sent: the env goes on


def test_the_callers_action_dtype_reaches_the_env_as_in_sync():
    """gymnasium hands each env an element of the caller's array: float64 stays float64
    even where the space says float32 (an env calling time.sleep(action) depends on it)."""
    fn = functools.partial(test_envs.SpaceEnv, spaces.Discrete(2), spaces.Box(0, 1, (), np.float32))
    ref = SyncVectorEnv([fn] * 2)
    with closing(fast_env([fn] * 2)) as env:
        env.reset(seed=0)
        ref.reset(seed=0)
        for a in (np.array([0.25, 0.5]), np.array([0.25, 0.5], np.float32)):
            got, want = env.step(a)[4], ref.step(a)[4]
            assert data_equivalence(got, want), (got, want)
    ref.close()


def test_spin_is_automatic_and_off_on_one_core():
    from fastvec.options import AUTO_SPIN_US, Options
    auto = Options()
    assert auto.spin_us == "auto"
    assert auto.spin_ns(2) == auto.spin_ns(16) == int(AUTO_SPIN_US * 1000)
    assert auto.spin_ns(1) == 0  # nothing can answer while we spin
    assert Options(spin_us=0).spin_ns(16) == 0
    assert Options(spin_us=25).spin_ns(2) == 25_000
    assert Options(context="serial").spin_ns(2) == 0  # nothing to wait for
    for bad in (-1, "fast", None):
        with pytest.raises(ValueError, match="spin_us"):
            FastVectorEnv([test_envs.AttrEnv], spin_us=bad)
