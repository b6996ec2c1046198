"""render(U, covariates) for every anatomy, acquisition profiles, and the oracle: the exact counterfactual of a
subject.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.cohort.brain_phantom import render_brain
from scripts.cohort.causal_model import ANATOMIES, BINARY_FINDINGS, BrainExogenous, ChestExogenous, check_modality
from scripts.cohort.chest_phantom import render_chest

# ----------------------------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------------------------


def render(
    modality: str,
    u: BrainExogenous | ChestExogenous,
    covariates: Mapping[str, Any],
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    profile: str = "standard",
    anatomy: str = "phantom",
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``modality`` from exogenous factors and covariates; ``shape``/``spacing`` ``None`` = defaults;
    ``profile`` the acquisition profile (``PROFILES``), the domain of the images; ``anatomy`` (brain only) the
    cartoon ``"phantom"`` or the real-anatomy ``"mni152"`` (``u`` then comes from ``sample_mni152_exogenous``)."""
    modality = check_modality(modality)
    check_profile(modality, profile)
    if check_anatomy(modality, anatomy) == "mni152":
        from scripts.cohort.mni152 import render_mni152

        image, label = render_mni152(u, covariates, shape=shape, spacing=spacing)  # type: ignore[arg-type]
    elif modality == "brain":
        image, label = render_brain(u, covariates, shape=shape, spacing=spacing)  # type: ignore[arg-type]
    else:
        if spacing is not None:
            raise ValueError("spacing applies to brain volumes only; the chest field of view is fixed, choose shape.")
        image, label = render_chest(u, covariates, shape=shape)  # type: ignore[arg-type]
    return apply_profile(modality, image, label, profile), label


# Acquisition profiles: the same anatomy seen by another scanner / protocol, for domain-shift experiments (the
# ablation pretrains on one profile and fine-tunes on "standard"). Applied after rendering, so they are
# deterministic and keep the label map.
PROFILES: dict[str, tuple[str, ...]] = {"brain": ("standard", "t2"), "chest": ("standard", "portable")}


def check_anatomy(modality: str, anatomy: str) -> str:
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {list(ANATOMIES)}, got {anatomy!r}.")
    if anatomy != "phantom" and modality != "brain":
        raise ValueError(f"anatomy {anatomy!r} is a brain anatomy; leave anatomy 'phantom' for {modality}.")
    return anatomy


def check_profile(modality: str, profile: str) -> str:
    if profile not in PROFILES[modality]:
        raise ValueError(f"profile must be one of {list(PROFILES[modality])} for {modality}, got {profile!r}.")
    return profile


def apply_profile(modality: str, image: np.ndarray, label: np.ndarray, profile: str = "standard") -> np.ndarray:
    """The image as acquired with ``profile``.

    - brain "t2": T2-weighted-like contrast inside the head (CSF bright, white matter dark): ``1.05 - I`` where the
      label is not background, background unchanged;
    - chest "portable": a bedside-film look: lower resolution (Gaussian blur of 1 px per 128 px of image size) and
      a flatter, brighter film response ``0.15 + 0.7 * I ** 1.7``.
    """
    check_profile(modality, profile)
    if profile == "standard":
        return image
    if profile == "t2":
        return np.where(label > 0, np.clip(1.05 - image, 0.0, 1.0), image).astype(np.float32)
    blurred = ndimage.gaussian_filter(image.astype(np.float32), sigma=max(image.shape) / 128.0)
    return (0.15 + 0.7 * np.clip(blurred, 0.0, 1.0) ** 1.7).astype(np.float32)


def counterfactual(
    modality: str,
    u: BrainExogenous | ChestExogenous,
    covariates: Mapping[str, Any],
    changes: Mapping[str, Any],
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    profile: str = "standard",
    anatomy: str = "phantom",
) -> tuple[np.ndarray, np.ndarray]:
    """The exact counterfactual: the same subject (same U) rendered with ``covariates`` updated by ``changes``.

    Example: ``counterfactual("brain", u, {"age": 70, "sex": "F", "diagnosis": "CN"}, {"age": 80})``.
    """
    modality = check_modality(modality)
    if not isinstance(changes, Mapping):
        raise ValueError(f"changes must be a dict of covariate -> new value, got {type(changes).__name__}.")
    allowed = ("age", "sex", "diagnosis") if modality == "brain" else ("age", "sex", *BINARY_FINDINGS)
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"changes has unknown {modality} covariates {unknown}; allowed: {list(allowed)}.")
    target = {**covariates, **changes}
    return render(modality, u, target, shape=shape, spacing=spacing, profile=profile, anatomy=anatomy)
