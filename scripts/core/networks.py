"""The network component: autoencoder + covariate-conditioned diffusion UNet + Latent Drift in one module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from scripts.core.drift import LatentDrift

FINETUNE_SCHEMES = ("full", "cross_attention", "embedding")


class CovariateTokens(nn.Module):
    """
    Embeds a covariate vector c (B, 1, size) as `size` context tokens (B, size, dim): token_i = c_i w_i + b_i.

    One token per vector entry (rather than one token for the whole vector) lets cross-attention weigh covariates
    against each other and position by position, so its query and key projections learn too.
    """

    def __init__(self, condition_size: int, context_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(condition_size, context_dim) * context_dim**-0.5)
        self.bias = nn.Parameter(torch.randn(condition_size, context_dim) * context_dim**-0.5)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        values = condition.reshape(condition.shape[0], -1, 1)
        if values.shape[1] != self.weight.shape[0]:
            raise ValueError(f"condition has {values.shape[1]} values, the model expects {self.weight.shape[0]}.")
        return values * self.weight + self.bias


class CovariateEmbedding(nn.Module):
    """
    Embeds a covariate vector c (B, 1, size) as one vector (B, dim) by a small MLP (Linear, SiLU, Linear), added to
    the UNet's timestep embedding, so every residual block sees the covariates. The last layer starts at zero: the
    untrained embedding changes nothing.
    """

    def __init__(self, condition_size: int, embedding_dim: int) -> None:
        super().__init__()
        self.condition_size = condition_size
        self.mlp = nn.Sequential(
            nn.Linear(condition_size, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        values = condition.reshape(condition.shape[0], -1)
        if values.shape[1] != self.condition_size:
            raise ValueError(f"condition has {values.shape[1]} values, the model expects {self.condition_size}.")
        return self.mlp(values)


CONDITIONINGS = ("cross_attention", "timestep_embedding", "input_channels")


class ConditionedUNet(nn.Module):
    """
    The denoiser ε_θ(z_t, t, c): the covariate vector c reaches a MONAI DiffusionModelUNet by one or more of
    `conditioning`: "cross_attention", one context token per covariate value (`CovariateTokens`) in the UNet's
    cross-attention (the UNet built `with_conditioning=True`, `cross_attention_dim=context_dim`);
    "timestep_embedding", an MLP embedding (`CovariateEmbedding`) added to the timestep embedding (the UNet built
    with `num_class_embeds=1`; it replaces the class-embedding table); "input_channels", c as constant input
    channels beside the latent (the UNet's `in_channels` counts them).

    Args:
        unet: the MONAI DiffusionModelUNet, built to match `conditioning`.
        condition_size: length of the covariate vector (`CovariateEncoder.size`).
        context_dim: the UNet's `cross_attention_dim` (used by "cross_attention").
        conditioning: the designs used, any non-empty combination of `CONDITIONINGS`.
        interval_gain: g > 0: a paired condition [c_source, c_target] reaches the UNet as [g (c_target - c_source),
            c_target] (a null half stays null), the interval as TADM; g (a saved buffer) makes it order one.
    """

    def __init__(
        self,
        unet: DiffusionModelUNet,
        condition_size: int,
        context_dim: int | None = None,
        conditioning: Sequence[str] = ("cross_attention",),
        interval_gain: float = 0.0,
    ) -> None:
        super().__init__()
        conditioning = [conditioning] if isinstance(conditioning, str) else list(conditioning)
        unknown = [c for c in conditioning if c not in CONDITIONINGS]
        if unknown or not conditioning or len(set(conditioning)) != len(conditioning):
            raise ValueError(
                f"conditioning must be a non-empty list of distinct {list(CONDITIONINGS)}, got {conditioning}."
            )
        self.unet, self.conditioning, self.condition_size = unet, tuple(conditioning), condition_size
        if "cross_attention" in conditioning:
            if not unet.with_conditioning or context_dim is None:
                raise ValueError(
                    "conditioning 'cross_attention': the diffusion UNet must be built with with_conditioning=True and "
                    "a cross_attention_dim."
                )
            self.embedding = CovariateTokens(condition_size, context_dim)
        if "timestep_embedding" in conditioning:
            if unet.num_class_embeds is None:
                raise ValueError("conditioning 'timestep_embedding': build the diffusion UNet with num_class_embeds=1.")
            unet.class_embedding = CovariateEmbedding(condition_size, unet.time_embed[-1].out_features)
        if float(interval_gain):
            self.register_buffer("interval_gain", torch.tensor(float(interval_gain)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "interval_gain"):
            source, target = condition.chunk(2, -1)
            interval = torch.where(source[..., -1:] > 0.5, source, self.interval_gain * (target - source))
            condition = torch.cat([interval, target], -1)
        context = self.embedding(condition) if "cross_attention" in self.conditioning else None
        labels = condition if "timestep_embedding" in self.conditioning else None
        if "input_channels" in self.conditioning:
            values = condition.reshape(condition.shape[0], -1, *([1] * (x.ndim - 2))).to(x.dtype)
            x = torch.cat([x, values.expand(-1, -1, *x.shape[2:])], 1)
        if x.shape[1] != self.unet.in_channels:
            raise ValueError(
                f"the denoiser's input has {x.shape[1]} channels, its UNet takes {self.unet.in_channels} (conditioning "
                f"{list(self.conditioning)}); build the UNet with the latent channels plus the condition's size."
            )
        return self.unet(x, timesteps=timesteps, context=context, class_labels=labels)


class LatentDriftModel(nn.Module):
    """
    One module holding the whole generative model, saved as `models/model.pt` with strict keys.

    `encode` / `decode` map images to the scaled diffusion latent and back: encoding takes the posterior mean, so it
    is deterministic (inversion needs that); the scale factor is measured on training data before stage 2 and saved
    with the weights. `forward(image)` returns an image so MONAI tools can call it.

    Args:
        autoencoder: the stage-1 MONAI AutoencoderKL.
        denoiser: the stage-2 ConditionedUNet.
        drift: the Latent Drift component (its δ is a run setting, not part of the saved weights).
        residual: a paired model whose denoiser samples g (z_target - z_source) (TADM's residual target); the
            buffer `residual_scale` holds g times the scale factor, measured like it on the training pairs.
    """

    def __init__(
        self, autoencoder: AutoencoderKL, denoiser: ConditionedUNet, drift: LatentDrift | None = None, residual=False
    ):
        super().__init__()
        self.autoencoder, self.denoiser = autoencoder, denoiser
        self.drift = drift if drift is not None else LatentDrift(0.0)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        if residual:
            self.register_buffer("residual_scale", torch.tensor(1.0))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(image)[0] * self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(latent / self.scale_factor)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """The image as the model represents it: encoded to the diffusion latent and decoded back."""
        return self.decode(self.encode(image))


def select_trainable(denoiser: ConditionedUNet, scheme: str = "full") -> list[nn.Parameter]:
    """
    Freeze the denoiser except what the fine-tuning scheme trains, and return those parameters for the optimizer.

    "full": the whole UNet and the covariate embedding (basic fine-tuning);
    "cross_attention": only the key/value projections of the cross-attention layers (Custom Diffusion);
    "embedding": only the covariate embeddings (tokens and/or the timestep-embedding MLP), the UNet frozen (Textual
    Inversion).
    """
    if scheme not in FINETUNE_SCHEMES:
        raise ValueError(f"finetune_scheme must be one of {FINETUNE_SCHEMES}, got {scheme!r}.")
    chosen = []
    for name, parameter in denoiser.named_parameters():
        if scheme == "full":
            trainable = True
        elif scheme == "cross_attention":
            trainable = ".attn2.to_k." in name or ".attn2.to_v." in name
        else:
            trainable = name.startswith(("embedding.", "unet.class_embedding."))
        parameter.requires_grad_(trainable)
        if trainable:
            chosen.append(parameter)
    if not chosen:
        raise ValueError(f"finetune_scheme {scheme!r} selects no parameter: the UNet has no cross-attention layer.")
    return chosen


def check_image_size(image_size: Sequence[int], autoencoder_channels: Sequence[int], unet_channels: Sequence[int]):
    """
    The network image size must divide into the autoencoder's downsamplings and then the UNet's: each side a
    multiple of 2 ** (levels - 1) of both. Raises a ValueError naming `image_size` (checked before any compute).
    """
    factor = 2 ** (len(autoencoder_channels) - 1) * 2 ** (len(unet_channels) - 1)
    bad = [int(size) for size in image_size if int(size) < factor or int(size) % factor]
    if bad:
        raise ValueError(
            f"image_size {list(image_size)}: every side must be a positive multiple of {factor} (the autoencoder "
            f"halves it {len(autoencoder_channels) - 1} times and the UNet {len(unet_channels) - 1} more); "
            f"{bad} are not. Inputs of any size are brought to image_size by the preprocessing; choose e.g. "
            f"{[max(factor, round(int(s) / factor) * factor) for s in image_size]}."
        )
    return list(image_size)
