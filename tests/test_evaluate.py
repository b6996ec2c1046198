"""The evaluation workflow: metrics, interventions, the cohort-trained evaluators and configs/evaluate.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.core.covariates import CovariateEncoder
from scripts.evaluation import evaluate, evaluators, metrics
from scripts.experiments import ablation
from tests.conftest import run_bundle

CHEST_SCHEMA = {
    "age": {"type": "continuous", "range": [18, 100]},
    "sex": {"type": "binary", "categories": ["F", "M"]},
    "cardiomegaly": {"type": "binary", "categories": [0, 1]},
    "effusion": {"type": "binary", "categories": [0, 1]},
}
CHEST = ["common.json", "chest_xray_2d.json"]
EVALUATE = ["inference.json", "chest_xray_2d.json", "evaluate.json"]
SMALL = {"image_size": [64, 64], "autoencoder_channels": [8, 16, 32], "unet_channels": [16, 32, 32]}
SMALL_CHEST = [argument for key, value in SMALL.items() for argument in (f"--{key}", json.dumps(value))]


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 1, 64, 64), (2, 1, 40, 40, 40)])
def test_similarity_is_perfect_on_identical_images_and_worse_on_perturbed(shape):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    same = metrics.similarity(images, images.clone())
    assert same["mae"] == 0 and math.isinf(same["psnr"])
    assert same["ssim"] == pytest.approx(1.0, abs=1e-5) and same["ms_ssim"] == pytest.approx(1.0, abs=1e-5)
    noisy = (images + 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    worse = metrics.similarity(images, noisy)
    assert worse["mae"] > 0.03 and worse["psnr"] < 30 and worse["ssim"] < 0.95 and worse["ms_ssim"] < 0.99
    noisier = metrics.similarity(images, (images + 0.3 * torch.randn(shape)).clamp(0, 1))
    assert noisier["mae"] > worse["mae"] and noisier["ssim"] < worse["ssim"] and noisier["psnr"] < worse["psnr"]


def test_fid_and_kid_vanish_for_one_distribution_and_grow_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(300, 16, generator=generator, dtype=torch.double)
    same = torch.randn(300, 16, generator=generator, dtype=torch.double)
    shifted = same + 1.0
    assert metrics.fid(real, real) == pytest.approx(0.0, abs=1e-6)
    # KID is unbiased for independent samples: two draws of one distribution score about 0
    assert abs(metrics.kid(real, same)[0]) < 0.05 * metrics.kid(real, shifted)[0]
    assert metrics.fid(real, shifted) > 10 * metrics.fid(real, same)
    assert metrics.kid(real, shifted)[0] > 10 * abs(metrics.kid(real, same)[0])
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(real[:1], same)


def test_interventions_flip_shift_and_literal():
    encoder = CovariateEncoder(CHEST_SCHEMA)
    source = {"age": 95, "sex": "F", "cardiomegaly": 0, "effusion": 1}
    assert evaluate.apply_intervention(encoder, source, {"effusion": "flip"})["effusion"] == 0
    assert evaluate.apply_intervention(encoder, source, {"sex": "flip"})["sex"] == "M"
    assert evaluate.apply_intervention(encoder, source, {"age": "+10"})["age"] == 100  # clipped to the range
    assert evaluate.apply_intervention(encoder, source, {"age": "-20"})["age"] == 75
    assert evaluate.apply_intervention(encoder, source, {"cardiomegaly": 1}) == {**source, "cardiomegaly": 1}
    for bad, message in (
        ({"height": 3}, "unknown covariate 'height'"),
        ({"age": "flip"}, "'flip' needs a binary"),
        ({"age": "+ten"}, "not a number"),
        ({}, "non-empty"),
        ({"sex": "X"}, "sex"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate.apply_intervention(encoder, source, bad)


def test_predictions_decode_to_covariate_values_inside_the_schema():
    encoder = CovariateEncoder(CHEST_SCHEMA)
    output = torch.tensor([[1.7, 3.0, -2.0, 0.1], [-0.5, -3.0, 2.0, -0.1]])
    rows = evaluators.decode_predictions(encoder, output)
    assert rows[0]["age"] == 100 and rows[1]["age"] == 18  # clamped to the range
    assert (rows[0]["sex"], rows[0]["cardiomegaly"], rows[0]["effusion"]) == ("M", 0, 1)
    assert (rows[1]["sex"], rows[1]["cardiomegaly"], rows[1]["effusion"]) == ("F", 1, 0)
    scores = evaluators.predictor_scores(
        encoder, [{"age": 100, "sex": "M", "cardiomegaly": 0, "effusion": 1}] * 2, output
    )
    assert scores["sex_accuracy"] == 0.5 and scores["age_mae"] == pytest.approx(41.0)


def test_blur_keeps_the_mean_and_smooths():
    image = torch.zeros(1, 1, 33, 33)
    image[..., 16, 16] = 1.0
    blurred = evaluators.gaussian_blur(image, 1.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and blurred.max() < 0.2
    assert evaluators.gaussian_blur(torch.ones(1, 1, 8, 8, 8), 1.5).allclose(torch.ones(1, 1, 8, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# The ablation's table
# ----------------------------------------------------------------------------------------------------------------


def _fake_evaluation(mae: float) -> dict:
    entry = {
        "oracle": {"counterfactual_vs_truth": {"mae": mae, "ssim": 1 - mae}},
        "gain_and_share": {"gain_over_doing_nothing": 1 - 10 * mae, "share_of_true_change": 4 * mae},
        "effectiveness": {"effusion_accuracy": {"counterfactual": 0.5}},
        "minimality": {"mae_where_unchanged": mae / 2},
        "realism": {"counterfactual": {"kid": 0.1}},
        "reversibility": {"counterfactual_vs_input": {"mae": 2 * mae}},
    }
    return {
        "interventions": {"effusion=flip": entry},
        "composition": {"counterfactual_vs_input": {"mae": mae}},
        "utility": {
            "trained_on_synthetic": {"effusion_auc": 0.75, "sex_auc": 0.25},
            "realism_of_samples": {"kid": 0.2},
        },
    }


def test_ablation_table_reports_mean_and_spread_over_seeds():
    rows = [ablation.metrics_row(_fake_evaluation(m)) for m in (0.1, 0.3)]
    assert rows[0]["utility_auc"] == 0.5 and rows[0]["reversibility_mae"] == pytest.approx(0.2)
    summary = ablation.summarise(rows)
    assert summary["oracle_mae"] == pytest.approx([0.2, 0.1])
    table = ablation.markdown_table({"rows": [{"model": "fine-tuned full", "ld": "off", "summary": summary}]})
    assert "| fine-tuned full | off | -1.0000 ± 1.0000 | 0.8000 ± 0.4000 | 0.2000 ± 0.1000 |" in table
    assert "| effusion=flip |" in table and "| fine-tuned full | off | -1.000 ± 1.000 / 0.800 ± 0.400 |" in table
    # the bar plot draws a negative gain below its zero line as well as a positive one above it
    rows = [{"model": "m", "ld": ld, "summary": {"gain": [g, 0.01]}} for ld, g in (("off", -0.2), ("on", 0.3))]
    picture = np.asarray(ablation.plot({"rows": rows}))
    off, on = picture[:, 200], picture[:, 520]  # a column through each bar's middle (2 bars from x = 40 to 700)
    grey, blue = np.nonzero((off == (150, 150, 150)).all(-1))[0], np.nonzero((on == (40, 90, 200)).all(-1))[0]
    assert grey.size and blue.size and grey.min() >= blue.max(), "the negative bar hangs below the positive one"


def test_ablation_rejects_bad_settings_before_any_work(tmp_path):
    common = dict(
        output_dir=str(tmp_path / "ablation"), modality="chest", preset="configs/chest_xray_2d.json",
        image_size=[64, 64], source_subjects=10, target_train_subjects=4, target_test_subjects=4,
        evaluator_subjects=10, autoencoder={}, pretrain={}, finetune={}, evaluation={}, evaluators={},
        delta_grid=[0.0],
    )  # fmt: skip
    with pytest.raises(ValueError, match="schemes"):
        ablation.run_ablation(source_profile="portable", schemes=["lora"], **common)
    with pytest.raises(ValueError, match="must differ"):
        ablation.run_ablation(source_profile="standard", **common)
    with pytest.raises(ValueError, match="profile must be one of"):
        ablation.run_ablation(source_profile="t2", **common)
    with pytest.raises(ValueError, match="spacing applies to the brain only"):
        ablation.run_ablation(source_profile="portable", spacing=2.0, **common)
    with pytest.raises(ValueError, match="brain anatomy"):
        ablation.run_ablation(source_profile="portable", anatomy="mni152", **common)
    brain = {**common, "modality": "brain", "preset": "configs/brain_mri_3d.json", "source_profile": "t2"}
    with pytest.raises(ValueError, match="spacing must be a positive"):
        ablation.run_ablation(spacing=0.0, anatomy="mni152", **brain)
    with pytest.raises(ValueError, match="anatomy must be one of"):
        ablation.run_ablation(anatomy="mni", **brain)
    assert not (tmp_path / "ablation").exists()


# ----------------------------------------------------------------------------------------------------------------
# Evaluators and the workflow through the CLI
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chest_cohort(tmp_path_factory):
    """A 64 px chest cohort (80 training / 20 held-out subjects) and evaluators trained on it through the CLI."""
    root = tmp_path_factory.mktemp("eval")
    cohort = root / "cohort"
    run_bundle("generate", ["generate_cohort.json"], "--modality", "chest", "--num_subjects", "100",
               "--shape", "[64, 64]", "--output_dir", str(cohort))  # fmt: skip
    run_bundle("run", [*CHEST, "train_evaluators.json"], *SMALL_CHEST, "--dataset_dir", str(cohort),
               "--evaluator_dir", str(root / "evaluators"), "--predictor_epochs", "25",
               "--segmenter_epochs", "20")  # fmt: skip
    return root


@pytest.mark.slow
def test_evaluators_reach_their_documented_held_out_accuracy(chest_cohort):
    """docs/evaluation.md quotes these floors (held-out subjects, 64 px chest cohort of 100 subjects)."""
    report = json.loads((chest_cohort / "evaluators" / "evaluators.json").read_text())
    assert report["num_training"] == 80 and report["num_held_out"] == 20
    assert not set(report["held_out_subjects"]) & {
        r["subject"] for r in json.loads((chest_cohort / "cohort" / "datalist.json").read_text())["training"]
    }
    predictor, segmenter = report["predictor"]["held_out"], report["segmenter"]["held_out"]
    assert predictor["cardiomegaly_accuracy"] >= 0.9 and predictor["effusion_accuracy"] >= 0.8
    assert predictor["sex_accuracy"] >= 0.85
    assert segmenter["mean_dice"] >= 0.85 and segmenter["dice"]["heart"] >= 0.85
    assert segmenter["cardiothoracic_ratio_abs_error"] <= 0.03


@pytest.mark.slow
def test_evaluate_workflow_writes_every_score_and_the_oracle_plumbing_is_exact(chest_cohort, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([f"configs/{name}" for name in CHEST])
    parser.update(SMALL)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "evaluation"
    run_bundle(
        "run", EVALUATE, *SMALL_CHEST, "--model_path", str(tmp_path / "model.pt"),
        "--dataset_dir", str(chest_cohort / "cohort"), "--evaluator_dir", str(chest_cohort / "evaluators"),
        "--results_dir", str(out), "--num_records", "4", "--num_inference_steps", "3",
        "--interventions", "[{'effusion': 'flip'}, {'age': '+0'}]", "--utility_samples", "8", "--utility_epochs", "1",
        "--utility_inference_steps", "2",
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "evaluation.json", "evaluation.md", "evaluation_montage.png", "evaluation_oracle.png",
    ]  # fmt: skip
    report = json.loads((out / "evaluation.json").read_text())
    flip, null = report["interventions"]["effusion=flip"], report["interventions"]["age=+0"]
    # a no-op intervention: the oracle's truth is the input itself, so the input scores perfectly against it
    assert null["oracle"]["input_vs_truth"]["mae"] == 0 and null["oracle"]["input_vs_truth"]["ssim"] > 0.9999
    assert null["changed_covariates"] == [] and null["minimality"]["unchanged_share_of_image"] == 1.0
    assert flip["changed_covariates"] == ["effusion"] and flip["oracle"]["input_vs_truth"]["mae"] > 0
    assert flip["effectiveness"]["effusion_accuracy"]["input"] == 0.0  # the predictor reads the inputs right
    assert flip["effectiveness"]["effusion_accuracy"]["truth"] >= 0.75  # ... and the oracle's truths
    for key in ("volumes", "minimality", "realism", "reversibility"):
        assert flip[key]
    # the two headline numbers: gain over doing nothing from the MAEs above, and none for the null intervention
    headline, oracle = flip["gain_and_share"], flip["oracle"]
    mae_ratio = oracle["counterfactual_vs_truth"]["mae"] / oracle["input_vs_truth"]["mae"]
    assert headline["gain_over_doing_nothing"] == pytest.approx(1 - mae_ratio, rel=1e-4, abs=1e-5)
    assert headline["per_scan"]["num_scans"] >= 1 and "gain_and_share" not in null
    assert report["settings"]["truth_frame"] == "input"  # the written counterfactual's frame, as the compositions'
    assert "## Gain over doing nothing and share of the true change" in (out / "evaluation.md").read_text()
    assert set(report["composition"]) == {"counterfactual_vs_input", "reconstruction_vs_input"}
    assert report["utility"]["num_training_images"] == 8
    assert "## Utility" in (out / "evaluation.md").read_text()


@pytest.mark.slow
def test_evaluate_rejects_bad_interventions_and_missing_evaluators_before_compute(chest_cohort, tmp_path):
    common = [*SMALL_CHEST, "--dataset_dir", str(chest_cohort / "cohort"), "--model_path", str(tmp_path / "none.pt")]
    out = tmp_path / "evaluation"
    result = run_bundle(
        "run", EVALUATE, *common, "--results_dir", str(out),
        "--evaluator_dir", str(chest_cohort / "evaluators"), "--interventions", "[{'bmi': 30}]", check=False,
    )  # fmt: skip
    assert result.returncode != 0 and not out.exists()
    assert "none.pt" in result.stderr.strip().splitlines()[-1]  # the weights are checked first, at initialize
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([f"configs/{name}" for name in CHEST])
    parser.update(SMALL)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "none.pt")
    for extra, message in (
        (["--evaluator_dir", str(chest_cohort / "evaluators"), "--interventions", "[{'bmi': 30}]"], "'bmi'"),
        (["--evaluator_dir", str(tmp_path / "nothing")], "train_evaluators.json"),
        (["--evaluator_dir", str(chest_cohort / "evaluators"), "--truth_frame", "native"], "truth_frame"),
    ):
        result = run_bundle("run", EVALUATE, *common, "--results_dir", str(out), *extra, check=False)
        assert result.returncode != 0 and not out.exists()
        assert message in result.stderr.strip().splitlines()[-1]
    assert Path(chest_cohort / "evaluators" / "predictor.pt").is_file()


@pytest.mark.slow
def test_compositions_run_scores_every_variant_and_recommends_one(chest_cohort, tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([f"configs/{name}" for name in CHEST])
    parser.update(SMALL)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), tmp_path / "model.pt")
    out = tmp_path / "compositions"
    run_bundle(
        "compositions", EVALUATE, *SMALL_CHEST, "--model_path",
        str(tmp_path / "model.pt"), "--dataset_dir", str(chest_cohort / "cohort"), "--evaluator_dir",
        str(chest_cohort / "evaluators"), "--results_dir", str(out), "--num_records", "6", "--num_inference_steps", "3",
        "--interventions", "[{'effusion': 'flip'}]", "--mask_thresholds", "[1.0, 3.0]",
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["autoencoder.png", "compositions.json", "compositions.md"]
    picture = np.asarray(Image.open(out / "autoencoder.png"))  # 3 inputs over their reconstructions, 3x enlarged
    assert picture.shape == (2 * 66 * 3, 3 * 66 * 3) and picture[: 66 * 3].std() > 0  # 64² images, 2 px gaps
    report = json.loads((out / "compositions.json").read_text())
    table = report["interventions"]["effusion=flip"]
    assert {"none", "reconstruction", "reference", "reference+mask@1", "reconstruction+mask@3"} <= set(table)
    for scores in table.values():
        assert scores["mae_to_truth"] > 0 and "effusion_accuracy" in scores["effectiveness"]
        assert {"cardiothoracic_ratio", "effusion_fraction"} <= set(scores["volumes"])  # the segmenter's reading
    assert 0 <= table["reference+mask@1"]["mask_dice"] <= 1
    assert report["recommended"]["variant"] in report["recommended"]["eligible"]
    for row in ("autoencoder_ceiling", "identifiable_ceiling", "autoencoder_alone"):
        assert row in table and row not in report["recommended"]["eligible"]
    assert "mask_dice" not in table["autoencoder_alone"]  # D(E(x)): no model, no mask
    adding = report["interventions"]["effusion=flip [effusion 0->1]"]["identifiable_ceiling"]
    removing = report["interventions"]["effusion=flip [effusion 1->0]"]["identifiable_ceiling"]
    assert removing["mae_to_truth"] < 1e-3 < adding["mae_to_truth"]  # the film shows what removing needs, not adding
    directions = [tag for tag in report["interventions"] if tag.startswith("effusion=flip [")]
    assert directions, "a flip over scans with and without the finding is also scored per direction"


def test_composition_scores_are_perfect_for_the_truth_and_zero_for_doing_nothing():
    from scripts.evaluation.metrics import oracle_scores

    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    truth = images.clone()
    truth[..., 4:8, 4:8] += 0.3
    changed = (truth - images).abs() > 0.02
    perfect = oracle_scores(truth, images, truth, changed, None)
    assert perfect["gain_over_doing_nothing"] == pytest.approx(1.0) and perfect[
        "share_of_true_change"
    ] == pytest.approx(1)
    nothing = oracle_scores(images, images, truth, changed, changed.float())
    assert nothing["gain_over_doing_nothing"] == pytest.approx(0.0) and nothing["share_of_true_change"] == 0.0
    assert nothing["mask_dice"] == pytest.approx(1.0) and nothing["mae_where_unchanged"] == 0.0
    assert perfect["per_scan"]["gain_median"] == pytest.approx(1.0) and perfect["per_scan"]["num_scans"] == 2
    assert nothing["per_scan"]["share_quartiles"] == pytest.approx([0.0, 0.0])
    half = images.clone()
    half[0] = truth[0]  # one scan made perfectly, the other left alone: quartiles span 0 to 1
    spread = oracle_scores(half, images, truth, changed, None)["per_scan"]
    assert spread["gain_median"] == pytest.approx(0.5) and spread["gain_quartiles"] == pytest.approx([0.25, 0.75])
    wrong_way = oracle_scores(images - (truth - images), images, truth, changed, None)
    assert wrong_way["share_of_true_change"] == pytest.approx(-1.0) and wrong_way["gain_over_doing_nothing"] < 0


def test_composition_volumes_score_the_truth_perfectly_and_the_input_as_no_change():
    from scripts.evaluation.compositions import _add_volumes

    source = [{"ventricle_ml": 40.0}, {"ventricle_ml": 50.0}]
    exact = [{"ventricle_ml": 44.0}, {"ventricle_ml": 60.0}]
    half = [{"ventricle_ml": 42.0}, {"ventricle_ml": 55.0}]
    table = {"truth_like": {}, "nothing": {}, "half": {}}
    _add_volumes(table, {"input": source, "truth_like": exact, "nothing": source, "half": half}, exact, range(2))
    truth_like, nothing, halfway = (table[n]["volumes"]["ventricle_ml"] for n in ("truth_like", "nothing", "half"))
    assert truth_like["median_relative_error"] == 0 and truth_like["share_of_true_change"] == pytest.approx(1)
    assert nothing["share_of_true_change"] == 0 and nothing["true_change"] == pytest.approx(7.0)
    assert nothing["median_relative_error"] == pytest.approx(nothing["input_median_relative_error"])
    assert halfway["share_of_true_change"] == pytest.approx(0.5)
    assert halfway["median_relative_error"] == pytest.approx(np.median([2 / 44, 5 / 60]))
    _add_volumes(table, {}, exact, range(2))  # no segmenter: nothing added, nothing fails
    assert set(table["half"]) == {"volumes"}


def test_recommendation_floor_can_follow_the_reference_composition_when_the_raw_decode_overshoots():
    from scripts.evaluation.compositions import _recommended

    def row(gain, share):
        return {"gain_over_doing_nothing": gain, "share_of_true_change": share}

    # a raw decode whose blur inflates its share: no composition keeps 0.9x of it, so "none" is the only choice
    tables = {"age=+20": {"none": row(-1.9, 1.1), "reference": row(0.12, 0.74), "reference+mask@2": row(0.17, 0.72),
                          "reference+mask@4": row(0.20, 0.50)}}  # fmt: skip
    assert _recommended(tables, 0.9)["variant"] == "none"
    chosen = _recommended(tables, 0.9, "reference")
    assert chosen["variant"] == "reference+mask@2" and chosen["share_floor"] == pytest.approx(0.666)
    with pytest.raises(ValueError, match="share_floor_variant 'nothing'"):
        _recommended(tables, 0.9, "nothing")


def test_truth_in_the_input_frame_undoes_its_own_scaling_and_keeps_what_the_percentiles_cut():
    from monai.transforms import Compose, ScaleIntensityRangePercentilesd

    from scripts.evaluation.evaluate import _unclipped, in_input_frame

    native = torch.linspace(0.0, 2.0, 101).reshape(1, 1, 101)  # a truth whose own range is [0.5, 1.5]
    own = native - 0.5  # scaled by its own range: (native - 0.5) / (1.5 - 0.5)
    back = in_input_frame(own, (0.5, 1.5), (0.0, 2.0))  # the input's range: native / 2
    assert torch.allclose(back, native / 2, atol=1e-6)
    assert (
        in_input_frame(own, (0.5, 1.5), (0.5, 1.0)).max() == 1
        and in_input_frame(own, (0.5, 1.5), (0.5, 1.0)).min() == 0
    )
    scale = Compose([ScaleIntensityRangePercentilesd("image", 10, 90, 0.0, 1.0, clip=True)])
    loose = _unclipped(scale)
    image = {"image": native.clone()}
    assert scale(dict(image))["image"].max() == 1 and loose(dict(image))["image"].max() > 1
    assert scale.transforms[0].scaler.clip, "the configured preprocessing itself is left clipping"


def test_autoencoder_ceiling_is_the_truth_for_a_lossless_autoencoder_and_blind_to_a_constant_one():
    from scripts.evaluation.compositions import autoencoder_ceiling
    from scripts.evaluation.metrics import oracle_scores

    class Codec(torch.nn.Module):
        def __init__(self, lossless: bool) -> None:
            super().__init__()
            self.lossless, self.weight = lossless, torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return x if self.lossless else torch.zeros_like(x)

        def decode(self, z):
            return z + 0.5 * (not self.lossless)

    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5
    truth = images.clone()
    truth[..., 2:6, 3:9] += 0.3
    changed = (truth - images).abs() > 0.02
    exact = autoencoder_ceiling(Codec(True), images, truth, 2, "fp32")
    assert oracle_scores(exact, images, truth, changed, None)["share_of_true_change"] == pytest.approx(1.0)
    blind = autoencoder_ceiling(Codec(False), images, truth, 2, "fp32")
    assert torch.equal(blind, images), "an autoencoder that renders every image alike carries none of the change"


def test_ablation_resumes_a_fine_tune_only_at_the_delta_it_was_trained_with(tmp_path):
    """Changing ld_delta and resuming must not reuse LD-on weights of another δ under the new label."""
    from scripts.core.drift import LatentDrift
    from scripts.io.weights import save_weights, weights_metadata

    weights = tmp_path / "full_ld-on_seed-0" / "model.pt"
    ablation._check_resumed_delta(weights, 0.1)  # nothing trained yet: nothing to check
    weights.parent.mkdir()
    save_weights(weights, torch.nn.Linear(2, 2), weights_metadata(drift=LatentDrift(0.1)))
    ablation._check_resumed_delta(weights, 0.1)
    with pytest.raises(ValueError, match="fine-tuned at delta 0.1, this run asks 0.05"):
        ablation._check_resumed_delta(weights, 0.05)


def test_ablation_tests_one_scan_per_held_out_subject(tmp_path):
    """A longitudinal target cohort has several visits per subject: the test set takes each subject's first visit."""
    records = [
        {"image": f"images/{s}_visit-{v}.nii.gz", "subject": s, "visit": v} for s in ("a", "b") for v in (2, 0, 1)
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [], "validation": records}))
    path = ablation._test_datalist(tmp_path)
    test = json.loads(Path(path).read_text())["test"]
    assert [(r["subject"], r["visit"]) for r in test] == [("a", 0), ("b", 0)]
    assert Path(path).parent == tmp_path  # beside the cohort's datalist: relative image paths still resolve
    assert json.loads(Path(path).read_text())["validation"] == records  # the rest of the datalist is kept
