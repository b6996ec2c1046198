"""Score one counterfactual against the cohort generator's exact counterfactual of the same subject.

The generator (scripts/cohort/render.py) re-renders a subject from its exogenous factors under the target covariates,
so for a scan of a generated cohort the true counterfactual image and label map are known. This compares the
model's counterfactual (the JSON record written by configs/inference.json) with it, region by region of the
oracle's label maps, in units of the input's 99.5th intensity percentile:

- brain: the rim the ventricles grow into (true ventricles that were not ventricles), the hippocampus that is lost,
  the source ventricles, the brain, the background;
- chest: where the effusion appears, the rim the enlarged heart adds, the lungs, the background;
- whole image: mean absolute error of the input and of the counterfactual to the truth.

    python -m monai.bundle run oracle --config_file configs/oracle_check.json \\
        --record eval/counterfactual/sample_visit-0_record.json --cohort_dir docs/samples/brain --subject sample
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import LoadImage

from scripts.cohort.causal_model import BRAIN_LABELS, CHEST_LABELS
from scripts.cohort.generate import load_subject, write_counterfactual_truth
from scripts.io.files import atomic_write_json


def _array(path: str) -> np.ndarray:
    image = np.asarray(LoadImage(image_only=True)(path), dtype=np.float64)
    return image.mean(-1) if image.ndim == 3 and image.shape[-1] in (3, 4) and "png" in path.lower() else image


def regions(modality: str, source_label: np.ndarray, true_label: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of the regions where the causal model changes (or must not change) the image."""
    if modality == "brain":
        v, h = BRAIN_LABELS["ventricles"], BRAIN_LABELS["hippocampus"]
        return {
            "ventricle_growth_rim": (true_label == v) & (source_label != v),
            "hippocampus_lost": (source_label == h) & (true_label != h),
            "source_ventricles": source_label == v,
            "brain": np.isin(true_label, [BRAIN_LABELS[k] for k in ("gray_matter", "white_matter", "hippocampus")]),
            "background": true_label == BRAIN_LABELS["background"],
        }
    heart, fluid = CHEST_LABELS["heart"], CHEST_LABELS["effusion"]
    lungs = [CHEST_LABELS["right_lung"], CHEST_LABELS["left_lung"]]
    return {
        "effusion_region": (true_label == fluid) & (source_label != fluid),
        "heart_growth_rim": (true_label == heart) & (source_label != heart),
        "lungs_unchanged": np.isin(source_label, lungs) & np.isin(true_label, lungs),
        "background": true_label == 0,
    }


def compare_to_oracle(
    record: str, cohort_dir: str, subject: str, visit: int = 0, output_path: str | None = None
) -> dict[str, Any]:
    """Region means of input, counterfactual and truth, and whole-image MAE; written to `output_path` (JSON)."""
    content = json.loads(Path(record).read_text())
    info = load_subject(cohort_dir, subject)
    factual = info["visits"][visit]
    changes = {k: v for k, v in content["target"].items() if k in factual and factual[k] != v}
    with tempfile.TemporaryDirectory() as folder:
        truth = write_counterfactual_truth(cohort_dir, subject, changes, visit=visit, output_dir=folder)
        true_image, true_label = _array(truth["image"]), _array(truth["label"]).round().astype(int)
    stem = f"{subject}_visit-{visit}"
    suffix = ".nii.gz" if info["modality"] == "brain" else ".png"
    source = _array(str(Path(cohort_dir) / "images" / f"{stem}{suffix}"))
    source_label = _array(str(Path(cohort_dir) / "labels" / f"{stem}{suffix}")).round().astype(int)
    result = _array(content["outputs"]["counterfactual"])
    if result.shape != source.shape:
        raise ValueError(f"{record}: counterfactual shape {result.shape} differs from the input's {source.shape}.")
    scale = float(np.percentile(source, 99.5)) or 1.0
    table = {}
    for name, mask in regions(info["modality"], source_label, true_label).items():
        if mask.any():
            table[name] = {
                "voxels": int(mask.sum()),
                "input": float(source[mask].mean() / scale),
                "counterfactual": float(result[mask].mean() / scale),
                "truth": float(true_image[mask].mean() / scale),
            }
    summary = {
        "record": str(record), "subject": subject, "visit": visit, "changes": changes,
        "regions": table,
        "mae_to_truth": {"input": float(np.abs(source - true_image).mean() / scale),
                         "counterfactual": float(np.abs(result - true_image).mean() / scale)},
        "true_measurements": truth["counterfactual_measurements"],
    }  # fmt: skip
    if output_path:
        atomic_write_json(summary, output_path)
    return summary
