"""Inferers: mixed-precision forward passes, autoencoder reconstruction and drifted DDIM sampling / inversion."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler
from torch import nn
from tqdm import tqdm

from scripts.data import as_flag
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
    source_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Drifted DDIM sampling from z_T = ε + δ down to z_0 under `condition` (B, 1, size); `source_latent` is the
    paired mode's extra input (see `denoise_latents`).
    """
    drift = drift if drift is not None else model.drift
    timesteps = set_inference_timesteps(scheduler, num_inference_steps)
    start = drift.prior(noise)
    return denoise_latents(
        model, scheduler, start, condition, timesteps, guidance_scale, null_condition, drift, precision, False,
        source_latent,
    )  # fmt: skip


@torch.inference_mode()
def invert_latents(
    model: LatentDriftModel,
    scheduler: DDIMScheduler,
    latent: torch.Tensor,
    condition: torch.Tensor,
    timesteps: torch.Tensor,
    drift: LatentDrift | None = None,
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
    drift = drift if drift is not None else model.drift
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
    guidance_scale: float = 1.0,
    null_condition: torch.Tensor | None = None,
    drift: LatentDrift | None = None,
    precision: str = "fp32",
    progress: bool = False,
    source_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Drifted DDIM sampling from a noisy latent at timesteps[0] down to z_0, with classifier-free guidance.

    `source_latent` (paired mode, scripts/paired.py) is concatenated to the latent as extra input channels at every
    step; the denoiser then predicts the noise of the first C channels only.
    """
    drift = drift if drift is not None else model.drift
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


class CounterfactualInferer(Inferer):
    """
    Counterfactual image synthesis by abduction -> action -> prediction (Pearl's three steps):

    1. abduction: encode the image to z_0 and DDIM-invert it with drift under the *source* covariates up to
       t_0 = strength * T (the inverted latent carries what the covariates do not explain: the subject's anatomy);
    2. action: swap the condition for the *target* covariates;
    3. prediction: DDIM-sample from t_0 down to 0 with drift and classifier-free guidance, then decode.

    Args:
        scheduler: a DDIMScheduler with clip_sample=False.
        num_inference_steps: DDIM steps over the whole chain [T, 0]; strength * steps of them are used each way.
        strength: fraction of the chain inverted, in (0, 1]: higher allows larger changes, lower keeps more detail.
        guidance_scale: classifier-free guidance weight w of the target condition (1 = no guidance).
        null_condition: the encoder's null condition vector (needed for guidance).
        delta: drift δ for inference (float or per-channel list); None keeps the model's own drift.
        drift_schedule: "paper" or "marginal" (see scripts/drift.py), used with `delta`.
        num_samples: n > 1 draws n counterfactuals and returns their mean and per-voxel std. Each draw starts from
            the inverted latent mixed with fresh noise, sqrt(1 - j²) z_t0 + j ε (variance preserving, j =
            `sample_jitter`); n = 1 uses the inverted latent as it is (deterministic).
        sample_jitter: j above, in [0, 1].
        seed: seed of every random draw, so the same call gives the same output.
        fixed_point_iterations: refinements per inversion step (see `invert_latents`).
        precision: "fp32", "bf16" (CPU or CUDA) or "fp16" (CUDA).
        progress: show progress bars for inversion and sampling.
        compile: run the denoiser through `torch.compile` (compiled once per inferer, on the first call; needs a
            C++ compiler on CPU; worth it for many inputs, not for one).
        paired: the network is a paired (longitudinal) model from configs/train_paired.json, whose denoiser takes
            the source latent as extra channels and [c_source, c_target] as condition. There is no inversion: each
            draw samples the target latent from the drifted prior ε + δ over the whole chain (`strength` unused),
            with guidance against the null of both vectors. n = 1 uses one seeded noise draw.
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        num_inference_steps: int = 50,
        strength: float = 0.6,
        guidance_scale: float = 1.0,
        null_condition: torch.Tensor | None = None,
        delta: float | list[float] | None = None,
        drift_schedule: str = "paper",
        num_samples: int = 1,
        sample_jitter: float = 0.1,
        seed: int = 0,
        fixed_point_iterations: int = 1,
        precision: str = "fp32",
        progress: bool = False,
        paired: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError("num_samples and num_inference_steps must be at least 1.")
        if not 0.0 <= sample_jitter <= 1.0:
            raise ValueError(f"sample_jitter must be in [0, 1], got {sample_jitter}.")
        if guidance_scale != 1.0 and null_condition is None:
            raise ValueError("guidance_scale != 1 needs the null condition (covariate_encoder.null()).")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
        self.scheduler, self.num_inference_steps, self.strength = scheduler, num_inference_steps, strength
        self.guidance_scale, self.null_condition = guidance_scale, null_condition
        self.drift = LatentDrift(delta, drift_schedule) if delta is not None else None
        self.num_samples, self.sample_jitter, self.seed = num_samples, sample_jitter, seed
        self.fixed_point_iterations, self.precision = fixed_point_iterations, precision
        self.progress, self.paired = as_flag(progress, "progress"), as_flag(paired, "paired")
        self.compile, self._compiled = as_flag(compile, "compile"), {}

    def timesteps(self) -> torch.Tensor:
        grid = set_inference_timesteps(self.scheduler, self.num_inference_steps)
        return grid[len(grid) - max(1, round(self.strength * len(grid))) :]

    @torch.inference_mode()
    def counterfactual(
        self,
        inputs: torch.Tensor,
        network: LatentDriftModel,
        source_condition: torch.Tensor,
        target_condition: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """{"counterfactual": mean image, "std": per-voxel std over samples (zeros for n = 1), "latent": z_0}."""
        with precision_context(inputs.device, self.precision):
            z0 = network.encode(inputs).float()
        if self.compile:  # the sampling helpers only use .denoiser and .drift of the network
            key = id(network.denoiser)
            if key not in self._compiled:
                self._compiled = {key: torch.compile(network.denoiser)}
            network = SimpleNamespace(denoiser=self._compiled[key], drift=network.drift, decode=network.decode)
        generator = torch.Generator().manual_seed(self.seed)
        if self.paired:
            drift = self.drift if self.drift is not None else network.drift
            timesteps = set_inference_timesteps(self.scheduler, self.num_inference_steps)
            condition = torch.cat([source_condition, target_condition], -1)
            null = None
            if self.null_condition is not None:
                null = paired_null_condition(self.null_condition, source_condition.shape[-1])
            starts = [drift.prior(torch.randn(z0.shape, generator=generator).to(z0)) for _ in range(self.num_samples)]
            source_latent = z0
        else:
            timesteps, condition, null, source_latent = self.timesteps(), target_condition, self.null_condition, None
            inverted = invert_latents(
                network,
                self.scheduler,
                z0,
                source_condition,
                timesteps,
                self.drift,
                self.fixed_point_iterations,
                self.precision,
                self.progress,
            )
            starts = [inverted]
            if self.num_samples > 1:
                jitter = self.sample_jitter
                noises = [torch.randn(z0.shape, generator=generator).to(z0) for _ in range(self.num_samples)]
                starts = [(1 - jitter**2) ** 0.5 * inverted + jitter * noise for noise in noises]
        images = []
        for start in starts:
            latent = denoise_latents(
                network,
                self.scheduler,
                start,
                condition,
                timesteps,
                self.guidance_scale,
                null,
                self.drift,
                self.precision,
                self.progress,
                source_latent,
            )
            with precision_context(inputs.device, self.precision):
                images.append(network.decode(latent).float())
        stacked = torch.stack(images)
        std = stacked.std(0) if self.num_samples > 1 else torch.zeros_like(stacked[0])
        return {"counterfactual": stacked.mean(0), "std": std, "latent": z0}

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: LatentDriftModel,
        source_condition: torch.Tensor,
        target_condition: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """(B, 2C, ...): the counterfactual in the first C channels and its per-voxel std in the last C."""
        result = self.counterfactual(inputs, network, source_condition, target_condition)
        return torch.cat([result["counterfactual"], result["std"]], 1)
