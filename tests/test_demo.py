"""The shipped demo: counterfactuals from the shipped weights move the oracle-measured anatomy the asked way."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from scripts.phantoms import BRAIN_LABELS, CHEST_LABELS, write_counterfactual_truth

pytestmark = pytest.mark.slow
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = BUNDLE_ROOT / "docs" / "samples"


def counterfactual(bundle_cli, presets: list[str], out: Path, *overrides: str) -> dict:
    bundle_cli("run", ["common.json", *presets, "inference.json"], "--results_dir", str(out), *overrides)
    (record,) = out.glob("*_record.json")
    return json.loads(record.read_text())


@pytest.fixture(scope="module")
def brain_truth(tmp_path_factory):
    """The oracle's exact counterfactual of the shipped brain sample at 85 with AD (its label map)."""
    truth = write_counterfactual_truth(SAMPLES / "brain", "sample", {"age": 85, "diagnosis": "AD"},
                                       output_dir=tmp_path_factory.mktemp("truth"))  # fmt: skip
    return nib.load(truth["label"]).get_fdata().astype(int)


def dark_fraction(image: np.ndarray, region: np.ndarray, threshold: float) -> float:
    return float((image[region] < threshold).mean())


def test_brain_counterfactual_older_with_ad_has_larger_ventricles(bundle_cli, tmp_path, brain_truth):
    source_image = nib.load(SAMPLES / "brain" / "images" / "sample_visit-0.nii.gz").get_fdata()
    source_label = nib.load(SAMPLES / "brain" / "labels" / "sample_visit-0.nii.gz").get_fdata().astype(int)
    record = counterfactual(bundle_cli, [], tmp_path)
    result = nib.load(record["outputs"]["counterfactual"]).get_fdata()
    ventricles = BRAIN_LABELS["ventricles"]
    # where ventricles are now or will be, per the oracle; CSF is darker than the white matter around it
    region = ndimage.binary_dilation((source_label == ventricles) | (brain_truth == ventricles), iterations=1)
    threshold = 0.5 * (
        source_image[source_label == ventricles].mean()
        + source_image[source_label == BRAIN_LABELS["white_matter"]].mean()
    )
    before = dark_fraction(source_image, region, threshold)
    truth = float((brain_truth[region] == ventricles).mean())
    after = dark_fraction(result, region, threshold)
    assert after > before + 0.25 * (truth - before), {"before": before, "after": after, "truth": truth}


def test_chest_counterfactual_with_effusion_brightens_the_true_effusion_region(bundle_cli, tmp_path):
    truth = write_counterfactual_truth(SAMPLES / "chest", "sample", {"cardiomegaly": 1, "effusion": 1},
                                       output_dir=tmp_path / "truth")  # fmt: skip
    effusion = np.array(Image.open(truth["label"])) == CHEST_LABELS["effusion"]
    source = np.array(Image.open(SAMPLES / "chest" / "images" / "sample_visit-0.png")).astype(float) / 65535
    record = counterfactual(bundle_cli, ["chest_xray_2d.json"], tmp_path / "out")
    result = np.array(Image.open(record["outputs"]["counterfactual"])).astype(float) / 65535
    assert effusion.any()
    assert result[effusion].mean() > source[effusion].mean() + 0.05


def test_same_seed_gives_the_same_counterfactual_file(bundle_cli, tmp_path):
    first = counterfactual(bundle_cli, ["chest_xray_2d.json"], tmp_path / "a")
    second = counterfactual(bundle_cli, ["chest_xray_2d.json"], tmp_path / "b")
    a = np.array(Image.open(first["outputs"]["counterfactual"]))
    b = np.array(Image.open(second["outputs"]["counterfactual"]))
    assert np.array_equal(a, b)
