"""Out-of-distribution check: is a scan like the ones the weights were trained on?

At the end of training the autoencoder's reconstruction error, mean |D(E(x)) - x| on the network grid after the
inference preprocessing, is measured over the validation scans and saved with the weights (`reconstruction_profile`),
together with the raw properties of the training files (`input_profile`: voxel spacing, field of view, bit depth).
At inference the input's own error is compared with that distribution: above the saved high percentile, the log
and the JSON record say that the scan lies outside what the weights were trained on (`out_of_distribution`).
It is a warning, not an error: the counterfactual is still written.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@torch.inference_mode()
def reconstruction_errors(network: Any, batches: Iterable, image_key: str = "image") -> list[float]:
    """Mean |D(E(x)) - x| of every image in `batches` (dicts holding `image_key`), with the network in eval mode."""
    device = next(network.parameters()).device
    was_training = network.training
    network.eval()
    errors: list[float] = []
    for batch in batches:
        images = torch.as_tensor(batch[image_key]).float().to(device)
        reconstruction = network.decode(network.encode(images)).float()
        errors += (reconstruction - images).abs().flatten(1).mean(1).cpu().tolist()
    network.train(was_training)
    return errors


def reconstruction_profile(
    network: Any, batches: Iterable, image_key: str = "image", percentile: float = 99.9
) -> dict[str, Any]:
    """
    The distribution saved with the weights: the sorted errors and the warning threshold at `percentile` of a
    log-normal fitted to them. A fitted tail, not the empirical percentile: validation sets are small and their
    scans come in subjects of near-identical visits, so the empirical 99th percentile is about the largest value
    seen, and new subjects of the same cohort cross it far more often than it promises.
    """
    errors = sorted(reconstruction_errors(network, batches, image_key))
    threshold = None  # fewer than 2 scans give no spread: the check then says it is unavailable
    if len(errors) >= 2:
        logs = np.log(np.maximum(errors, 1e-12))
        z = statistics.NormalDist().inv_cdf(percentile / 100)
        threshold = float(np.exp(logs.mean() + z * logs.std(ddof=1)))
    return {
        "values": [round(e, 6) for e in errors],
        "percentile": float(percentile),
        "threshold": threshold,
        "fit": "log-normal",
        "measured_on": "validation scans after the inference preprocessing",
    }


def scan_properties(path: str) -> dict[str, Any]:
    """Spacing (mm), field of view (mm) and stored data type of an image file, read from its header only."""
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        header = nib.load(path).header
        shape = header.get_data_shape()[:3]
        spacing = [float(z) for z in header.get_zooms()[:3]]
        return {
            "spacing_mm": spacing,
            "field_of_view_mm": [round(n * z, 3) for n, z in zip(shape, spacing)],
            "dtype": str(header.get_data_dtype()),
        }
    from PIL import Image

    with Image.open(path) as picture:
        return {"dtype": {"I;16": "uint16", "I": "int32", "F": "float32"}.get(picture.mode, "uint8")}


def input_profile(paths: Sequence[str]) -> dict[str, Any]:
    """The range of each raw property over the training files: what `check_input` compares a new scan with."""
    properties = [scan_properties(p) for p in paths]
    if not properties:
        raise ValueError("cannot build the input profile: no training file given.")
    profile: dict[str, Any] = {"dtypes": sorted({p["dtype"] for p in properties}), "count": len(properties)}
    for key in ("spacing_mm", "field_of_view_mm"):
        values = np.array([p[key] for p in properties if key in p])
        if values.size:
            profile[key] = {"min": values.min(0).tolist(), "max": values.max(0).tolist()}
    return profile


def out_of_distribution(metadata: Mapping[str, Any] | None, error: float | None, path: str) -> dict[str, Any]:
    """
    Compare the input's reconstruction error and raw properties with what the weights saved; log a warning for
    each finding and return the record's "out_of_distribution" entry.
    """
    profile = (metadata or {}).get("reconstruction_error")
    if not profile or profile.get("threshold") is None or error is None:
        return {
            "available": False,
            "reason": "the weights carry no reconstruction-error profile (saved before this check existed, not by "
            "stage-2 training, or from fewer than 2 validation scans); re-save them with configs/stamp_weights.json",
        }
    values = np.asarray(profile["values"], dtype=float)
    rank = float((values < error).mean() * 100)
    outside = error > float(profile["threshold"])
    findings = []
    if outside:
        findings.append(
            f"reconstruction error {error:.4f} is above the {profile['percentile']:g}th percentile "
            f"({profile['threshold']:.4f}) of the training validation scans' errors (it ranks above {rank:.1f}% of "
            "them): the scan "
            "lies outside what these weights were trained on; read the counterfactual with care"
        )
    findings += _raw_findings(metadata.get("input_profile"), path)
    for finding in findings:
        logger.warning(f"{path}: {finding}")
    return {
        "available": True,
        "outside": bool(outside) or bool(findings),
        "reconstruction_error": round(float(error), 6),
        "percentile_rank": round(rank, 1),
        "threshold": float(profile["threshold"]),
        "threshold_percentile": float(profile["percentile"]),
        "findings": findings,
    }


def _raw_findings(profile: Mapping[str, Any] | None, path: str) -> list[str]:
    if not profile or not Path(path).is_file():
        return []
    try:
        properties = scan_properties(path)
    except Exception:  # unreadable headers were refused before compute; nothing to add here
        return []
    findings = []
    if properties["dtype"] not in profile.get("dtypes", [properties["dtype"]]):
        findings.append(f"stored as {properties['dtype']}, the training scans as {profile['dtypes']}")
    for key, what in (("spacing_mm", "voxel spacing"), ("field_of_view_mm", "field of view")):
        if key in properties and key in profile:
            low = np.asarray(profile[key]["min"]) * 0.8
            high = np.asarray(profile[key]["max"]) * 1.25
            value = np.asarray(properties[key])
            if ((value < low) | (value > high)).any():
                findings.append(
                    f"{what} {value.round(2).tolist()} mm is outside the training range "
                    f"{profile[key]['min']}-{profile[key]['max']} mm (±25%)"
                )
    return findings
