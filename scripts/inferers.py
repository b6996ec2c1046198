"""Inferers: mixed-precision forward passes, autoencoder reconstruction and drifted DDIM sampling / inversion."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from scripts.drift import LatentDrift
from scripts.networks import LatentDriftModel

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


class AutocastInferer(Inferer):
    """Calls `network(inputs, *args, **kwargs)` under the chosen autocast precision and returns float32."""

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with precision_context(inputs.device, self.precision):
            output = network(inputs, *args, **kwargs)
        return output.float() if isinstance(output, torch.Tensor) else output


class ReconstructionInferer(AutocastInferer):
    """Autoencoder reconstruction (encode to the posterior mean, decode) for stage-1 validation."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().__call__(inputs, network.reconstruct)


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
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    null_condition: torch.Tensor | None = None,
    drift: LatentDrift | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Drifted DDIM sampling from z_T = ε + δ down to z_0 under `condition` (B, 1, size)."""
    drift = drift if drift is not None else model.drift
    latent = drift.prior(noise)
    for t in set_inference_timesteps(scheduler, num_inference_steps):
        with precision_context(latent.device, precision):
            output = guided_noise_estimate(model.denoiser, latent, t, condition, null_condition, guidance_scale)
        latent = drift.step(scheduler, output.float(), t, latent)
    return latent
