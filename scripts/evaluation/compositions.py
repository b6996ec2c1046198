"""Every composition x mask threshold from one run of the chains, scored side by side, with the recommendation rule
fixed beforehand.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.core.covariates import CovariateEncoder
from scripts.core.inferers import CounterfactualInferer, compose, edit_mask
from scripts.evaluation import evaluators as E
from scripts.evaluation.evaluate import (
    apply_intervention,
    check_cohort,
    check_truth_frame,
    intervention_tag,
    load_truths,
    reconstruct,
    requested_changes,
    run_counterfactuals,
)
from scripts.evaluation.metrics import UNCHANGED_TOLERANCE, effectiveness_scores, oracle_scores
from scripts.evaluation.report import compositions_markdown, reconstruction_montage
from scripts.io.datalist import load_datalist
from scripts.io.files import staged_folder

COMPOSITION_VARIANTS = (
    ("none", False), ("reconstruction", False), ("reference", False), ("reconstruction", True), ("reference", True),
)  # fmt: skip
# Not a composition a user can pick: the input plus the autoencoder's own rendering of the true change,
# x + D(E(x*)) - D(E(x)). It reads the truth, so it is the most any latent model with these autoencoder weights
# can show, and it never enters the recommendation.
CEILING = "autoencoder_ceiling"
# Nor this: the oracle's best counterfactual from the input scan alone (scripts/cohort/render.py
# `identifiable_counterfactual`): the exogenous factors the scan does not show (where an added effusion collects)
# are redrawn and the per-voxel median taken. No model, however good, can be expected to beat it on average.
IDENTIFIABLE = "identifiable_ceiling"
# Nor this, a floor: the input through the autoencoder alone, D(E(x)), no model and no covariate change. The raw
# decode ("none") carries the same reconstruction error, so whatever share of the true change this row shows is the
# autoencoder's, not the model's: the raw decode's share above it is what the model itself adds.
ALONE = "autoencoder_alone"
NOT_CHOICES = (CEILING, IDENTIFIABLE, ALONE)


def autoencoder_ceiling(network: Any, images: torch.Tensor, truth: torch.Tensor, batch_size: int, precision: str):
    """The input plus the autoencoder's rendering of the true change, x + D(E(x*)) - D(E(x)), clamped to [0, 1]."""
    change = reconstruct(network, truth, batch_size, precision) - reconstruct(network, images, batch_size, precision)
    return (images + change).clamp(0, 1)


