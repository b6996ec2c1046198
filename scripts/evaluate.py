"""The evaluation workflow (configs/evaluate.json): counterfactuals of a synthetic cohort scored against the truth.

For each held-out cohort scan x with covariates s and each configured intervention (target t), the bundle's
`CounterfactualInferer` gives cf = CF(x; s -> t), the generator's oracle gives the exact counterfactual x* (same
exogenous factors U, covariates t), and the evaluators trained on the cohort (`scripts.evaluators`) read both.
Scores (docs/evaluation.md; Monteiro et al., ICLR 2023 for the axioms):

- oracle: MAE, PSNR, SSIM, MS-SSIM of cf against x* (and, as the do-nothing baseline, of x against x*); volume
  errors of cf's segmented ventricles / hippocampus / brain (chest: cardiothoracic ratio, effusion fraction) against
  x*'s exact label map, with the segmenter's own error on x* as the floor;
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
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric
from monai.transforms import LoadImage
from PIL import Image, ImageDraw

from scripts import evaluators as E
from scripts import phantoms
from scripts.counterfactual import diverging, mid_slices
from scripts.data import load_datalist
from scripts.files import staged_folder
from scripts.inferers import CounterfactualInferer, compose, edit_mask, precision_context, sample_latents
from scripts.transforms import CovariateEncoder

MS_SSIM_KERNEL = 7
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001)  # the first three of the standard five scales (fits 64 px images)
UNCHANGED_TOLERANCE = 0.02  # |x* - x| at or below this is "the oracle changed nothing here"


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def similarity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Mean over images of MAE, PSNR (dB, data range 1), SSIM and MS-SSIM between batches in [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"similarity needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}.")
    a, b = a.float().clamp(0, 1), b.float().clamp(0, 1)
    spatial_dims = a.dim() - 2
    mse = ((a - b) ** 2).flatten(1).mean(1)
    psnr = PSNRMetric(max_val=1.0, reduction="none")(a, b).flatten() if bool((mse > 0).all()) else None
    ssim = SSIMMetric(spatial_dims, data_range=1.0)(a, b)  # standard 11-voxel Gaussian window
    ms_ssim = MultiScaleSSIMMetric(spatial_dims, data_range=1.0, kernel_size=MS_SSIM_KERNEL, weights=MS_SSIM_WEIGHTS)
    return {
        "mae": float((a - b).abs().mean()),
        "psnr": float(psnr.mean()) if psnr is not None else math.inf,
        "ssim": float(ssim.mean()),
        "ms_ssim": float(ms_ssim(a, b).mean()),
    }


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N, F), via MONAI's FIDMetric."""
    return float(FIDMetric()(fake.double(), real.double()))


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50, subset_size: int | None = None, seed: int = 0):
    """Kernel Inception Distance: unbiased MMD² with the cubic kernel (x·y / d + 1)³, mean and std over subsets."""
    real, fake = real.double(), fake.double()
    size = min(subset_size or 1000, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side.")
    generator = torch.Generator().manual_seed(seed)
    dim = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=generator)[:size]]
        y = fake[torch.randperm(len(fake), generator=generator)[:size]]
        kxx, kyy, kxy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(size, dtype=torch.double)
        mmd = (kxx * off).sum() / (size * (size - 1)) + (kyy * off).sum() / (size * (size - 1)) - 2 * kxy.mean()
        values.append(float(mmd))
    return float(np.mean(values)), float(np.std(values))


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


def _changes(encoder: CovariateEncoder, source: Mapping, target: Mapping) -> dict[str, Any]:
    return {k: target[k] for k in encoder.schema if not E.same_value(encoder.schema[k], source[k], target[k])}


def _tag(spec: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.items())


# ----------------------------------------------------------------------------------------------------------------
# The workflow
# ----------------------------------------------------------------------------------------------------------------


