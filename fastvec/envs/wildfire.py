"""WildfireEnv: place fuel breaks against a spreading pyretechnics fire.

::

    seed -> landscape.generate -> float32 rasters + 1 east column -> SpaceTimeCubes
                                        ^                                  | read live
    step(action) -- break: fuel 91 -----+                                  v
                 -- spread_fire_with_phi_field(same SpreadState, minutes_per_step)
                 -- phi, time_of_arrival (live views) -> _fireobs.build (C, nogil) -> obs

The simulator (SpreadState, SpaceTimeCube) cannot be pickled, so it is built in ``reset``:
an env that was never reset pickles, and works under fork and spawn. numpy/scipy start
OpenBLAS thread pools; with many workers set ``OPENBLAS_NUM_THREADS=1`` in their environment.

Handled quirks of pyretechnics 2026.10.20: its narrow band never tracks the easternmost
column (we add a non-burnable one and crop it); a fire can stall while every call answers
"max duration reached" (we count steps without new burned cells); unknown fuel codes or an
ignition off the grid read or write outside its arrays (we validate first and raise
ValueError); non-float32 inputs are copied with a printed ``WARNING:`` (we pass float32);
``get_full_matrices`` returns live views (observations are fresh arrays); a burned cell's
phi can climb back above 0 (burned means "has an arrival time").
"""

from __future__ import annotations

import logging
import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

try:
    from pyretechnics import fuel_models as _fuel_models
    from pyretechnics.eulerian_level_set import SpreadState, spread_fire_with_phi_field
    from pyretechnics.space_time_cube import SpaceTimeCube
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        'fastvec.envs.wildfire needs pyretechnics: pip install "fastvec[fire]"') from exc

from fastvec.envs import _fireobs
from fastvec.envs import landscape as _landscape
from fastvec.envs.landscape import CELL_SIZE_M, WIND_MAX_KMH, Landscape

__all__ = ["WildfireEnv", "BREAK_CODE", "CHANNELS"]

logger = logging.getLogger(__name__)

#: Fuel model code written into break cells (NB1, not burnable).
BREAK_CODE = 91
#: Observation channels, in order; see csrc/fireobs.h.
CHANNELS = ("fuel", "burned", "front", "arrival", "elevation", "wind_u", "wind_v")

FUEL_CODES = frozenset(int(n) for n in _fuel_models.list_fuel_model_numbers())
_NONBURNABLE = np.array(sorted(n for n in FUEL_CODES
                               if not _fuel_models.get_fuel_model(n)["burnable"]), np.float32)


def _fuel_value_table() -> np.ndarray:
    """Observation value of each fuel code: 0 if not burnable, else 0.25..1 by total load."""
    load = {n: sum(_fuel_models.get_fuel_model(n)["w_o"]) for n in FUEL_CODES}
    top = max(load[n] for n in FUEL_CODES if n not in _NONBURNABLE)
    table = np.zeros(max(FUEL_CODES) + 1, np.float32)
    for n in FUEL_CODES:
        if n not in _NONBURNABLE:
            table[n] = 0.25 + 0.75 * load[n] / top
    return table


_FUEL_VALUE = _fuel_value_table()


def _burnable(codes: np.ndarray) -> np.ndarray:
    return ~np.isin(codes, _NONBURNABLE)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _pad_east(a: np.ndarray, value: float) -> np.ndarray:
    return _f32(np.pad(a, ((0, 0), (0, 1)), constant_values=value))


