"""The conditioning comparison (configs/conditioning.json): its scores, table, checks and one tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest

from scripts.experiments import conditioning
from tests.conftest import run_bundle


def report(share: float, raw: float, effusion_accuracy: float = 0.5) -> dict:
    def variant(value):
        return {"share_of_true_change": value, "gain_over_doing_nothing": value - 0.5, "mae_to_truth": 1 - value}

    chosen = {**variant(share), "effectiveness": {"effusion_accuracy": effusion_accuracy, "age_abs_error": 9.0}}
    table = {"none": variant(raw), "reconstruction+mask@0.5": chosen}
    return {"interventions": {"effusion=flip": table, "effusion=flip [effusion 0->1]": table}}


def test_scores_read_the_default_composition_and_the_raw_decode():
    row = conditioning.scores(report(0.4, 0.6, 0.75), "reconstruction+mask@0.5")
    assert set(row) == {"effusion=flip", "effusion=flip [effusion 0->1]"}
    assert row["effusion=flip"] == {"share": 0.4, "gain": pytest.approx(-0.1), "mae": 0.6, "effectiveness": 0.75,
                                    "raw_share": 0.6}  # fmt: skip
    with pytest.raises(ValueError, match="no variant 'reference'"):
        conditioning.scores(report(0.4, 0.6), "reference")


def test_the_table_reports_mean_and_spread_over_seeds():
    per_seed = [conditioning.scores(report(s, 0.5), "reconstruction+mask@0.5") for s in (0.2, 0.4)]
    summary = conditioning.summarise(per_seed)
    assert summary["effusion=flip"]["share"] == [pytest.approx(0.3), pytest.approx(0.1)]
    results = {"rows": [{"conditioning": ["timestep_embedding"], "condition_dropout": 0.15, "guidance_scale": 3.0,
                         "summary": summary}]}  # fmt: skip
    table = conditioning.markdown(results)
    assert "| timestep_embedding | 0.15 | 3 | 0.300 ± 0.100 |" in table and "**effusion=flip [effusion 0->1]**" in table


def test_designs_and_the_default_composition_are_checked_before_any_work(tmp_path):
    assert conditioning.check_designs([["cross_attention", "timestep_embedding"], "input_channels"])[1] == [
        "input_channels"
    ]
    for bad in ([["film"]], [[]], [["input_channels", "input_channels"]], []):
        with pytest.raises(ValueError, match="designs"):
            conditioning.check_designs(bad)
    assert conditioning.default_variant(["configs/inference.json", "configs/chest_xray_2d.json"]) == (
        "reconstruction+mask@8"
    )
    earlier = {"mask_threshold": 4.0, "mask_signed_smoothing": 0.0}  # how the 2026-12-05 tables were scored
    assert conditioning.default_variant(["configs/inference.json", "configs/chest_xray_2d.json"], earlier) == (
        "reconstruction+mask@4"
    )
    with pytest.raises(ValueError, match="designs"):
        conditioning.compare_conditioning(
            str(tmp_path), "chest", "configs/chest_xray_2d.json", [32, 32], 4, 4, 4, {}, {}, {}, {}, [["film"]]
        )
    assert not any(tmp_path.iterdir()), "nothing is written before the settings are checked"


@pytest.mark.slow
def test_a_tiny_comparison_runs_end_to_end_and_resumes(tmp_path):
    tiny = {"autoencoder_channels": [8, 16, 16], "unet_channels": [16, 16, 16], "cross_attention_dim": 16}
    epochs = {"max_epochs": 1, "batch_size": 4, "val_interval": 1, "sample_every_epochs": 1}
    overrides = {
        "output_dir": str(tmp_path / "conditioning"), "image_size": [32, 32], "train_subjects": 8,
        "test_subjects": 4, "evaluator_subjects": 10, "network": tiny, "autoencoder": {**epochs, "adversarial_weight": 0.0},
        "diffusion": epochs, "evaluators": {"predictor_epochs": 1, "segmenter_epochs": 1},
        "evaluation": {"num_records": 4, "num_inference_steps": 2, "eval_batch_size": 4},
        "designs": [["timestep_embedding"], ["input_channels"]], "guidance_scales": [3.0], "seeds": [0],
    }  # fmt: skip
    arguments = [a for key, value in overrides.items() for a in (f"--{key}", json.dumps(value))]
    first = run_bundle("run", ["conditioning.json"], *arguments, timeout=1200)
    results = json.loads((tmp_path / "conditioning" / "results.json").read_text())
    assert [row["conditioning"] for row in results["rows"]] == [["timestep_embedding"], ["input_channels"]]
    for row in results["rows"]:
        scores = row["per_seed"][0]
        assert {"effusion=flip", "cardiomegaly=flip"} <= set(scores)
        assert all(math.isfinite(value) for tag in scores.values() for value in tag.values())
    models = sorted((tmp_path / "conditioning" / "models").iterdir())
    assert [m.name for m in models] == ["input_channels_dropout-0.15_seed-0", "timestep_embedding_dropout-0.15_seed-0"]
    assert "| timestep_embedding | 0.15 | 3 |" in (tmp_path / "conditioning" / "results.md").read_text()
    again = run_bundle("run", ["conditioning.json"], *arguments, timeout=600)
    assert not any(line.endswith(" ...") for line in again.stdout.splitlines()), "a rerun resumes: nothing reruns"
    assert again.stdout.count("done before") == 8, first.stdout[-2000:]