def _load_truth(
    cohort_dir: str, record: Mapping, changes: Mapping, transform: Callable, folder: Path, image_size
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's counterfactual image (through the bundle preprocessing) and label map, on the network grid."""
    truth = phantoms.write_counterfactual_truth(
        cohort_dir, str(record["subject"]), dict(changes), int(record.get("visit", 0)), output_dir=folder
    )
    covariates = {k: v for k, v in truth["counterfactual_covariates"].items() if k not in ("image", "label")}
    image = torch.as_tensor(transform({**covariates, "image": truth["image"]})["image"]).float()
    label = torch.as_tensor(np.asarray(LoadImage(image_only=True, ensure_channel_first=True)(truth["label"]))).long()
    if tuple(label.shape[1:]) != tuple(image_size):
        raise ValueError(f"oracle label of {record['subject']} has shape {tuple(label.shape[1:])}, not image_size.")
    return image, label


def _check_cohort(cohort_dir: str, records: Sequence[Mapping], datalist: str) -> None:
    for index, record in enumerate(records):
        subject = record.get("subject")
        if subject is None or not (Path(cohort_dir) / "exogenous" / f"{subject}.json").is_file():
            raise FileNotFoundError(
                f"{datalist}, record {index}: no exogenous factors for subject {subject!r} under '{cohort_dir}/"
                "exogenous'; the evaluation needs a cohort written by configs/generate_cohort.json (set cohort_dir)."
            )


def _run_counterfactuals(inferer, network, images, source, target, batch_size: int, parts: bool = False):
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


COMPOSITION_VARIANTS = (
    ("none", False), ("reconstruction", False), ("reference", False), ("reconstruction", True), ("reference", True),
)  # fmt: skip


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
    parts = _run_counterfactuals(chains, network, images, source, target, batch_size, parts=True)
    references = parts["counterfactual"] - parts["change"]
    reference_change = (references - parts["reconstruction"]).abs()
    masks = {inferer.mask_threshold: parts["edit_mask"]}
    for threshold in mask_thresholds:
        masks[float(threshold)] = edit_mask(parts["change"], reference_change, threshold, inferer.mask_smoothing)
    changed = (truth - images).abs() > UNCHANGED_TOLERANCE
    table = {}
    for composition, masked in COMPOSITION_VARIANTS:
        for threshold, mask in sorted(masks.items()) if masked else [(None, None)]:
            change = {"none": parts["counterfactual"] - images, "reconstruction": parts["counterfactual"] -
                      parts["reconstruction"], "reference": parts["change"]}[composition]  # fmt: skip
            output = compose(images, parts["counterfactual"], change, mask, composition).clamp(0, 1)
            name = composition + ("" if threshold is None else f"+mask@{threshold:g}")
            table[name] = _oracle_scores(output, images, truth, changed, mask)
            if outputs is not None:
                outputs[name] = output
    return table


def _directions(encoder: CovariateEncoder, records: Sequence[Mapping], targets: Sequence[Mapping]) -> dict:
    """Record indices per direction of change ("effusion 0->1"), when the records move more than one way."""
    groups: dict[str, list[int]] = {}
    for index, (record, target) in enumerate(zip(records, targets)):
        moves = [f"{k} {record[k]}->{v}" for k, v in _changes(encoder, record, target).items()
                 if encoder.schema[k]["type"] != "continuous"]  # fmt: skip
        if moves:
            groups.setdefault(", ".join(moves), []).append(index)
    return groups if len(groups) > 1 else {}


def _subset_scores(outputs: Mapping[str, torch.Tensor], images, truth, indices) -> dict[str, dict[str, float]]:
    chosen = torch.as_tensor(indices)
    changed = (truth[chosen] - images[chosen]).abs() > UNCHANGED_TOLERANCE
    return {name: {**_oracle_scores(output[chosen], images[chosen], truth[chosen], changed, None),
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
    evaluator_dir: str | None = None,
    predictor_channels: Sequence[int] = (),
    segmenter_channels: Sequence[int] = (),
    spatial_dims: int = 3,
) -> dict[str, Any]:
    """
    The composition table of `score_compositions` for each intervention over `datalist[datalist_key]`, and the
    recommended setting: the highest mean gain over doing nothing among the variants that keep at least
    `min_share_kept` of the share of the true change that the raw decode ("none") reaches. Run it on a validation
    split to choose `composition` / `mask_threshold`, then score held-out scans with the chosen values.
    An intervention that moves a covariate both ways over the records (a "flip": adding and removing a finding) is
    also scored per direction. With trained evaluators in `evaluator_dir`, each variant's effectiveness is added
    (how often the covariate predictor reads the asked value; for age, its absolute error).
    Writes compositions.json and compositions.md into `output_dir` (all or nothing).
    """
    started = time.perf_counter()
    records = load_datalist(datalist, datalist_key)[:num_records]
    if len(records) < 2:
        raise ValueError(f"{datalist}: '{datalist_key}' has {len(records)} record(s); the comparison needs 2 or more.")
    _check_cohort(cohort_dir, records, datalist)
    images = E.load_cohort_split(datalist, datalist_key, encoder, transform, image_size, False, num_records)["images"]
    predictor = None
    if evaluator_dir and (Path(evaluator_dir) / "predictor.pt").is_file():
        predictor = E.load_evaluators(evaluator_dir, encoder, spatial_dims, predictor_channels, segmenter_channels)[0]
    source = torch.stack([encoder.encode(r).reshape(1, -1) for r in records]).float()
    with staged_folder(output_dir, prefix=".compositions.") as staged:
        tables = {}
        for spec in interventions:
            targets = [apply_intervention(encoder, r, spec) for r in records]
            truth = torch.stack([_load_truth(cohort_dir, r, _changes(encoder, r, t), transform, staged / "truth",
                                             image_size)[0] for r, t in zip(records, targets)])  # fmt: skip
            target = torch.stack([encoder.encode(t).reshape(1, -1) for t in targets]).float()
            outputs: dict[str, torch.Tensor] = {}
            table = score_compositions(
                inferer, network, images, source, target, truth, batch_size, mask_thresholds, outputs
            )
            if predictor is not None:
                changed = sorted({k for r, t in zip(records, targets) for k in _changes(encoder, r, t)})
                for name, output in outputs.items():
                    rows = E.decode_predictions(encoder, E.predict(predictor, output))
                    table[name]["effectiveness"] = {
                        k: v["counterfactual"]
                        for k, v in _effectiveness(encoder, {"counterfactual": rows}, targets, changed).items()
                    }
            tables[_tag(spec)] = table
            for direction, chosen in _directions(encoder, records, targets).items():
                tables[f"{_tag(spec)} [{direction}]"] = _subset_scores(outputs, images, truth, chosen)
            scores = tables[_tag(spec)]
            summary = [
                f"{k} {v['gain_over_doing_nothing']:+.3f}/{v['share_of_true_change']:.3f}" for k, v in scores.items()
            ]
            print(f"{_tag(spec)} (gain/share): " + ", ".join(summary))
        whole = {tag: table for tag, table in tables.items() if not tag.endswith("]")}
        report = {"interventions": tables, "recommended": _recommended(whole, min_share_kept),
                  "settings": {"datalist": str(datalist), "datalist_key": datalist_key, "num_records": len(records),
                               "unchanged_tolerance": UNCHANGED_TOLERANCE, "min_share_kept": min_share_kept,
                               "strength": inferer.strength, "guidance_scale": inferer.guidance_scale,
                               "num_inference_steps": inferer.num_inference_steps,
                               "mask_smoothing": inferer.mask_smoothing},
                  "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        shutil.rmtree(staged / "truth", ignore_errors=True)
        (staged / "compositions.json").write_text(json.dumps(report, indent=4) + "\n")
        (staged / "compositions.md").write_text(compositions_markdown(report))
    return report


def _recommended(tables: Mapping[str, Mapping[str, Mapping[str, float]]], min_share_kept: float) -> dict[str, Any]:
    names = list(next(iter(tables.values())))
    first = next(iter(tables.values()))
    mean = {n: {k: float(np.mean([t[n][k] for t in tables.values()])) for k, v in first[n].items()
                if isinstance(v, float)} for n in names}  # fmt: skip
    floor = min_share_kept * mean["none"]["share_of_true_change"]
    eligible = [n for n in names if mean[n]["share_of_true_change"] >= floor] or ["none"]
    best = max(eligible, key=lambda n: mean[n]["gain_over_doing_nothing"])
    return {"variant": best, "mean_over_interventions": mean[best], "share_floor": floor, "eligible": eligible}


def _oracle_scores(output, images, truth, changed, mask) -> dict[str, float]:
    mae, mae_input = (output - truth).abs().mean(), (images - truth).abs().mean()
    moved, needed = (output - images) * torch.sign(truth - images), (truth - images).abs()
    scores = {
        "mae_to_truth": float(mae),
        "gain_over_doing_nothing": float(1 - mae / mae_input),
        "mae_where_unchanged": float((output - images).abs()[~changed].mean()),
        "share_of_true_change": float(moved[changed].sum() / needed[changed].sum().clamp_min(1e-8)),
    }
    if mask is not None:
        inside = mask > 0.5
        scores["mask_dice"] = float(2 * (inside & changed).sum() / (inside.sum() + changed.sum()).clamp_min(1))
        scores["mask_fraction"] = float(inside.float().mean())
    return scores


@torch.inference_mode()
def _reconstruct(network, images: torch.Tensor, batch_size: int, precision: str) -> torch.Tensor:
    device = next(network.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        with precision_context(device, precision):
            chunk = images[start : start + batch_size].to(device)
            out.append(network.decode(network.encode(chunk).float()).float().clamp(0, 1).cpu())
    return torch.cat(out)


def _effectiveness(encoder, rows, targets, changed) -> dict[str, dict[str, float]]:
    """Per changed covariate, how often the predictor reads the target value (or its error) on each image set."""
    scores: dict[str, dict[str, float]] = {}
    for name in changed:
        spec = encoder.schema[name]
        for label, rows_of in rows.items():
            if spec["type"] == "continuous":
                value = float(np.mean([abs(r[name] - float(t[name])) for r, t in zip(rows_of, targets)]))
                scores.setdefault(f"{name}_abs_error", {})[label] = value
            else:
                value = float(np.mean([E.same_value(spec, r[name], t[name]) for r, t in zip(rows_of, targets)]))
                scores.setdefault(f"{name}_accuracy", {})[label] = value
    return scores


def _minimality(encoder, rows_cf, rows_recon, rows_input, kept, cf, images, truth, recon) -> dict[str, float]:
    """Covariates left alone should read the same on cf as on x (the reconstruction's reading is the floor); pixels
    the oracle leaves unchanged should stay (the reconstruction's error there is the floor)."""
    scores: dict[str, float] = {}
    for name in kept:
        spec = encoder.schema[name]
        for who, rows in (("counterfactual", rows_cf), ("reconstruction", rows_recon)):
            if spec["type"] == "continuous":
                change = [abs(a[name] - b[name]) for a, b in zip(rows, rows_input)]
                scores[f"{name}_kept_abs_change_{who}"] = float(np.mean(change))
            else:
                agree = [E.same_value(spec, a[name], b[name]) for a, b in zip(rows, rows_input)]
                scores[f"{name}_kept_agreement_{who}"] = float(np.mean(agree))
    unchanged = (truth - images).abs() <= UNCHANGED_TOLERANCE
    share = float(unchanged.float().mean())
    scores["unchanged_share_of_image"] = share
    scores["mae_where_unchanged"] = float((cf - images).abs()[unchanged].mean()) if share else float("nan")
    scores["reconstruction_mae_where_unchanged"] = (
        float((recon - images).abs()[unchanged].mean()) if share else float("nan")
    )
    return scores


def _volumes(segmenter, spatial_dims, spacing, cf, truth_images, truth_labels, images) -> dict[str, dict[str, float]]:
    measured = {
        name: [E.measure(m[0].numpy(), spatial_dims, spacing) for m in E.segment(segmenter, batch)]
        for name, batch in (("counterfactual", cf), ("input", images), ("truth_image", truth_images))
    }
    exact = [E.measure(m[0].numpy(), spatial_dims, spacing) for m in truth_labels]
    source = measured["input"]
    scores: dict[str, dict[str, float]] = {}
    for key in exact[0]:
        row = {f"{name}_abs_error": float(np.mean([abs(m[key] - e[key]) for m, e in zip(values, exact)]))
               for name, values in measured.items()}  # fmt: skip
        row["true_change"] = float(np.mean([e[key] - s[key] for e, s in zip(exact, source)]))
        row["counterfactual_change"] = float(
            np.mean([c[key] - s[key] for c, s in zip(measured["counterfactual"], source)])
        )
        scores[key] = row
    return scores


def _utility(
    model, scheduler, encoder, predictor_channels, spatial_dims, train_records, held_out, real_train, settings
):
    """Paper's utility test: predictors trained on sampled vs real images, AUC on the real held-out scans."""
    count = min(int(settings["num_samples"]), len(train_records))
    device = next(model.parameters()).device
    conditions = torch.stack([encoder.encode(r).reshape(1, -1) for r in train_records[:count]]).float()
    latent_shape = model.encode(held_out["images"][:1].to(device)).shape[1:]
    noise = torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(int(settings["seed"])))
    synthetic = []
    for start in range(0, count, settings["batch_size"]):  # sample_latents runs in inference mode
        chunk = slice(start, start + settings["batch_size"])
        latents = sample_latents(
            model, scheduler, noise[chunk].to(device), conditions[chunk].to(device), drift=settings["drift"],
            num_inference_steps=settings["num_inference_steps"], guidance_scale=settings["guidance_scale"],
            null_condition=encoder.null().to(device), precision=settings["precision"],
        )  # fmt: skip
        with torch.no_grad():
            synthetic.append(model.decode(latents).float().clamp(0, 1).cpu())
    synthetic_images = torch.cat(synthetic).clone()
    targets = conditions[:, 0, :-1]
    scores = {}
    for name, images in (("trained_on_synthetic", synthetic_images), ("trained_on_real", real_train[:count])):
        torch.manual_seed(int(settings["seed"]))
        predictor = E.build_predictor(spatial_dims, encoder, predictor_channels)
        E.fit_predictor(predictor, encoder, images.clone(), targets.clone(), settings["epochs"], seed=settings["seed"])
        scores[name] = E.predictor_scores(encoder, held_out["records"], E.predict(predictor, held_out["images"]))
    return {"num_training_images": count, **scores}, synthetic_images


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
) -> dict[str, Any]:
    """Score the model's counterfactuals of `datalist[datalist_key]` (first `num_records` scans); see the module."""
    started = time.perf_counter()
    if num_records < 2:
        raise ValueError(f"num_records must be at least 2 (KID and the tables need several scans), got {num_records}.")
    if not interventions:
        raise ValueError("interventions is empty: give at least one, e.g. [{'age': '+10'}].")
    records = load_datalist(datalist, datalist_key)[:num_records]
    if len(records) < 2:
        raise ValueError(f"{datalist}: '{datalist_key}' has {len(records)} record(s); the evaluation needs 2 or more.")
    _check_cohort(cohort_dir, records, datalist)
    targets = {_tag(spec): [apply_intervention(encoder, r, spec) for r in records] for spec in interventions}
    predictor, segmenter, evaluator_report = E.load_evaluators(
        evaluator_dir, encoder, spatial_dims, predictor_channels, segmenter_channels
    )
    held_out = E.load_cohort_split(datalist, datalist_key, encoder, transform, image_size, limit=num_records)
    reference_datalist = reference_datalist or datalist
    reference = E.load_cohort_split(
        reference_datalist, reference_key, encoder, transform, image_size, False, num_reference
    )
    images = held_out["images"]
    source_conditions = torch.stack([encoder.encode(r).reshape(1, -1) for r in records]).float()
    recon = _reconstruct(network, images, batch_size, inferer.precision)
    reference_features = E.features(predictor, reference["images"])
    rows_input = E.decode_predictions(encoder, E.predict(predictor, images))
    rows_recon = E.decode_predictions(encoder, E.predict(predictor, recon))

    with staged_folder(output_dir, prefix=".evaluation.") as staged:
        report: dict[str, Any] = {"interventions": {}, "settings": {}}
        montage_rows, oracle_bars = [], []
        if axioms:
            null = _run_counterfactuals(inferer, network, images, source_conditions, source_conditions, batch_size)
            report["composition"] = {"counterfactual_vs_input": similarity(null, images),
                                     "reconstruction_vs_input": similarity(recon, images)}  # fmt: skip
        for spec in interventions:
            tag = _tag(spec)
            target_records = targets[tag]
            target_conditions = torch.stack([encoder.encode(t).reshape(1, -1) for t in target_records]).float()
            truths = [
                _load_truth(cohort_dir, r, _changes(encoder, r, t), transform, staged / "truth", image_size)
                for r, t in zip(records, target_records)
            ]
            truth_images = torch.stack([t[0] for t in truths])
            truth_labels = torch.stack([t[1] for t in truths])
            cf = _run_counterfactuals(inferer, network, images, source_conditions, target_conditions, batch_size)
            rows_cf = E.decode_predictions(encoder, E.predict(predictor, cf))
            rows_truth = E.decode_predictions(encoder, E.predict(predictor, truth_images))
            changed = sorted({k for r, t in zip(records, target_records) for k in _changes(encoder, r, t)})
            kept = [k for k in encoder.schema if k not in spec]
            cf_features, truth_features = E.features(predictor, cf), E.features(predictor, truth_images)
            entry = {
                "num_scans": len(records),
                "changed_covariates": changed,
                "oracle": {
                    "counterfactual_vs_truth": similarity(cf, truth_images),
                    "input_vs_truth": similarity(images, truth_images),
                    "reconstruction_vs_truth": similarity(recon, truth_images),
                },
                "volumes": _volumes(segmenter, spatial_dims, spacing, cf, truth_images, truth_labels, images),
                "effectiveness": _effectiveness(
                    encoder,
                    {"counterfactual": rows_cf, "truth": rows_truth, "input": rows_input, "reconstruction": rows_recon},
                    target_records,
                    changed,
                ),
                "minimality": _minimality(
                    encoder, rows_cf, rows_recon, rows_input, kept, cf, images, truth_images, recon
                ),
                "realism": {
                    "counterfactual": {"fid": fid(reference_features, cf_features),
                                       "kid": kid(reference_features, cf_features)[0]},
                    "truth": {"fid": fid(reference_features, truth_features),
                              "kid": kid(reference_features, truth_features)[0]},
                },  # fmt: skip
            }
            if axioms:
                back = _run_counterfactuals(inferer, network, cf, target_conditions, source_conditions, batch_size)
                entry["reversibility"] = {"counterfactual_vs_input": similarity(back, images)}
            report["interventions"][tag] = entry
            montage_rows.append((tag, images[0], cf[0], truth_images[0]))
            oracle_bars.append((tag, entry["oracle"]))
            print(f"{tag}: MAE to truth {entry['oracle']['counterfactual_vs_truth']['mae']:.4f} "
                  f"(input {entry['oracle']['input_vs_truth']['mae']:.4f})")  # fmt: skip
        input_features = E.features(predictor, images)
        report["realism_of_inputs"] = {"fid": fid(reference_features, input_features),
                                       "kid": kid(reference_features, input_features)[0]}  # fmt: skip
        if utility and int(utility.get("num_samples", 0)) > 0:
            train_records = load_datalist(datalist, "training")[: int(utility["num_samples"])]
            real_train = E.load_cohort_split(datalist, "training", encoder, transform, image_size, False,
                                             int(utility["num_samples"]))["images"]  # fmt: skip
            utility_settings = {"drift": inferer.resolve_drift(network), "precision": inferer.precision, **utility}
            report["utility"], synthetic = _utility(
                network, scheduler, encoder, predictor_channels, spatial_dims, train_records, held_out, real_train,
                utility_settings,
            )  # fmt: skip
            report["utility"]["realism_of_samples"] = {
                "fid": fid(reference_features, E.features(predictor, synthetic)),
                "kid": kid(reference_features, E.features(predictor, synthetic))[0],
            }
        report["evaluators"] = {"dir": str(evaluator_dir), "held_out": {
            "predictor": evaluator_report["predictor"]["held_out"],
            "segmenter": evaluator_report["segmenter"]["held_out"]}}  # fmt: skip
        report["settings"] = {
            "datalist": str(datalist), "datalist_key": datalist_key, "cohort_dir": str(cohort_dir),
            "num_records": len(records), "num_reference": len(reference["records"]),
            "reference_datalist": str(reference_datalist), "reference_key": reference_key, "axioms": bool(axioms),
            "unchanged_tolerance": UNCHANGED_TOLERANCE, **dict(settings or {}),
        }  # fmt: skip
        report["seconds"] = round(time.perf_counter() - started, 1)
        shutil.rmtree(staged / "truth", ignore_errors=True)
        (staged / "evaluation.json").write_text(json.dumps(report, indent=4) + "\n")
        (staged / "evaluation.md").write_text(markdown_report(report))
        write_montage(staged / "evaluation_montage.png", montage_rows)
        bar_plot(oracle_bars).save(staged / "evaluation_oracle.png")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Human views
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The evaluation's tables in markdown."""
    lines = ["# Counterfactual evaluation", ""]
    s = report["settings"]
    lines += [f"{s['num_records']} scans of `{s['datalist']}` ['{s['datalist_key']}'], {report['seconds']} s.", ""]
    lines += ["## Against the oracle (image similarity to the true counterfactual)", "",
              "| intervention | compared | MAE | PSNR | SSIM | MS-SSIM |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for name, values in entry["oracle"].items():
            lines.append(
                f"| {tag} | {name} | " + " | ".join(_fmt(values[k]) for k in ("mae", "psnr", "ssim", "ms_ssim")) + " |"
            )
    lines += ["", "## Volumes (segmenter on the image vs the truth's exact label map)", "",
              "| intervention | quantity | true change | cf change | cf error | input error | "
              "segmenter error on truth |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for key, v in entry["volumes"].items():
            lines.append(f"| {tag} | {key} | {_fmt(v['true_change'])} | {_fmt(v['counterfactual_change'])} | "
                         f"{_fmt(v['counterfactual_abs_error'])} | {_fmt(v['input_abs_error'])} | "
                         f"{_fmt(v['truth_image_abs_error'])} |")  # fmt: skip
    lines += ["", "## Effectiveness (anti-causal predictor on counterfactual / truth / input)", "",
              "| intervention | score | counterfactual | truth | input | reconstruction |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for key, v in entry["effectiveness"].items():
            values = " | ".join(_fmt(v[k]) for k in ("counterfactual", "truth", "input", "reconstruction"))
            lines.append(f"| {tag} | {key} | {values} |")
    lines += [
        "",
        "## Minimality, reversibility, realism",
        "",
        "| intervention | score | value |",
        "| --- | --- | --- |",
    ]
    for tag, entry in report["interventions"].items():
        for key, value in entry["minimality"].items():
            lines.append(f"| {tag} | minimality: {key} | {_fmt(value)} |")
        for key, value in entry.get("reversibility", {}).get("counterfactual_vs_input", {}).items():
            lines.append(f"| {tag} | reversibility: {key} | {_fmt(value)} |")
        for who, values in entry["realism"].items():
            lines.append(f"| {tag} | realism of {who}: FID / KID | {_fmt(values['fid'])} / {_fmt(values['kid'])} |")
    r = report["realism_of_inputs"]
    lines.append(f"| (all) | realism of the real inputs: FID / KID | {_fmt(r['fid'])} / {_fmt(r['kid'])} |")
    if "composition" in report:
        for name, values in report["composition"].items():
            lines.append(
                f"| (null intervention) | composition: {name} MAE / SSIM | "
                f"{_fmt(values['mae'])} / {_fmt(values['ssim'])} |"
            )
    if "utility" in report:
        u = report["utility"]
        lines += ["", f"## Utility ({u['num_training_images']} training images, scored on the real scans above)", "",
                  "| trained on | " + " | ".join(u["trained_on_real"]) + " |",
                  "| --- | " + " | ".join("---" for _ in u["trained_on_real"]) + " |"]  # fmt: skip
        for name in ("trained_on_synthetic", "trained_on_real"):
            lines.append(
                f"| {name} | " + " | ".join(_fmt(u[name].get(k, float("nan"))) for k in u["trained_on_real"]) + " |"
            )
    lines += ["", "Evaluators (held-out subjects): " + json.dumps(report["evaluators"]["held_out"]["predictor"]), ""]
    return "\n".join(lines)


def compositions_markdown(report: Mapping[str, Any]) -> str:
    """The composition table as markdown: one row per variant and intervention."""
    lines = ["# Compositions against the oracle", "",
             f"{report['settings']['num_records']} scans of `{report['settings']['datalist_key']}`; "
             f"recommended: **{report['recommended']['variant']}** (highest mean gain over doing nothing among the "
             f"variants keeping >= {report['settings']['min_share_kept']:g}x the raw decode's share of the true "
             "change).", "",
             "| intervention | variant | MAE to truth | gain over doing nothing | MAE where unchanged | share of true "
             "change | mask Dice | mask fraction | effectiveness |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, table in report["interventions"].items():
        for name, v in table.items():
            lines.append(f"| {tag} | {name} | {v['mae_to_truth']:.4f} | {v['gain_over_doing_nothing']:+.3f} | "
                         f"{v['mae_where_unchanged']:.4f} | {v['share_of_true_change']:.3f} | "
                         f"{_fmt(v.get('mask_dice', '-'))} | {_fmt(v.get('mask_fraction', '-'))} | "
                         f"{', '.join(f'{k} {x:.2f}' for k, x in v.get('effectiveness', {}).items())} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_montage(path: Path, rows: Sequence[tuple]) -> None:
    """One block per intervention (first scan): input | counterfactual | truth | cf - input | truth - input."""
    blocks = []
    for _, image, cf, truth in rows:
        for views in zip(*(mid_slices(t[0].numpy()) for t in (image, cf, truth))):
            gray = [np.repeat((np.clip(v, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1) for v in views]
            panels = gray + [diverging(views[1] - views[0], 0.25), diverging(views[2] - views[0], 0.25)]
            blocks.append(np.concatenate([np.pad(p, ((0, 2), (0, 2), (0, 0))) for p in panels], 1))
    width = max(b.shape[1] for b in blocks)
    picture = np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in blocks], 0)
    scale = max(1, -(-384 // picture.shape[1]))
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)


def bar_plot(bars: Sequence[tuple[str, Mapping]], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """MAE to the true counterfactual per intervention: input (grey), counterfactual (blue), reconstruction (green)."""
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    keys = (("input_vs_truth", (150, 150, 150)), ("counterfactual_vs_truth", (40, 90, 200)),
            ("reconstruction_vs_truth", (60, 160, 80)))  # fmt: skip
    top = max(v[k]["mae"] for _, v in bars for k, _ in keys) or 1.0
    left, bottom, height = 50, size[1] - 60, size[1] - 100
    group = (size[0] - left - 20) / max(1, len(bars))
    draw.line([(left, bottom), (size[0] - 10, bottom)], fill="black")
    draw.text((5, 10), f"MAE to the true counterfactual (max {top:.4f})", fill="black")
    for i, (tag, values) in enumerate(bars):
        for j, (key, colour) in enumerate(keys):
            x0 = left + i * group + 10 + j * (group - 20) / 3
            x1 = x0 + (group - 20) / 3 - 4
            y0 = bottom - height * values[key]["mae"] / top
            draw.rectangle([x0, y0, x1, bottom], fill=colour)
        draw.text((left + i * group + 10, bottom + 8), tag[:40], fill="black")
    draw.text(
        (left, size[1] - 25), "grey: input   blue: counterfactual   green: autoencoder reconstruction", fill="black"
    )
    return picture
