"""WildfireEnv and its observation kernel (fastvec/envs, csrc/fireobs.c).

The env tests need the optional extra and are marked ``fire``: they skip when pyretechnics
is not installed, and only then (a fastvec module that fails to import fails them). The
kernel's tests and the ImportError one need no extra and always run. Landscapes in most
env tests are hand-made and uniform (grass, wind from the west) so that where the fire
goes is known.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

fire = pytest.mark.fire
HERE = Path(__file__).resolve().parent  # not the repo root: that would import the source tree


def wildfire():
    from fastvec.envs import wildfire as module

    return module


def uniform_landscape(size, bands, fuel=102, wind=20.0, upwind=270.0, dead=0.05,
                      ignition=None, dtype=np.float32):
    """Flat, one fuel everywhere, steady wind (from the west by default)."""
    from fastvec.envs.landscape import MOISTURE_KEYS, Landscape

    zeros = np.zeros((size, size), dtype)
    return Landscape(
        fuel_model=np.full((size, size), fuel, dtype),
        elevation=zeros.copy(), slope=zeros.copy(), aspect=zeros.copy(),
        canopy_cover=zeros.copy(), canopy_height=zeros.copy(),
        canopy_base_height=zeros.copy(), canopy_bulk_density=zeros.copy(),
        moisture=dict(zip(MOISTURE_KEYS, (dead, dead + 0.01, dead + 0.02, 0.6, 0.9, 1.0))),
        wind_speed=np.full(bands, wind, dtype),
        upwind_direction=np.full(bands, upwind, dtype),
        ignition=(size // 2, 1) if ignition is None else ignition,
    )


def env_on(make_land, **kwargs):
    """A WildfireEnv whose landscapes come from ``make_land(size, bands)``."""

    class Env(wildfire().WildfireEnv):
        def make_landscape(self, rng, bands):
            return make_land(self.size, bands)

    return Env(**kwargs)


def run(env, actions, seed=0):
    """Reset, then step through ``actions`` (or a fixed dummy one) until the episode ends."""
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards, info = [], {}
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return out, rewards, info


# -- the C kernel, by known answers ---------------------------------------------------------

def kernel_inputs():
    # 2 x 3 output grid. phi and arrival are views into wider arrays (strided rows, one
    # extra column that must be ignored, as the env's padded east column is). Cell (1, 2)
    # burned and then got phi > 0 back, as pyretechnics sometimes does: burned, not front.
    nan = np.nan
    phi_full = np.array([[-1.0, -1.0, 1.0, -1.0],
                         [1.0, -0.5, 0.2, -1.0]], np.float32)
    arrival_full = np.array([[0.0, 32.0, nan, 5.0],
                             [nan, 48.0, 16.0, 5.0]], np.float32)
    fuel = np.array([[1.0, 0.5, 0.0],
                     [0.5, 2.0, 0.4]], np.float32)
    elevation = np.array([[0.0, 0.25, nan],
                          [1.5, -1.0, 1.0]], np.float32)
    return phi_full[:, :3], arrival_full[:, :3], fuel, elevation


# Channel by channel for those inputs, arrival_scale 1/64, wind (0.5, -3).
EXPECTED = np.array([
    [[1.0, 0.5, 0.0], [0.5, 1.0, 0.4]],      # fuel, clamped
    [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]],      # burned: arrival is not NaN
    # front, phi < 0 next to phi >= 0 with fuel: (0,0) has (1,0) north of it; (0,1)'s
    # neighbours have phi < 0 or no fuel ((0,2)); (1,1) has (1,0) to its west.
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    [[0.0, 0.5, 0.0], [0.0, 0.75, 0.25]],    # arrival / 64, NaN -> 0
    [[0.0, 0.25, 0.0], [1.0, 0.0, 1.0]],     # elevation, clamped, NaN -> 0
    np.full((2, 3), 0.5),                    # wind_u
    np.full((2, 3), -1.0),                   # wind_v, clamped
], np.float32)


def test_kernel_float32_known_answer():
    from fastvec.envs import _fireobs

    out = np.full((_fireobs.CHANNELS, 2, 3), 7.0, np.float32)
    _fireobs.build(out, *kernel_inputs(), 1 / 64, 0.5, -3.0)
    np.testing.assert_array_equal(out, EXPECTED)


def test_kernel_uint8_known_answer():
    from fastvec.envs import _fireobs

    out = np.full((_fireobs.CHANNELS, 2, 3), 7, np.uint8)
    _fireobs.build(out, *kernel_inputs(), 1 / 64, 0.5, -3.0)
    expected = np.floor(EXPECTED * 255 + 0.5).astype(np.uint8)
    # [-1, 1] channels: round(127.5 * (v + 1)): 0.5 -> 191, -1 -> 0.
    expected[_fireobs.WIND_U] = 191
    expected[_fireobs.WIND_V] = 0
    np.testing.assert_array_equal(out, expected)
    assert expected[_fireobs.FUEL, 0, 1] == 128 and expected[_fireobs.ARRIVAL, 1, 1] == 191


def test_kernel_zero_wind_is_mid_scale_in_uint8():
    from fastvec.envs import _fireobs

    out = np.empty((_fireobs.CHANNELS, 2, 3), np.uint8)
    _fireobs.build(out, *kernel_inputs(), 1 / 64, 0.0, float("nan"))
    assert (out[_fireobs.WIND_U] == 128).all() and (out[_fireobs.WIND_V] == 128).all()


def test_kernel_rejects_bad_arguments():
    from fastvec.envs import _fireobs

    phi, arrival, fuel, elev = kernel_inputs()
    out = np.empty((_fireobs.CHANNELS, 2, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        _fireobs.build(np.empty((3, 2, 3), np.float32), phi, arrival, fuel, elev, 1, 0, 0)
    with pytest.raises(TypeError, match="float32 or uint8"):
        _fireobs.build(out.astype(np.float64), phi, arrival, fuel, elev, 1, 0, 0)
    with pytest.raises(ValueError, match="smaller"):
        _fireobs.build(out, phi[:, :2], arrival, fuel, elev, 1, 0, 0)
    with pytest.raises(ValueError, match="contiguous"):
        wide = np.zeros((2, 6), np.float32)
        _fireobs.build(out, wide[:, ::2], arrival, fuel, elev, 1, 0, 0)
    with pytest.raises(ValueError):  # float64 input: buffer dtype mismatch
        _fireobs.build(out, phi.astype(np.float64), arrival, fuel, elev, 1, 0, 0)
    with pytest.raises(ValueError):  # not C-contiguous output
        _fireobs.build(np.empty((2, 3, _fireobs.CHANNELS), np.float32).transpose(2, 0, 1),
                       phi, arrival, fuel, elev, 1, 0, 0)


# -- the gymnasium contract -----------------------------------------------------------------

@fire
@pytest.mark.parametrize("obs_dtype", ["float32", "uint8"])
def test_spaces_and_observations(obs_dtype):
    env = wildfire().WildfireEnv(size=24, max_steps=6, obs_dtype=obs_dtype)
    assert env.observation_space.shape == (7, 24, 24)
    assert env.observation_space.dtype == np.dtype(obs_dtype)
    assert env.action_space == gym.spaces.MultiDiscrete([24, 24, 2])
    obs, info = env.reset(seed=3)
    assert obs in env.observation_space and info["burned_cells"] == 1
    for _ in range(3):
        obs, reward, *_ = env.step(env.action_space.sample())
        assert obs in env.observation_space and reward <= 0


@fire
@pytest.mark.filterwarnings("ignore:.*alternative render modes")  # env made without a spec
def test_check_env():
    from gymnasium.utils.env_checker import check_env

    check_env(wildfire().WildfireEnv(size=16, max_steps=5, render_mode="rgb_array"))
    check_env(wildfire().WildfireEnv(size=16, max_steps=5, obs_dtype="uint8"),
              skip_render_check=True)


@fire
def test_registered_id_makes_the_env():
    import fastvec  # noqa: F401 - importing it registers the id

    assert "fastvec/Wildfire-v0" in gym.registry, "import fastvec did not register the id"
    env = gym.make("fastvec/Wildfire-v0", size=16, max_steps=3)
    assert isinstance(env.unwrapped, wildfire().WildfireEnv)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    env.close()


@fire
def test_deterministic_under_seed():
    actions = [(5, 5, 0), (10, 3, 1), (0, 12, 0), (20, 20, 1), (7, 9, 1)]
    runs = [run(wildfire().WildfireEnv(size=24, max_steps=10), actions, seed=11)
            for _ in range(2)]
    (obs_a, rew_a, _), (obs_b, rew_b, _) = runs
    assert rew_a == rew_b
    for a, b in zip(obs_a, obs_b, strict=True):
        np.testing.assert_array_equal(a, b)
    other, _, _ = run(wildfire().WildfireEnv(size=24, max_steps=10), actions, seed=12)
    assert not np.array_equal(other[0], obs_a[0])


@fire
def test_picklable_before_reset():
    env = pickle.loads(pickle.dumps(wildfire().WildfireEnv(size=16, max_steps=3)))
    env.reset(seed=0)
    env.step((0, 0, 0))


@fire
def test_bad_arguments_and_misuse():
    WildfireEnv = wildfire().WildfireEnv
    for kwargs in ({"size": 1}, {"max_steps": 0}, {"break_length": 0}, {"stall_steps": 0},
                   {"minutes_per_step": 0.0}, {"obs_dtype": "float64"}, {"render_mode": "human"}):
        with pytest.raises(ValueError):
            WildfireEnv(**kwargs)
    env = WildfireEnv(size=16, max_steps=1)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step((0, 0, 0))
    env.reset(seed=0)
    for bad in [(16, 0, 0), (0, 0, 2), (-1, 0, 0), (0, 0), (0.5, 0, 0)]:
        with pytest.raises(ValueError, match="not in"):
            env.step(bad)
    env.step((0, 0, 0))  # max_steps=1: truncated
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step((0, 0, 0))


@fire
def test_render_rgb_array():
    env = wildfire().WildfireEnv(size=16, max_steps=3, render_mode="rgb_array")
    env.reset(seed=0)
    env.step((0, 0, 0))
    img = env.render()
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


# -- the fire and its pitfalls --------------------------------------------------------------

@fire
def test_episode_end_info_and_return():
    env = env_on(uniform_landscape, size=20, max_steps=40)
    _, rewards, info = run(env, [(0, 19, 1)] * 40)
    # Rewards are minus new cells / all cells, so the return counts all but the ignition.
    assert info["burned_fraction"] == pytest.approx(info["burned_cells"] / 400)
    assert sum(rewards) == pytest.approx(-(info["burned_cells"] - 1) / 400)
    assert "reduction" not in info


@fire
def test_east_column_burns():
    # pyretechnics never tracks its easternmost column; the env pads one and crops it.
    env = env_on(uniform_landscape, size=20, max_steps=40)
    obs, _, info = run(env, [(0, 0, 0)] * 40)
    burned = obs[-1][1]
    assert burned[:, -1].all() and info["burned_cells"] > 300


@fire
def test_library_quirk_east_column_is_never_tracked():
    # Canary for the padding: if this starts failing, a newer pyretechnics fixed it.
    from importlib.metadata import version

    import pyretechnics.eulerian_level_set as els
    from pyretechnics.space_time_cube import SpaceTimeCube

    if version("pyretechnics") != "2026.10.20":
        pytest.skip("checks the behaviour of pyretechnics 2026.10.20")
    from fastvec.envs.wildfire import _Fire

    land = uniform_landscape(16, 21)
    fire_ = _Fire(land, land.fuel_model, land.ignition, 30.0, 21)
    # The same inputs without the padded column: the last cube column is the real one.
    cubes = {k: SpaceTimeCube((21, 16, 16), np.asarray(c.data)[..., :16].copy()
                              if np.ndim(c.base) == 2 else c.base)
             for k, c in fire_.cubes.items()}
    state = els.SpreadState((21, 16, 16))
    state.set_resolution((30.0, 30.0, 30.0))
    state.set_start_time(0.0)
    state.ignite_cell(land.ignition)
    for _ in range(20):
        out = els.spread_fire_with_phi_field(cubes, state, max_duration=30.0)
    phi = state.get_full_matrices()["phi"]
    assert not (phi[:, -1] < 0).any() and (phi[:, -2] < 0).all()
    # ...and it never ends: cells stay tracked, every call says "max duration reached".
    assert out["stop_condition"] == "max duration reached" and out["num_tracked_cells"] > 0


@fire
def test_stalled_fire_terminates():
    # Fuel wetter than its moisture of extinction: nothing spreads, yet pyretechnics keeps
    # the ignition tracked and answers "max duration reached" forever.
    env = env_on(functools.partial(uniform_landscape, dead=0.3), size=16, max_steps=50,
                 stall_steps=3)
    _, rewards, info = run(env, [(0, 0, 0)] * 50)
    assert rewards == [0.0, 0.0, 0.0]
    assert info["burned_cells"] == 1 and info["burned_fraction"] == 1 / 256


@fire
def test_burned_cells_never_unburn():
    # Lit on the south edge with a north wind, pyretechnics pushes the ignition cell's phi
    # back above 0 and the fire leaves the grid. Burned means "has an arrival time", so the
    # cell stays burned and the reward is not positive.
    land = functools.partial(uniform_landscape, wind=26.0, upwind=0.0, dead=0.069,
                             ignition=(0, 8))
    env = env_on(land, size=16, max_steps=5)
    obs, rewards, info = run(env, [(15, 0, 0)] * 5)
    assert env._fire.phi[0, 8] >= 0  # the quirk itself
    assert rewards == [0.0] and info["burned_cells"] == 1 and obs[-1][1][0, 8] == 1


@fire
def test_fire_that_burns_out_terminates():
    env = env_on(uniform_landscape, size=16, max_steps=60, stall_steps=50, break_length=1)
    _, rewards, info = run(env, [(0, 0, 0)] * 60)
    assert len(rewards) < 60 and info["burned_cells"] == 256 - 2  # the break at (0..1, 0)


@fire
def test_break_stops_the_fire():
    size = 24
    wall = (0, 16, 1)  # north-running break, columns 16-17, the full height
    env = env_on(uniform_landscape, size=size, max_steps=40, break_length=size,
                 compute_reduction=True)
    obs, _, info = run(env, [wall] + [(0, 0, 0)] * 40)
    final = obs[-1]
    assert (final[0][:, 16:18] == 0).all()            # the break shows as no fuel
    assert not final[1][:, 16:].any()                 # nothing east of it burned
    assert final[1][:, :16].sum() > 0.9 * 16 * size   # west of it burned
    assert info["reduction"] == pytest.approx(1 - info["burned_cells"] / (size * size))


@fire
def test_break_placed_at_the_front_acts_on_the_running_fire():
    # The first steps run without breaks, then a wall goes 2 cells ahead of the front, well
    # inside the band of cells pyretechnics already tracks: it must still hold.
    size = 32
    env = env_on(uniform_landscape, size=size, max_steps=40, break_length=size)
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        obs, *_ = env.step((size - 1, 0, 0))  # a break in the far north-west corner
    front = int(np.nonzero(obs[1].any(axis=0))[0].max())
    assert front < size - 6
    wall = front + 2
    obs, _, term, trunc, _ = env.step((0, wall, 1))
    while not (term or trunc):
        obs, _, term, trunc, _ = env.step((0, 0, 0))
    assert not obs[1][:, wall:].any() and obs[1][:, wall - 1].any()


@fire
def test_breaks_do_not_touch_burned_cells():
    size = 24
    env = env_on(uniform_landscape, size=size, max_steps=20, break_length=size)
    env.reset(seed=0)
    for _ in range(2):
        obs, *_ = env.step((size - 1, size - 2, 0))
    burned = obs[1].astype(bool)
    # A wall over the burned area: only its unburned cells lose their fuel.
    obs2, *_ = env.step((0, 1, 1))
    assert (obs2[0][:, 1:3][burned[:, 1:3]] > 0).all()
    assert (obs2[0][:, 1:3][~obs2[1][:, 1:3].astype(bool)] == 0).all()
    assert obs2[1].sum() > burned.sum()  # and the fire goes on


@fire
def test_reduction_is_zero_when_breaks_change_nothing():
    def land(size, bands):
        lnd = uniform_landscape(size, bands)
        lnd.fuel_model[-2:, -8:] = 98  # water in the north-east corner
        return lnd

    env = env_on(land, size=16, max_steps=30, compute_reduction=True)
    _, _, info = run(env, [(14, 8, 0)] * 30)
    assert info["reduction"] == 0.0


@fire
@pytest.mark.parametrize("code", [-9999.0, 1e6, 14.0, 250.0, float("nan")])
def test_unknown_fuel_codes_raise_instead_of_crashing(code):
    def land(size, bands):
        lnd = uniform_landscape(size, bands)
        lnd.fuel_model[3:6, 3:6] = code
        return lnd

    with pytest.raises(ValueError, match="fuel_model"):
        env_on(land, size=16).reset(seed=0)


@fire
@pytest.mark.parametrize("cell", [(16, 0), (0, 16), (-1, 3), (3, -1), (2, 2), "x"])
def test_bad_ignitions_raise(cell):
    def land(size, bands):
        lnd = uniform_landscape(size, bands, ignition=cell)
        lnd.fuel_model[2, 2] = 98
        return lnd

    with pytest.raises(ValueError, match="ignition"):
        env_on(land, size=16).reset(seed=0)


@fire
def test_nothing_printed(capfd):
    # pyretechnics prints "WARNING: ... not a Numpy float32 array" for other dtypes; a
    # float64 landscape must be converted before it gets there.
    env = env_on(functools.partial(uniform_landscape, dtype=np.float64), size=16,
                 max_steps=4, compute_reduction=True)
    run(env, [(0, 8, 1)] * 4)
    run(wildfire().WildfireEnv(size=16, max_steps=4, compute_reduction=True), [(3, 3, 0)] * 4)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@fire
def test_observations_are_not_live_views():
    env = env_on(uniform_landscape, size=16, max_steps=10)
    obs, _ = env.reset(seed=0)
    first = obs.copy()
    step1, *_ = env.step((0, 0, 0))
    kept = step1.copy()
    env.step((0, 0, 0))
    np.testing.assert_array_equal(obs, first)
    np.testing.assert_array_equal(step1, kept)


# -- worker processes -----------------------------------------------------------------------

def _vector_run(vec, steps=3):
    obs, _ = vec.reset(seed=[1, 2])
    out = [obs]
    for k in range(steps):
        obs, *_ = vec.step(np.array([[k, k, 0], [k + 1, 2, 1]]))
        out.append(obs)
    return out


@fire
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_async_vector_env(context):
    make = functools.partial(wildfire().WildfireEnv, size=16, max_steps=10)
    sync = gym.vector.SyncVectorEnv([make, make])
    expected = _vector_run(sync)
    sync.close()
    vec = gym.vector.AsyncVectorEnv([make, make], context=context)
    try:
        got = _vector_run(vec)
    finally:
        vec.close()
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@fire
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_fast_vector_env(context):
    from fastvec import FastVectorEnv

    make = functools.partial(wildfire().WildfireEnv, size=16, max_steps=10)
    sync = gym.vector.SyncVectorEnv([make, make])
    expected = _vector_run(sync)
    sync.close()
    vec = FastVectorEnv([make, make], context=context)
    try:
        got = _vector_run(vec)
    finally:
        vec.close()
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@fire
def test_fast_vector_env_step_pickles_no_info():
    """burned_cells and sim_minutes get typed columns (fastvec/infos.py): after the first
    steps, a step's reply carries nothing pickled, and the infos equal SyncVectorEnv's."""
    from fastvec import FastVectorEnv
    make = functools.partial(wildfire().WildfireEnv, size=16, max_steps=40)
    sync = gym.vector.SyncVectorEnv([make, make])
    vec = FastVectorEnv([make, make])
    try:
        sync.reset(seed=3)
        vec.reset(seed=3)
        actions = np.zeros((2, 3), np.int64)
        for t in range(6):
            actions[:, 0] = actions[:, 1] = t
            expected, got = sync.step(actions), vec.step(actions)
            for key in ("burned_cells", "sim_minutes"):
                np.testing.assert_array_equal(got[4][key], expected[4][key])
                assert got[4][key].dtype == expected[4][key].dtype
        assert {"burned_cells", "sim_minutes"} <= set(vec._infos.keys)
        assert [s.ctl.resp_payload_len for s in vec._sup.slots] == [0, 0]
    finally:
        vec.close()
        sync.close()


# -- without the extra ----------------------------------------------------------------------

def test_import_error_names_the_extra():
    # Runs whether or not pyretechnics is installed: a child process hides it.
    code = """
import sys
sys.modules["pyretechnics"] = None  # import pyretechnics -> ImportError
import fastvec.envs
try:
    from fastvec.envs import WildfireEnv
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("no ImportError")
"""
    import fastvec

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastvec.__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert 'pip install "fastvec[fire]"' in res.stdout

