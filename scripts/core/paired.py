"""Paired counterfactuals from longitudinal data: sampling the follow-up latent, in one step or a rollout.

The InstructPix2Pix analogue for longitudinal pairs (Brooks et al., CVPR 2023), with Latent Drift. The denoiser
ε_θ(z_t, t, c) sees the source latent as extra input channels and both covariate vectors as its condition:

    input       [z_t^target, z_0^source]                     (B, 2C, *spatial)
    condition   c = [c_source, c_target]                     (B, 1, 2 * size)
    forward     z_t^target = sqrt(ᾱ_t) z_0^target + sqrt(1 - ᾱ_t) (ε + δ)    target: ε (or v)
    sampling    z_T = ε + δ,  z_{t-1} = step(ε̂, t, z_t) + δ_t,  z_0^source fixed at every step
    guidance    ε̂ = ε(z_t, z^source, ∅) + w (ε(z_t, z^source, c) - ε(z_t, z^source, ∅)),  ∅ = [null, null]

Guidance training nulls both covariate vectors together (one `ConditionDropoutd` on both keys); the source latent is
always given, so guidance acts on the covariates only. A paired model can start from unpaired weights of the same
design (scripts/training/warm_start.py), as InstructPix2Pix starts from a text-to-image model. A long interval can be
walked in steps inside the training pairs' span (`rollout_paired`), each step's target latent the next one's source.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler

from scripts.core.drift import LatentDrift
from scripts.core.networks import LatentDriftModel
from scripts.core.sampling import paired_null_condition, sample_latents


@torch.inference_mode()
def sample_paired(
    model: LatentDriftModel,
    scheduler: DDIMScheduler,
    source_latent: torch.Tensor,
    condition_source: torch.Tensor,
    condition_target: torch.Tensor,
    num_inference_steps: int = 50,
    *,
    drift: LatentDrift,
    guidance_scale: float = 1.0,
    null_condition: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """
    Drifted DDIM sampling of the target latent z_0 given the source latent (B, C, *spatial) and the source and
    target covariate vectors (B, 1, size), from z_T = ε + δ, with classifier-free guidance of weight
    `guidance_scale` against the null condition (`CovariateEncoder.null()`, used for both halves).

    `noise` is ε (shape of `source_latent`); None draws it from the global generator. `drift` is the one to run at
    (the inferer's `resolve_drift`: the weights' δ unless the config overrides it).
    """
    if guidance_scale != 1.0 and null_condition is None:
        raise ValueError("guidance_scale != 1 needs the null condition (covariate_encoder.null()).")
    if condition_source.shape != condition_target.shape:
        shapes = f"source {tuple(condition_source.shape)}, target {tuple(condition_target.shape)}"
        raise ValueError(f"condition_source and condition_target must have the same shape, got {shapes}.")
    noise = torch.randn_like(source_latent) if noise is None else noise.to(source_latent)
    if noise.shape != source_latent.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != source latent shape {tuple(source_latent.shape)}.")
    condition = torch.cat([condition_source, condition_target], -1).to(source_latent)
    null = None if null_condition is None else paired_null_condition(null_condition, condition_source.shape[-1])
    return sample_latents(
        model, scheduler, noise, condition, drift=drift, progress=progress,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, null_condition=null,
        precision=precision, source_latent=source_latent,
    )  # fmt: skip


def rollout_paired(
    model: LatentDriftModel, scheduler: DDIMScheduler, source_latent: torch.Tensor, path: list[torch.Tensor],
    noises: list[torch.Tensor], residual: tuple | None = None, **kwargs: Any,
) -> torch.Tensor:  # fmt: skip
    """
    The latent at the end of the covariate `path` (K + 1 condition vectors, `CovariateEncoder.path`): K paired
    samplings, step k from the latent at path[k] to the one at path[k + 1] with noise `noises[k]`. A residual model
    (`residual` = its (scale_factor, residual_scale)) samples g (z_target - z_source), g = residual_scale /
    scale_factor, added to the step's source. K = 1 is `sample_paired`.
    """
    latent = source_latent
    for k, noise in enumerate(noises):
        sample = sample_paired(model, scheduler, latent, path[k], path[k + 1], noise=noise, **kwargs)
        latent = sample if residual is None else latent + sample * residual[0] / residual[1]
    return latent
