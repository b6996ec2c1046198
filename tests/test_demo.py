"""The shipped demos: counterfactuals from the shipped weights move the oracle-measured anatomy the asked way."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from scripts.cohort.causal_model import CHEST_LABELS
from scripts.cohort.generate import write_counterfactual_truth
from scripts.cohort.oracle import compare_to_oracle

pytestmark = pytest.mark.slow
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "chest"
CHEST = ["chest_xray_2d.json"]
BRAIN_SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "brain"
BRAIN_MAE_RATIO = 1.1  # the inversion weights barely respond yet: the counterfactual must at least not hurt the subject


def counterfactual(bundle_cli, out: Path, *overrides: str) -> np.ndarray:
    """Runs the README's first command into `out`; returns the counterfactual film scaled to [0, 1]."""
    bundle_cli("run", ["inference.json", *CHEST], "--results_dir", str(out), *overrides)
    (record,) = out.glob("*_record.json")
    return np.array(Image.open(json.loads(record.read_text())["outputs"]["counterfactual"])).astype(float) / 65535


@pytest.fixture(scope="module")
def demo(bundle_cli, tmp_path_factory):
    """The shipped sample (no finding), its counterfactual with cardiomegaly + effusion, and the oracle's labels."""
    root = tmp_path_factory.mktemp("demo")
    truth = write_counterfactual_truth(SAMPLE, "sample", {"cardiomegaly": 1, "effusion": 1}, output_dir=root / "truth")
    return {
        "source": np.array(Image.open(SAMPLE / "images" / "sample_visit-0.png")).astype(float) / 65535,
        "source_label": np.array(Image.open(SAMPLE / "labels" / "sample_visit-0.png")),
        "true_label": np.array(Image.open(truth["label"])),
        "result": counterfactual(bundle_cli, root / "out"),
        "root": root,
    }


def test_counterfactual_keeps_the_input_film_size(demo):
    assert demo["result"].shape == demo["source"].shape


def test_effusion_fills_the_region_where_the_oracle_puts_the_fluid(demo):
    fluid = demo["true_label"] == CHEST_LABELS["effusion"]
    assert fluid.any()
    assert demo["result"][fluid].mean() > demo["source"][fluid].mean() + 0.05


def test_cardiomegaly_brightens_the_rim_the_oracle_adds_to_the_heart(demo):
    heart = CHEST_LABELS["heart"]
    rim = (demo["true_label"] == heart) & (demo["source_label"] != heart)
    assert rim.any()
    assert demo["result"][rim].mean() > demo["source"][rim].mean() + 0.05


def test_chest_counterfactual_reaches_half_the_true_change_and_beats_doing_nothing(demo):
    # docs/demo.md: effusion 0.68 and heart rim 0.97 of the true change; MAE to the truth 0.81x the input's
    (record,) = (demo["root"] / "out").glob("*_record.json")
    oracle = compare_to_oracle(str(record), str(SAMPLE), "sample")
    for region in ("effusion_region", "heart_growth_rim"):
        r = oracle["regions"][region]
        assert (r["counterfactual"] - r["input"]) >= 0.5 * (r["truth"] - r["input"]), (region, r)
    mae = oracle["mae_to_truth"]
    assert mae["counterfactual"] < mae["input"], mae


def test_same_seed_gives_the_same_counterfactual(demo, bundle_cli):
    again = counterfactual(bundle_cli, demo["root"] / "again")
    assert np.array_equal(again, demo["result"])


# ---------------------------------------------------------------------------------------------------- 3D brain demo
PAIRED = ["inference.json", "paired.json", "paired_residual.json", "paired_interval.json"]


def brain_run(bundle_cli, out: Path, configs: list[str], *overrides: str) -> dict:
    """A brain counterfactual of the shipped sample into `out`, its record and its comparison with the oracle."""
    bundle_cli("run", configs, "--results_dir", str(out), *overrides)
    record = out / "sample_visit-0_record.json"
    return {
        "record": json.loads(record.read_text()),
        "oracle": compare_to_oracle(str(record), str(BRAIN_SAMPLE), "sample"),
        "source": nib.load(BRAIN_SAMPLE / "images" / "sample_visit-0.nii.gz"),
    }


@pytest.fixture(scope="module")
def brain(bundle_cli, tmp_path_factory):
    """README command 1: the shipped sample (65, F, CN) 20 years older on the shipped paired (longitudinal) weights."""
    return brain_run(
        bundle_cli, tmp_path_factory.mktemp("brain") / "out", PAIRED, "--target", "{'age': 85, 'diagnosis': 'CN'}"
    )


@pytest.fixture(scope="module")
def brain_ad(bundle_cli, tmp_path_factory):
    """65, F, CN -> 85, AD on the shipped inversion weights (configs/inference.json as it is)."""
    return brain_run(bundle_cli, tmp_path_factory.mktemp("brain_ad") / "out", ["inference.json"])


def test_brain_counterfactual_is_a_nifti_on_the_input_grid(brain):
    result = nib.load(brain["record"]["outputs"]["counterfactual"])
    assert result.shape == brain["source"].shape
    np.testing.assert_allclose(result.affine, brain["source"].affine, atol=1e-4)
    assert brain["record"]["target"] == {"age": 85, "sex": "F", "diagnosis": "CN"}
    assert set(brain["record"]["outputs"]) == {"counterfactual", "difference", "mask", "std", "montage"}
    assert brain["record"]["drift"] == {"delta": pytest.approx(0.1), "schedule": "marginal", "delta_from": "weights"}


