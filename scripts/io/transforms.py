"""Input-side MONAI transforms: field-of-view check, grey-scale conversion, the intensity record, per-image chains."""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.core.covariates import source_name
from scripts.io.writer import scan_name


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
                    f"{source_name(d)}: {100 * outside / total:.0f}% of the scan's foreground lies outside the "
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
                raise ValueError(f"{source_name(d)}: expected a grayscale or RGB image, got {image.shape[0]} channels.")
            d[key] = image
        return d


class RecordIntensityRanged(MapTransform):
    """
    Stores the image's lower and upper intensity percentiles in its metadata ("intensity_range") before
    ScaleIntensityRangePercentilesd maps them to [0, 1], so outputs can be written back in the input's intensities.
    """

    def __init__(self, keys: KeysCollection, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).float().flatten()
            if values.numel() == 0 or not torch.isfinite(values).all():
                raise ValueError(f"{scan_name(d[key])}: the image is empty or holds NaN/Inf voxels.")
            low, high = torch.quantile(
                values[:: max(1, values.numel() // 2_000_000)], torch.tensor([self.lower, self.upper]) / 100
            )
            if not high > low:
                raise ValueError(f"{scan_name(d[key])}: the image is constant; there is nothing to condition on.")
            d[key].meta["intensity_range"] = [float(low), float(high)]
        return d


class PerImaged(MapTransform):
    """
    Dictionary transform: runs a single-image transform chain, written for the key `image_key`, on each of `keys`.

    It lets the paired pipeline reuse the bundle's `preprocessing` (and a modality preset's) for `image_source` and
    `image_target` without a copy. `transform` must be deterministic: datasets cache its output.
    """

    def __init__(self, keys: KeysCollection, transform: Callable[[dict], Mapping], image_key: str = "image") -> None:
        super().__init__(keys)
        self.transform, self.image_key = transform, image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform({self.image_key: d[key]})[self.image_key]
        return d
