"""The evaluation workflow (configs/evaluate.json): counterfactuals of a synthetic cohort scored against the truth.

For each held-out cohort scan x with covariates s and each configured intervention (target t), the bundle's
`CounterfactualInferer` gives cf = CF(x; s -> t), the generator's oracle gives the exact counterfactual x* (same
exogenous factors U, covariates t), and the evaluators trained on the cohort (`scripts.evaluation.evaluators`) read both.
Scores (docs/evaluation.md; Monteiro et al., ICLR 2023 for the axioms):

- oracle: MAE, PSNR, SSIM, MS-SSIM of cf against x* (and, as the do-nothing baseline, of x against x*); volume
  errors of cf's segmented ventricles / hippocampus / brain (chest: cardiothoracic ratio, effusion fraction) against
  x*'s exact label map, with the segmenter's own error on x* as the floor;
- gain and share (the two headline numbers, `gain_and_share`, absent when the oracle changes nothing): gain over
  doing nothing 1 - MAE(cf, x*) / MAE(x, x*) and the share of the true change cf makes where the oracle changes the
  scan, pooled and per scan (median, quartiles), as the composition table (`compositions`) scores its variants;
- effectiveness: the anti-causal predictor's accuracy (or age error) on cf for the intervened covariates, next to
  the same on x* (ceiling) and on x (floor);
- minimality: agreement of the predictor on cf and x for the covariates left alone, and the MAE of cf to x where
  the oracle says nothing changes (|x* - x| <= tolerance), next to the autoencoder's reconstruction error there;
- composition: CF(x; s -> s) against x (the null intervention must give x back), next to the autoencoder floor;
- reversibility: CF(CF(x; s -> t); t -> s) against x;
- realism: FID and KID of the predictor's features of the counterfactuals against real reference images (and of
  x*, the truth, as the floor);
- utility (the paper's AUC): a fresh predictor trained on images *sampled* by the model under the training
  records' covariates, tested on the real held-out scans, next to the same predictor trained on as many real scans.

Outputs (all-or-nothing in `output_dir`): `evaluation.json` (every number + settings), `evaluation.md` (the
tables), `evaluation_montage.png` (input | counterfactual | truth | cf - x | x* - x per scan) and
`evaluation_oracle.png` (image error to the truth: input vs counterfactual vs reconstruction, per intervention).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImage, ScaleIntensityRangePercentilesd

from scripts.cohort import generate
from scripts.core.covariates import CovariateEncoder
from scripts.core.inferers import CounterfactualInferer, compose, precision_context
from scripts.evaluation import evaluators as E
from scripts.evaluation.metrics import (
    UNCHANGED_TOLERANCE,
    effectiveness_scores,
    fid,
    kid,
    minimality_scores,
    oracle_scores,
    similarity,
    utility_scores,
    volume_scores,
)
from scripts.evaluation.report import bar_plot, markdown_report, write_montage
from scripts.io.datalist import as_flag, load_datalist
from scripts.io.files import staged_folder

# ----------------------------------------------------------------------------------------------------------------
# Interventions
# ----------------------------------------------------------------------------------------------------------------


def apply_intervention(encoder: CovariateEncoder, source: Mapping[str, Any], spec: Mapping[str, Any]) -> dict:
    """The target covariates of `spec` applied to `source`.

    Each value is a literal (``{"diagnosis": "AD"}``), ``"flip"`` (the other category of a binary covariate) or a
    signed shift of a continuous one (``{"age": "+10"}``, clipped to the schema range).
    """
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"interventions: each entry must be a non-empty dict of covariate -> change, got {spec!r}.")
    target = dict(source)
    for name, change in spec.items():
        if name not in encoder.schema:
            raise ValueError(f"interventions: unknown covariate {name!r}; the schema has {list(encoder.schema)}.")
        kind = encoder.schema[name]
        if change == "flip":
            if kind["type"] != "binary":
                raise ValueError(f"interventions: 'flip' needs a binary covariate, {name!r} is {kind['type']}.")
            categories = kind["categories"]
            first = E.same_value(kind, source[name], categories[0])
            target[name] = categories[1] if first else categories[0]
        elif isinstance(change, str) and change[:1] in "+-" and kind["type"] == "continuous":
            try:
                shift = float(change)
            except ValueError:
                raise ValueError(f"interventions: {name!r} shift {change!r} is not a number like '+10'.") from None
            low, high = (float(v) for v in kind["range"])
            target[name] = round(min(max(float(source[name]) + shift, low), high), 2)
        else:
            target[name] = change
    encoder.encode(target, source=f"interventions {dict(spec)}")
    return target


def requested_changes(encoder: CovariateEncoder, source: Mapping, target: Mapping) -> dict[str, Any]:
    """The covariates whose value in `target` differs from `source`, with their target values."""
    return {k: target[k] for k in encoder.schema if not E.same_value(encoder.schema[k], source[k], target[k])}


def intervention_tag(spec: Mapping[str, Any]) -> str:
    """The intervention's name in the report, e.g. ``age=+10,sex=flip``."""
    return ",".join(f"{k}={v}" for k, v in spec.items())