def score_compositions(
    inferer: CounterfactualInferer,
    network: Any,
    images: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    truth: torch.Tensor,
    batch_size: int = 8,
    mask_thresholds: Sequence[float] = (),
    outputs: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """
    Every composition (none / reconstruction / reference, each without and with the automatic mask, the mask at
    the inferer's threshold and at each of `mask_thresholds`) from one run of the chains, against the oracle:
    MAE to the truth, gain over doing nothing 1 - MAE(cf, truth) / MAE(x, truth), MAE to the input where the
    oracle changes nothing, the share of the true change reached where it changes (sum of (cf - x) sign(x* - x)
    over sum of |x* - x|), and the mask's Dice with the oracle's change region.
    """
    chains = copy.copy(inferer)
    chains.composition, chains.auto_mask = "reference", True
    parts = run_counterfactuals(chains, network, images, source, target, batch_size, parts=True)
    references = parts["counterfactual"] - parts["change"]
    reference_change = references - parts["reconstruction"]
    masks = {inferer.mask_threshold: parts["edit_mask"]}
    for threshold in mask_thresholds:
        masks[float(threshold)] = edit_mask(parts["change"], reference_change, threshold, inferer.mask_smoothing,
                                            inferer.mask_signed_smoothing)  # fmt: skip
    changed = (truth - images).abs() > UNCHANGED_TOLERANCE
    table = {}
    for composition, masked in COMPOSITION_VARIANTS:
        for threshold, mask in sorted(masks.items()) if masked else [(None, None)]:
            change = {"none": parts["counterfactual"] - images, "reconstruction": parts["counterfactual"] -
                      parts["reconstruction"], "reference": parts["change"]}[composition]  # fmt: skip
            output = compose(images, parts["counterfactual"], change, mask, composition).clamp(0, 1)
            name = composition + ("" if threshold is None else f"+mask@{threshold:g}")
            table[name] = oracle_scores(output, images, truth, changed, mask)
            if outputs is not None:
                outputs[name] = output
    return table


def _measure(segmenter, images: torch.Tensor, spatial_dims: int, spacing) -> list[dict[str, float]]:
    """The causal quantities (volumes) of the segmenter's label map of each image."""
    with torch.no_grad():
        return [E.measure(m[0].numpy(), spatial_dims, spacing) for m in E.segment(segmenter, images)]


def _directions(encoder: CovariateEncoder, records: Sequence[Mapping], targets: Sequence[Mapping]) -> dict:
    """Record indices per direction of change ("effusion 0->1"), when the records move more than one way."""
    groups: dict[str, list[int]] = {}
    for index, (record, target) in enumerate(zip(records, targets)):
        moves = [f"{k} {record[k]}->{v}" for k, v in requested_changes(encoder, record, target).items()
                 if encoder.schema[k]["type"] != "continuous"]  # fmt: skip
        if moves:
            groups.setdefault(", ".join(moves), []).append(index)
    return groups if len(groups) > 1 else {}


def _subset_scores(outputs: Mapping[str, torch.Tensor], images, truth, indices) -> dict[str, dict[str, float]]:
    chosen = torch.as_tensor(indices)
    changed = (truth[chosen] - images[chosen]).abs() > UNCHANGED_TOLERANCE
    return {name: {**oracle_scores(output[chosen], images[chosen], truth[chosen], changed, None),
                   "num_scans": len(indices)} for name, output in outputs.items()}  # fmt: skip


def compare_compositions(
    network: Any,
    inferer: CounterfactualInferer,
    encoder: CovariateEncoder,
    transform: Callable[[dict], dict],
    datalist: str,
    datalist_key: str,
    cohort_dir: str,
    interventions: Sequence[Mapping[str, Any]],
    image_size: Sequence[int],
    output_dir: str,
    num_records: int = 16,
    batch_size: int = 8,
    mask_thresholds: Sequence[float] = (1.0, 2.0, 3.0, 4.0, 6.0),
    min_share_kept: float = 0.9,
    share_floor_variant: str = "none",
    truth_frame: str = "input",
    identifiable_draws: int = 32,
    evaluator_dir: str | None = None,
    predictor_channels: Sequence[int] = (),
    segmenter_channels: Sequence[int] = (),
    spatial_dims: int = 3,
    spacing: Sequence[float] | float = 3.0,
) -> dict[str, Any]:
    """
    The composition table of `score_compositions` for each intervention over `datalist[datalist_key]`, and the
    recommended setting: the highest mean gain over doing nothing among the variants that keep at least
    `min_share_kept` of the share of the true change that `share_floor_variant` reaches (the raw decode, "none";
    "reference" where the raw decode's share is inflated by the autoencoder's blur). Run it on a validation
    split to choose `composition` / `mask_threshold`, then score held-out scans with the chosen values.
    `truth_frame` "input" (the default) compares in the written counterfactual's intensity frame, "own" in each
    truth's own (`load_truths`).
    `identifiable_draws` > 0 adds the `identifiable_ceiling` row over that many draws (0 leaves it out). The
    `autoencoder_alone` row scores D(E(x)), the input through the autoencoder with no model: the part of the raw
    decode's share that is the autoencoder's reconstruction error, not the model's change.
    An intervention that moves a covariate both ways over the records (a "flip": adding and removing a finding) is
    also scored per direction. With trained evaluators in `evaluator_dir`, each variant's effectiveness is added
    (how often the covariate predictor reads the asked value; for age, its absolute error) and its volumes (the
    segmenter's label map of the output against the oracle's exact label map of the truth, `_add_volumes`).
    Writes compositions.json, compositions.md and autoencoder.png (the first 3 inputs over their reconstructions:
    what the frozen stage 1 keeps) into `output_dir` (all or nothing).
    """
    started = time.perf_counter()
    records = load_datalist(datalist, datalist_key)[:num_records]
    if len(records) < 2:
        raise ValueError(f"{datalist}: '{datalist_key}' has {len(records)} record(s); the comparison needs 2 or more.")
    check_cohort(cohort_dir, records, datalist)
    check_truth_frame(truth_frame)
    images = E.load_cohort_split(datalist, datalist_key, encoder, transform, image_size, False, num_records)["images"]
    predictor = segmenter = None
    if evaluator_dir and (Path(evaluator_dir) / "predictor.pt").is_file():
        predictor, segmenter = E.load_evaluators(
            evaluator_dir, encoder, spatial_dims, predictor_channels, segmenter_channels
        )[:2]
    source = torch.stack([encoder.encode(r).reshape(1, -1) for r in records]).float()
    measured_input = []
    if segmenter is not None:
        measured_input = _measure(segmenter, images, spatial_dims, spacing)
    with staged_folder(output_dir, prefix=".compositions.") as staged:
        alone = reconstruct(network, images, batch_size, inferer.precision).clamp(0, 1)
        reconstruction_montage(staged / "autoencoder.png", images[:3], alone[:3])
        tables = {}
        for spec in interventions:
            targets = [apply_intervention(encoder, r, spec) for r in records]

            def oracle(draws: int) -> tuple[torch.Tensor, list]:
                return load_truths(cohort_dir, records, targets, encoder, transform, truth_frame, staged / "truth",
                                   image_size, draws)  # fmt: skip

            truth, truths = oracle(0)
            exact = [E.measure(t[1][0].numpy(), spatial_dims, spacing) for t in truths]
            target = torch.stack([encoder.encode(t).reshape(1, -1) for t in targets]).float()
            outputs: dict[str, torch.Tensor] = {}
            table = score_compositions(
                inferer, network, images, source, target, truth, batch_size, mask_thresholds, outputs
            )
            outputs[CEILING] = autoencoder_ceiling(network, images, truth, batch_size, inferer.precision)
            changed = (truth - images).abs() > UNCHANGED_TOLERANCE
            table[CEILING] = oracle_scores(outputs[CEILING], images, truth, changed, None)
            outputs[ALONE] = alone
            table[ALONE] = oracle_scores(outputs[ALONE], images, truth, changed, None)
            if identifiable_draws:
                outputs[IDENTIFIABLE] = oracle(identifiable_draws)[0]
                table[IDENTIFIABLE] = oracle_scores(outputs[IDENTIFIABLE], images, truth, changed, None)
            readings = {}
            if predictor is not None:
                readings = {
                    name: E.decode_predictions(encoder, E.predict(predictor, out)) for name, out in outputs.items()
                }
                _add_effectiveness(table, encoder, readings, records, targets, range(len(records)))
            measured = {}
            if segmenter is not None:
                measured = {
                    "input": measured_input,
                    **{name: _measure(segmenter, out, spatial_dims, spacing) for name, out in outputs.items()},
                }
                _add_volumes(table, measured, exact, range(len(records)))
            tables[intervention_tag(spec)] = table
            for direction, chosen in _directions(encoder, records, targets).items():
                subset = _subset_scores(outputs, images, truth, chosen)
                _add_effectiveness(subset, encoder, readings, records, targets, chosen)
                _add_volumes(subset, measured, exact, chosen)
                tables[f"{intervention_tag(spec)} [{direction}]"] = subset
            scores = tables[intervention_tag(spec)]
            summary = [
                f"{k} {v['gain_over_doing_nothing']:+.3f}/{v['share_of_true_change']:.3f}" for k, v in scores.items()
            ]
            print(f"{intervention_tag(spec)} (gain/share): " + ", ".join(summary))
        whole = {tag: table for tag, table in tables.items() if not tag.endswith("]")}
        report = {"interventions": tables, "recommended": _recommended(whole, min_share_kept, share_floor_variant),
                  "settings": {"datalist": str(datalist), "datalist_key": datalist_key, "num_records": len(records),
                               "unchanged_tolerance": UNCHANGED_TOLERANCE, "min_share_kept": min_share_kept,
                               "share_floor_variant": share_floor_variant, "truth_frame": truth_frame,
                               "identifiable_draws": identifiable_draws,
                               "strength": inferer.strength, "guidance_scale": inferer.guidance_scale,
                               "num_inference_steps": inferer.num_inference_steps,
                               "mask_smoothing": inferer.mask_smoothing,
                               "mask_signed_smoothing": inferer.mask_signed_smoothing,
                               "keep_intensity_scale": inferer.keep_intensity_scale,
                               "num_samples": inferer.num_samples, "sample_jitter": inferer.sample_jitter,
                               "sample_reduction": inferer.sample_reduction},
                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        shutil.rmtree(staged / "truth", ignore_errors=True)
        (staged / "compositions.json").write_text(json.dumps(report, indent=4) + "\n")
        (staged / "compositions.md").write_text(compositions_markdown(report))
    return report


def _add_effectiveness(table, encoder, readings, records, targets, indices) -> None:
    """Each variant's effectiveness over the records at `indices`: how often the predictor reads the asked value."""
    chosen = list(indices)
    changed = sorted({k for i in chosen for k in requested_changes(encoder, records[i], targets[i])})
    wanted = [targets[i] for i in chosen]
    for name, rows in readings.items():
        scores = effectiveness_scores(encoder, {"counterfactual": [rows[i] for i in chosen]}, wanted, changed)
        table[name]["effectiveness"] = {k: v["counterfactual"] for k, v in scores.items()}


def _add_volumes(table, measured, exact, indices) -> None:
    """
    Each variant's volumes over the records at `indices`, from `measured` (the segmenter's measures per variant and
    of the input) and `exact` (the oracle's label map of the truth): per quantity the median relative error
    |cf - truth| / truth (and the untouched input's, doing nothing), the mean true change (truth - input as the
    segmenter reads it) and the share of it the output makes (mean output change over mean true change).
    """
    chosen = list(indices)
    if not measured or not chosen:
        return
    source = [measured["input"][i] for i in chosen]
    truth = [exact[i] for i in chosen]
    true_change = {key: float(np.mean([t[key] - s[key] for t, s in zip(truth, source)])) for key in truth[0]}

    def relative_error(values, key):
        return float(
            np.median([abs(v[key] - t[key]) / t[key] for v, t in zip(values, truth) if t[key] > 0] or [np.nan])
        )

    for name, rows in measured.items():
        if name == "input" or name not in table:
            continue
        values = [rows[i] for i in chosen]
        table[name]["volumes"] = {
            key: {
                "median_relative_error": relative_error(values, key),
                "input_median_relative_error": relative_error(source, key),
                "true_change": true_change[key],
                "share_of_true_change": float(np.mean([v[key] - s[key] for v, s in zip(values, source)]))
                / true_change[key] if true_change[key] else float("nan"),
            }
            for key in truth[0]
        }  # fmt: skip


def _recommended(
    tables: Mapping[str, Mapping[str, Mapping[str, float]]], min_share_kept: float, floor_variant: str = "none"
) -> dict[str, Any]:
    names = [name for name in next(iter(tables.values())) if name not in NOT_CHOICES]
    first = next(iter(tables.values()))
    mean = {n: {k: float(np.mean([t[n][k] for t in tables.values()])) for k, v in first[n].items()
                if isinstance(v, float)} for n in names}  # fmt: skip
    if floor_variant not in mean:
        raise ValueError(f"share_floor_variant '{floor_variant}' is not one of the scored variants {names}.")
    floor = min_share_kept * mean[floor_variant]["share_of_true_change"]
    eligible = [n for n in names if mean[n]["share_of_true_change"] >= floor] or ["none"]
    best = max(eligible, key=lambda n: mean[n]["gain_over_doing_nothing"])
    return {"variant": best, "mean_over_interventions": mean[best], "share_floor": floor, "eligible": eligible}
