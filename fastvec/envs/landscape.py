"""Synthetic landscapes for the wildfire env: terrain, fuels, canopy, moisture and wind.

Everything is drawn from one ``numpy.random.Generator``, so a seed fixes a landscape and no
data is downloaded. Rasters are float32 (pyretechnics copies, and prints a warning for, any
other dtype) with shape (size, size); row 0 is the south edge, as in pyretechnics, where y
points north. Units are those pyretechnics expects (see ``Landscape``).

This module needs only numpy; the simulator's quirks (padding, validation) live in
``fastvec.envs.wildfire``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Edge of one cell in metres (LANDFIRE's 30 m grid).
CELL_SIZE_M = 30.0
#: Wind speed (km/h) that the observation maps to 1.
WIND_MAX_KMH = 40.0

# Scott & Burgan 40 codes grouped by kind; patches draw from these only (all exist in
# pyretechnics' fuel model table). Timber kinds get a canopy.
GRASS = (101, 102, 103)
GRASS_SHRUB = (121, 122)
SHRUB = (141, 142, 145)
TIMBER_UNDERSTORY = (161, 165)
TIMBER_LITTER = (181, 183, 186)
BURNABLE_CODES = GRASS + GRASS_SHRUB + SHRUB + TIMBER_UNDERSTORY + TIMBER_LITTER
TIMBER_CODES = TIMBER_UNDERSTORY + TIMBER_LITTER
#: Open water; the env's fuel breaks use NB1 (91).
WATER = 98

MOISTURE_KEYS = (
    "fuel_moisture_dead_1hr",
    "fuel_moisture_dead_10hr",
    "fuel_moisture_dead_100hr",
    "fuel_moisture_live_herbaceous",
    "fuel_moisture_live_woody",
    "foliar_moisture",
)


@dataclass
class Landscape:
    """The inputs of one episode on a (size, size) grid.

    ``fuel_model`` holds fuel model codes; ``slope`` is rise/run; ``aspect`` and
    ``upwind_direction`` are degrees clockwise from north (aspect is the downhill direction,
    upwind the direction the wind comes from); canopy cover is a fraction, heights are
    metres, bulk density kg/m^3; moistures are fractions of dry weight; wind speed is km/h
    at 10 m. Wind is uniform in space and varies in time: one value per band of the
    simulation (``wind_*[k]`` applies during step k). ``ignition`` (row, col) or None to
    let the env draw one.
    """

    fuel_model: np.ndarray
    elevation: np.ndarray
    slope: np.ndarray
    aspect: np.ndarray
    canopy_cover: np.ndarray
    canopy_height: np.ndarray
    canopy_base_height: np.ndarray
    canopy_bulk_density: np.ndarray
    moisture: dict[str, float]
    wind_speed: np.ndarray
    upwind_direction: np.ndarray
    ignition: tuple[int, int] | None = field(default=None)


def smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """White noise low-passed with a Gaussian of ``scale`` cells, rescaled to [0, 1]."""
    noise = rng.standard_normal((size, size))
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    gain = np.exp(-2.0 * (np.pi * scale) ** 2 * (kx**2 + ky**2))
    f = np.fft.irfft2(np.fft.rfft2(noise) * gain, s=(size, size))
    lo, hi = f.min(), f.max()
    return (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)


def slope_aspect(elevation: np.ndarray, cell_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Slope (rise/run) and aspect (downhill azimuth, degrees) of an elevation raster."""
    dz_dy, dz_dx = np.gradient(elevation.astype(np.float64), cell_size)  # rows point north
    slope = np.hypot(dz_dx, dz_dy)
    aspect = np.degrees(np.arctan2(-dz_dx, -dz_dy)) % 360.0
    return slope.astype(np.float32), np.where(slope > 0, aspect, 0.0).astype(np.float32)


def random_walk(rng: np.random.Generator, n: int, start: float, step: float, lo: float,
                hi: float) -> np.ndarray:
    """A slowly drifting series: ``start`` plus cumulative N(0, step) steps, clipped."""
    return np.clip(start + np.cumsum(rng.normal(0.0, step, n)), lo, hi)


def generate(rng: np.random.Generator, size: int, bands: int) -> Landscape:
    """Draw a landscape of ``size`` x ``size`` cells with wind for ``bands`` steps."""
    f32 = np.float32
    relief = rng.uniform(30.0, 300.0)
    elevation = (relief * smooth_field(rng, size, size / 6)).astype(f32)
    slope, aspect = slope_aspect(elevation, CELL_SIZE_M)

    # Fuel patches: quantiles of a smooth field, each band of it one code, so every code
    # covers about the same area. A few low spots of another field become water.
    codes = rng.choice(BURNABLE_CODES, size=rng.integers(3, 7), replace=False)
    veg = smooth_field(rng, size, size / 12)
    edges = np.quantile(veg, np.linspace(0, 1, len(codes) + 1)[1:-1])
    fuel = np.asarray(codes, dtype=f32)[np.searchsorted(edges, veg)]
    wet = smooth_field(rng, size, size / 10)
    fuel[wet < rng.uniform(0.0, 0.12)] = WATER

    timber = np.isin(fuel, TIMBER_CODES)
    density = smooth_field(rng, size, size / 8)
    canopy_cover = np.where(timber, 0.3 + 0.5 * density, 0.0).astype(f32)
    canopy_height = np.where(timber, 12.0 + 13.0 * density, 0.0).astype(f32)
    canopy_base_height = np.where(timber, 1.5 + 3.5 * (1.0 - density), 0.0).astype(f32)
    canopy_bulk_density = np.where(timber, 0.05 + 0.15 * density, 0.0).astype(f32)

    dead = rng.uniform(0.03, 0.08)
    moisture = dict(zip(MOISTURE_KEYS, (
        dead,
        dead + rng.uniform(0.01, 0.02),
        dead + rng.uniform(0.02, 0.04),
        rng.uniform(0.3, 1.0),
        rng.uniform(0.6, 1.3),
        rng.uniform(0.8, 1.2),
    )))

    wind_speed = random_walk(rng, bands, rng.uniform(5.0, 30.0), 1.5, 0.0, WIND_MAX_KMH)
    upwind = random_walk(rng, bands, rng.uniform(0.0, 360.0), 5.0, -np.inf, np.inf) % 360.0
    return Landscape(
        fuel_model=fuel,
        elevation=elevation,
        slope=slope,
        aspect=aspect,
        canopy_cover=canopy_cover,
        canopy_height=canopy_height,
        canopy_base_height=canopy_base_height,
        canopy_bulk_density=canopy_bulk_density,
        moisture={k: float(v) for k, v in moisture.items()},
        wind_speed=wind_speed.astype(f32),
        upwind_direction=upwind.astype(f32),
    )
