"""Conditioning designs compared at equal training compute, scored against the oracle (configs/conditioning.json).

How the covariates reach the denoiser decides whether a counterfactual shows the asked change. This experiment
trains the same diffusion model once per design (`ConditionedUNet`'s `conditioning`: cross-attention tokens, an MLP
embedding added to the timestep embedding, constant input channels, and combinations), condition-dropout rate and
seed, with the same data, autoencoder, optimizer steps and seeds, and scores each model's counterfactuals of fixed
held-out subjects at each guidance scale with the composition workflow (configs/evaluate.json `compositions`):

- share of the true change reached in the oracle's change region, with the default composition and raw (the
  decoded counterfactual itself: what the model says changes);
- gain over doing nothing (1 - MAE(cf, truth) / MAE(input, truth)) and the MAE to the truth;
- effectiveness: how often the covariate predictor (trained on a separate cohort) reads the asked value;
- each of these for adding and removing a finding apart.

Stages (each skipped when its output exists, so the experiment resumes): cohorts (training + held-out test
subjects fixed before any training, and an evaluator cohort), evaluators, one autoencoder shared by every model,
then per design x dropout x seed a diffusion model and its scores. Writes `results.json` and `results.md` (mean ±
std over seeds) into `output_dir`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser

from scripts.core.networks import CONDITIONINGS
from scripts.experiments.stages import Stages
from scripts.io.files import atomic_write, atomic_write_json

METRICS = (
    ("share", "share of true change ↑"),
    ("gain", "gain over doing nothing ↑"),
    ("mae", "MAE to truth ↓"),
    ("effectiveness", "effectiveness ↑"),
    ("raw_share", "raw share ↑"),
)


def default_variant(configs: Sequence[str], overrides: Mapping[str, Any] | None = None) -> str:
    """The composition the merged `configs` (with `overrides` on top) run by default, as compositions.json names it."""
    parser = ConfigParser()
    parser.read_config(list(configs))
    parser.update(dict(overrides or {}))
    name = str(parser["composition"])
    return name + (f"+mask@{float(parser['mask_threshold']):g}" if parser["auto_mask"] else "")


def check_designs(designs: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each design a non-empty list of distinct known conditionings; errors name the design."""
    checked = []
    for design in designs:
        design = [design] if isinstance(design, str) else list(design)
        if not design or len(set(design)) != len(design) or not set(design) <= set(CONDITIONINGS):
            raise ValueError(f"designs: {design} is not a non-empty list of distinct {list(CONDITIONINGS)}.")
        checked.append(design)
    if not checked:
        raise ValueError("designs must name at least one conditioning design.")
    return checked


def scores(report: Mapping[str, Any], variant: str) -> dict[str, dict[str, float]]:
    """Per intervention tag of one compositions.json (directions included): the table's metrics."""
    out = {}
    for tag, table in report["interventions"].items():
        if variant not in table:
            raise ValueError(f"compositions.json has no variant {variant!r} (it has {sorted(table)}).")
        chosen, raw = table[variant], table["none"]
        effectiveness = [v for k, v in chosen.get("effectiveness", {}).items() if k.endswith("_accuracy")]
        out[tag] = {
            "share": chosen["share_of_true_change"],
            "gain": chosen["gain_over_doing_nothing"],
            "mae": chosen["mae_to_truth"],
            "effectiveness": float(np.mean(effectiveness)) if effectiveness else float("nan"),
            "raw_share": raw["share_of_true_change"],
        }
    return out


