"""Scoring a counterfactual against the generator's oracle (scripts/cohort/oracle.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scripts.cohort.generate import write_counterfactual_truth
from scripts.cohort.oracle import compare_to_oracle

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples"
CASES = {"chest": {"cardiomegaly": 1, "effusion": 1}, "brain": {"age": 85, "diagnosis": "AD"}}


@pytest.mark.parametrize("modality", sorted(CASES))
def test_the_true_counterfactual_scores_perfectly_and_the_input_does_not(modality, tmp_path):
    cohort = SAMPLES / modality
    truth = write_counterfactual_truth(cohort, "sample", CASES[modality], output_dir=tmp_path / "truth")
    source = json.loads((cohort / "exogenous" / "sample.json").read_text())["visits"][0]
    target = {**source, **CASES[modality]}
    suffix = ".nii.gz" if modality == "brain" else ".png"
    for name, image in (("truth", truth["image"]), ("input", str(cohort / "images" / f"sample_visit-0{suffix}"))):
        copy = tmp_path / f"{name}{suffix}"
        shutil.copy(image, copy)
        record = tmp_path / f"{name}_record.json"
        record.write_text(json.dumps({"target": target, "outputs": {"counterfactual": str(copy)}}))
        result = compare_to_oracle(str(record), str(cohort), "sample", output_path=str(tmp_path / f"{name}.json"))
        assert result["changes"] == CASES[modality]
        assert json.loads((tmp_path / f"{name}.json").read_text()) == result
        changed = [r for n, r in result["regions"].items() if n in ("ventricle_growth_rim", "effusion_region")]
        assert changed and changed[0]["voxels"] > 0
        if name == "truth":
            assert result["mae_to_truth"]["counterfactual"] == pytest.approx(0.0, abs=1e-6)
            assert all(r["counterfactual"] == pytest.approx(r["truth"]) for r in result["regions"].values())
        else:
            assert result["mae_to_truth"]["counterfactual"] == pytest.approx(result["mae_to_truth"]["input"])
            assert abs(changed[0]["counterfactual"] - changed[0]["truth"]) > 0.1


def test_the_identifiable_counterfactual_redraws_only_what_the_scan_does_not_show():
    import numpy as np

    from scripts.cohort.causal_model import CHEST_LABELS, sample_chest_exogenous
    from scripts.cohort.render import counterfactual, identifiable_counterfactual, unobserved_factors

    u, shape = sample_chest_exogenous(3), (64, 64)
    clear = {"age": 60, "sex": "F", "cardiomegaly": 0, "effusion": 0}
    hidden = unobserved_factors("chest", u, clear, shape=shape)
    assert {"effusion_side", "effusion_height"} <= set(hidden) and "noise_seed" not in hidden
    assert "effusion_side" not in unobserved_factors("chest", u, {**clear, "effusion": 1}, shape=shape)
    # what the film shows is all a heart change needs: the identifiable counterfactual is the exact one
    exact = counterfactual("chest", u, clear, {"cardiomegaly": 1}, shape=shape)
    image, label, _ = identifiable_counterfactual("chest", u, clear, {"cardiomegaly": 1}, draws=4, shape=shape)
    np.testing.assert_array_equal(image, exact[0])
    np.testing.assert_array_equal(label, exact[1])
    # adding fluid: where it lies is unknown, so the result is the fluid most redraws agree on, not the truth
    image, label, hidden = identifiable_counterfactual("chest", u, clear, {"effusion": 1}, draws=16, shape=shape)
    truth = counterfactual("chest", u, clear, {"effusion": 1}, shape=shape)
    assert "effusion_side" in hidden and (label == CHEST_LABELS["effusion"]).any()
    assert not np.array_equal(image, truth[0]) and image.shape == truth[0].shape and image.dtype == truth[0].dtype
    with pytest.raises(ValueError, match="draws"):
        identifiable_counterfactual("chest", u, clear, {"effusion": 1}, draws=0, shape=shape)
