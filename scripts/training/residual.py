"""The residual target of paired training (configs/paired_residual.json), as TADM does for brain ageing.

A paired model with `residual` (`LatentDriftModel(..., residual=True)`) samples the change g (z_target - z_source)
instead of the whole target latent; the counterfactual is z_source + (its sample) / g. A small change is easier to
learn than a whole brain on a small budget, and where the model predicts no change the output is the source itself.
The gain g makes the change unit-variance, as the scale factor does for latents: `residual_scale` = 1 / std of the
unscaled change over a few training batches, measured before training (`measure_residual_scale`).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any

import torch
from monai.transforms import MapTransform

from scripts.core.networks import LatentDriftModel
from scripts.training.engines import latent_scale_factor, same_on_all_ranks


class LatentDifferenced(MapTransform):
    """
    Dictionary transform: `output_key` = latent of `keys[0]` - latent of `keys[1]` (the unscaled latents
    `EncodeLatentd` cached), e.g. keys ("latent_target", "latent_source"). Deterministic, so the cache holds it.
    """

    def __init__(self, keys: tuple[str, str] | list[str], output_key: str = "latent_residual") -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"LatentDifferenced takes two keys (minuend, subtrahend), got {list(self.keys)}.")
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        missing = [key for key in self.keys if key not in d]
        if missing:
            raise KeyError(f"LatentDifferenced: the sample has no {missing}; put EncodeLatentd before it.")
        first, second = (torch.as_tensor(d[key]).float() for key in self.keys)
        d[self.output_key] = first - second
        return d


def measure_residual_scale(
    network: LatentDriftModel, batches: Iterable, latent_key: str = "latent_residual"
) -> float | None:
    """Fill a residual model's `residual_scale` with 1 / std of the cached change (rank 0's); None for other models."""
    if not hasattr(network, "residual_scale"):
        return None
    scale = same_on_all_ranks(latent_scale_factor(network.autoencoder, batches, latent_key=latent_key))
    network.residual_scale.fill_(scale)
    return scale
