"""Specification of the synthetic cohort generator: determinism, causal effect sizes, oracle, files and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from scripts.cohort import brain_phantom, causal_model, chest_phantom, generate, render

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 192 mm field of view at 4.8 mm voxels: the whole head, ~5x faster than the 64^3 default, for qualitative checks.
BRAIN_GRID = {"shape": (40, 40, 40), "spacing": 4.8}
# Volumes are measured on the default 64^3 grid at 3 mm: a hippocampus is only ~4 voxels across there and ~2.5 at
# 4.8 mm, where a 10-year volume ratio is voxelisation noise of up to +-17 % (measured).
VOLUME_GRID = {"shape": (64, 64, 64), "spacing": 3.0}
CHEST_SHAPE = (96, 96)
BRAIN_SEEDS = (0, 1, 2)
# Voxelising a ~11 ml ventricle system or a ~6 ml hippocampal pair at 3 mm leaves each volume a few % off the
# analytic value (most voxels touch the surface); a ratio of two such volumes is within ~5-7 % (measured on seeds
# 0-3). Averaging over BRAIN_SEEDS subjects shrinks that, so the mean ratio must match the documented compound
# rate within 6 %. The documented rates differ by far more (CN vs AD ventricles over 10 years: x1.22 vs x1.55).
MEAN_RATIO_TOLERANCE = 0.06


def brain(age: float, diagnosis: str = "CN", sex: str = "F") -> dict:
    return {"age": age, "sex": sex, "diagnosis": diagnosis}


def chest(cardiomegaly: int = 0, effusion: int = 0, sex: str = "F", age: float = 50.0) -> dict:
    return {"age": age, "sex": sex, "cardiomegaly": cardiomegaly, "effusion": effusion}


def measured_brain(seed: int, covariates: dict) -> dict:
    _, label = brain_phantom.render_brain(causal_model.sample_brain_exogenous(seed), covariates, **VOLUME_GRID)
    return brain_phantom.measure_brain(label, VOLUME_GRID["spacing"])


def mean_ratio(key: str, before: dict, after: dict) -> float:
    return float(np.mean([measured_brain(s, after)[key] / measured_brain(s, before)[key] for s in BRAIN_SEEDS]))


def test_brain_render_is_bit_identical_for_the_same_inputs():
    u = causal_model.sample_brain_exogenous(3)
    first = brain_phantom.render_brain(u, brain(70.0), **BRAIN_GRID)
    second = brain_phantom.render_brain(causal_model.sample_brain_exogenous(3), brain(70.0), **BRAIN_GRID)
    assert first[0].dtype == np.float32 and first[1].dtype == np.uint8
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_chest_render_is_bit_identical_for_the_same_inputs():
    u = causal_model.sample_chest_exogenous(3)
    first = chest_phantom.render_chest(u, chest(1, 1), CHEST_SHAPE)
    second = chest_phantom.render_chest(u, chest(1, 1), CHEST_SHAPE)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_a_different_noise_seed_changes_only_the_noise():
    u = causal_model.sample_brain_exogenous(0)
    other = causal_model.BrainExogenous.from_dict({**u.to_dict(), "noise_seed": u.noise_seed + 1})
    image_a, label_a = brain_phantom.render_brain(u, brain(70.0), **BRAIN_GRID)
    image_b, label_b = brain_phantom.render_brain(other, brain(70.0), **BRAIN_GRID)
    assert not np.array_equal(image_a, image_b)
    assert np.array_equal(label_a, label_b)
    assert np.abs(image_a - image_b).mean() < 4 * u.noise_sigma


def test_brain_image_has_t1_contrast_wm_brighter_than_gm_brighter_than_csf():
    u = causal_model.sample_brain_exogenous(0)
    image, label = brain_phantom.render_brain(u, brain(60.0), **BRAIN_GRID)
    mean = {
        name: image[label == value].mean() for name, value in causal_model.BRAIN_LABELS.items() if name != "background"
    }
    assert mean["white_matter"] > mean["gray_matter"] + 0.1 > mean["ventricles"] + 0.2
    assert 0.0 <= image.min() and image.max() < 1.5


@pytest.mark.parametrize("diagnosis", ["CN", "AD"])
def test_ventricles_grow_at_the_documented_compound_rate(diagnosis):
    expected = (1.0 + causal_model.VENTRICLE_GROWTH_PER_YEAR[diagnosis]) ** 10
    ratio = mean_ratio("ventricle_ml", brain(65.0, diagnosis), brain(75.0, diagnosis))
    assert ratio == pytest.approx(expected, rel=MEAN_RATIO_TOLERANCE)


@pytest.mark.parametrize("diagnosis", ["CN", "AD"])
def test_hippocampi_shrink_at_the_documented_compound_rate(diagnosis):
    expected = (1.0 - causal_model.HIPPOCAMPUS_SHRINK_PER_YEAR[diagnosis]) ** 10
    ratio = mean_ratio("hippocampus_ml", brain(65.0, diagnosis), brain(75.0, diagnosis))
    assert ratio < 1.0
    assert ratio == pytest.approx(expected, rel=MEAN_RATIO_TOLERANCE)


def test_ventricles_grow_faster_in_ad_than_mci_than_cn_for_the_same_subject():
    growth = {dx: measured_brain(0, brain(80.0, dx))["ventricle_ml"] for dx in ("CN", "MCI", "AD")}
    assert growth["AD"] > growth["MCI"] > growth["CN"]


def test_brain_shrinks_with_age_while_skull_size_stays():
    young = measured_brain(1, brain(60.0, "AD"))
    old = measured_brain(1, brain(80.0, "AD"))
    assert old["brain_ml"] < 0.95 * young["brain_ml"]


def test_cortex_thins_and_gm_wm_contrast_falls_with_age():
    u = causal_model.sample_brain_exogenous(2)
    young_image, young = brain_phantom.render_brain(u, brain(60.0), **BRAIN_GRID)
    old_image, old = brain_phantom.render_brain(u, brain(85.0), **BRAIN_GRID)
    gm, wm = causal_model.BRAIN_LABELS["gray_matter"], causal_model.BRAIN_LABELS["white_matter"]
    contrast = [img[lab == wm].mean() - img[lab == gm].mean() for img, lab in ((young_image, young), (old_image, old))]
    expected = (1.0 - causal_model.GM_WM_CONTRAST_DECAY_PER_YEAR) ** 25
    assert contrast[1] / contrast[0] == pytest.approx(expected, rel=0.1)
    assert (old == gm).sum() < (young == gm).sum()


def test_male_brain_is_larger_than_female_brain_by_the_documented_scale():
    ratio = measured_brain(0, brain(70.0, sex="M"))["brain_ml"] / measured_brain(0, brain(70.0, sex="F"))["brain_ml"]
    assert ratio == pytest.approx(causal_model.SEX_LINEAR_SCALE["M"] ** 3, rel=0.03)


@pytest.mark.parametrize("seed", range(4))
def test_cardiomegaly_moves_the_cardiothoracic_ratio_across_one_half(seed):
    u = causal_model.sample_chest_exogenous(seed)
    normal = chest_phantom.measure_chest(chest_phantom.render_chest(u, chest(0), CHEST_SHAPE)[1])[
        "cardiothoracic_ratio"
    ]
    enlarged = chest_phantom.measure_chest(chest_phantom.render_chest(u, chest(1), CHEST_SHAPE)[1])[
        "cardiothoracic_ratio"
    ]
    assert 0.38 < normal < 0.5 < enlarged < 0.7
    assert normal == pytest.approx(u.ctr_baseline, abs=0.035)
    assert enlarged / normal == pytest.approx(causal_model.CARDIOMEGALY_WIDTH_FACTOR, rel=0.06)


@pytest.mark.parametrize("seed", range(3))
def test_effusion_fills_the_costophrenic_angle_and_none_gives_zero(seed):
    u = causal_model.sample_chest_exogenous(seed)
    image_dry, label_dry = chest_phantom.render_chest(u, chest(effusion=0), CHEST_SHAPE)
    image_wet, label_wet = chest_phantom.render_chest(u, chest(effusion=1), CHEST_SHAPE)
    assert chest_phantom.measure_chest(label_dry)["effusion_fraction"] == 0.0
    assert chest_phantom.measure_chest(label_wet)["effusion_fraction"] > 0.03
    fluid = label_wet == causal_model.CHEST_LABELS["effusion"]
    rows = np.flatnonzero(fluid.any(axis=1))
    assert rows.min() > CHEST_SHAPE[0] // 2  # the fluid collects in the lower half of the chest
    assert image_wet[fluid].mean() > image_dry[fluid].mean() + 0.1  # fluid is denser (brighter) than air


def test_chest_film_shows_dark_lungs_and_a_bright_heart():
    image, label = chest_phantom.render_chest(causal_model.sample_chest_exogenous(0), chest(), CHEST_SHAPE)
    lungs = np.isin(label, [causal_model.CHEST_LABELS["right_lung"], causal_model.CHEST_LABELS["left_lung"]])
    assert image[lungs].mean() + 0.25 < image[label == causal_model.CHEST_LABELS["heart"]].mean()
    assert image[label == causal_model.CHEST_LABELS["background"]].mean() < 0.05


@pytest.mark.parametrize("modality", ["brain", "chest"])
def test_counterfactual_without_change_equals_the_factual_render(modality):
    u = causal_model.sample_exogenous(modality, 5)
    covariates = brain(72.0, "MCI") if modality == "brain" else chest(1, 0)
    grid = BRAIN_GRID if modality == "brain" else {"shape": CHEST_SHAPE}
    factual = render.render(modality, u, covariates, **grid)
    same = render.counterfactual(modality, u, covariates, {}, **grid)
    assert all(np.array_equal(a, b) for a, b in zip(factual, same))


def test_counterfactual_applies_the_change_to_the_same_subject():
    u = causal_model.sample_brain_exogenous(5)
    changes = {"age": 80.0, "diagnosis": "AD"}
    image, label = render.counterfactual("brain", u, brain(70.0, "CN"), changes, **BRAIN_GRID)
    expected = brain_phantom.render_brain(u, brain(80.0, "AD"), **BRAIN_GRID)
    assert np.array_equal(image, expected[0]) and np.array_equal(label, expected[1])


def test_exogenous_factors_round_trip_through_json():
    for modality in causal_model.MODALITIES:
        u = causal_model.sample_exogenous(modality, 11)
        assert type(u).from_dict(json.loads(json.dumps(u.to_dict()))) == u


def test_generate_cohort_writes_a_subject_split_datalist_with_covariates(tmp_path):
    path = generate.generate_cohort(tmp_path, "brain", num_subjects=5, shape=(32, 32, 32), spacing=6.0, seed=1)
    with open(path) as f:
        datalist = json.load(f)
    records = datalist["training"] + datalist["validation"]
    assert len(records) == 5 * 3
    assert {r["subject"] for r in datalist["training"]}.isdisjoint({r["subject"] for r in datalist["validation"]})
    assert len({r["subject"] for r in datalist["validation"]}) == 1
    for record in records:
        assert os.path.isfile(tmp_path / record["image"]) and os.path.isfile(tmp_path / record["label"])
        assert record["sex"] in ("F", "M") and record["diagnosis"] in ("CN", "MCI", "AD")
        assert 55.0 <= record["age"] <= 92.0
    visits = sorted((r for r in records if r["subject"] == "sub-0001"), key=lambda r: r["visit"])
    assert [v["visit"] for v in visits] == [0, 1, 2]
    assert all(1.0 <= b["age"] - a["age"] <= 3.0 for a, b in zip(visits, visits[1:]))
    assert len({v["diagnosis"] for v in visits}) == 1


def test_progression_advances_the_diagnosis_one_stage_at_a_time_and_the_oracle_re_renders_every_visit(tmp_path):
    path = generate.generate_cohort(tmp_path, "brain", num_subjects=12, shape=(16, 16, 16), spacing=12.0, seed=3,
                                    progression=0.5)  # fmt: skip
    with open(path) as f:
        records = [r for section in json.load(f).values() for r in section]
    stages = {"CN": 0, "MCI": 1, "AD": 2}
    converted = 0
    for subject in {r["subject"] for r in records}:
        visits = sorted((r for r in records if r["subject"] == subject), key=lambda r: r["visit"])
        steps = [stages[b["diagnosis"]] - stages[a["diagnosis"]] for a, b in zip(visits, visits[1:])]
        assert set(steps) <= {0, 1}, f"{subject}: a diagnosis goes back or skips a stage"
        converted += any(steps)
    assert converted >= 3, "at 50% a year, most subjects that can convert do"
    with open(tmp_path / "cohort.json") as f:
        assert json.load(f)["progression"] == 0.5
    subject = generate.load_subject(tmp_path, "sub-0001")
    image, _ = render.render("brain", subject["u"], subject["visits"][-1], subject["shape"], subject["spacing"])
    written = [r for r in records if r["subject"] == "sub-0001" and r["visit"] == 2][0]
    assert np.array_equal(np.asarray(nib.load(tmp_path / written["image"]).dataobj), image)


def test_cohort_images_are_ras_nifti_and_re_render_from_their_exogenous_file(tmp_path):
    import nibabel as nib

    generate.generate_cohort(tmp_path, "brain", num_subjects=1, visits_per_subject=1, shape=(32, 32, 32), spacing=6.0)
    nifti = nib.load(tmp_path / "images" / "sub-0001_visit-0.nii.gz")
    assert nib.aff2axcodes(nifti.affine) == ("R", "A", "S")
    assert np.allclose(nifti.header.get_zooms(), 6.0)
    subject = generate.load_subject(tmp_path, "sub-0001")
    image, _ = render.render("brain", subject["u"], subject["visits"][0], subject["shape"], subject["spacing"])
    assert np.array_equal(np.asarray(nifti.dataobj), image)


def test_chest_cohort_writes_png_films_and_binary_findings(tmp_path):
    from PIL import Image

    path = generate.generate_cohort(tmp_path, "chest", num_subjects=4, shape=(64, 64), seed=2)
    with open(path) as f:
        records = [r for section in json.load(f).values() for r in section]
    assert len(records) == 4
    for record in records:
        assert record["image"].endswith(".png") and record["cardiomegaly"] in (0, 1) and record["effusion"] in (0, 1)
        assert Image.open(tmp_path / record["image"]).size == (64, 64)


def test_write_counterfactual_truth_writes_the_oracle_files(tmp_path):
    generate.generate_cohort(tmp_path, "brain", num_subjects=1, visits_per_subject=1, shape=(32, 32, 32), spacing=6.0)
    truth = generate.write_counterfactual_truth(tmp_path, "sub-0001", {"age": 90.0})
    assert os.path.isfile(truth["image"]) and os.path.isfile(truth["label"])
    assert truth["counterfactual_covariates"]["age"] == 90.0
    assert truth["counterfactual_measurements"]["ventricle_ml"] > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: generate.generate_cohort("/tmp/unused", modality="knee"), "modality"),
        (lambda: generate.generate_cohort("/tmp/unused", num_subjects=0), "num_subjects"),
        (lambda: generate.generate_cohort("/tmp/unused", shape=(64, 64)), "shape"),
        (lambda: generate.generate_cohort("/tmp/unused", "chest", spacing=3.0), "spacing"),
        (lambda: generate.generate_cohort("/tmp/unused", val_fraction=1.0), "val_fraction"),
        (lambda: generate.generate_cohort("/tmp/unused", progression=1.0), "progression"),
        (lambda: generate.generate_cohort("/tmp/unused", "chest", progression=0.1), "progression"),
        (lambda: brain_phantom.render_brain(causal_model.sample_brain_exogenous(0), brain(70.0, "XYZ")), "diagnosis"),
        (lambda: brain_phantom.render_brain(causal_model.sample_brain_exogenous(0), brain(70.0, sex="X")), "sex"),
        (lambda: brain_phantom.render_brain(causal_model.sample_brain_exogenous(0), brain(float("nan"))), "age"),
        (lambda: chest_phantom.render_chest(causal_model.sample_chest_exogenous(0), chest(effusion=2)), "effusion"),
        (lambda: render.counterfactual("brain", causal_model.sample_brain_exogenous(0), brain(70), {"bmi": 3}), "bmi"),
    ],
)
def test_bad_arguments_raise_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.slow
def test_bundle_cli_generate_writes_the_datalist(tmp_path):
    output_dir = tmp_path / "cohort"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "generate",
        "--config_file",
        "configs/generate_cohort.json",
        "--modality",
        "brain",
        "--output_dir",
        str(output_dir),
        "--num_subjects",
        "2",
        "--shape",
        "[32,32,32]",
        "--spacing",
        "6.0",
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(output_dir / "datalist.json") as f:
        datalist = json.load(f)
    assert len(datalist["training"]) + len(datalist["validation"]) == 2 * 3


def test_acquisition_profiles_change_the_look_not_the_anatomy_and_the_oracle_keeps_the_profile(tmp_path):
    brain_u, chest_u = causal_model.sample_exogenous("brain", 3), causal_model.sample_exogenous("chest", 3)
    brain_cov = {"age": 70, "sex": "F", "diagnosis": "CN"}
    t1, label = render.render("brain", brain_u, brain_cov, shape=(32, 32, 32), spacing=6.0)
    t2, label_t2 = render.render("brain", brain_u, brain_cov, shape=(32, 32, 32), spacing=6.0, profile="t2")
    np.testing.assert_array_equal(label, label_t2)
    labels = causal_model.BRAIN_LABELS
    csf, wm = label == labels["ventricles"], label == labels["white_matter"]
    assert t1[wm].mean() > t1[csf].mean() and t2[csf].mean() > t2[wm].mean()  # T2-like: fluid bright
    low, label_low = render.render("brain", brain_u, brain_cov, shape=(32, 32, 32), spacing=6.0, profile="lowfield")
    np.testing.assert_array_equal(label, label_low)
    gm = label == labels["gray_matter"]
    assert low[wm].mean() > low[csf].mean()  # still T1: fluid dark, but grey and white matter closer together
    assert low[wm].mean() / low[gm].mean() < t1[wm].mean() / t1[gm].mean()
    assert np.abs(np.diff(low, axis=0)).mean() < np.abs(np.diff(t1, axis=0)).mean()  # lower resolution
    chest_cov = {"age": 60, "sex": "M", "cardiomegaly": 0, "effusion": 0}
    film, _ = render.render("chest", chest_u, chest_cov, shape=(64, 64))
    portable, _ = render.render("chest", chest_u, chest_cov, shape=(64, 64), profile="portable")
    again, _ = render.render("chest", chest_u, chest_cov, shape=(64, 64), profile="portable")
    np.testing.assert_array_equal(portable, again)
    assert portable.min() >= 0.15 and np.abs(portable - film).mean() > 0.05
    with pytest.raises(ValueError, match="profile must be one of"):
        render.render("chest", chest_u, chest_cov, shape=(64, 64), profile="t2")
    datalist = generate.generate_cohort(tmp_path, "chest", num_subjects=2, shape=(64, 64), profile="portable")
    record = json.loads(open(datalist).read())["training"][0]
    truth = generate.write_counterfactual_truth(tmp_path, record["subject"], {"effusion": 1 - record["effusion"]})
    subject = generate.load_subject(tmp_path, record["subject"])
    assert subject["profile"] == "portable"
    expected, _ = render.counterfactual(
        "chest", subject["u"], subject["visits"][0], {"effusion": 1 - record["effusion"]}, (64, 64), profile="portable"
    )
    from PIL import Image

    written = np.asarray(Image.open(truth["image"]), dtype=np.float32) / 65535.0
    assert np.abs(written - expected).max() < 1e-3  # the truth is rendered in the cohort's profile
