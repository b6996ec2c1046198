"""The paper's delta search (configs/find_delta.json): distances, the chosen delta, the CLI on the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from scripts.cohort.generate import generate_cohort
from scripts.evaluation.delta_search import check_grid, distances

CHEST = ["common.json", "chest_xray_2d.json", "find_delta.json"]


def test_identical_batches_are_at_distance_zero():
    images = torch.rand(4, 1, 8, 8)
    assert distances(images, images.clone()) == {"paired_l1": 0.0, "nearest_l1": 0.0, "mean_image_l1": 0.0}


def test_distances_grow_with_a_perturbation():
    real = torch.rand(4, 1, 8, 8)
    near, far = distances(real + 0.05, real), distances(real + 0.2, real)
    for name in near:
        assert 0 < near[name] < far[name], name
    assert near["paired_l1"] == pytest.approx(0.05, abs=1e-6)


def test_nearest_l1_finds_a_shuffled_match():
    real = torch.rand(4, 1, 8, 8)
    shuffled = real[[2, 0, 3, 1]]
    result = distances(shuffled, real)
    assert result["nearest_l1"] == pytest.approx(0.0, abs=1e-6) and result["paired_l1"] > 0.1


@pytest.mark.parametrize("grid", [[], [0.1, float("nan")]])
def test_a_bad_grid_is_refused(grid):
    with pytest.raises(ValueError, match="delta_grid must be a non-empty list of finite numbers"):
        check_grid(grid)


@pytest.mark.slow
def test_find_delta_cli_on_the_shipped_chest_weights(tmp_path, bundle_cli):
    generate_cohort(tmp_path / "cohort", seed=5, modality="chest", num_subjects=10, shape=(128, 128))
    out = tmp_path / "search"
    arguments = [
        "--search_datalist", str(tmp_path / "cohort" / "datalist.json"), "--results_dir", str(out),
        "--search_datalist_key", "training", "--delta_grid", "[-0.2,0.0,0.2]", "--num_records", "3",
        "--num_inference_steps", "5",
    ]  # fmt: skip
    bundle_cli("run", CHEST, *arguments)
    result = json.loads((out / "delta_search.json").read_text())
    curve = result["curve"]
    assert [row["delta"] for row in curve] == [-0.2, 0.0, 0.2]
    assert result["chosen_delta"] == min(curve, key=lambda row: row["paired_l1"])["delta"]
    assert result["settings"]["num_records"] == 3
    # the same noise at every delta: the distances differ only because delta moves the samples
    assert len({round(row["paired_l1"], 6) for row in curve}) == 3
    assert Image.open(out / "delta_search.png").size == (640, 400)
    assert Image.open(out / "delta_search_samples.png").width > 3 * 32

    bad = bundle_cli("run", CHEST, *arguments[:2], "--results_dir", str(tmp_path / "bad"), "--delta_grid", "[]",
                     check=False)  # fmt: skip
    assert bad.returncode != 0 and "delta_grid must be a non-empty list" in bad.stderr.splitlines()[-1]
    assert not (tmp_path / "bad").exists()
