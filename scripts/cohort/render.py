"""render(U, covariates) for every anatomy, acquisition profiles, and the oracle: the exact counterfactual of a
subject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.cohort.brain_phantom import render_brain
from scripts.cohort.causal_model import (
    ANATOMIES,
    BINARY_FINDINGS,
    BrainExogenous,
    ChestExogenous,
    check_modality,
    sample_exogenous,
)
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
PROFILES: dict[str, tuple[str, ...]] = {"brain": ("standard", "t2", "lowfield"), "chest": ("standard", "portable")}


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
    - brain "lowfield": the same T1 contrast from a low-field scanner: lower resolution (Gaussian blur of 1 voxel
      per 96 voxels of the longest side) and a flatter grey-white contrast ``I ** 0.5`` inside the head; a milder
      shift than "t2", which an autoencoder trained on one profile can still reconstruct in the other;
    - chest "portable": a bedside-film look: lower resolution (Gaussian blur of 1 px per 128 px of image size) and
      a flatter, brighter film response ``0.15 + 0.7 * I ** 1.7``.
    """
    check_profile(modality, profile)
    if profile == "standard":
        return image
    if profile == "t2":
        return np.where(label > 0, np.clip(1.05 - image, 0.0, 1.0), image).astype(np.float32)
    if profile == "lowfield":
        blurred = np.clip(ndimage.gaussian_filter(image.astype(np.float32), sigma=max(image.shape) / 96.0), 0.0, 1.0)
        return np.where(label > 0, blurred**0.5, blurred).astype(np.float32)
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


def prior_draw(modality: str, anatomy: str, rng: np.random.Generator) -> BrainExogenous | ChestExogenous | Any:
    """One draw of exogenous factors from the prior of ``modality`` / ``anatomy``."""
    if check_anatomy(modality, anatomy) == "mni152":
        from scripts.cohort.mni152 import sample_mni152_exogenous

        return sample_mni152_exogenous(rng)
    return sample_exogenous(modality, rng)


_UNOBSERVED: dict[tuple, tuple[str, ...]] = {}


def unobserved_factors(modality: str, u: Any, covariates: Mapping[str, Any], seed: int = 0, **grid: Any) -> list[str]:
    """
    The exogenous factors this scan does not show: redrawn from the prior (twice, each time to another value, from
    ``seed``), the rendered scan stays identical to the voxel; cached per scan. Example: a film without an effusion
    does not show the side or the height an effusion would take (``effusion_side``, ``effusion_height``), so no
    model can read them from it.
    """
    key = (modality, repr(u), repr(sorted(covariates.items())), repr(sorted(grid.items())))
    if key in _UNOBSERVED:  # a property of the scan; evaluations ask it once per intervention
        return list(_UNOBSERVED[key])
    scan, rng, hidden = render(modality, u, covariates, **grid)[0], np.random.default_rng(seed), []
    for field in dataclasses.fields(u):
        current, unchanged = getattr(u, field.name), True
        for _ in range(2):
            values = (getattr(prior_draw(modality, grid.get("anatomy", "phantom"), rng), field.name) for _ in range(8))
            other = next((v for v in values if v != current), None)
            if other is None or not np.array_equal(render(modality, dataclasses.replace(u, **{field.name: other}),
                                                          covariates, **grid)[0], scan):  # fmt: skip
                unchanged = False
                break
        if unchanged:
            hidden.append(field.name)
    _UNOBSERVED[key] = tuple(hidden)
    return hidden


def identifiable_counterfactual(
    modality: str,
    u: Any,
    covariates: Mapping[str, Any],
    changes: Mapping[str, Any],
    draws: int = 32,
    seed: int = 0,
    **grid: Any,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """
    The best counterfactual any model can infer from the scan alone, and the factors it could not know: per voxel,
    the median (the value closest in absolute error on average) of the exact counterfactuals over ``draws`` redraws
    of the factors the scan does not show (`unobserved_factors`), with the per-voxel most frequent label. Where the
    scan shows every factor the counterfactual needs, this is the exact counterfactual. Example: adding an effusion
    to a film without one, the side and height of the fluid are unknown; the median puts fluid where most draws do.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}.")
    hidden, rng = unobserved_factors(modality, u, covariates, **grid), np.random.default_rng(seed)
    if not hidden:
        image, label = counterfactual(modality, u, covariates, changes, **grid)
        return image, label, hidden
    images, labels = [], []
    for _ in range(draws):
        prior = prior_draw(modality, grid.get("anatomy", "phantom"), rng)
        drawn = dataclasses.replace(u, **{name: getattr(prior, name) for name in hidden})
        image, label = counterfactual(modality, drawn, covariates, changes, **grid)
        images.append(image)
        labels.append(label)
    stacked = np.stack(labels)
    ids = np.unique(stacked)
    counts = np.stack([(stacked == i).sum(0) for i in ids])
    return np.median(np.stack(images), 0).astype(images[0].dtype), ids[counts.argmax(0)].astype(labels[0].dtype), hidden