class _Fire:
    """One pyretechnics spread over a grid plus one non-burnable east column.

    The column is there because pyretechnics never tracks its last column; ``phi`` and
    ``arrival`` are (rows, cols) live views that leave it out. Breaks write into ``fuel``,
    the very array the fuel cube reads: each spread call rebuilds its frontier and caches
    from the cubes, so a break takes effect on the next call.
    """

    def __init__(self, land: Landscape, fuel: np.ndarray, ignition: tuple[int, int],
                 minutes_per_step: float, bands: int):
        rows, cols = fuel.shape
        shape = (bands, rows, cols + 1)
        self.fuel = _pad_east(fuel, BREAK_CODE)

        def plane(a):
            return SpaceTimeCube(shape, _pad_east(a, 0.0))

        self.cubes = {
            "slope": plane(land.slope),
            "aspect": plane(land.aspect),
            "fuel_model": SpaceTimeCube(shape, self.fuel),
            "canopy_cover": plane(land.canopy_cover),
            "canopy_height": plane(land.canopy_height),
            "canopy_base_height": plane(land.canopy_base_height),
            "canopy_bulk_density": plane(land.canopy_bulk_density),
            # One value per band; a band is one step.
            "wind_speed_10m": SpaceTimeCube(shape, _f32(land.wind_speed[:bands])),
            "upwind_direction": SpaceTimeCube(shape, _f32(land.upwind_direction[:bands])),
            **{k: SpaceTimeCube(shape, np.float32(v)) for k, v in land.moisture.items()},
        }
        if not np.shares_memory(np.asarray(self.cubes["fuel_model"].data), self.fuel):
            raise RuntimeError("pyretechnics copied the fuel raster; breaks would not reach it")
        self.minutes, self.target = float(minutes_per_step), 0.0
        self.cols = cols
        self.state = SpreadState(shape)
        self.state.set_resolution((self.minutes, CELL_SIZE_M, CELL_SIZE_M))
        self.state.set_start_time(0.0)
        self.state.ignite_cell(ignition)
        self._views()

    def _views(self) -> None:
        m = self.state.get_full_matrices(["phi", "time_of_arrival"])
        self.phi = m["phi"][:, :self.cols]
        self.arrival = m["time_of_arrival"][:, :self.cols]

    def advance(self) -> bool:
        """Spread for one step; False once no cell is tracked (the fire is out)."""
        # Aim at the step's end rather than adding a step: pyretechnics keeps time in float32
        # and stops up to a second early, which would otherwise add up.
        self.target += self.minutes
        out = spread_fire_with_phi_field(self.cubes, self.state,
                                         max_duration=self.target - self.minutes_elapsed)
        self._views()
        return out["num_tracked_cells"] > 0

    def place(self, ys: slice, xs: slice) -> np.ndarray:
        """Make the never burned, burnable cells of the window non-burnable; return which."""
        # Burned cells keep their fuel: pyretechnics drops a cell from the front once its
        # fuel reads non-burnable, so a "break" there would put out a fire already burning.
        window = self.fuel[ys, xs]
        placed = np.isnan(self.arrival[ys, xs]) & _burnable(window)
        window[placed] = BREAK_CODE
        return placed

    def burned(self) -> int:
        """Cells that ever burned.

        Counted by arrival time, not phi < 0: pyretechnics sometimes lets a burned cell's phi
        climb back above 0 (next to the grid edge, around breaks) but keeps its arrival time,
        so this count never falls and rewards stay <= 0.
        """
        return int(np.count_nonzero(~np.isnan(self.arrival)))

    @property
    def minutes_elapsed(self) -> float:
        return float(self.state.get_simulation_time())


class _Episode:
    """Step and stall counters of one run: the one place that decides when it ends."""

    def __init__(self, fire: _Fire, max_steps: int, stall_steps: int):
        self.fire, self.max_steps, self.stall_steps = fire, max_steps, stall_steps
        self.steps = self.idle = 0
        self.burned = fire.burned()

    def advance(self) -> tuple[int, bool, bool]:
        """One step of the fire: (newly burned cells, terminated, truncated)."""
        burning = self.fire.advance()
        burned = self.fire.burned()
        new, self.burned = burned - self.burned, burned
        self.steps += 1
        # A stalled fire keeps its tracked cells forever, so no progress is the other end.
        self.idle = 0 if new > 0 else self.idle + 1
        terminated = not burning or self.idle >= self.stall_steps
        return new, terminated, not terminated and self.steps >= self.max_steps


