"""Summary of a generated brain cohort: does every brain fit its grid, and how much do the volumes vary?

    python -c "from scripts.cohort_summary import summarise_cohort; print(summarise_cohort('data/cohort_brain_mni152'))"

For each scan it reads the label map and reports the smallest gap (mm) between the brain and each face of the grid
(a brain that touches a face is cut off), the extent of the brain (mm) and the measured volumes; over the cohort it
gives the range of those and the subject-to-subject spread (mean, standard deviation) of each volume at visit 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from scripts.phantoms import measure_brain

__all__ = ["scan_geometry", "summarise_cohort"]

FACES = ("left", "right", "posterior", "anterior", "inferior", "superior")


def scan_geometry(label: np.ndarray, spacing: float) -> dict[str, Any]:
    """Gap (mm) from the labelled brain to each grid face and the brain's extent (mm) along x, y, z."""
    found = np.argwhere(np.asarray(label) > 0)
    if found.size == 0:
        raise ValueError("the label map is empty: no brain to measure.")
    low, high = found.min(axis=0), found.max(axis=0)
    gaps = []
    for axis, size in enumerate(label.shape):
        gaps += [float(low[axis]) * spacing, float(size - 1 - high[axis]) * spacing]
    return {"gap_mm": dict(zip(FACES, gaps)), "extent_mm": [float(h - lo + 1) * spacing for lo, h in zip(low, high)]}


def _spread(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0}


def summarise_cohort(cohort_dir: str | os.PathLike) -> dict[str, Any]:
    """Smallest gap to each face and largest extent over all scans; spread of the visit-0 volumes over subjects."""
    import nibabel as nib

    cohort_dir = Path(cohort_dir)
    records = [r for part in json.loads((cohort_dir / "datalist.json").read_text()).values() for r in part]
    gaps = {face: float("inf") for face in FACES}
    extent = [0.0, 0.0, 0.0]
    baseline: dict[str, list[float]] = {}
    for record in records:
        image = nib.load(str(cohort_dir / record["label"]))
        label, spacing = np.asarray(image.dataobj), float(image.header.get_zooms()[0])
        geometry = scan_geometry(label, spacing)
        gaps = {face: min(gaps[face], geometry["gap_mm"][face]) for face in FACES}
        extent = [max(a, b) for a, b in zip(extent, geometry["extent_mm"])]
        if record.get("visit", 0) == 0:
            for key, value in measure_brain(label, spacing).items():
                baseline.setdefault(key, []).append(value)
    return {
        "scans": len(records),
        "grid_shape": list(label.shape),
        "spacing_mm": spacing,
        "smallest_gap_mm": gaps,
        "largest_brain_extent_mm": extent,
        "visit0_volume_spread_ml": {key: _spread(values) for key, values in baseline.items()},
    }
