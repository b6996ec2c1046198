"""The paper's fine-tuning table on the synthetic cohort, under a real domain shift (configs/ablation.json).

Stages (each one a run of the bundle's own configs through `python -m monai.bundle run`, so the configs stay the
program; every stage is skipped when its output exists, so an interrupted ablation resumes where it stopped):

1. cohorts: a large *source* cohort in another acquisition profile (`scripts.cohort.render.PROFILES`: chest films
   with the "portable" look; brains in the "t2" or "lowfield" profile, on the grid of `spacing` and `anatomy`), a
   small *target* cohort in the standard profile (few training subjects; its validation subjects are the test set)
   and an *evaluator* cohort (standard profile, other subjects) on which the covariate predictor and segmenter are
   trained (configs/train_evaluators.json);
2. pretraining on the source domain only: autoencoder (frozen afterwards, like the paper's VAE) and diffusion UNet
   with δ = 0;
3. the paper's δ search (configs/find_delta.json) of the pretrained model against target training images;
4. fine-tuning on the target training subjects with each scheme (`full`, `cross_attention`, `embedding`), LD off
   (δ = 0) and LD on (δ = the searched δ, or `ld_delta` if set), for each seed: same data, steps and budget on
   both sides;
5. evaluation of every model (configs/evaluate.json) on the target test subjects, plus the pretrained model
   without fine-tuning (LD off / LD at inference only);
6. `results.json`, `results.md` (the table: mean ± std over seeds), `results_oracle.png` (a column of the table as
   bars) and `results_montage.png` (each model's counterfactuals of the first test scan, first seed) in
   `output_dir`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from scripts.cohort import causal_model, render
from scripts.experiments.stages import Stages
from scripts.io.files import atomic_write, atomic_write_json
from scripts.io.weights import read_weights

SCHEMES = ("full", "cross_attention", "embedding")


def metrics_row(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The table's columns from one evaluation.json (means over the interventions)."""
    entries = list(evaluation["interventions"].values())
    mean = lambda values: float(np.mean(values))  # noqa: E731
    row = {
        "oracle_mae": mean([e["oracle"]["counterfactual_vs_truth"]["mae"] for e in entries]),
        "oracle_ssim": mean([e["oracle"]["counterfactual_vs_truth"]["ssim"] for e in entries]),
        "gain": mean([e["gain_and_share"]["gain_over_doing_nothing"] for e in entries if "gain_and_share" in e]),
        "share": mean([e["gain_and_share"]["share_of_true_change"] for e in entries if "gain_and_share" in e]),
        "effectiveness": mean([v["counterfactual"] for e in entries for k, v in e["effectiveness"].items()
                               if k.endswith("_accuracy")]),  # fmt: skip
        "minimality_mae": mean([e["minimality"]["mae_where_unchanged"] for e in entries]),
        "cf_kid": mean([e["realism"]["counterfactual"]["kid"] for e in entries]),
    }
    for tag, e in evaluation["interventions"].items():
        if "gain_and_share" not in e:
            continue
        row[f"gain {tag}"] = e["gain_and_share"]["gain_over_doing_nothing"]
        row[f"share {tag}"] = e["gain_and_share"]["share_of_true_change"]
    if "composition" in evaluation:
        row["composition_mae"] = evaluation["composition"]["counterfactual_vs_input"]["mae"]
        row["reversibility_mae"] = mean([e["reversibility"]["counterfactual_vs_input"]["mae"] for e in entries])
    utility = evaluation.get("utility")
    if utility:
        aucs = [v for k, v in utility["trained_on_synthetic"].items() if k.endswith("_auc")]
        row["utility_auc"] = mean(aucs) if aucs else float("nan")
        row["sample_kid"] = utility["realism_of_samples"]["kid"]
    return row


def summarise(rows: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    keys = rows[0].keys()
    return {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows]))] for k in keys}


