"""Geometry of the procedural anatomy: voxel grids in mm, signed distances, partial-volume painting, random fields."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Geometry helpers (signed distances in mm: negative inside)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def mm_grid(shape: tuple[int, ...], spacing: float) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates in mm, origin at the grid centre, float32."""
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * spacing).astype(np.float32) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij", sparse=False)
    for g in grids:
        g.flags.writeable = False
    return tuple(grids)


def ellipsoid_distance(points: Sequence[np.ndarray], center: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """First-order signed distance to an axis-aligned ellipsoid (exact on the surface, smooth everywhere)."""
    scaled = [(p - c) / a for p, c, a in zip(points, center, semi_axes)]
    norm = np.sqrt(sum(s * s for s in scaled))
    grad = np.sqrt(sum((s / a) ** 2 for s, a in zip(scaled, semi_axes)))
    return (norm - 1.0) * norm / np.maximum(grad, 1e-6)


def rotate(u: np.ndarray, v: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return c * u - s * v, s * u + c * v


def coverage(signed_distance: np.ndarray, spacing: float) -> np.ndarray:
    """Partial-volume fraction of a voxel inside a surface (linear ramp one voxel wide); 0.5 on the surface."""
    return np.clip(0.5 - signed_distance / spacing, 0.0, 1.0)


class Painter:
    """Front-to-back compositing of soft tissue masks into an intensity image and a hard label map."""

    def __init__(self, shape: tuple[int, ...], spacing: float):
        self.image = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, np.uint8)
        self.spacing = spacing

    def paint(self, signed_distance: np.ndarray, intensity: float | np.ndarray, label: int) -> None:
        alpha = coverage(signed_distance, self.spacing)
        self.image += alpha * (intensity - self.image)
        self.label[signed_distance < 0] = label


def random_waves(points: Sequence[np.ndarray], seed: int, wavelength: float, count: int) -> np.ndarray:
    """Unit-variance band-limited random field: a sum of plane waves of one wavelength, random directions/phases."""
    rng = np.random.default_rng(seed)
    dims = len(points)
    directions = rng.normal(size=(count, dims))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2.0 * np.pi, count)
    k = 2.0 * np.pi / wavelength
    field = np.zeros(points[0].shape, np.float32)
    for direction, phase in zip(directions, phases):
        arg = sum(np.float32(k * d) * p for d, p in zip(direction, points))
        field += np.cos(arg + np.float32(phase))
    return field * np.float32(math.sqrt(2.0 / count))
