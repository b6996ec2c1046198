"""The method's MONAI transforms: latent encoding, condition dropout and the drift noising of a training sample."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.schedulers.scheduler import Scheduler
from monai.transforms import MapTransform, RandomizableTransform

from scripts.core.covariates import CovariateEncoder
from scripts.core.drift import LatentDrift


class ConditionDropoutd(RandomizableTransform, MapTransform):
    """Replaces the condition by the null condition with probability `prob` (classifier-free guidance training)."""

    def __init__(self, keys: KeysCollection, encoder: CovariateEncoder, prob: float = 0.1) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"condition dropout prob must be in [0, 1], got {prob}.")
        RandomizableTransform.__init__(self, prob=prob)
        MapTransform.__init__(self, keys)
        self.null = encoder.null()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.null.to(d[key]).expand_as(d[key]).clone()
        return d


class DriftNoised(RandomizableTransform, MapTransform):
    """
    The stage-2 training transform: the drifted forward process on one sample's clean latent z_0 (C, *spatial).

    It sits in the training transform chain after the cached latent encoding (`EncodeLatentd`, which stores
    unscaled posterior means) and does, per sample, with its own random state (seeded like any MONAI random
    transform, `set_random_state`):

        z_0 = scale * latent,   t ~ U{0, ..., T - 1},   ε ~ N(0, I)
        z_t = sqrt(ᾱ_t) z_0 + sqrt(1 - ᾱ_t) (ε + δ)          (`LatentDrift.add_noise`)

    and writes z_t to `noisy_key`, the loss target (ε, v or z_0 by the scheduler's prediction type) to
    `target_key` and t (a 0-d int64 tensor) to `timesteps_key`, ready for the prepare-batch.

    Args:
        keys: the one clean latent to noise.
        scheduler: the training noise scheduler (its T, ᾱ_t and prediction type).
        drift: the `LatentDrift` holding δ.
        scale: the model's latent scale factor: a number, or a tensor read at every call (the model's
            `scale_factor` buffer, measured after the latents are cached).
        also_scale: keys of further latents to scale, not noise.
        clean_scale: their scale when it differs (a residual target's source latent: the model's scale factor).
    """

    def __init__(
        self,
        keys: KeysCollection,
        scheduler: Scheduler,
        drift: LatentDrift,
        scale: float | torch.Tensor = 1.0,
        noisy_key: str = "noisy",
        target_key: str = "target",
        timesteps_key: str = "timesteps",
        also_scale: KeysCollection = (),
        clean_scale: float | torch.Tensor | None = None,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"DriftNoised noises one latent per sample; got keys {list(self.keys)}.")
        self.scheduler, self.drift, self.scale = scheduler, drift, scale
        self.clean_scale = scale if clean_scale is None else clean_scale
        self.noisy_key, self.target_key, self.timesteps_key = noisy_key, target_key, timesteps_key
        self.also_scale = [also_scale] if isinstance(also_scale, str) else list(also_scale)
        self.timestep, self.noise = 0, None

    def randomize(self, shape: Sequence[int]) -> None:
        self.timestep = int(self.R.randint(0, self.scheduler.num_train_timesteps))
        self.noise = torch.from_numpy(self.R.standard_normal(tuple(shape)).astype(np.float32))

    @staticmethod
    def _scaled(value: Any, scale: float | torch.Tensor) -> torch.Tensor:
        latent = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        return latent.float() * float(scale)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if key not in d:
            raise KeyError(f"DriftNoised: the sample has no '{key}' (keys: {sorted(map(str, d))}); put EncodeLatentd "
                           "before it in the transform chain.")  # fmt: skip
        z0 = self._scaled(d[key], self.scale)
        self.randomize(z0.shape)
        timesteps = torch.tensor([self.timestep])
        noisy, target = self.drift.add_noise(self.scheduler, z0[None], self.noise[None], timesteps)
        d[self.noisy_key], d[self.target_key], d[self.timesteps_key] = noisy[0], target[0], timesteps[0]
        for other in self.also_scale:
            d[other] = self._scaled(d[other], self.clean_scale)
        return d


class EncodeLatentd(MapTransform):
    """
    Dictionary transform: the frozen stage-1 encoder's latent (posterior mean, *unscaled*) of each of `keys`, stored
    under the matching entry of `output_keys` (one name, or one per key). Deterministic, so a CacheDataset encodes
    each training image once instead of every epoch; `DriftNoised` multiplies it by the model's latent scale factor.
    """

    def __init__(
        self, keys: KeysCollection, autoencoder: torch.nn.Module, output_keys: KeysCollection = "latent"
    ) -> None:
        super().__init__(keys)
        self.autoencoder = autoencoder
        self.output_keys = [output_keys] if isinstance(output_keys, str) else list(output_keys)
        if len(self.output_keys) != len(self.keys):
            raise ValueError(f"EncodeLatentd: {len(self.keys)} keys but {len(self.output_keys)} output_keys.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.autoencoder.eval()
        device = next(self.autoencoder.parameters()).device
        for key, output_key in zip(self.keys, self.output_keys):
            image = torch.as_tensor(d[key]).float()[None].to(device)
            with torch.no_grad():
                d[output_key] = self.autoencoder.encode(image)[0][0].cpu()
        return d