def test_twenty_years_older_darkens_half_the_rim_the_oracle_adds_to_the_ventricles(brain):
    # T1: CSF is dark; the oracle's ventricles at 85 cover voxels that were tissue at 65. docs/demo.md: 103%.
    rim = brain["oracle"]["regions"]["ventricle_growth_rim"]
    assert rim["voxels"] > 100 and rim["truth"] < rim["input"]
    assert rim["input"] - rim["counterfactual"] >= 0.5 * (rim["input"] - rim["truth"]), rim


def test_twenty_years_older_is_closer_to_the_truth_than_the_untouched_scan(brain):
    mae = brain["oracle"]["mae_to_truth"]  # docs/demo.md: 0.96x
    assert mae["counterfactual"] < mae["input"], mae


def test_twenty_years_older_moves_the_hippocampus_the_oracle_removes_toward_the_truth(brain):
    lost = brain["oracle"]["regions"]["hippocampus_lost"]
    assert lost["voxels"] > 20 and lost["truth"] > lost["input"]
    assert lost["input"] < lost["counterfactual"] < lost["input"] + 1.5 * (lost["truth"] - lost["input"]), lost


def test_brain_counterfactuals_leave_the_background_alone(brain, brain_ad):
    for run in (brain, brain_ad):
        background = run["oracle"]["regions"]["background"]
        assert abs(background["counterfactual"] - background["input"]) < 0.02


def test_ad_counterfactual_is_a_nifti_on_the_input_grid(brain_ad):
    assert nib.load(brain_ad["record"]["outputs"]["counterfactual"]).shape == brain_ad["source"].shape
    assert brain_ad["record"]["target"] == {"age": 85, "sex": "F", "diagnosis": "AD"}
    assert set(brain_ad["record"]["outputs"]) == {"counterfactual", "difference", "mask", "montage"}
    assert brain_ad["record"]["drift"] == {"delta": pytest.approx(0.1), "schedule": "paper", "delta_from": "weights"}


@pytest.mark.xfail(
    strict=True,
    reason="issue 14: the MNI152 inversion weights do not grow the ventricles for 85 with AD (rim "
    "0.7435 -> 0.7437, docs/demo.md); strict, so the bound returns to force once they do",
)
def test_older_with_ad_darkens_the_rim_the_oracle_adds_to_the_ventricles(brain_ad):
    rim = brain_ad["oracle"]["regions"]["ventricle_growth_rim"]
    assert rim["voxels"] > 100 and rim["truth"] < rim["input"]
    assert rim["counterfactual"] < rim["input"], "the rim must darken, however little (docs/demo.md: how much)"


def test_older_with_ad_moves_the_hippocampus_the_oracle_removes_toward_the_truth(brain_ad):
    # T1: the oracle's hippocampi at 85 with AD shrink, the lost voxels turn brighter (CSF-filled temporal horn aside,
    # at 3 mm the partial volume with white matter dominates). docs/demo.md: the ventricle rim does not move yet.
    lost = brain_ad["oracle"]["regions"]["hippocampus_lost"]
    assert lost["voxels"] > 50 and lost["truth"] > lost["input"]
    assert lost["counterfactual"] > lost["input"], "the lost hippocampus must move toward the truth, however little"


def test_ad_counterfactual_is_no_further_from_the_truth_than_the_input_allows(brain_ad):
    mae = brain_ad["oracle"]["mae_to_truth"]
    assert mae["counterfactual"] <= BRAIN_MAE_RATIO * mae["input"], mae


@pytest.fixture(scope="module")
def brain_ad_rollout(bundle_cli, tmp_path_factory):
    """README "A long interval in steps": 65, F, CN -> 85, AD on the shipped paired weights, configs/paired_rollout.json
    (5 steps of 4 years at guidance 4)."""
    out = tmp_path_factory.mktemp("brain_ad_rollout") / "out"
    return brain_run(bundle_cli, out, PAIRED + ["paired_rollout.json"], "--target", "{'age': 85, 'diagnosis': 'AD'}")


def test_rollout_older_with_ad_grows_the_ventricles_closer_to_the_truth_editing_little(brain_ad_rollout):
    # docs/results.md "On held-out brains: configs/paired_rollout.json": rim 85% of the way (59% at guidance 3),
    # MAE 0.84x the input's, mask 5% of the grid
    record, oracle = brain_ad_rollout["record"], brain_ad_rollout["oracle"]
    assert record["parameters"]["rollout_steps"] == 5 and record["parameters"]["guidance_scale"] == 4.0
    assert record["target"]["diagnosis"] == "AD"
    rim = oracle["regions"]["ventricle_growth_rim"]
    assert rim["input"] - rim["counterfactual"] >= 0.7 * (rim["input"] - rim["truth"]), rim
    mae = oracle["mae_to_truth"]
    assert mae["counterfactual"] < 0.9 * mae["input"], mae
    mask = nib.load(record["outputs"]["mask"]).get_fdata()
    assert 0 < (mask > 0).mean() < 0.1