# ----------------------------------------------------------------------------------------------------------------
# The workflow
# ----------------------------------------------------------------------------------------------------------------


def load_truth(
    cohort_dir: str, record: Mapping, changes: Mapping, transform: Callable, folder: Path, image_size,
    unobserved_draws: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """
    The oracle's counterfactual image (through the bundle preprocessing) and label map, on the network grid;
    `unobserved_draws` > 0: the best counterfactual the scan alone allows (`identifiable_counterfactual`) instead.
    """
    truth = generate.write_counterfactual_truth(
        cohort_dir, str(record["subject"]), dict(changes), int(record.get("visit", 0)), output_dir=folder,
        unobserved_draws=unobserved_draws,
    )  # fmt: skip
    covariates = {k: v for k, v in truth["counterfactual_covariates"].items() if k not in ("image", "label")}
    image = torch.as_tensor(transform({**covariates, "image": truth["image"]})["image"]).float()
    label = torch.as_tensor(np.asarray(LoadImage(image_only=True, ensure_channel_first=True)(truth["label"]))).long()
    if tuple(label.shape[1:]) != tuple(image_size):
        raise ValueError(f"oracle label of {record['subject']} has shape {tuple(label.shape[1:])}, not image_size.")
    return image, label


TRUTH_FRAMES = ("input", "own")


def check_truth_frame(truth_frame: str) -> str:
    if truth_frame not in TRUTH_FRAMES:
        raise ValueError(f"truth_frame must be 'own' or 'input', got {truth_frame!r}.")
    return truth_frame


def load_truths(
    cohort_dir: str, records: Sequence[Mapping], targets: Sequence[Mapping], encoder: CovariateEncoder,
    transform: Callable, truth_frame: str, folder: Path, image_size, unobserved_draws: int = 0,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:  # fmt: skip
    """
    The oracle's counterfactuals of `records` under `targets` (`load_truth`): the images stacked in `truth_frame`,
    and each (image, label) as loaded. "input" re-expresses each truth in its input's intensity scaling
    (`in_input_frame`), the frame the written counterfactual is in, so a change of the percentiles themselves (atrophy
    lowers a brain's 99.5th) counts as the error it is in the output; "own" scales each truth by its own
    percentiles, as the preprocessing does any scan (the frame of the earlier tables; docs/evaluation.md).
    """
    own = check_truth_frame(truth_frame) == "own"
    truth_transform = transform if own else _unclipped(transform)
    loaded = [load_truth(cohort_dir, r, requested_changes(encoder, r, t), truth_transform, folder, image_size,
                         unobserved_draws) for r, t in zip(records, targets)]  # fmt: skip
    images = torch.stack([torch.as_tensor(t[0]).as_subclass(torch.Tensor) for t in loaded])
    if not own:
        images = torch.stack([in_input_frame(image, t[0].meta["intensity_range"], _range(transform, r))
                              for image, t, r in zip(images, loaded, records)])  # fmt: skip
    return images, loaded


def in_input_frame(truth: torch.Tensor, truth_range: Sequence[float], input_range: Sequence[float]) -> torch.Tensor:
    """
    A truth scaled by its own (lower, upper) intensity percentiles, unclipped, re-expressed in its input's scaling
    and clipped to [0, 1] like the input: the native truth as the inverse preprocessing of the input would map it.
    """
    (truth_low, truth_high), (low, high) = truth_range, input_range
    return ((truth * (truth_high - truth_low) + truth_low - low) / (high - low)).clamp(0, 1)


def _unclipped(transform: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """A copy of the preprocessing whose percentile scaling keeps the values outside [0, 1]."""
    copied = copy.deepcopy(transform)
    for item in getattr(copied, "transforms", ()):
        if isinstance(item, ScaleIntensityRangePercentilesd):
            item.scaler.clip = False
    return copied


def _range(transform: Callable[[dict], dict], record: Mapping) -> list[float]:
    return list(transform(dict(record))["image"].meta["intensity_range"])


def check_cohort(cohort_dir: str, records: Sequence[Mapping], datalist: str) -> None:
    """Raise unless every record's subject has its exogenous factors in the cohort (the oracle needs them)."""
    for index, record in enumerate(records):
        subject = record.get("subject")
        if subject is None or not (Path(cohort_dir) / "exogenous" / f"{subject}.json").is_file():
            raise FileNotFoundError(
                f"{datalist}, record {index}: no exogenous factors for subject {subject!r} under '{cohort_dir}/"
                "exogenous'; the evaluation needs a cohort written by configs/generate_cohort.json (set cohort_dir)."
            )


def run_counterfactuals(inferer, network, images, source, target, batch_size: int, parts: bool = False):
    """
    The inferer's counterfactuals of `images` on the network grid, composed as it is configured (`compose`);
    with `parts`, the dict of every part of the chains (counterfactual, reference, change, edit_mask...) instead.
    """
    device = next(network.parameters()).device
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        chunk = slice(start, start + batch_size)
        result = inferer.counterfactual(
            images[chunk].to(device), network, source[chunk].to(device), target[chunk].to(device)
        )
        mask = result["edit_mask"] if inferer.auto_mask else None
        result["composed"] = compose(images[chunk].to(device), result["counterfactual"], result["change"], mask,
                                     inferer.composition)  # fmt: skip
        for key, value in result.items():
            out.setdefault(key, []).append(value.float().cpu())
    joined = {key: torch.cat(values) for key, values in out.items()}
    return joined if parts else joined["composed"].clamp(0, 1)


@torch.inference_mode()
def reconstruct(network, images: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    """The autoencoder's reconstructions of `images` (decode(encode(x))), clamped to [0, 1]."""
    device = next(network.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        with precision_context(device, precision):
            chunk = images[start : start + batch_size].to(device)
            out.append(network.decode(network.encode(chunk).float()).float().clamp(0, 1).cpu())
    return torch.cat(out)


def evaluate(
    network: Any,
    inferer: CounterfactualInferer,
    scheduler: Any,
    encoder: CovariateEncoder,
    transform: Callable[[dict], dict],
    datalist: str,
    datalist_key: str,
    cohort_dir: str,
    interventions: Sequence[Mapping[str, Any]],
    evaluator_dir: str,
    predictor_channels: Sequence[int],
    segmenter_channels: Sequence[int],
    image_size: Sequence[int],
    spatial_dims: int,
    output_dir: str,
    spacing: Sequence[float] | float = 3.0,
    num_records: int = 16,
    num_reference: int = 200,
    reference_datalist: str | None = None,
    reference_key: str = "training",
    batch_size: int = 8,
    axioms: bool = True,
    utility: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    truth_frame: str = "input",
) -> dict[str, Any]:
    """
    Score the model's counterfactuals of `datalist[datalist_key]` (first `num_records` scans); see the module.
    `truth_frame` ("input" | "own"): the intensity frame of the oracle's truth (`load_truths`).
    """
    started = time.perf_counter()
    axioms = as_flag(axioms, "axioms")  # the CLI passes "false" as text
    check_truth_frame(truth_frame)
    records = _checked_records(datalist, datalist_key, cohort_dir, interventions, num_records)
    targets = {
        intervention_tag(spec): [apply_intervention(encoder, r, spec) for r in records] for spec in interventions
    }
    run = _Run(network, inferer, encoder, transform, cohort_dir, image_size, spatial_dims, spacing, batch_size,
               truth_frame)  # fmt: skip
    reference_datalist = reference_datalist or datalist
    scans = _Scans.load(run, datalist, datalist_key, records, evaluator_dir, predictor_channels, segmenter_channels,
                        num_reference, reference_datalist, reference_key)  # fmt: skip
    with staged_folder(output_dir, prefix=".evaluation.") as staged:
        report: dict[str, Any] = {"interventions": {}, "settings": {}}
        if axioms:
            report["composition"] = _composition(run, scans)
        report["interventions"], montage_rows, oracle_bars = _score_interventions(
            run, scans, interventions, targets, staged, axioms
        )
        report["realism_of_inputs"] = scans.realism(scans.images)
        if utility and int(utility.get("num_samples", 0)) > 0:
            report["utility"] = _utility(run, scans, scheduler, datalist, predictor_channels, utility)
        report["evaluators"] = _evaluators_entry(evaluator_dir, scans.evaluator_report)
        settings = {**dict(settings or {}), "truth_frame": truth_frame}
        report["settings"] = _settings_entry(scans, datalist, datalist_key, cohort_dir, reference_datalist,
                                             reference_key, axioms, settings)  # fmt: skip
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write(staged, report, montage_rows, oracle_bars)
    return report


def _checked_records(datalist, datalist_key, cohort_dir, interventions, num_records: int) -> list[dict]:
    """The records to score, with the request checked before any compute."""
    if num_records < 2:
        raise ValueError(f"num_records must be at least 2 (KID and the tables need several scans), got {num_records}.")
    if not interventions:
        raise ValueError("interventions is empty: give at least one, e.g. [{'age': '+10'}].")
    records = load_datalist(datalist, datalist_key)[:num_records]
    if len(records) < 2:
        raise ValueError(f"{datalist}: '{datalist_key}' has {len(records)} record(s); the evaluation needs 2 or more.")
    check_cohort(cohort_dir, records, datalist)
    return records


@dataclass(frozen=True)
class _Run:
    """The model, its inferer and the data plumbing (covariates, preprocessing, cohort, grid) every step shares."""

    network: Any
    inferer: CounterfactualInferer
    encoder: CovariateEncoder
    transform: Callable[[dict], dict]
    cohort_dir: str
    image_size: Sequence[int]
    spatial_dims: int
    spacing: Sequence[float] | float
    batch_size: int
    truth_frame: str = "input"

    def counterfactuals(self, images: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`run_counterfactuals` of `images` from `source` to `target` conditions with this run's model."""
        return run_counterfactuals(self.inferer, self.network, images, source, target, self.batch_size)

    def conditions(self, records: Sequence[Mapping]) -> torch.Tensor:
        """The encoded covariates of `records`, (N, 1, size)."""
        return torch.stack([self.encoder.encode(r).reshape(1, -1) for r in records]).float()


@dataclass
class _Scans:
    """The held-out scans with what every intervention is scored against (reconstructions, readings, references)."""

    records: list[dict]
    images: torch.Tensor
    source: torch.Tensor  # encoded source covariates (N, 1, size)
    recon: torch.Tensor
    held_out: dict
    reference: dict
    reference_features: torch.Tensor
    rows_input: list
    rows_recon: list
    predictor: Any
    segmenter: Any
    evaluator_report: dict

    @classmethod
    def load(cls, run: _Run, datalist, datalist_key, records, evaluator_dir, predictor_channels, segmenter_channels,
             num_reference, reference_datalist, reference_key) -> _Scans:  # fmt: skip
        """The evaluators, the held-out and reference scans, and the readings shared by every intervention."""
        encoder = run.encoder
        predictor, segmenter, evaluator_report = E.load_evaluators(
            evaluator_dir, encoder, run.spatial_dims, predictor_channels, segmenter_channels
        )
        held_out = E.load_cohort_split(datalist, datalist_key, encoder, run.transform, run.image_size,
                                       limit=len(records))  # fmt: skip
        reference = E.load_cohort_split(
            reference_datalist, reference_key, encoder, run.transform, run.image_size, False, num_reference
        )
        images = held_out["images"]
        source = run.conditions(records)
        recon = reconstruct(run.network, images, run.batch_size, run.inferer.precision)
        reference_features = E.features(predictor, reference["images"])
        rows_input = E.decode_predictions(encoder, E.predict(predictor, images))
        rows_recon = E.decode_predictions(encoder, E.predict(predictor, recon))
        return cls(records, images, source, recon, held_out, reference, reference_features, rows_input, rows_recon,
                   predictor, segmenter, evaluator_report)  # fmt: skip

    def realism(self, images: torch.Tensor) -> dict[str, float]:
        """FID and KID of `images` against the reference scans, in the predictor's feature space."""
        features = E.features(self.predictor, images)
        return {"fid": fid(self.reference_features, features), "kid": kid(self.reference_features, features)[0]}


def _composition(run: _Run, scans: _Scans) -> dict[str, Any]:
    """The composition axiom: the null intervention CF(x; s -> s) against x, next to the reconstruction."""
    null = run.counterfactuals(scans.images, scans.source, scans.source)
    return {"counterfactual_vs_input": similarity(null, scans.images),
            "reconstruction_vs_input": similarity(scans.recon, scans.images)}  # fmt: skip


def _score_interventions(
    run: _Run, scans: _Scans, interventions, targets, staged: Path, axioms: bool
) -> tuple[dict[str, Any], list, list]:
    """Every intervention's scores by tag, with the montage rows and the oracle bars of the pictures."""
    entries: dict[str, Any] = {}
    montage_rows, oracle_bars = [], []
    for spec in interventions:
        tag = intervention_tag(spec)
        entry, cf, truth_images = _score_intervention(run, scans, spec, targets[tag], staged, axioms)
        entries[tag] = entry
        montage_rows.append((tag, scans.images[0], cf[0], truth_images[0]))
        oracle_bars.append((tag, entry["oracle"]))
        print(f"{tag}: MAE to truth {entry['oracle']['counterfactual_vs_truth']['mae']:.4f} "
              f"(input {entry['oracle']['input_vs_truth']['mae']:.4f})")  # fmt: skip
    return entries, montage_rows, oracle_bars


def _oracle_truth(run: _Run, records, target_records, staged: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's exact counterfactual images (in the run's truth frame) and label maps of `records`."""
    images, loaded = load_truths(run.cohort_dir, records, target_records, run.encoder, run.transform, run.truth_frame,
                                 staged / "truth", run.image_size)  # fmt: skip
    return images, torch.stack([t[1] for t in loaded])


def _score_intervention(
    run: _Run, scans: _Scans, spec, target_records, staged: Path, axioms: bool
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One intervention's scores (oracle, volumes, effectiveness, minimality, realism, reversibility), cf and truth."""
    records, images, encoder = scans.records, scans.images, run.encoder
    target_conditions = run.conditions(target_records)
    truth_images, truth_labels = _oracle_truth(run, records, target_records, staged)
    cf = run.counterfactuals(images, scans.source, target_conditions)
    rows_cf = E.decode_predictions(encoder, E.predict(scans.predictor, cf))
    rows_truth = E.decode_predictions(encoder, E.predict(scans.predictor, truth_images))
    changed = sorted({k for r, t in zip(records, target_records) for k in requested_changes(encoder, r, t)})
    kept = [k for k in encoder.schema if k not in spec]
    readings = {
        "counterfactual": rows_cf,
        "truth": rows_truth,
        "input": scans.rows_input,
        "reconstruction": scans.rows_recon,
    }
    entry = {
        "num_scans": len(records),
        "changed_covariates": changed,
        "oracle": {
            "counterfactual_vs_truth": similarity(cf, truth_images),
            "input_vs_truth": similarity(images, truth_images),
            "reconstruction_vs_truth": similarity(scans.recon, truth_images),
        },
        "volumes": volume_scores(
            scans.segmenter, run.spatial_dims, run.spacing, cf, truth_images, truth_labels, images
        ),
        "effectiveness": effectiveness_scores(encoder, readings, target_records, changed),
        "minimality": minimality_scores(
            encoder, rows_cf, scans.rows_recon, scans.rows_input, kept, cf, images, truth_images, scans.recon
        ),
        "realism": {"counterfactual": scans.realism(cf), "truth": scans.realism(truth_images)},
    }
    changed_voxels = (truth_images - images).abs() > UNCHANGED_TOLERANCE
    if changed_voxels.any():  # a null intervention has no change to reach and no error to gain over
        entry["gain_and_share"] = oracle_scores(cf, images, truth_images, changed_voxels, None)
    if axioms:
        back = run.counterfactuals(cf, target_conditions, scans.source)
        entry["reversibility"] = {"counterfactual_vs_input": similarity(back, images)}
    return entry, cf, truth_images


def _utility(run: _Run, scans: _Scans, scheduler, datalist, predictor_channels, utility) -> dict[str, Any]:
    """The paper's utility test, with the realism of the sampled images."""
    train_records = load_datalist(datalist, "training")[: int(utility["num_samples"])]
    real_train = E.load_cohort_split(datalist, "training", run.encoder, run.transform, run.image_size, False,
                                     int(utility["num_samples"]))["images"]  # fmt: skip
    utility_settings = {"drift": run.inferer.resolve_drift(run.network), "precision": run.inferer.precision, **utility}
    scores, synthetic = utility_scores(
        run.network, scheduler, run.encoder, predictor_channels, run.spatial_dims, train_records, scans.held_out,
        real_train, utility_settings,
    )  # fmt: skip
    scores["realism_of_samples"] = scans.realism(synthetic)
    return scores


def _evaluators_entry(evaluator_dir, evaluator_report: Mapping[str, Any]) -> dict[str, Any]:
    """Where the evaluators came from and their own held-out scores."""
    return {"dir": str(evaluator_dir), "held_out": {
        "predictor": evaluator_report["predictor"]["held_out"],
        "segmenter": evaluator_report["segmenter"]["held_out"]}}  # fmt: skip


def _settings_entry(scans: _Scans, datalist, datalist_key, cohort_dir, reference_datalist, reference_key, axioms,
                    settings) -> dict[str, Any]:  # fmt: skip
    """The report's settings: the data scored, the reference, the axioms switch and the caller's `settings`."""
    return {
        "datalist": str(datalist), "datalist_key": datalist_key, "cohort_dir": str(cohort_dir),
        "num_records": len(scans.records), "num_reference": len(scans.reference["records"]),
        "reference_datalist": str(reference_datalist), "reference_key": reference_key,
        "axioms": bool(axioms), "unchanged_tolerance": UNCHANGED_TOLERANCE, **dict(settings or {}),
    }  # fmt: skip


def _write(staged: Path, report: Mapping[str, Any], montage_rows, oracle_bars) -> None:
    """evaluation.json, evaluation.md, the montage and the bar plot into the staged folder."""
    shutil.rmtree(staged / "truth", ignore_errors=True)
    (staged / "evaluation.json").write_text(json.dumps(report, indent=4) + "\n")
    (staged / "evaluation.md").write_text(markdown_report(report))
    write_montage(staged / "evaluation_montage.png", montage_rows)
    bar_plot(oracle_bars).save(staged / "evaluation_oracle.png")
