"""Warm start of a paired (longitudinal) denoiser from unpaired weights of the same design.

Used by the overlay configs/paired_warm_start.json, after configs/paired.json on configs/train_diffusion.json.
"""

from __future__ import annotations

import torch

from scripts.core.networks import LatentDriftModel
from scripts.io.weights import is_paired, read_weights, trained_conditioning


def warm_start_paired(network: LatentDriftModel, path: str) -> LatentDriftModel:
    """
    Load the unpaired weights at `path` (autoencoder, denoiser, scale factor) into the paired `network` of the same
    design, widening the three parts that the paired condition and input make larger:

    - first convolution: the weights for [z_t, z_0^source] (and, with `input_channels`, [c_source, c_target]):
      z_t's and c_target's copied, z_0^source's and c_source's zero;
    - cross-attention tokens (`CovariateTokens`): the unpaired token weights for both halves of [c_source, c_target];
      with c_source = c_target every key/value pair appears twice, which leaves attention's output unchanged;
    - timestep-embedding MLP (`CovariateEmbedding`): its first layer reads c_target with the unpaired weights and
      c_source with zeros.

    So before any paired step the model predicts what the unpaired one predicts for c_target (exactly, with
    cross-attention fed c_source = c_target). The drift stays the config's; training then learns the rest. A
    residual model (configs/paired_residual.json) starts the same way; its `residual_scale` is measured afterwards.
    An interval model (configs/paired_interval.json) keeps its `interval_gain`; its first half carries the interval
    g (c_target - c_source), which is 0 for c_source = c_target: exact through the embedding MLP (zero weights),
    not through cross-attention (the interval tokens start as the covariate tokens of a zero vector).
    """
    if not is_paired(network):
        raise ValueError(f"warm start from {path}: the network is not paired; add configs/paired.json.")
    state, metadata = read_weights(path)
    if (metadata or {}).get("paired"):
        raise ValueError(f"{path}: already a paired model; resume it or set model_path instead of warm-starting.")
    trained_with = trained_conditioning(metadata)
    denoiser = network.denoiser
    if trained_with != list(denoiser.conditioning):
        raise ValueError(
            f'{path}: unpaired weights trained with conditioning {trained_with}; set --conditioning "{trained_with}".'
        )
    target = network.state_dict()
    latent_channels, size = network.autoencoder.latent_channels, denoiser.condition_size // 2
    channels = size if "input_channels" in denoiser.conditioning else 0  # the condition's input channels
    widened = {}
    for key, value in state.items():
        if key not in target:
            raise ValueError(f"{path}: holds {key!r}, which the paired network lacks; the designs differ.")
        wanted = target[key].shape
        if value.shape == wanted:
            widened[key] = value
        elif key == "denoiser.unet.conv_in.conv.weight" and (value.shape[1], wanted[1]) == (
            latent_channels + channels,
            2 * (latent_channels + channels),
        ):  # [z_t, z_0^source, c_source, c_target]: the unpaired weights for z_t and c_target, zeros elsewhere
            zeros = value.new_zeros(value.shape[0], latent_channels + channels, *value.shape[2:])
            widened[key] = torch.cat([value[:, :latent_channels], zeros, value[:, latent_channels:]], 1)
        elif key.startswith("denoiser.embedding.") and wanted[0] == 2 * value.shape[0] == 2 * size:
            widened[key] = torch.cat([value, value], 0)
        elif key == "denoiser.unet.class_embedding.mlp.0.weight" and wanted[1] == 2 * value.shape[1] == 2 * size:
            widened[key] = torch.cat([torch.zeros_like(value), value], 1)
        else:
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, which does not widen to the paired network's "
                f"{tuple(wanted)}; warm-start from weights of the same design (channels, covariates)."
            )
    for own in ("residual_scale", "denoiser.interval_gain"):  # the paired model's own settings (residual.py)
        if own in target:
            widened[own] = target[own]
    missing = sorted(set(target) - set(widened))
    if missing:
        raise ValueError(f"{path}: lacks {missing[:3]} of the paired network; the designs differ.")
    network.load_state_dict(widened, strict=True)
    return network
