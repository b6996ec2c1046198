"""Latent Drift: the drifted prior, forward noising, reverse step and DDIM inversion of a latent diffusion model.

Implements Yeganeh et al., "Latent Drifting in Diffusion Models for Counterfactual Medical Image Synthesis",
CVPR 2025 (arXiv 2412.20651). With drift delta (symbol δ) the prior becomes N(δ, I) and each reverse step's mean
is moved by δ_t (paper Eq. 4: p(z_{t-1} | z_t) = N(μ_θ(z_t, t, c) + δ, Σ_t)):

    prior           z_T     = ε + δ,                                   ε ~ N(0, I)
    forward (train) z_t     = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) (ε + δ)    target: ε, or v computed from ε
    reverse step    z_{t-1} = step(ε_θ(z_t, t, c), t, z_t) + δ_t
    inversion       z_t     = step⁻¹(ε_θ, t, z_{t-1} - δ_t)             exact inverse of the DDIM step (η = 0)

Drift schedules δ_t:
    "paper":    δ_t = δ at every reverse step, as in the paper's Eq. 4. Exact where an inversion undoes it (the
                counterfactual chain); a chain from the prior runs "marginal" instead (`for_prior_start`).
    "marginal": δ_t = δ (sqrt(1 - ᾱ_{t-1}) - A_t sqrt(1 - ᾱ_t)), with A_t = ∂z_{t-1}/∂z_t of the scheduler step at a
                fixed noise estimate. It keeps the drift carried by each reverse state equal to the drift
                sqrt(1 - ᾱ_t) δ of the drifted forward marginal, so the chain ends at t = 0 with no residual offset
                and δ acts only through what the network sees (an extension; not in the paper). t - 1 follows the
                scheduler's own convention (t - T/N for DDIM), so the chain is exact on an evenly spaced grid.

δ is a scalar (paper) or one value per latent channel (extension). δ = 0 reproduces plain MONAI bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.networks.schedulers.scheduler import Scheduler
from torch import nn

DRIFT_SCHEDULES = ("paper", "marginal")


class LatentDrift(nn.Module):
    """
    The Latent Drift component shared by training, sampling and inversion.

    Args:
        delta: drift δ. A float (the paper's scalar) or a sequence with one value per latent channel.
        schedule: how δ is applied per reverse step: "paper" (δ every step) or "marginal" (see module docstring).
    """

    def __init__(self, delta: float | Sequence[float] = 0.0, schedule: str = "paper") -> None:
        super().__init__()
        if schedule not in DRIFT_SCHEDULES:
            raise ValueError(f"drift schedule must be one of {DRIFT_SCHEDULES}, got {schedule!r}.")
        values = torch.as_tensor(delta, dtype=torch.float32)
        if values.ndim > 1 or values.numel() == 0 or not torch.isfinite(values).all():
            raise ValueError(f"drift delta must be a finite float or a list of one float per channel, got {delta!r}.")
        self.schedule = schedule
        # δ is a run setting, not a learned weight: it is not saved in the state dict.
        self.register_buffer("delta", values, persistent=False)

    @property
    def values(self) -> float | list[float]:
        """δ as plain numbers, as the user wrote them (0.1, not float32's 0.10000000149011612)."""
        rounded = [float(f"{v:.7g}") for v in self.delta.reshape(-1).tolist()]
        return rounded[0] if self.delta.ndim == 0 else rounded

    @property
    def is_zero(self) -> bool:
        return bool((self.delta == 0).all())

    def extra_repr(self) -> str:
        return f"delta={self.delta.tolist()}, schedule={self.schedule!r}"

    def for_prior_start(self) -> LatentDrift:
        """
        The drift a chain that starts from the prior z_T = ε + δ runs at: the "marginal" form of this δ. The paper's δ
        at every step is exact where an inversion undoes it, but from the prior it compounds (each DDIM step scales an
        offset by sqrt(ᾱ_{t-1} / ᾱ_t)) and drives the latent off the data the weights were trained on.
        """
        return self if self.is_zero or self.schedule == "marginal" else LatentDrift(self.delta.tolist(), "marginal")

    def broadcast(self, like: torch.Tensor) -> torch.Tensor:
        """δ shaped to add to a latent batch `like` of shape (B, C, *spatial)."""
        if self.delta.ndim == 1 and self.delta.numel() not in (1, like.shape[1]):
            raise ValueError(
                f"per-channel drift delta has {self.delta.numel()} values but the latent has {like.shape[1]} channels."
            )
        shape = (1, -1) + (1,) * (like.ndim - 2) if self.delta.ndim == 1 else ()
        return self.delta.to(device=like.device, dtype=like.dtype).reshape(shape)

    def prior(self, noise: torch.Tensor) -> torch.Tensor:
        """z_T = ε + δ: a draw from the drifted prior N(δ, I), given ε ~ N(0, I)."""
        return noise if self.is_zero else noise + self.broadcast(noise)

    def add_noise(
        self, scheduler: Scheduler, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Drifted forward process for training. Returns (z_t, target):
        z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) (ε + δ); target = ε, or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) z_0, or z_0.
        """
        z_t = scheduler.add_noise(original_samples=z0, noise=self.prior(noise), timesteps=timesteps)
        if scheduler.prediction_type == "v_prediction":
            return z_t, scheduler.get_velocity(sample=z0, noise=noise, timesteps=timesteps)
        if scheduler.prediction_type == "sample":
            return z_t, z0
        return z_t, noise

    def step(
        self,
        scheduler: DDPMScheduler | DDIMScheduler,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Drifted reverse step z_{t-1} = step(model_output, t, z_t) + δ_t, for DDPM or DDIM (η = 0)."""
        z_prev, _ = scheduler.step(model_output, timestep, sample, generator=generator)
        if self.is_zero:
            return z_prev
        return z_prev + self.step_drift(scheduler, timestep, sample)

    def invert_step(
        self, scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor
    ) -> torch.Tensor:
        """
        Drifted DDIM inversion: the z_t for which `step(scheduler, model_output, timestep, z_t)` returns `sample`.

        With η = 0 and no clipping the DDIM step is affine and element-wise in z_t at a fixed model output,
        z_{t-1} = A z_t + B + δ_t, so z_t = (z_{t-1} - δ_t - B) / A exactly, for every prediction type.
        `sample` is z_{t-1} at the previous timestep of `timestep` in the scheduler's inference grid.
        """
        if not isinstance(scheduler, DDIMScheduler):
            raise TypeError(f"inversion needs a DDIMScheduler, got {type(scheduler).__name__}.")
        if scheduler.clip_sample:
            raise ValueError("DDIM inversion needs the scheduler's clip_sample=False (clipping is not invertible).")
        offset, _ = scheduler.step(model_output, timestep, torch.zeros_like(sample))  # B
        slope = scheduler.step(model_output, timestep, torch.ones_like(sample))[0] - offset  # A
        if not bool(slope.abs().min() > 0):
            raise ValueError(
                f"the DDIM step at timestep {int(timestep)} does not depend on z_t (prediction_type='sample' at the "
                "last step), so it cannot be inverted; invert over timesteps > 0."
            )
        target = sample if self.is_zero else sample - self.step_drift(scheduler, timestep, sample)
        return (target - offset) / slope

    def step_drift(
        self, scheduler: DDPMScheduler | DDIMScheduler, timestep: int | torch.Tensor, like: torch.Tensor
    ) -> torch.Tensor:
        """δ_t, the drift added to the reverse step that leaves `timestep`, shaped to add to `like`."""
        delta = self.broadcast(like)
        if self.schedule == "paper":
            return delta
        alpha_t, alpha_prev = _cumulative_alphas(scheduler, int(timestep))
        if isinstance(scheduler, DDIMScheduler):
            slope = (alpha_prev / alpha_t) ** 0.5  # A_t of the DDIM step at a fixed noise estimate
        else:
            t = int(timestep)
            x0_coeff = alpha_prev**0.5 * scheduler.betas[t] / (1 - alpha_t)
            slope = x0_coeff / alpha_t**0.5 + scheduler.alphas[t] ** 0.5 * (1 - alpha_prev) / (1 - alpha_t)
        coefficient = (1 - alpha_prev) ** 0.5 - slope * (1 - alpha_t) ** 0.5
        return delta * coefficient.to(device=like.device, dtype=like.dtype)


def _cumulative_alphas(scheduler: DDPMScheduler | DDIMScheduler, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_{t-1}) for the step leaving `timestep`, with the scheduler's own convention for t - 1 < 0."""
    alphas_cumprod = scheduler.alphas_cumprod.cpu()
    if isinstance(scheduler, DDIMScheduler):
        previous = timestep - scheduler.num_train_timesteps // scheduler.num_inference_steps
        final = scheduler.final_alpha_cumprod.cpu()
        return alphas_cumprod[timestep], alphas_cumprod[previous] if previous >= 0 else final
    return alphas_cumprod[timestep], alphas_cumprod[timestep - 1] if timestep > 0 else torch.tensor(1.0)
