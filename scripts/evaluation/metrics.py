"""Scores of counterfactuals: image similarity, FID/KID, oracle errors, effectiveness, minimality, volumes and utility."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric, MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from scripts.core.sampling import sample_latents
from scripts.evaluation import evaluators as E

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


def oracle_scores(output, images, truth, changed, mask) -> dict[str, Any]:
    """Scores against the oracle pooled over the batch, and `per_scan` medians and quartiles (`_per_scan`)."""
    mae, mae_input = (output - truth).abs().mean(), (images - truth).abs().mean()
    moved, needed = (output - images) * torch.sign(truth - images), (truth - images).abs()
    scores = {
        "mae_to_truth": float(mae),
        "gain_over_doing_nothing": float(1 - mae / mae_input),
        "mae_where_unchanged": float((output - images).abs()[~changed].mean()),
        "share_of_true_change": float(moved[changed].sum() / needed[changed].sum().clamp_min(1e-8)),
    }
    scores["per_scan"] = _per_scan(output, images, truth, changed, moved, needed)
    if mask is not None:
        inside = mask > 0.5
        scores["mask_dice"] = float(2 * (inside & changed).sum() / (inside.sum() + changed.sum()).clamp_min(1))
        scores["mask_fraction"] = float(inside.float().mean())
    return scores


def _per_scan(output, images, truth, changed, moved, needed) -> dict[str, Any]:
    """Gain over doing nothing and share of the true change per scan (scans the oracle changes): median, quartiles."""
    mae_input = (images - truth).abs().flatten(1).mean(1)
    has_change = changed.flatten(1).any(1) & (mae_input > 0)
    if not has_change.any():
        return {}
    gains = (1 - (output - truth).abs().flatten(1).mean(1) / mae_input.clamp_min(1e-12))[has_change]
    shares = ((moved * changed).flatten(1).sum(1) / (needed * changed).flatten(1).sum(1).clamp_min(1e-8))[has_change]
    levels = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    (g25, g50, g75), (s25, s50, s75) = (torch.quantile(v.double(), levels).tolist() for v in (gains, shares))
    return {"num_scans": int(has_change.sum()), "gain_median": g50, "gain_quartiles": [g25, g75],
            "share_median": s50, "share_quartiles": [s25, s75]}  # fmt: skip


def effectiveness_scores(encoder, rows, targets, changed) -> dict[str, dict[str, float]]:
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


def minimality_scores(encoder, rows_cf, rows_recon, rows_input, kept, cf, images, truth, recon) -> dict[str, float]:
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


def volume_scores(
    segmenter, spatial_dims, spacing, cf, truth_images, truth_labels, images
) -> dict[str, dict[str, float]]:
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


def utility_scores(
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
