"""MONAI transforms of the bundle: covariate encoding, condition dropout, the drifted forward noising, input views."""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.schedulers.scheduler import Scheduler
from monai.transforms import MapTransform, RandomizableTransform, Transform

from scripts.drift import LatentDrift

COVARIATE_TYPES = ("continuous", "binary", "categorical")


class CovariateError(ValueError):
    """A covariate record or schema that cannot be encoded; the message names the field."""


class CovariateEncoder:
    """
    Turns a record of patient covariates into the normalised conditioning vector of the diffusion model.

    The schema is declared once in config, one entry per covariate, in vector order::

        {"age": {"type": "continuous", "range": [40, 100]},
         "sex": {"type": "binary", "categories": ["F", "M"]},
         "diagnosis": {"type": "categorical", "categories": ["CN", "MCI", "AD"]}}

    Encoding: continuous -> (value - low) / (high - low), one entry; binary -> 0 for the first category, 1 for the
    second (0/1 and booleans are accepted too), one entry; categorical -> one-hot, one entry per category. A last
    entry flags the reserved null condition (all zeros, flag 1) used for classifier-free guidance. A covariate with
    a "default" may be missing from a record; any other missing, unknown or out-of-range value is an error.
    """

    def __init__(self, schema: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(schema, Mapping) or not schema:
            raise CovariateError("covariate_schema must be a non-empty mapping of covariate name -> definition.")
        self.schema = {str(name): dict(spec) for name, spec in schema.items()}
        for name, spec in self.schema.items():
            _check_spec(name, spec)
        self.size = sum(_width(spec) for spec in self.schema.values()) + 1

    def encode(self, record: Mapping[str, Any], source: str = "record") -> torch.Tensor:
        """The conditioning vector (size,) of `record`; errors name `source` and the field."""
        values: list[float] = []
        for name, spec in self.schema.items():
            value = record.get(name)
            value = spec.get("default") if value is None else value
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise CovariateError(f"{source}: covariate '{name}' is missing; add it ({_expected(spec)}).")
            values.extend(_encode_value(name, spec, value, source))
        return torch.tensor(values + [0.0], dtype=torch.float32)

    def null(self) -> torch.Tensor:
        """The reserved null condition: zeros with the null flag set."""
        vector = torch.zeros(self.size, dtype=torch.float32)
        vector[-1] = 1.0
        return vector

    def check_records(self, records: Sequence[Mapping[str, Any]], source: str = "datalist") -> list:
        """Encode every record once, so a bad covariate stops the run before any compute. Returns `records`."""
        for index, record in enumerate(records):
            where = f"{source}, record {index}" + (f" ({record['image']})" if "image" in record else "")
            self.encode(record, source=where)
        return list(records)

    def describe(self) -> dict[str, Any]:
        """How each covariate is encoded, for metadata.json and the docs."""
        layout, start = {}, 0
        for name, spec in self.schema.items():
            width = _width(spec)
            layout[name] = {**spec, "slice": [start, start + width]}
            start += width
        layout["null_flag"] = {"slice": [start, start + 1]}
        return {"size": self.size, "layout": layout}


def _width(spec: Mapping[str, Any]) -> int:
    return len(spec["categories"]) if spec["type"] == "categorical" else 1


def _expected(spec: Mapping[str, Any]) -> str:
    if spec["type"] == "continuous":
        return f"a number in {list(spec['range'])}"
    return f"one of {list(spec.get('categories', [0, 1]))}"


def _check_spec(name: str, spec: dict[str, Any]) -> None:
    kind = spec.get("type")
    if kind not in COVARIATE_TYPES:
        raise CovariateError(f"covariate_schema['{name}']: 'type' must be one of {COVARIATE_TYPES}, got {kind!r}.")
    if kind == "continuous":
        low_high = spec.get("range")
        try:
            low, high = (float(bound) for bound in low_high)
            valid = low < high and not isinstance(low_high, str)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise CovariateError(f"covariate_schema['{name}']: continuous needs 'range': [low, high] with low < high.")
    else:
        categories = spec.setdefault("categories", [0, 1]) if kind == "binary" else spec.get("categories")
        needed = 2 if kind == "binary" else None
        if not isinstance(categories, list) or len(set(map(str, categories))) != len(categories) or len(categories) < 2:
            raise CovariateError(f"covariate_schema['{name}']: {kind} needs a list of distinct 'categories'.")
        if needed and len(categories) != needed:
            raise CovariateError(f"covariate_schema['{name}']: binary needs exactly 2 categories, got {categories}.")


def _encode_value(name: str, spec: Mapping[str, Any], value: Any, source: str) -> list[float]:
    kind = spec["type"]
    if kind == "continuous":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CovariateError(f"{source}: covariate '{name}' must be a number, got {value!r}.") from None
        low, high = float(spec["range"][0]), float(spec["range"][1])
        if not low <= number <= high:
            raise CovariateError(
                f"{source}: covariate '{name}' = {number:g} is outside its range [{low:g}, {high:g}] in "
                "covariate_schema; fix the value or widen the range (and retrain)."
            )
        return [(number - low) / (high - low)]
    categories = [str(c) for c in spec["categories"]]
    integral = isinstance(value, (bool, np.bool_)) or (isinstance(value, float) and value.is_integer())
    text = str(int(value)) if integral else str(value)
    if kind == "binary" and text not in categories and text in ("0", "1"):
        return [float(text)]
    if text not in categories:
        raise CovariateError(f"{source}: covariate '{name}' = {value!r} is unknown; expected {_expected(spec)}.")
    if kind == "binary":
        return [float(categories.index(text))]
    return [1.0 if category == text else 0.0 for category in categories]


class EncodeCovariatesd(Transform):
    """
    Dictionary transform: encodes the covariates of a datalist record into `output_key`, shape (1, size), ready to
    be collated into the (B, 1, size) cross-attention context.
    """

    def __init__(self, encoder: CovariateEncoder, output_key: str = "condition", prefix: str = "") -> None:
        self.encoder, self.output_key, self.prefix = encoder, output_key, prefix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        record = {name: d.get(self.prefix + name) for name in self.encoder.schema if self.prefix + name in d}
        source = _source_name(d)
        d[self.output_key] = self.encoder.encode(record, source=source).unsqueeze(0)
        return d


def _source_name(data: Mapping[Hashable, Any]) -> str:
    image = data.get("image")
    meta = getattr(image, "meta", None)
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    return str(image) if isinstance(image, str) else "record"


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
    `target_key` and t (a 0-d int64 tensor) to `timesteps_key`; a collated batch holds them ready for the
    prepare-batch. `also_scale` names other cached latents to multiply by the same scale and leave clean (the
    source latent of paired training).

    Args:
        keys: the one clean latent to noise.
        scheduler: the training noise scheduler (its T, ᾱ_t and prediction type).
        drift: the `LatentDrift` holding δ.
        scale: the model's latent scale factor: a number, or a tensor read at every call (the model's
            `scale_factor` buffer, measured after the latents are cached).
        also_scale: keys of further latents to scale, not noise.
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
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"DriftNoised noises one latent per sample; got keys {list(self.keys)}.")
        self.scheduler, self.drift, self.scale = scheduler, drift, scale
        self.noisy_key, self.target_key, self.timesteps_key = noisy_key, target_key, timesteps_key
        self.also_scale = [also_scale] if isinstance(also_scale, str) else list(also_scale)
        self.timestep, self.noise = 0, None

    def randomize(self, shape: Sequence[int]) -> None:
        self.timestep = int(self.R.randint(0, self.scheduler.num_train_timesteps))
        self.noise = torch.from_numpy(self.R.standard_normal(tuple(shape)).astype(np.float32))

    def _scaled(self, value: Any) -> torch.Tensor:
        latent = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        return latent.float() * float(self.scale)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        key = self.keys[0]
        if key not in d:
            raise KeyError(f"DriftNoised: the sample has no '{key}' (keys: {sorted(map(str, d))}); put EncodeLatentd "
                           "before it in the transform chain.")  # fmt: skip
        z0 = self._scaled(d[key])
        self.randomize(z0.shape)
        timesteps = torch.tensor([self.timestep])
        noisy, target = self.drift.add_noise(self.scheduler, z0[None], self.noise[None], timesteps)
        d[self.noisy_key], d[self.target_key], d[self.timesteps_key] = noisy[0], target[0], timesteps[0]
        for other in self.also_scale:
            d[other] = self._scaled(d[other])
        return d


