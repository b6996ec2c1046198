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
