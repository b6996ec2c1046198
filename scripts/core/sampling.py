"""Sampling with Latent Drift (passed explicitly): guided noise estimates, the reverse chain and its inversion."""

from __future__ import annotations

import contextlib

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn
from tqdm import tqdm

from scripts.core.drift import LatentDrift
from scripts.core.networks import LatentDriftModel

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16" (CPU or CUDA) or "fp16" (CUDA only); a no-op for "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
    device_type = torch.device(device).type
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU.")
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])


def set_inference_timesteps(scheduler: DDIMScheduler, num_inference_steps: int) -> torch.Tensor:
    """
    An evenly spaced DDIM grid t_i = T - 1 - i * (T // N) on the scheduler's own t - T/N convention, so each step's
    previous timestep is the next grid point and DDIM inversion retraces the sampling chain.
    """
    scheduler.set_timesteps(num_inference_steps)
    stride = scheduler.num_train_timesteps // num_inference_steps
    scheduler.timesteps = torch.arange(num_inference_steps) * -stride + (scheduler.num_train_timesteps - 1)
    return scheduler.timesteps


def guided_noise_estimate(
    denoiser: nn.Module,
    latent: torch.Tensor,
    timestep: torch.Tensor,
    condition: torch.Tensor,
    null_condition: torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """ε̂ = ε(z, ∅) + w (ε(z, c) - ε(z, ∅)) (classifier-free guidance); plain ε(z, c) when w = 1 or no null given."""
    batch = latent.shape[0]
    timesteps = timestep.to(latent.device).reshape(1).expand(batch)
    if null_condition is None or guidance_scale == 1.0:
        return denoiser(latent, timesteps, condition)
    null = null_condition.to(condition).reshape(1, 1, -1).expand(batch, 1, -1)
    both = denoiser(torch.cat([latent, latent]), torch.cat([timesteps, timesteps]), torch.cat([null, condition]))
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.inference_mode()
def sample_latents(
    model: LatentDriftModel,
    scheduler: DDIMScheduler,
    noise: torch.Tensor,
    condition: torch.Tensor,
    *,
    drift: LatentDrift,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    null_condition: torch.Tensor | None = None,
    precision: str = "fp32",
    source_latent: torch.Tensor | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """
    Drifted DDIM sampling from z_T = ε + δ down to z_0 under `condition` (B, 1, size); `source_latent` is the
    paired mode's extra input (see `denoise_latents`). The chain runs `drift.for_prior_start()` (the marginal
    schedule of the same δ).
    """
    timesteps, drift = set_inference_timesteps(scheduler, num_inference_steps), drift.for_prior_start()
    return denoise_latents(
        model, scheduler, drift.prior(noise), condition, timesteps, drift=drift, guidance_scale=guidance_scale,
        null_condition=null_condition, precision=precision, source_latent=source_latent, progress=progress,
    )  # fmt: skip


@torch.inference_mode()
def invert_latents(
    model: LatentDriftModel,
    scheduler: DDIMScheduler,
    latent: torch.Tensor,
    condition: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    drift: LatentDrift,
    fixed_point_iterations: int = 0,
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """
    Drifted DDIM inversion of a clean latent z_0 up the given (descending) `timesteps`, under `condition`.

    Each step inverts the drifted DDIM step exactly for a noise estimate ε_θ(ẑ_t, t, c); the estimate is first
    taken at the known lower state, then refined `fixed_point_iterations` times at the current guess of z_t, so that
    with enough iterations sampling back down from the result retraces the input (Pan et al. 2023, fixed-point
    inversion).
    """
    for t in tqdm(timesteps.flip(0), desc="inversion", disable=not progress, leave=False):
        lower = latent
        for _ in range(fixed_point_iterations + 1):
            with precision_context(latent.device, precision):
                output = guided_noise_estimate(model.denoiser, latent, t, condition, None, 1.0).float()
            latent = drift.invert_step(scheduler, output, t, lower)
    return latent


@torch.inference_mode()
def denoise_latents(
    model: LatentDriftModel,
    scheduler: DDIMScheduler,
    latent: torch.Tensor,
    condition: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    drift: LatentDrift,
    guidance_scale: float = 1.0,
    null_condition: torch.Tensor | None = None,
    precision: str = "fp32",
    progress: bool = False,
    source_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Drifted DDIM sampling from a noisy latent at timesteps[0] down to z_0, with classifier-free guidance.

    `source_latent` (paired mode, scripts/core/paired.py) is concatenated to the latent as extra input channels at every
    step; the denoiser then predicts the noise of the first C channels only.
    """
    for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
        inputs = latent if source_latent is None else torch.cat([latent, source_latent], 1)
        with precision_context(latent.device, precision):
            output = guided_noise_estimate(model.denoiser, inputs, t, condition, null_condition, guidance_scale)
        latent = drift.step(scheduler, output.float(), t, latent)
    return latent


def paired_null_condition(null_condition: torch.Tensor, size: int) -> torch.Tensor:
    """The null of the paired condition [c_source, c_target]: the encoder's null for both halves (full length kept)."""
    null = null_condition.reshape(-1)
    if null.numel() == size:
        return torch.cat([null, null])
    if null.numel() == 2 * size:
        return null
    raise ValueError(f"null_condition has {null.numel()} values; expected {size} (one covariate vector) or {2 * size}.")