class CheckFieldOfViewd(MapTransform):
    """
    Dictionary transform, placed just before the crop to the network's grid: measures how much of the image's
    foreground (intensities above `foreground` on the [0, 1] scale) the centred crop to `spatial_size` leaves out.
    Above `tolerance` it logs a warning naming the share and what to do, and writes it to `warnings_key` (always
    set, "" without a warning, so records batch together; the counterfactual's record lists it). The output keeps
    the input outside the model's view.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        pixdim: Sequence[float] | None = None,
        foreground: float = 0.1,
        tolerance: float = 0.01,
        warnings_key: str = "warnings",
    ) -> None:
        super().__init__(keys)
        self.warnings_key = warnings_key
        self.spatial_size, self.pixdim = [int(s) for s in spatial_size], pixdim
        self.foreground, self.tolerance = foreground, tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        d[self.warnings_key] = ""
        for key in self.key_iterator(d):
            image = d[key]
            inside = torch.as_tensor(image[0]) > self.foreground
            total = int(inside.sum())
            window = tuple(
                slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + s) for n, s in zip(inside.shape, self.spatial_size)
            )
            outside = total - int(inside[window].sum())
            if total and outside / total > self.tolerance:
                spacing = f" at {list(self.pixdim)} mm" if self.pixdim is not None else ""
                extent = [round(n * float(p)) for n, p in zip(inside.shape, self.pixdim)] if self.pixdim else None
                warning = (
                    f"{_source_name(d)}: {100 * outside / total:.0f}% of the scan's foreground lies outside the "
                    f"model's field of view ({self.spatial_size} voxels{spacing}"
                    + (f"; the scan spans {extent} mm" if extent else "")
                    + ") and is left unchanged; crop the scan to the anatomy, or use a coarser pixdim, to cover it."
                )
                logging.getLogger(__name__).warning(warning)
                d[self.warnings_key] = warning
        return d


class ToGrayscaled(MapTransform):
    """
    Dictionary transform: a radiograph as one 2D channel. RGB(A) becomes the mean of R, G, B; a single-frame 3D array
    (how DICOM radiographs load) loses its trailing frame axis. (MONOCHROME1 DICOM, white = air, is already inverted
    by MONAI's default ITK reader; tests/test_engines.py checks that.)
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.ndim == 4 and image.shape[-1] == 1:
                image = image[..., 0]
            if image.shape[0] in (3, 4):
                image = image[:3].mean(0, keepdim=True)
            elif image.shape[0] != 1:
                raise ValueError(
                    f"{_source_name(d)}: expected a grayscale or RGB image, got {image.shape[0]} channels."
                )
            d[key] = image
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