def summarise(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Mean and std over seeds of every metric of every intervention tag."""
    tags = per_seed[0].keys()
    return {
        tag: {k: [float(np.mean([s[tag][k] for s in per_seed])), float(np.std([s[tag][k] for s in per_seed]))]
              for k, _ in METRICS}
        for tag in tags
    }  # fmt: skip


def markdown(results: Mapping[str, Any]) -> str:
    """One table per intervention tag: a row per design x dropout x guidance scale, mean ± std over seeds."""
    lines = []
    tags = list(results["rows"][0]["summary"]) if results["rows"] else []
    for tag in tags:
        lines += [f"\n**{tag}**\n", "| conditioning | dropout | guidance | " + " | ".join(t for _, t in METRICS) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]  # fmt: skip
        for row in results["rows"]:
            cells = []
            for key, _ in METRICS:
                mean, std = row["summary"][tag][key]
                cells.append("n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}")
            design = " + ".join(row["conditioning"])
            lines.append(
                f"| {design} | {row['condition_dropout']:g} | {row['guidance_scale']:g} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines).lstrip() + "\n"


def compare_conditioning(
    output_dir: str,
    modality: str,
    preset: str,
    image_size: Sequence[int],
    train_subjects: int,
    test_subjects: int,
    evaluator_subjects: int,
    autoencoder: Mapping[str, Any],
    diffusion: Mapping[str, Any],
    evaluators: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    designs: Sequence[Sequence[str]],
    condition_dropouts: Sequence[float] = (0.1,),
    guidance_scales: Sequence[float] = (1.0, 3.0),
    seeds: Sequence[int] = (0, 1, 2),
    network: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Run (or resume) every stage; returns the results written to `output_dir`/results.json. `network` holds config
    overrides every stage shares (e.g. larger `unet_channels` on a GPU); the settings dicts go to their stage.
    """
    designs = check_designs(designs)
    if not seeds or not guidance_scales or not condition_dropouts:
        raise ValueError("seeds, guidance_scales and condition_dropouts must each name at least one value.")
    root = Path(output_dir).absolute()
    stages = Stages(root, ["configs/common.json", preset], "conditioning")
    size = {"image_size": list(image_size), **dict(network or {})}
    shape = json.dumps(list(image_size))
    split = test_subjects / (train_subjects + test_subjects)  # the held-out test subjects: fixed before training
    cohort = stages.cohort(
        "train",
        modality,
        {"num_subjects": train_subjects + test_subjects, "seed": 200, "val_fraction": split, "shape": shape},
    )
    evaluator_cohort = stages.cohort(
        "evaluator", modality, {"num_subjects": evaluator_subjects, "seed": 300, "val_fraction": 0.2, "shape": shape}
    )
    evaluator_dir = root / "evaluators"
    stages.run("evaluators", evaluator_dir / "evaluators.json", ["configs/train_evaluators.json"],
               {**size, "dataset_dir": str(evaluator_cohort), "evaluator_dir": str(evaluator_dir), **evaluators})  # fmt: skip
    shared = root / "autoencoder"
    data = {**size, "dataset_dir": str(cohort), "resume": False}
    stages.run("autoencoder", shared / "autoencoder.pt", ["configs/train_autoencoder.json"],
               {**data, "ckpt_dir": str(shared), "output_dir": str(shared / "runs"), **autoencoder}, "training")  # fmt: skip
    variant = default_variant(["configs/inference.json", preset], evaluation)
    rows: dict[tuple, list] = {}
    for design in designs:
        for dropout in condition_dropouts:
            for seed in seeds:
                tag = f"{'+'.join(design)}_dropout-{dropout:g}_seed-{seed}"
                folder = root / "models" / tag
                model = {"conditioning": design, "condition_dropout": dropout, "seed": seed}
                stages.run(f"train_{tag}", folder / "model.pt", ["configs/train_diffusion.json"],
                           {**data, **model, "ckpt_dir": str(folder), "output_dir": str(folder / "runs"),
                            "autoencoder_path": str(shared / "autoencoder.pt"), **diffusion}, "training")  # fmt: skip
                for guidance in guidance_scales:
                    results_dir = root / "scores" / f"{tag}_guidance-{guidance:g}"
                    stages.run(f"score_{results_dir.name}", results_dir / "compositions.json", ["configs/evaluate.json"],
                               {**size, **model, "dataset_dir": str(cohort), "evaluator_dir": str(evaluator_dir),
                                "model_path": str(folder / "model.pt"), "guidance_scale": guidance,
                                "results_dir": str(results_dir), **evaluation}, "compositions",
                               ["configs/inference.json", preset])  # fmt: skip
                    report = json.loads((results_dir / "compositions.json").read_text())
                    rows.setdefault((tuple(design), dropout, guidance), []).append(scores(report, variant))
    results = {
        "settings": {"modality": modality, "preset": preset, **size, "train_subjects": train_subjects,
                     "test_subjects": test_subjects, "evaluator_subjects": evaluator_subjects,
                     "autoencoder": dict(autoencoder), "diffusion": dict(diffusion), "evaluators": dict(evaluators),
                     "evaluation": dict(evaluation), "seeds": list(seeds), "variant": variant},
        "rows": [{"conditioning": list(design), "condition_dropout": dropout, "guidance_scale": guidance,
                  "per_seed": per_seed, "summary": summarise(per_seed)}
                 for (design, dropout, guidance), per_seed in rows.items()],
        "timings_seconds": stages.timings,
    }  # fmt: skip
    atomic_write_json(results, root / "results.json")
    table = markdown(results)
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table), ".md")
    print(table)
    return results
