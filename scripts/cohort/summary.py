"""Summary of a generated brain cohort: does every brain fit its grid, how much do the volumes vary, and how much
of the covariates can the anatomy reveal at all?

    python -c "from scripts.cohort.summary import summarise_cohort; print(summarise_cohort('data/cohort_brain_mni152'))"
    python -c "from scripts.cohort.summary import volume_ceiling; print(volume_ceiling('data/cohort_brain_mni152'))"

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

from scripts.cohort.brain_phantom import measure_brain

__all__ = ["scan_geometry", "summarise_cohort", "volume_ceiling"]

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


VOLUMES = ("ventricle_ml", "hippocampus_ml", "brain_ml", "gray_matter_ml")


def _contrast(cohort_dir: Path, record: dict) -> float:
    """log(mean white-matter / mean grey-matter intensity) of a scan, inside its exact label map."""
    import nibabel as nib

    from scripts.cohort.causal_model import BRAIN_LABELS

    image = np.asarray(nib.load(str(cohort_dir / record["image"])).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(str(cohort_dir / record["label"])).dataobj)
    white, grey = image[label == BRAIN_LABELS["white_matter"]], image[label == BRAIN_LABELS["gray_matter"]]
    return float(np.log(white.mean() / grey.mean()))


def volume_ceiling(cohort_dir: str | os.PathLike) -> dict[str, Any]:
    """
    What an oracle that reads the exact structure volumes (the generator's measurements) and the grey/white-matter
    contrast (mean intensities inside the exact label map) reaches on the evaluators' tasks, fitted on the
    datalist's training records and scored on its validation records: age by least squares on these features and
    sex (held-out MAE, beside the mean guess's), sex and diagnosis by logistic regression on them (accuracy, beside
    the majority guess's). These are the covariates' documented effects; the subjects' own variety limits an
    image-based predictor the same way, so this is the reference its held-out skill is read against (a CNN may use
    cues beyond these, such as cortical thickness).
    """
    from sklearn.linear_model import LinearRegression, LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cohort_dir = Path(cohort_dir)
    datalist = json.loads((cohort_dir / "datalist.json").read_text())
    measured: dict[str, list[dict[str, float]]] = {}

    def features(records: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        rows, covariates = [], {"age": [], "sex": [], "diagnosis": []}
        for record in records:
            subject = str(record["subject"])
            if subject not in measured:
                measured[subject] = json.loads((cohort_dir / "exogenous" / f"{subject}.json").read_text())[
                    "measurements"
                ]
            volumes = measured[subject][int(record.get("visit", 0))]
            rows.append([np.log(volumes[key]) for key in VOLUMES] + [_contrast(cohort_dir, record)])
            for key in covariates:
                covariates[key].append(record[key])
        return np.asarray(rows), {key: np.asarray(values) for key, values in covariates.items()}

    train_x, train_y = features(datalist["training"])
    test_x, test_y = features(datalist["validation"])
    sex_train = (train_y["sex"] == "M").astype(float)[:, None]
    sex_test = (test_y["sex"] == "M").astype(float)[:, None]
    age = make_pipeline(StandardScaler(), LinearRegression()).fit(np.hstack([train_x, sex_train]), train_y["age"])
    age_error = np.abs(age.predict(np.hstack([test_x, sex_test])) - test_y["age"])
    result: dict[str, Any] = {
        "num_training": len(train_x),
        "num_held_out": len(test_x),
        "age_mae": float(age_error.mean()),
        "age_mae_mean_guess": float(np.abs(test_y["age"] - train_y["age"].mean()).mean()),
    }
    for key in ("sex", "diagnosis"):
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_x, train_y[key])
        values, counts = np.unique(train_y[key], return_counts=True)
        result[f"{key}_accuracy"] = float((classifier.predict(test_x) == test_y[key]).mean())
        result[f"{key}_accuracy_majority_guess"] = float((test_y[key] == values[counts.argmax()]).mean())
    result["segmentation_dice"] = 1.0  # the oracle renders the label map itself
    return result