COLUMNS = (
    ("gain", "gain over doing nothing ↑"),
    ("share", "share of true change ↑"),
    ("oracle_mae", "MAE to truth ↓"),
    ("oracle_ssim", "SSIM to truth ↑"),
    ("effectiveness", "effectiveness ↑"),
    ("minimality_mae", "MAE where unchanged ↓"),
    ("reversibility_mae", "reversibility MAE ↓"),
    ("cf_kid", "KID cf ↓"),
    ("sample_kid", "KID samples ↓"),
    ("utility_auc", "utility AUC ↑"),
)


def markdown_table(results: Mapping[str, Any]) -> str:
    lines = ["| model | LD (δ) | " + " | ".join(title for _, title in COLUMNS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]  # fmt: skip
    for row in results["rows"]:
        cells = []
        for key, _ in COLUMNS:
            mean_std = row["summary"].get(key)
            cells.append("n/a" if mean_std is None else f"{mean_std[0]:.4f} ± {mean_std[1]:.4f}")
        lines.append(f"| {row['model']} | {row['ld']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + intervention_table(results)


def intervention_table(results: Mapping[str, Any]) -> str:
    """Gain over doing nothing / share of the true change per intervention (mean ± std over seeds)."""
    tags = [k[len("gain ") :] for k in results["rows"][0]["summary"] if k.startswith("gain ")]
    if not tags:
        return ""
    lines = ["", "gain over doing nothing / share of the true change, per intervention:", "",
             "| model | LD (δ) | " + " | ".join(tags) + " |",
             "| --- | --- | " + " | ".join("---" for _ in tags) + " |"]  # fmt: skip
    for row in results["rows"]:
        cells = []
        for tag in tags:
            (gain, gain_std), (share, share_std) = row["summary"][f"gain {tag}"], row["summary"][f"share {tag}"]
            cells.append(f"{gain:+.3f} ± {gain_std:.3f} / {share:.3f} ± {share_std:.3f}")
        lines.append(f"| {row['model']} | {row['ld']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Mapping[str, Any], key: str = "gain", size: tuple[int, int] = (720, 360)) -> Image.Image:
    """Bars of one column from zero, LD off (grey) and on (blue) side by side per model, with ± std whiskers."""
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    rows = results["rows"]
    low = min([0.0] + [r["summary"][key][0] - r["summary"][key][1] for r in rows])
    high = max([0.0] + [r["summary"][key][0] + r["summary"][key][1] for r in rows])
    span = (high - low) or 1.0
    left, bottom, height = 40, size[1] - 70, size[1] - 110
    y = lambda value: bottom - height * (value - low) / span  # noqa: E731
    width = (size[0] - left - 20) / len(rows)
    title = dict(COLUMNS)[key].rstrip(" ↑↓")  # the default font has no arrows
    draw.text((5, 8), f"{title} per model (mean ± std over seeds; {low:+.4f} to {high:+.4f})", fill="black")
    draw.line([(left, y(0.0)), (size[0] - 10, y(0.0))], fill="black")
    for i, row in enumerate(rows):
        mean, std = row["summary"][key]
        x0, x1 = left + i * width + 6, left + (i + 1) * width - 6
        colour = (40, 90, 200) if row["ld"] != "off" else (150, 150, 150)
        draw.rectangle([x0, min(y(mean), y(0.0)), x1, max(y(mean), y(0.0))], fill=colour)
        xm = (x0 + x1) / 2
        draw.line([(xm, y(mean + std)), (xm, y(mean - std))], fill="black")
        label = row["model"].replace("fine-tuned ", "").replace("pretrained ", "pre ")
        draw.text((x0, bottom + 6), label[:14], fill="black")
        draw.text((x0, bottom + 20), f"LD {row['ld']}"[:14], fill="black")
    draw.text((left, size[1] - 25), "grey: LD off   blue: LD on", fill="black")
    return picture


def montage(panels: Sequence[tuple[str, Path]], label_width: int = 230) -> Image.Image:
    """The evaluation montages of several models stacked, each labelled on its left."""
    pictures = [(label, Image.open(path).convert("RGB")) for label, path in panels]
    width = label_width + max(p.width for _, p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height + 4 for _, p in pictures)), "white")
    top = 0
    for label, picture in pictures:
        canvas.paste(picture, (label_width, top))
        ImageDraw.Draw(canvas).multiline_text((6, top + 6), label.replace(", ", "\n"), fill="black")
        top += picture.height + 4
    return canvas


def run_ablation(
    output_dir: str,
    modality: str,
    preset: str,
    image_size: Sequence[int],
    source_profile: str,
    source_subjects: int,
    target_train_subjects: int,
    target_test_subjects: int,
    evaluator_subjects: int,
    autoencoder: Mapping[str, Any],
    pretrain: Mapping[str, Any],
    finetune: Mapping[str, Any],
    evaluation: Mapping[str, Any],
    evaluators: Mapping[str, Any],
    delta_grid: Sequence[float],
    ld_delta: float | None = None,
    schemes: Sequence[str] = SCHEMES,
    seeds: Sequence[int] = (0, 1, 2),
    network: Mapping[str, Any] | None = None,
    anatomy: str = "phantom",
    spacing: float | None = None,
) -> dict[str, Any]:
    """
    Run (or resume) every stage; returns the results written to `output_dir`/results.json. `network` holds config
    overrides every training and evaluation stage shares (e.g. larger `unet_channels` on a GPU). For the brain,
    `anatomy` (``"phantom"`` or ``"mni152"``) and `spacing` (mm, isotropic; ``None`` = 3) set the cohorts' grid, and
    the networks' `pixdim` follows `spacing`.
    """
    _check_settings(modality, source_profile, schemes, seeds, anatomy, spacing)
    root = Path(output_dir).absolute()
    stages = Stages(root, ["configs/common.json", preset], "ablation")
    grid = {} if modality == "chest" else {"spacing": float(spacing or 3.0), "anatomy": anatomy}
    base = {
        "image_size": list(image_size),
        **({"pixdim": [grid["spacing"]] * 3} if grid else {}),
        **dict(network or {}),
    }
    counts = (source_subjects, target_train_subjects, target_test_subjects, evaluator_subjects)
    cohorts = _cohorts(stages, modality, image_size, grid, source_profile, *counts)
    evaluator_dir = root / "evaluators"
    stages.run("evaluators", evaluator_dir / "evaluators.json", ["configs/train_evaluators.json"],
               {**base, "dataset_dir": str(cohorts["evaluator"]), "evaluator_dir": str(evaluator_dir), **evaluators})  # fmt: skip
    source = _pretrain(stages, root, {**base, "dataset_dir": str(cohorts["source"])}, autoencoder, pretrain)
    target = {**base, "dataset_dir": str(cohorts["target"])}
    searched, delta = _search_delta(stages, root, target, source, delta_grid, target_train_subjects, ld_delta)
    runs = _finetune(stages, root, target, source, schemes, seeds, delta, finetune)
    test_datalist = _test_datalist(cohorts["target"])
    evaluation_overrides = {**target, "evaluator_dir": str(evaluator_dir), "eval_datalist": test_datalist,
                            "eval_datalist_key": "test", "reference_datalist": str(cohorts["evaluator"] / "datalist.json"),
                            **evaluation}  # fmt: skip
    rows, pictures = _evaluate(stages, root, runs, evaluation_overrides, preset, seeds[0])
    results = {
        "settings": {"modality": modality, **base, **grid, "source_profile": source_profile,
                     "source_subjects": source_subjects, "target_train_subjects": target_train_subjects,
                     "target_test_subjects": target_test_subjects, "evaluator_subjects": evaluator_subjects,
                     "autoencoder": dict(autoencoder), "pretrain": dict(pretrain), "finetune": dict(finetune),
                     "evaluation": dict(evaluation), "seeds": list(seeds), "schemes": list(schemes),
                     "searched_delta": searched, "ld_delta": delta, "delta_grid": list(delta_grid)},
        "rows": [{"model": m, "ld": ld, "per_seed": r,
                  "summary": summarise([{k: v for k, v in x.items() if k != "seed"} for x in r])}
                 for (m, ld), r in rows.items()],
        "timings_seconds": stages.timings,
        "total_compute_seconds": round(sum(stages.timings.values()), 1),
    }  # fmt: skip
    _write_results(root, results, pictures)
    return results


def _check_settings(
    modality: str,
    source_profile: str,
    schemes: Sequence[str],
    seeds: Sequence[int],
    anatomy: str = "phantom",
    spacing: float | None = None,
) -> None:
    """Schemes, seeds, the domain shift and the brain's grid, checked before any work."""
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown or not schemes:
        raise ValueError(f"schemes must be a non-empty subset of {list(SCHEMES)}, got {list(schemes)}.")
    if not seeds:
        raise ValueError("seeds must name at least one seed.")
    render.check_profile(causal_model.check_modality(modality), source_profile)
    if source_profile == "standard":
        raise ValueError("source_profile must differ from the target's 'standard' profile (that is the domain shift).")
    render.check_anatomy(modality, anatomy)
    if spacing is not None and modality == "chest":
        raise ValueError("spacing applies to the brain only; leave it null for the chest (its field of view is fixed).")
    if spacing is not None and not float(spacing) > 0:
        raise ValueError(f"spacing must be a positive voxel size in mm, got {spacing!r}.")


def _cohorts(stages, modality, image_size, grid, source_profile, source, target_train, target_test, evaluator) -> dict:
    """Stage 1, through the generator config like a user: source, target and evaluator cohorts (`grid`: the brain's
    spacing and anatomy)."""
    shape = {"shape": json.dumps(list(image_size)), **grid}
    cohorts = {
        "source": (source, source_profile, 0.1, 100),
        "target": (target_train + target_test, "standard", target_test / (target_train + target_test), 200),
        "evaluator": (evaluator, "standard", 0.2, 300),
    }
    return {
        name: stages.cohort(name, modality, {"num_subjects": count, "profile": profile, "val_fraction": fraction,
                                             "seed": seed, **shape})  # fmt: skip
        for name, (count, profile, fraction, seed) in cohorts.items()
    }


def _test_datalist(target: Path) -> str:
    """The test scans: the first scan of each held-out target subject (a longitudinal cohort has several per subject;
    `num_records` then counts subjects, not visits). Written beside the cohort's datalist, as its copy with a "test" key;
    returns its path."""
    datalist = json.loads((target / "datalist.json").read_text())
    first: dict[str, dict] = {}
    for record in datalist["validation"]:
        kept = first.setdefault(record["subject"], record)
        if record.get("visit", 0) < kept.get("visit", 0):
            first[record["subject"]] = record
    test = list(first.values())
    path = target / "datalist_test.json"
    atomic_write_json({**datalist, "test": test}, path)  # the rest stays: evaluation reads "training" too
    return str(path)


def _pretrain(stages, root: Path, source_data: Mapping[str, Any], autoencoder, pretrain) -> Path:
    """Stage 2: autoencoder and diffusion UNet (δ = 0) on the source domain only; returns their folder."""
    source = root / "pretrained"
    settings = {**source_data, "ckpt_dir": str(source), "output_dir": str(source / "runs"), "resume": False}
    stages.run("pretrain_autoencoder", source / "autoencoder.pt", ["configs/train_autoencoder.json"],
               {**settings, **autoencoder}, "training")  # fmt: skip
    stages.run("pretrain_diffusion", source / "model.pt", ["configs/train_diffusion.json"],
               {**settings, "delta": 0.0, **pretrain}, "training")  # fmt: skip
    return source


def _search_delta(stages, root: Path, target, source: Path, delta_grid, train_subjects: int, ld_delta):
    """Stage 3: the paper's δ search on the target training images; returns (searched δ, δ used)."""
    search_dir = root / "find_delta"
    stages.run("find_delta", search_dir / "delta_search.json", ["configs/find_delta.json"],
               {**target, "model_path": str(source / "model.pt"), "delta": 0.0, "delta_grid": list(delta_grid),
                "search_datalist_key": "training", "num_records": min(16, train_subjects),
                "results_dir": str(search_dir)})  # fmt: skip
    searched = json.loads((search_dir / "delta_search.json").read_text())["chosen_delta"]
    return searched, float(ld_delta) if ld_delta is not None else float(searched)


def _finetune(stages, root: Path, target, source: Path, schemes, seeds, delta: float, finetune) -> list[tuple]:
    """Stage 4: every scheme x LD off/on x seed fine-tuned on the target; returns (model, ld, seed, folder, δ)."""
    runs = []
    for seed in seeds:
        runs.append(("pretrained (no fine-tuning)", "off", seed, source, 0.0))
        runs.append(("pretrained (no fine-tuning)", f"inference only ({delta:g})", seed, source, delta))
        for scheme in schemes:
            for ld, value in (("off", 0.0), (f"train + inference ({delta:g})", delta)):
                tag = f"{scheme}_ld-{'on' if value else 'off'}_seed-{seed}"
                folder = root / "finetuned" / tag
                _check_resumed_delta(folder / "model.pt", value)
                stages.run(f"finetune_{tag}", folder / "model.pt", ["configs/train_diffusion.json", "configs/finetune.json"],
                           {**target, "ckpt_dir": str(folder), "output_dir": str(folder / "runs"), "resume": False,
                            "finetune_from": str(source / "model.pt"), "finetune_scheme": scheme, "delta": value,
                            "seed": seed, **finetune}, "training")  # fmt: skip
                runs.append((f"fine-tuned {scheme}", ld, seed, folder, value))
    return runs


def _check_resumed_delta(weights: Path, delta: float) -> None:
    """A fine-tune is resumed from its folder only if its weights were trained at the δ this run asks for."""
    if not weights.is_file():
        return
    _, metadata = read_weights(weights)
    trained = ((metadata or {}).get("drift") or {}).get("delta")
    if trained is not None and not np.allclose(np.asarray(trained, dtype=float), delta):
        raise ValueError(
            f"{weights} was fine-tuned at delta {trained}, this run asks {delta:g}: set ld_delta to {trained} "
            f"or move {weights.parent} away to fine-tune it again."
        )


def _evaluate(stages, root: Path, runs, overrides, preset: str, first_seed: int) -> tuple[dict, list]:
    """Stage 5: every model scored on the target test subjects; returns the rows per (model, LD) and the montage."""
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    pictures: list[tuple[str, Path]] = []
    for model, ld, seed, folder, value in runs:  # the weights own their δ: inference_delta sets the arm's
        results_dir = root / "evaluations" / f"{folder.name}_delta-{value:g}_seed-{seed}"
        stages.run(f"evaluate_{results_dir.name}", results_dir / "evaluation.json", ["configs/evaluate.json"],
                   {**overrides, "model_path": str(folder / "model.pt"), "inference_delta": value, "seed": seed,
                    "results_dir": str(results_dir)}, base=["configs/inference.json", preset])  # fmt: skip
        metrics = metrics_row(json.loads((results_dir / "evaluation.json").read_text()))
        rows.setdefault((model, "off" if value == 0 else ld), []).append({**metrics, "seed": seed})
        if seed == first_seed:
            pictures.append((f"{model}, LD {'off' if value == 0 else ld}", results_dir / "evaluation_montage.png"))
    return rows, pictures


def _write_results(root: Path, results: Mapping[str, Any], pictures: Sequence[tuple[str, Path]]) -> None:
    """Stage 6: results.json, the table, the bar plot and the montage."""
    atomic_write_json(results, root / "results.json")
    table = markdown_table(results)
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table), ".md")
    atomic_write(root / "results_oracle.png", lambda tmp: plot(results).save(tmp, format="PNG"), ".png")
    atomic_write(root / "results_montage.png", lambda tmp: montage(pictures).save(tmp, format="PNG"), ".png")
    print(table)
