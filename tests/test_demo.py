"""The shipped chest demo: counterfactuals from the shipped weights move the oracle-measured anatomy the asked way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.phantoms import CHEST_LABELS, write_counterfactual_truth

pytestmark = pytest.mark.slow
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "chest"
CHEST = ["chest_xray_2d.json"]


def counterfactual(bundle_cli, out: Path, *overrides: str) -> np.ndarray:
    """Runs the README's first command into `out`; returns the counterfactual film scaled to [0, 1]."""
    bundle_cli("run", ["common.json", *CHEST, "inference.json"], "--results_dir", str(out), *overrides)
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


def test_same_seed_gives_the_same_counterfactual(demo, bundle_cli):
    again = counterfactual(bundle_cli, demo["root"] / "again")
    assert np.array_equal(again, demo["result"])
