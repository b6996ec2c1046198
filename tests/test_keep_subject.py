"""Specification, through the bundle CLI, of counterfactuals that keep the subject and of the drift they run at."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, tiny_overrides
from monai.transforms import LoadImage

pytestmark = pytest.mark.slow

SOURCE, TARGET = "{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}", "{'age': 85, 'diagnosis': 'AD'}"


def run_tiny(bundle_cli, bundle: Path, out: Path, *extra: str, check: bool = True):
    return bundle_cli(
        "run", ["inference.json"], *tiny_overrides(bundle), "--image", str(bundle / "scan.nii.gz"),
        "--results_dir", str(out), "--source", SOURCE, "--progress", "false", *extra, check=check,
    )  # fmt: skip


def volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_target_equal_to_source_returns_the_input_voxel_for_voxel(untrained_bundle, bundle_cli, tmp_path):
    run_tiny(bundle_cli, untrained_bundle, tmp_path / "same", "--target", "{}")
    output = volume(tmp_path / "same" / "scan_counterfactual.nii.gz")
    assert np.array_equal(output, volume(untrained_bundle / "scan.nii.gz"))
    assert not volume(tmp_path / "same" / "scan_mask.nii.gz").any()


def test_a_keep_mask_leaves_its_voxels_bit_identical(untrained_bundle, bundle_cli, tmp_path):
    scan = nib.load(untrained_bundle / "scan.nii.gz")
    keep = np.zeros(scan.shape, np.uint8)
    keep[:20] = 1
    nib.save(nib.Nifti1Image(keep, scan.affine), tmp_path / "keep.nii.gz")
    out = tmp_path / "kept"
    # the untrained denoiser ignores covariates (zero-initialised output): the reconstruction base shows a change
    run_tiny(bundle_cli, untrained_bundle, out, "--target", TARGET, "--keep_mask", str(tmp_path / "keep.nii.gz"),
             "--auto_mask", "false", "--composition", "reconstruction")  # fmt: skip
    output, source = volume(out / "scan_counterfactual.nii.gz"), np.asarray(scan.dataobj)
    assert np.array_equal(output[:20], source[:20])
    assert not np.array_equal(output[20:], source[20:]), "outside the keep mask the change applies"
    record = json.loads((out / "scan_record.json").read_text())
    assert record["parameters"]["keep_mask"] == str(tmp_path / "keep.nii.gz")


@pytest.mark.parametrize("problem", ["shape", "affine", "values"])
def test_a_mask_that_does_not_fit_the_input_fails_before_compute(untrained_bundle, bundle_cli, tmp_path, problem):
    scan = nib.load(untrained_bundle / "scan.nii.gz")
    shape, affine, values = scan.shape, scan.affine, np.zeros(scan.shape, np.float32)
    if problem == "shape":
        values = np.zeros((10, 10, 10), np.float32)
    elif problem == "affine":
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
    else:
        values = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(values, affine), tmp_path / "edit.nii.gz")
    out = tmp_path / "out"
    result = run_tiny(bundle_cli, untrained_bundle, out, "--target", TARGET, "--edit_mask",
                      str(tmp_path / "edit.nii.gz"), check=False)  # fmt: skip
    assert result.returncode != 0 and not out.exists()
    last = result.stderr.strip().splitlines()[-1]
    assert "edit_mask" in last and "edit.nii.gz" in last, last


def test_the_marginal_schedule_alone_runs_at_the_weights_delta_and_says_so(untrained_bundle, bundle_cli, tmp_path):
    outputs = {}
    for schedule in ("paper", "marginal"):
        out = tmp_path / schedule
        # inversion retraces either schedule's sampling exactly: start mostly from noise to see the schedule act
        run_tiny(bundle_cli, untrained_bundle, out, "--target", TARGET, "--inference_drift_schedule", schedule,
                 "--composition", "none", "--auto_mask", "false", "--num_samples", "2",
                 "--sample_jitter", "0.9")  # fmt: skip
        record = json.loads((out / "scan_record.json").read_text())
        assert record["drift"] == {"delta": pytest.approx(0.1), "schedule": schedule, "delta_from": "config"}
        assert len(record["weights"]["sha256"]) == 64
        outputs[schedule] = volume(out / "scan_counterfactual.nii.gz")
    assert np.abs(outputs["paper"] - outputs["marginal"]).max() > 1e-3, "the schedule must change the output"


@pytest.mark.parametrize("modality", ["brain", "chest"])
def test_readme_counterfactual_without_composition_is_unchanged_by_the_refactor(bundle_cli, tmp_path, modality):
    """Golden values (block means) of configs/inference.json (the brain inversion weights) and the chest preset."""
    golden = json.loads((BUNDLE_ROOT / "tests" / "golden" / "readme_counterfactual.json").read_text())[modality]
    preset = {"brain": "brain_mri_3d.json", "chest": "chest_xray_2d.json"}[modality]
    out = tmp_path / modality
    bundle_cli("run", ["inference.json", preset], "--results_dir", str(out), "--composition", "none",
               "--auto_mask", "false", "--progress", "false")  # fmt: skip
    name = "sample_visit-0_counterfactual." + ("nii.gz" if modality == "brain" else "png")
    image = np.asarray(LoadImage(image_only=True)(str(out / name)), dtype=np.float64)
    image = image.mean(-1) if image.ndim == 3 and modality == "chest" else image
    assert list(image.shape) == golden["shape"]
    blocks = golden["blocks"]
    cut = [s - s % blocks for s in image.shape]
    image = image[tuple(slice(0, c) for c in cut)]
    means = image.reshape(*[x for c in cut for x in (blocks, c // blocks)]).mean(axis=tuple(range(1, 2 * len(cut), 2)))
    scale = float(np.abs(golden["block_means"]).max())
    np.testing.assert_allclose(means, np.asarray(golden["block_means"]), atol=1e-4 * scale)
    record = json.loads((out / "sample_visit-0_record.json").read_text())
    assert record["drift"]["delta_from"] == "weights"