class WildfireEnv(gym.Env):
    """Contain a wildfire on a synthetic landscape by placing fuel breaks.

    Action ``(row, col, orientation)`` from ``MultiDiscrete([size, size, 2])``: a break of
    ``break_length`` x 2 cells with its south-west corner at (row, col), running east
    (orientation 0) or north (1), clipped at the edges. Only never burned, burnable cells
    change (to fuel code 91). Then the fire spreads for ``minutes_per_step`` minutes.

    Observation: ``(7, size, size)`` channels-first raster, channels ``CHANNELS`` (fuel,
    burned, front, arrival, elevation, wind_u, wind_v; see csrc/fireobs.h); row 0 is south.
    float32 in [0, 1] ([-1, 1] for wind), or uint8 0..255 with ``obs_dtype="uint8"``.

    Reward: minus the cells burned during the step as a fraction of the grid, so an episode's
    return is minus the burned fraction, less the ignition cell. Terminates when the fire is
    out or burned no new cell for ``stall_steps`` steps; truncates after ``max_steps``. Every
    info has ``burned_cells`` and ``sim_minutes``; the last one of an episode also
    ``burned_fraction``, and with ``compute_reduction=True`` ``reduction`` =
    1 - burned / burned without breaks (same landscape and ignition, same ending rules,
    simulated then).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, size: int = 64, minutes_per_step: float = 30.0, max_steps: int = 100,
                 break_length: int = 8, obs_dtype: str = "float32", stall_steps: int = 4,
                 compute_reduction: bool = False, render_mode: str | None = None):
        for name, value, lo in (("size", size, 2), ("max_steps", max_steps, 1),
                                ("break_length", break_length, 1),
                                ("stall_steps", stall_steps, 1)):
            if not isinstance(value, (int, np.integer)) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, not {value!r}")
        if not (minutes_per_step > 0 and math.isfinite(minutes_per_step)):
            raise ValueError(f"minutes_per_step must be > 0, not {minutes_per_step!r}")
        if obs_dtype not in ("float32", "uint8"):
            raise ValueError(f'obs_dtype must be "float32" or "uint8", not {obs_dtype!r}')
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', not {render_mode!r}")
        self.size, self.max_steps = int(size), int(max_steps)
        self.minutes_per_step = float(minutes_per_step)
        self.break_length, self.stall_steps = int(break_length), int(stall_steps)
        self.obs_dtype, self.compute_reduction = obs_dtype, bool(compute_reduction)
        self.render_mode = render_mode

        shape = (len(CHANNELS), self.size, self.size)
        self.action_space = spaces.MultiDiscrete([self.size, self.size, 2])
        if obs_dtype == "uint8":
            self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        else:
            low = np.zeros(shape, np.float32)
            low[list(_fireobs.SIGNED_CHANNELS)] = -1.0
            self.observation_space = spaces.Box(low, 1.0, shape, np.float32)

        # Built by reset(); pyretechnics objects cannot be pickled.
        self._fire: _Fire | None = None
        self._episode: _Episode | None = None
        self._done = False

    # -- landscapes -------------------------------------------------------------------------

    def make_landscape(self, rng: np.random.Generator, bands: int) -> Landscape:
        """The landscape of the next episode; override to supply your own."""
        return _landscape.generate(rng, self.size, bands)

    def _check_landscape(self, land: Landscape, bands: int) -> np.ndarray:
        """Validate what pyretechnics would not; return the fuel codes as float32."""
        shape = (self.size, self.size)
        for name in ("fuel_model", "elevation", "slope", "aspect", "canopy_cover",
                     "canopy_height", "canopy_base_height", "canopy_bulk_density"):
            a = np.asarray(getattr(land, name))
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise ValueError(f"landscape.{name} must be finite with shape {shape}")
        fuel = _f32(land.fuel_model)
        unknown = set(np.unique(fuel).tolist()) - FUEL_CODES
        if unknown:  # pyretechnics indexes a 300-entry table with these, unchecked
            raise ValueError(f"landscape.fuel_model has codes pyretechnics does not know: "
                             f"{sorted(unknown)[:5]}")
        for name in ("wind_speed", "upwind_direction"):
            a = np.asarray(getattr(land, name))
            if a.ndim != 1 or len(a) < bands or not np.all(np.isfinite(a[:bands])):
                raise ValueError(f"landscape.{name} must be 1-d, finite, of length >= {bands}")
        if np.any(np.asarray(land.wind_speed[:bands]) < 0):
            raise ValueError("landscape.wind_speed must be >= 0")
        if set(land.moisture) != set(_landscape.MOISTURE_KEYS) or not all(
                math.isfinite(v) and v > 0 for v in land.moisture.values()):
            raise ValueError(f"landscape.moisture needs positive finite values for exactly "
                             f"{_landscape.MOISTURE_KEYS}")
        return fuel

    def _draw_ignition(self, fuel: np.ndarray) -> tuple[int, int]:
        # Away from the edges when possible: a fire lit on an edge with the wind blowing
        # off the grid leaves it at once (pyretechnics even un-burns the ignition cell).
        m = self.size // 8
        inner = np.zeros_like(fuel, dtype=bool)
        inner[m:self.size - m, m:self.size - m] = True
        for allowed in (inner & _burnable(fuel), _burnable(fuel)):
            cells = np.flatnonzero(allowed)
            if cells.size:
                return divmod(int(self.np_random.choice(cells)), self.size)
        raise ValueError("the landscape has no burnable cell to ignite")

    def _check_ignition(self, cell, fuel: np.ndarray) -> tuple[int, int]:
        # pyretechnics writes phi[2+y, 2+x] unchecked: off the grid corrupts memory.
        try:
            y, x = (int(v) for v in cell)
        except (TypeError, ValueError):
            raise ValueError(f"ignition must be (row, col), not {cell!r}") from None
        if not (0 <= y < self.size and 0 <= x < self.size):
            raise ValueError(f"ignition {cell!r} is off the {self.size}x{self.size} grid")
        if not _burnable(fuel[y, x]):
            raise ValueError(f"ignition {cell!r} is on non-burnable fuel {int(fuel[y, x])}")
        return y, x

    # -- gymnasium API ----------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._fire = self._episode = None  # a landscape that fails its checks ends the last run
        bands = self.max_steps + 1  # one spare band: pyretechnics keeps time in float32
        land = self.make_landscape(self.np_random, bands)
        fuel = self._check_landscape(land, bands)
        cell = land.ignition if land.ignition is not None else self._draw_ignition(fuel)
        self._ignition = self._check_ignition(cell, fuel)
        self._land, self._fuel0 = land, fuel
        self._fuel_value = _FUEL_VALUE[fuel.astype(np.intp)]
        elev = np.asarray(land.elevation, np.float64)
        span = elev.max() - elev.min()
        self._elevation = _f32((elev - elev.min()) / span if span > 0 else np.zeros_like(elev))
        self._breaks = np.zeros((self.size, self.size), bool)
        self._fire = _Fire(land, fuel, self._ignition, self.minutes_per_step, bands)
        self._episode = _Episode(self._fire, self.max_steps, self.stall_steps)
        self._done = False
        logger.debug("reset: ignition %s, fuels %s", self._ignition, np.unique(fuel).tolist())
        return self._observe(), self._info()

    def step(self, action):
        if self._fire is None:
            raise RuntimeError("step() called before reset(); call reset() first")
        if self._done:
            raise RuntimeError("step() called after the episode ended; call reset() first")
        self._place_break(*self._parse(action))
        new, terminated, truncated = self._episode.advance()
        info = self._info()
        if terminated or truncated:
            self._done = True
            info.update(self._final_info())
        reward = -new / (self.size * self.size)
        return self._observe(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array" or self._fire is None:
            return None
        fv = self._fuel_value
        img = np.empty((self.size, self.size, 3), np.uint8)
        img[...] = (120, 120, 120)  # not burnable
        green = fv > 0
        img[green, 0] = 30
        img[green, 1] = (80 + 150 * fv[green]).astype(np.uint8)
        img[green, 2] = 30
        img[self._breaks] = (170, 110, 40)
        obs = self._observe()
        if self.obs_dtype == "uint8":
            obs = obs.astype(np.float32) / 255
        img[obs[1] > 0.5] = (40, 40, 40)
        img[obs[2] > 0.5] = (255, 90, 0)
        return np.ascontiguousarray(img[::-1])  # north up

    # -- helpers ----------------------------------------------------------------------------

    def _parse(self, action) -> tuple[int, int, int]:
        a = np.asarray(action)
        if (a.shape != (3,) or a.dtype.kind not in "iu"
                or not self.action_space.contains(a.astype(np.int64))):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        return int(a[0]), int(a[1]), int(a[2])

    def _place_break(self, row: int, col: int, north: int) -> None:
        length, n = self.break_length, self.size
        rows, cols = (length, 2) if north else (2, length)
        ys, xs = slice(row, min(row + rows, n)), slice(col, min(col + cols, n))
        placed = self._fire.place(ys, xs)
        self._fuel_value[ys, xs][placed] = 0.0
        self._breaks[ys, xs] |= placed

    def _observe(self) -> np.ndarray:
        obs = np.empty(self.observation_space.shape, self.observation_space.dtype)
        k = min(self._episode.steps, len(self._land.wind_speed) - 1)  # wind of the next step
        speed = float(self._land.wind_speed[k]) / WIND_MAX_KMH
        to = math.radians(float(self._land.upwind_direction[k]) + 180.0)
        _fireobs.build(obs, self._fire.phi, self._fire.arrival, self._fuel_value,
                       self._elevation, 1.0 / (self.max_steps * self.minutes_per_step),
                       speed * math.sin(to), speed * math.cos(to))
        return obs

    def _info(self) -> dict:
        return {"burned_cells": self._episode.burned, "sim_minutes": self._fire.minutes_elapsed}

    def _final_info(self) -> dict:
        info = {"burned_fraction": self._episode.burned / (self.size * self.size)}
        if self.compute_reduction:
            baseline = self._burned_without_breaks()
            info["reduction"] = 1.0 - self._episode.burned / baseline
        return info

    def _burned_without_breaks(self) -> int:
        fire = _Fire(self._land, self._fuel0, self._ignition, self.minutes_per_step,
                     self.max_steps + 1)
        run = _Episode(fire, self.max_steps, self.stall_steps)
        while not any(run.advance()[1:]):
            pass
        logger.debug("baseline without breaks: %d cells in %d steps", run.burned, run.steps)
        return run.burned
