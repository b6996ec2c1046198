"""Inferers: mixed-precision forward passes, autoencoder reconstruction and drifted DDIM sampling / inversion."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.layers import GaussianFilter
from monai.networks.schedulers import DDIMScheduler

from scripts.core.drift import LatentDrift
from scripts.core.networks import LatentDriftModel
from scripts.core.paired import rollout_paired
from scripts.core.sampling import (
    PRECISIONS,
    denoise_latents,
    invert_latents,
    precision_context,
    set_inference_timesteps,
)
from scripts.io.datalist import as_flag

COMPOSITIONS = ("reference", "reconstruction", "none")
NOISE_QUANTILE = 0.9  # the reference chain's change level that `edit_mask` thresholds are relative to


class CounterfactualInferer(Inferer):
    """
    Counterfactual image synthesis by abduction -> action -> prediction (Pearl's three steps):

    1. abduction: encode the image to z_0 and DDIM-invert it with drift under the *source* covariates up to
       t_0 = strength * T (the inverted latent carries what the covariates do not explain: the subject's anatomy);
    2. action: swap the condition for the *target* covariates;
    3. prediction: DDIM-sample from t_0 down to 0 with drift and classifier-free guidance, then decode.

    Keeping the subject: the prediction also runs under the *source* covariates from the same inverted latent, with
    the same noise and guidance, batched with the counterfactual chain (the reference chain z_ref). The model's
    answer is the change D(z_cf) - D(base), which the workflow adds to the input itself (`compose`), so everything
    the covariates do not cause keeps the input's own detail. The base is set by `composition`:
    "reference" D(z_ref) (the default: the chain's own blur and drift cancel), "reconstruction" D(E(x)), or "none"
    (the raw decode D(z_cf) is the output, as in plain latent diffusion editing).

    Args:
        scheduler: a DDIMScheduler with clip_sample=False.
        num_inference_steps: DDIM steps over the whole chain [T, 0]; strength * steps of them are used each way.
        strength: fraction of the chain inverted, in (0, 1]: higher allows larger changes, lower keeps more detail.
        guidance_scale: classifier-free guidance weight w of the target condition (1 = no guidance).
        null_condition: the encoder's null condition vector (needed for guidance).
        delta: drift δ for inference (float or per-channel list); None uses the δ the weights were trained with
            (the network's drift, which `load_weights` sets from the weights file).
        drift_schedule: "paper" or "marginal" (see scripts/core/drift.py); None uses the weights' schedule.
        composition: "reference", "reconstruction" or "none" (see above).
        auto_mask: also return an edit mask (`edit_mask`): where the change is small against what the reference
            chain itself changes, the output is the input, voxel for voxel. Runs the reference chain.
        mask_threshold: the mask's threshold, in units of the reference chain's own change |D(z_ref) - D(E(x))|
            (its 90th percentile over the image; see `edit_mask`).
        mask_smoothing: Gaussian sigma (network voxels) of the mask's smoothing and soft edge.
        mask_signed_smoothing: sigma > 0 smooths the *signed* changes before their size is compared (`edit_mask`),
            so an edge the chain merely re-draws (a +/- pair) cancels while a one-signed change stays.
        num_samples: n > 1 draws n counterfactuals and returns their `sample_reduction` ("mean" or per-voxel
            "median": with diverse draws, the change most of them agree on, e.g. the side an added effusion takes)
            and per-voxel std. Each draw starts from the inverted latent mixed with fresh noise, sqrt(1 - j²) z_t0
            + j ε (variance preserving, j = `sample_jitter` in [0, 1]); n = 1 uses the inverted latent as it is.
        keep_intensity_scale: divide each chain's decode by its median ratio to D(E(x)) over the foreground (> 0.1),
            so that a global intensity rescale the model learnt from self-scaled training scans (atrophy lowers a
            brain's 99.5th percentile, which brightens the whole scan in its own frame) is not written into the input.
        seed: seed of every random draw, so the same call gives the same output.
        fixed_point_iterations: refinements per inversion step (see `invert_latents`).
        precision: "fp32", "bf16" (CPU or CUDA) or "fp16" (CUDA).
        progress: show progress bars for inversion and sampling.
        compile: run the denoiser through `torch.compile` (compiled once per inferer, on the first call; needs a
            C++ compiler on CPU; worth it for many inputs, not for one).
        paired: the network is a paired (longitudinal) model (the configs/paired.json overlay), whose denoiser takes
            the source latent as extra channels and [c_source, c_target] as condition. There is no inversion: each
            draw samples the target latent from the drifted prior ε + δ over the whole chain (`strength` unused),
            with guidance against the null of both vectors; its reference chain is conditioned on [c_source,
            c_source]. n = 1 uses one seeded noise draw.
        rollout_steps: K > 1 (paired only) walks source -> target in K paired steps along `covariate_path`
            (`CovariateEncoder.path`), each step's output latent the next one's source and fresh seeded noise per
            step, so that a long interval is asked as steps inside the span of the training pairs.
    """

    def __init__(
        self,
        scheduler: DDIMScheduler,
        num_inference_steps: int = 50,
        strength: float = 0.6,
        guidance_scale: float = 1.0,
        null_condition: torch.Tensor | None = None,
        delta: float | list[float] | None = None,
        drift_schedule: str | None = None,
        composition: str = "reference",
        auto_mask: bool = True,
        mask_threshold: float = 2.0,
        mask_smoothing: float = 1.0,
        mask_signed_smoothing: float = 0.0,
        num_samples: int = 1,
        sample_jitter: float = 0.1,
        sample_reduction: str = "mean",
        keep_intensity_scale: bool = False,
        seed: int = 0,
        fixed_point_iterations: int = 1,
        precision: str = "fp32",
        progress: bool = False,
        paired: bool = False,
        compile: bool = False,
        rollout_steps: int = 1,
        covariate_path: Callable[..., list[torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        if num_samples < 1 or num_inference_steps < 1:
            raise ValueError("num_samples and num_inference_steps must be at least 1.")
        if rollout_steps < 1:
            raise ValueError(f"rollout_steps must be at least 1, got {rollout_steps}.")
        if rollout_steps > 1 and not (as_flag(paired, "paired") and callable(covariate_path)):
            raise ValueError("rollout_steps > 1 needs a paired model (configs/paired.json) and covariate_path.")
        if not 0.0 <= sample_jitter <= 1.0:
            raise ValueError(f"sample_jitter must be in [0, 1], got {sample_jitter}.")
        if sample_reduction not in ("mean", "median"):
            raise ValueError(f"sample_reduction must be 'mean' or 'median', got {sample_reduction!r}.")
        if guidance_scale != 1.0 and null_condition is None:
            raise ValueError("guidance_scale != 1 needs the null condition (covariate_encoder.null()).")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
        if composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}.")
        if not mask_threshold > 0 or not min(mask_smoothing, mask_signed_smoothing) >= 0:
            raise ValueError(f"mask_threshold must be > 0 and mask_smoothing, mask_signed_smoothing >= 0, got "
                             f"{mask_threshold}, {mask_smoothing}, {mask_signed_smoothing}.")  # fmt: skip
        if delta is None and drift_schedule is not None:
            LatentDrift(0.0, drift_schedule)  # an unknown schedule fails here, before any compute
        self.scheduler, self.num_inference_steps, self.strength = scheduler, num_inference_steps, strength
        self.guidance_scale, self.null_condition = guidance_scale, null_condition
        self.delta, self.drift_schedule = delta, drift_schedule
        self.override = LatentDrift(delta, drift_schedule or "paper") if delta is not None else None
        self.composition, self.auto_mask = composition, as_flag(auto_mask, "auto_mask")
        self.mask_threshold, self.mask_smoothing = float(mask_threshold), float(mask_smoothing)
        self.mask_signed_smoothing = float(mask_signed_smoothing)
        self.num_samples, self.sample_jitter, self.sample_reduction = num_samples, sample_jitter, sample_reduction
        self.keep_intensity_scale = as_flag(keep_intensity_scale, "keep_intensity_scale")
        self.fixed_point_iterations, self.precision = fixed_point_iterations, precision
        self.progress, self.paired, self.seed = as_flag(progress, "progress"), as_flag(paired, "paired"), seed
        self.compile, self._compiled = as_flag(compile, "compile"), {}
        self.rollout_steps, self.covariate_path = int(rollout_steps), covariate_path

    def resolve_drift(self, network: LatentDriftModel) -> LatentDrift:
        """The drift this inferer runs `network` at: `delta` if given, else the weights' δ; likewise the schedule."""
        if self.override is not None:
            return self.override
        if self.drift_schedule is None or self.drift_schedule == network.drift.schedule:
            return network.drift
        return LatentDrift(network.drift.delta.tolist(), self.drift_schedule)

    def describe_drift(self, network: LatentDriftModel) -> dict[str, Any]:
        """What the record says about the drift actually used, and where it came from."""
        drift = self.resolve_drift(network)
        drift, delta = (drift.for_prior_start() if self.paired else drift), drift.values
        origin = "inference_delta" if self.override is not None else ("weights" if _has_metadata(network) else "config")
        return {"delta": delta, "schedule": drift.schedule, "delta_from": origin}

    @property
    def runs_reference(self) -> bool:
        return self.composition == "reference" or self.auto_mask

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
        """
        On the network grid: {"counterfactual": D(z_cf) (mean over samples), "change": D(z_cf) - base (mean),
        "edit_mask": the automatic mask (ones without `auto_mask`), "std": per-voxel std of D(z_cf) over samples
        (zeros for n = 1), "reconstruction": D(E(x)), "reconstruction_error": mean |D(E(x)) - x| per image,
        "latent": z_0}.
        """
        drift = self.resolve_drift(network)
        with precision_context(inputs.device, self.precision):
            z0 = network.encode(inputs).float()
            reconstruction = network.decode(z0).float()
        denoiser = self._denoiser(network)
        starts, timesteps, conditions, null = self._abduction(denoiser, z0, source_condition, target_condition, drift)
        counterfactuals, references, generator = [], [], torch.Generator().manual_seed(self.seed + 1)
        for start in starts:
            latent, sources, source_latents = (torch.cat([c, c]) if self.runs_reference else c
                                               for c in (start, source_condition, z0))  # fmt: skip
            if self.paired:  # the chains start from noise; the source latent is the extra input at every step
                fresh = [torch.randn(start.shape, generator=generator).to(start) for _ in range(self.rollout_steps - 1)]
                noises = [latent] + [torch.cat([n, n]) if self.runs_reference else n for n in fresh]
                path = [sources, conditions] if self.rollout_steps == 1 else [
                    torch.cat([c, source_condition]) if self.runs_reference else c
                    for c in self.covariate_path(source_condition, target_condition, self.rollout_steps)]  # fmt: skip
                scales = (network.scale_factor, network.residual_scale) if hasattr(network, "residual_scale") else None
                latent = rollout_paired(
                    denoiser, self.scheduler, source_latents, path, noises, scales, drift=drift,
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    null_condition=self.null_condition, precision=self.precision, progress=self.progress,
                )  # fmt: skip
            else:
                latent = denoise_latents(
                    denoiser, self.scheduler, latent, conditions, timesteps, drift=drift,
                    guidance_scale=self.guidance_scale, null_condition=null, precision=self.precision,
                    progress=self.progress,
                )  # fmt: skip
            with precision_context(inputs.device, self.precision):
                images = network.decode(latent).float()
            if self.keep_intensity_scale:
                images = match_intensity_scale(
                    images, reconstruction.repeat(len(images) // len(inputs), *[1] * (images.ndim - 1))
                )
            counterfactuals.append(images[: len(inputs)])
            references.append(images[len(inputs) :] if self.runs_reference else None)
        return self._result(inputs, counterfactuals, references, reconstruction, z0)

    def _denoiser(self, network: LatentDriftModel) -> Any:
        """The network the sampling helpers see (they use only `.denoiser`): compiled once if `compile`."""
        if not self.compile:
            return network
        key = id(network.denoiser)
        if key not in self._compiled:
            self._compiled = {key: torch.compile(network.denoiser)}
        return SimpleNamespace(denoiser=self._compiled[key])

    def _abduction(self, denoiser, z0, source_condition, target_condition, drift):
        """
        Start latents (paired: the noise ε; otherwise the inverted latent, jittered per sample), timesteps, the
        conditions of the chains (target, then source for the reference chain; paired: their target halves) and null.
        """
        generator = torch.Generator().manual_seed(self.seed)
        if self.paired:
            starts = [torch.randn(z0.shape, generator=generator).to(z0) for _ in range(self.num_samples)]
            timesteps, null = None, None
        else:
            timesteps, null = self.timesteps(), self.null_condition
            inverted = invert_latents(
                denoiser, self.scheduler, z0, source_condition, timesteps, drift=drift,
                fixed_point_iterations=self.fixed_point_iterations, precision=self.precision, progress=self.progress,
            )  # fmt: skip
            starts = [inverted]
            if self.num_samples > 1:
                jitter = self.sample_jitter
                noises = [torch.randn(z0.shape, generator=generator).to(z0) for _ in range(self.num_samples)]
                starts = [(1 - jitter**2) ** 0.5 * inverted + jitter * noise for noise in noises]
        conditions = torch.cat([target_condition, source_condition]) if self.runs_reference else target_condition
        return starts, timesteps, conditions, null

    def _result(self, inputs, counterfactuals, references, reconstruction, z0) -> dict[str, torch.Tensor]:
        stacked, refs = torch.stack(counterfactuals), torch.stack(references) if self.runs_reference else None
        reduce = (lambda t: t.median(0).values) if self.sample_reduction == "median" else (lambda t: t.mean(0))
        std = stacked.std(0) if self.num_samples > 1 else torch.zeros_like(stacked[0])
        base = reconstruction if self.composition == "reconstruction" else inputs.float()
        change = reduce(stacked - refs) if self.composition == "reference" else reduce(stacked) - base
        mask = torch.ones_like(change)
        if self.auto_mask:
            mask = edit_mask(reduce(stacked - refs), reduce(refs) - reconstruction, self.mask_threshold,
                             self.mask_smoothing, self.mask_signed_smoothing)  # fmt: skip
        error = (reconstruction - inputs.float()).abs().flatten(1).mean(1)
        return {"counterfactual": reduce(stacked), "change": change, "edit_mask": mask, "std": std,
                "reconstruction": reconstruction, "reconstruction_error": error, "latent": z0}  # fmt: skip

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: LatentDriftModel,
        source_condition: torch.Tensor,
        target_condition: torch.Tensor,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """The batch's counterfactual, change, edit_mask, std and reconstruction_error (see `counterfactual`)."""
        result = self.counterfactual(inputs, network, source_condition, target_condition)
        return {key: result[key] for key in ("counterfactual", "change", "edit_mask", "std", "reconstruction_error")}


def edit_mask(change: torch.Tensor, reference_change: torch.Tensor, threshold: float = 2.0, smoothing: float = 1.0,
              signed_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """
    Where the counterfactual's change is significant: a soft mask in [0, 1] per image (B, C, *spatial).

    The change's size is compared with the size of the reference chain's own change D(z_ref) - D(E(x)) (what
    inversion and resampling alter without any covariate change), taken at its 90th percentile over the image (the
    level most of the chain's own noise stays under): 1 at and above `threshold` times it, 0 below half of it, a
    smooth ramp between; the mask is smoothed again (sigma `smoothing`) for a soft edge, and values under 1% are
    set to exactly 0, so the output there is the input itself. The size of either change is |G * change| with a
    Gaussian G of sigma `signed_smoothing` when that is > 0 (an edge drawn slightly differently, a +/- pair,
    cancels; a one-signed change such as added fluid stays), else G_smoothing * |change|.
    """
    spatial_dims = change.ndim - 2
    blur = GaussianFilter(spatial_dims, smoothing).to(change.device) if smoothing > 0 else None
    if signed_smoothing > 0:
        signed = GaussianFilter(spatial_dims, signed_smoothing).to(change.device)
        magnitude, noise = signed(change).abs(), signed(reference_change).abs()
    else:
        magnitude, noise = change.abs(), reference_change.abs()
        if blur is not None:
            magnitude, noise = blur(magnitude), blur(noise)
    scale = torch.quantile(noise.flatten(1).float(), NOISE_QUANTILE, dim=1).clamp_min(1e-4)
    scale = scale.reshape(-1, *([1] * (change.ndim - 1)))
    mask = ((magnitude / (threshold * scale) - 0.5) / 0.5).clamp(0, 1)
    mask = mask * mask * (3 - 2 * mask)  # smoothstep
    if blur is not None:
        mask = blur(mask)
    return torch.where(mask < 0.01, torch.zeros_like(mask), mask.clamp(0, 1))


def match_intensity_scale(images: torch.Tensor, base: torch.Tensor, floor: float = 0.1) -> torch.Tensor:
    """`images` each divided by the median of images / base over base's foreground (base > floor; 1 without one)."""
    scales = [
        (i[b > floor] / b[b > floor]).median() if (b > floor).any() else i.new_ones(()) for i, b in zip(images, base)
    ]
    return images / torch.stack(scales).clamp_min(1e-3).reshape(-1, *[1] * (images.ndim - 1))


def compose(
    image: torch.Tensor, counterfactual: torch.Tensor, change: torch.Tensor, mask: torch.Tensor | None, composition: str
) -> torch.Tensor:
    """
    The counterfactual the user gets: the input plus the model's change inside the mask (input, voxel for voxel,
    where the mask is 0); composition "none" without a mask returns the raw decode `counterfactual`.
    """
    if composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {composition!r}.")
    if composition == "none":
        if mask is None:
            return counterfactual
        change = counterfactual - image
    if mask is None:
        return image + change
    return torch.where(mask > 0, image + mask * change, image)


def _has_metadata(network: Any) -> bool:
    info = getattr(network, "weights_info", None)
    return bool(info and info.get("metadata") and "drift" in info["metadata"])
