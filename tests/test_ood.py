"""Specification of the out-of-distribution warning: the input's reconstruction error against the weights' profile."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT

from scripts.io.ood import input_profile, out_of_distribution, reconstruction_errors

PROFILE = {"values": [0.01, 0.012, 0.013, 0.015, 0.02], "percentile": 99.0, "threshold": 0.0198}


def test_weights_without_a_profile_say_the_check_is_unavailable():
    assert out_of_distribution(None, 0.5, "scan.nii.gz")["available"] is False
    assert out_of_distribution({"drift": {}}, 0.5, "scan.nii.gz")["available"] is False
    one_scan = {"reconstruction_error": {**PROFILE, "values": [0.01], "threshold": None}}
    assert out_of_distribution(one_scan, 0.5, "scan.nii.gz")["available"] is False


def test_an_error_above_the_threshold_warns_with_both_numbers_and_the_percentile(caplog):
    with caplog.at_level(logging.WARNING):
        result = out_of_distribution({"reconstruction_error": PROFILE}, 0.05, "far.nii.gz")
    assert result["outside"] and result["percentile_rank"] == 100.0
    assert "far.nii.gz" in caplog.text and "0.0500" in caplog.text and "99th percentile (0.0198)" in caplog.text


def test_an_error_inside_the_profile_is_silent(caplog):
    with caplog.at_level(logging.WARNING):
        result = out_of_distribution({"reconstruction_error": PROFILE}, 0.0125, "near.nii.gz")
    assert not result["outside"] and result["percentile_rank"] == 40.0 and not caplog.text


def test_a_scan_with_another_spacing_than_the_training_files_is_reported(tmp_path):
    for name, spacing in (("train.nii.gz", 3.0), ("fine.nii.gz", 1.0)):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([spacing] * 3 + [1.0])), tmp_path / name)
    metadata = {"reconstruction_error": PROFILE, "input_profile": input_profile([str(tmp_path / "train.nii.gz")])}
    result = out_of_distribution(metadata, 0.0125, str(tmp_path / "fine.nii.gz"))
    assert result["outside"] and any("voxel spacing" in finding for finding in result["findings"])


@pytest.mark.slow
def test_shipped_brain_weights_flag_a_far_off_scan_and_not_new_cohort_scans(tmp_path):
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from scripts.cohort.generate import generate_cohort
    from scripts.io.weights import load_weights

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / n) for n in ("common.json", "brain_mri_3d.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    network = load_weights(parser.get_parsed_content("network_def"), str(BUNDLE_ROOT / "models" / "model.pt")).eval()
    metadata = network.weights_info["metadata"]
    preprocess = Compose(parser.get_parsed_content("preprocessing")[:-1])  # no covariates needed
    # new subjects of the cohort the weights were trained on (another seed): the 99.9th percentile stays quiet
    generate_cohort(str(tmp_path / "cohort"), modality="brain", num_subjects=6, seed=123, anatomy="mni152")
    scans = sorted((tmp_path / "cohort" / "images").glob("*.nii.gz"))
    images = [{"image": preprocess({"image": str(p)})["image"][None]} for p in scans]
    errors = reconstruction_errors(network, images)
    flagged = [out_of_distribution(metadata, e, str(p))["outside"] for e, p in zip(errors, scans)]
    assert len(scans) >= 12 and sum(flagged) <= 1, (errors, metadata["reconstruction_error"]["threshold"])
    # a smooth random volume on the same grid and header: not a head at all
    rng = np.random.default_rng(0)
    noise = torch.nn.functional.avg_pool3d(
        torch.as_tensor(rng.random((1, 1, 64, 80, 64)), dtype=torch.float32), 9, 1, 4
    )
    affine = nib.load(scans[0]).affine
    nib.save(nib.Nifti1Image(noise[0, 0].numpy(), affine), tmp_path / "smooth.nii.gz")
    far = preprocess({"image": str(tmp_path / "smooth.nii.gz")})["image"][None]
    (error,) = reconstruction_errors(network, [{"image": far}])
    assert out_of_distribution(metadata, error, str(tmp_path / "smooth.nii.gz"))["outside"]
    # the cartoon phantom anatomy (no cortex, smooth shapes) given to the real-anatomy weights is outside too
    generate_cohort(str(tmp_path / "cartoon"), modality="brain", num_subjects=1, seed=0, shape=(64, 80, 64))
    cartoon = sorted((tmp_path / "cartoon" / "images").glob("*.nii.gz"))[0]
    (error,) = reconstruction_errors(network, [{"image": preprocess({"image": str(cartoon)})["image"][None]}])
    assert out_of_distribution(metadata, error, str(cartoon))["outside"]
