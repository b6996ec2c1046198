"""Synthetic brain MRI / chest X-ray cohorts with a known causal model and an oracle for exact counterfactuals.

Every synthetic image is ``render(U, covariates)``: a deterministic function of per-subject exogenous factors ``U``
(anatomy size and shape jitter, cortical folding, tissue contrast, bias field, noise seed, ...) and of the
covariates a counterfactual question changes (age, sex, diagnosis; cardiomegaly, effusion). Holding ``U`` fixed
and changing covariates gives the *exact* counterfactual (Pearl's abduction -> action -> prediction with the
abduction known), so counterfactual, volume and longitudinal errors of a generative model can be measured against
the truth (docs/evaluation.md).

Brain (3D, T1-weighted-like, RAS voxel grid, millimetre anatomy). Causal mechanisms, compounded per year from
``REFERENCE_AGE`` (60 years) and applied to the subject's own anatomy:

============================  ==========  ==========  ==========  ============================================
mechanism                     CN          MCI         AD          constant
============================  ==========  ==========  ==========  ============================================
lateral ventricle volume      +2.0 %/yr   +3.0 %/yr   +4.5 %/yr   ``VENTRICLE_GROWTH_PER_YEAR``
hippocampal volume            -1.0 %/yr   -2.0 %/yr   -3.5 %/yr   ``HIPPOCAMPUS_SHRINK_PER_YEAR``
cortical thickness            -0.4 %/yr   -0.7 %/yr   -1.2 %/yr   ``CORTEX_THINNING_PER_YEAR``
sulcal / subarachnoid CSF     +0.02 mm/yr +0.03 mm/yr +0.05 mm/yr ``SULCAL_WIDENING_MM_PER_YEAR``
GM/WM intensity contrast      -0.8 %/yr (all)                     ``GM_WM_CONTRAST_DECAY_PER_YEAR``
head, brain and all anatomy   x1.035 linear size for "M" (about +11 % volume)  ``SEX_LINEAR_SCALE``
============================  ==========  ==========  ==========  ============================================

A volume ``V`` at age ``a`` is ``V(a) = V(60) * (1 + r) ** (a - 60)``; the rendered shapes are scaled by the cube
root of that factor about their own centre, so the law holds exactly up to voxelisation. The skull and intracranial
volume do not change with age; the brain (grey + white matter + hippocampus) shrinks because ventricles and sulci
grow and the cortex thins. Labels are ``BRAIN_LABELS``.
This brain is a procedural cartoon (``anatomy="phantom"``); ``anatomy="mni152"`` renders the same causal model,
labels and files on real anatomy: the MNI152 template shipped in nilearn under per-subject random deformations
(``scripts/cohort/mni152.py``, docs/cohort_mni152.md).

Chest (2D, postero-anterior radiograph, standard display: air black, bone and soft tissue bright, patient's right
on the image left). The image is an analytic projection: attenuation line integrals of ellipsoidal body, lungs,
heart, mediastinum, spine, ribs and clavicles, then ``1 - exp(-attenuation)``. Mechanisms:

- cardiomegaly: the heart's horizontal extent is ``ctr_baseline`` (per subject, 0.42-0.48) times the inner thoracic
  width, multiplied by ``CARDIOMEGALY_WIDTH_FACTOR`` (1.28) when present, so the cardiothoracic ratio exceeds 0.5;
- effusion: fluid replaces air in the costophrenic angle of the side(s) in ``U.effusion_side`` up to a level
  ``U.effusion_height`` above the angle, with a meniscus rising towards the lateral chest wall;
- opacity (optional covariate, default 0): a patchy consolidation at ``U.opacity_center``;
- sex: "M" thorax is ``CHEST_SEX_LINEAR_SCALE`` (1.07) times larger; "F" adds breast soft-tissue shadows;
- age: bone attenuation falls ``BONE_DENSITY_LOSS_PER_YEAR`` (0.5 %/yr) after 40 years.

Labels are ``CHEST_LABELS``. ``measure_brain`` / ``measure_chest`` read the causal quantities back from label maps,
``counterfactual`` is the oracle, ``generate_cohort`` writes a MONAI datalist cohort and
``write_counterfactual_truth`` writes the true counterfactual of any subject in such a cohort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

MODALITIES = ("brain", "chest")
# Brain anatomy: the procedural cartoon below, or the MNI152 template under random deformations
# (scripts/cohort/mni152.py, needs nilearn). Both share the causal model, labels, files and oracle.
ANATOMIES = ("phantom", "mni152")

# ----------------------------------------------------------------------------------------------------------------
# Brain causal model
# ----------------------------------------------------------------------------------------------------------------

BRAIN_LABELS: dict[str, int] = {
    "background": 0,
    "ventricles": 1,  # lateral ventricles (the volume that grows with age)
    "gray_matter": 2,  # cortex, deep grey nuclei, cerebellar cortex
    "white_matter": 3,  # cerebral and cerebellar white matter, brainstem
    "hippocampus": 4,
    "csf": 5,  # other CSF: sulci, subarachnoid space, third ventricle
    "extracranial": 6,  # skull, scalp, neck
}
DIAGNOSES = ("CN", "MCI", "AD")
SEXES = ("F", "M")
REFERENCE_AGE = 60.0
VENTRICLE_GROWTH_PER_YEAR: dict[str, float] = {"CN": 0.020, "MCI": 0.030, "AD": 0.045}
HIPPOCAMPUS_SHRINK_PER_YEAR: dict[str, float] = {"CN": 0.010, "MCI": 0.020, "AD": 0.035}
CORTEX_THINNING_PER_YEAR: dict[str, float] = {"CN": 0.004, "MCI": 0.007, "AD": 0.012}
SULCAL_WIDENING_MM_PER_YEAR: dict[str, float] = {"CN": 0.02, "MCI": 0.03, "AD": 0.05}
GM_WM_CONTRAST_DECAY_PER_YEAR = 0.008
SEX_LINEAR_SCALE: dict[str, float] = {"F": 1.0, "M": 1.035}
BRAIN_AGE_RANGE = (18.0, 110.0)
DEFAULT_BRAIN_SHAPE = (64, 64, 64)
DEFAULT_BRAIN_SPACING = 3.0

# ----------------------------------------------------------------------------------------------------------------
# Chest causal model
# ----------------------------------------------------------------------------------------------------------------

CHEST_LABELS: dict[str, int] = {
    "background": 0,
    "right_lung": 1,  # patient's right, image left
    "left_lung": 2,
    "heart": 3,
    "effusion": 4,  # pleural fluid replacing aerated lung
    "opacity": 5,  # consolidation inside a lung
    "bone": 6,  # spine, ribs, clavicles where they do not overlie the labels above
    "soft_tissue": 7,  # chest wall, mediastinum, abdomen, neck
}
BINARY_FINDINGS = ("cardiomegaly", "effusion", "opacity")
CARDIOMEGALY_WIDTH_FACTOR = 1.28
CHEST_SEX_LINEAR_SCALE: dict[str, float] = {"F": 1.0, "M": 1.07}
BONE_DENSITY_LOSS_PER_YEAR = 0.005
CHEST_AGE_RANGE = (0.0, 110.0)
CHEST_FIELD_OF_VIEW_MM = 400.0
DEFAULT_CHEST_SHAPE = (128, 128)


# ----------------------------------------------------------------------------------------------------------------
# Exogenous factors
# ----------------------------------------------------------------------------------------------------------------


class Serialisable:
    """Round trip of a frozen dataclass of floats/ints/strings/tuples through JSON."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"{cls.__name__} is missing fields {missing}; re-generate the cohort's exogenous JSON.")
        return cls(**{n: tuple(values[n]) if isinstance(values[n], list) else values[n] for n in names})


@dataclass(frozen=True)
class BrainExogenous(Serialisable):
    """Per-subject exogenous factors U of a brain: everything about the image that no covariate causes."""

    size_scale: float  # global linear size on top of the sex effect
    axis_scale: tuple[float, float, float]  # head shape: relative L-R, A-P, I-S stretch
    pose: tuple[float, float]  # pitch (about L-R) and yaw (about I-S) in degrees
    ventricle_scale: float  # lateral ventricle volume factor at the reference age
    ventricle_asymmetry: float  # relative size difference of left vs right ventricle
    hippocampus_scale: float  # hippocampal volume factor at the reference age
    folding_seed: int  # random directions and phases of the gyral pattern
    folding_wavelength: float  # mm, gyral period
    sulcal_depth: float  # mm
    cortical_thickness: float  # mm at the reference age (thicker than real so the ribbon survives 3 mm voxels)
    contrast: tuple[float, float, float, float]  # multiplicative jitter of WM, GM, CSF, scalp intensities
    bias_field: tuple[float, ...]  # 9 coefficients: x, y, z, x^2, y^2, z^2, xy, xz, yz of the log bias field
    noise_sigma: float  # Rician noise standard deviation (image range ~[0, 1])
    noise_seed: int


@dataclass(frozen=True)
class ChestExogenous(Serialisable):
    """Per-subject exogenous factors U of a chest radiograph."""

    size_scale: float
    aspect: float  # thoracic height / width jitter
    ctr_baseline: float  # cardiothoracic ratio without cardiomegaly
    heart_angle: float  # degrees, tilt of the cardiac long axis
    heart_shift: float  # mm, horizontal shift of the heart towards the patient's left
    diaphragm_level: float  # mm, vertical offset of both domes
    right_dome_raise: float  # mm the right dome sits above the left
    rib_offset: float  # mm, vertical phase of the rib cage
    rib_spacing: float  # mm between posterior ribs
    effusion_side: str  # "right", "left" or "both": where an effusion collects if present
    effusion_height: float  # mm of fluid above the costophrenic angle at the lateral wall
    opacity_center: tuple[float, float]  # fractional (x, y) position inside the right/left lung field
    opacity_radius: float  # mm
    vessel_seed: int
    exposure: float  # attenuation gain (film darkness)
    gamma: float
    noise_sigma: float
    noise_seed: int


def sample_brain_exogenous(rng: np.random.Generator | int) -> BrainExogenous:
    """Draw brain exogenous factors from a generator or an integer seed."""
    rng = np.random.default_rng(rng)
    return BrainExogenous(
        size_scale=float(np.clip(rng.normal(1.0, 0.025), 0.94, 1.06)),
        axis_scale=tuple(float(v) for v in np.clip(rng.normal(1.0, 0.02, 3), 0.95, 1.05)),
        pose=(float(rng.uniform(-4.0, 4.0)), float(rng.uniform(-3.0, 3.0))),
        ventricle_scale=float(np.clip(rng.lognormal(0.0, 0.15), 0.7, 1.4)),
        ventricle_asymmetry=float(rng.uniform(-0.06, 0.06)),
        hippocampus_scale=float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15)),
        folding_seed=int(rng.integers(0, 2**31 - 1)),
        folding_wavelength=float(rng.uniform(19.0, 23.0)),
        sulcal_depth=float(rng.uniform(14.0, 18.0)),
        cortical_thickness=float(rng.uniform(4.2, 4.8)),
        contrast=tuple(float(v) for v in np.clip(rng.normal(1.0, 0.03, 4), 0.92, 1.08)),
        bias_field=tuple(float(v) for v in rng.normal(0.0, 1.0, 9) * np.array([0.06] * 3 + [0.05] * 3 + [0.03] * 3)),
        noise_sigma=float(rng.uniform(0.012, 0.025)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_chest_exogenous(rng: np.random.Generator | int) -> ChestExogenous:
    """Draw chest exogenous factors from a generator or an integer seed."""
    rng = np.random.default_rng(rng)
    return ChestExogenous(
        size_scale=float(np.clip(rng.normal(1.0, 0.03), 0.92, 1.08)),
        aspect=float(rng.uniform(0.95, 1.05)),
        ctr_baseline=float(rng.uniform(0.42, 0.48)),
        heart_angle=float(rng.uniform(-6.0, 6.0)),
        heart_shift=float(rng.uniform(-4.0, 4.0)),
        diaphragm_level=float(rng.uniform(-8.0, 8.0)),
        right_dome_raise=float(rng.uniform(8.0, 18.0)),
        rib_offset=float(rng.uniform(-6.0, 6.0)),
        rib_spacing=float(rng.uniform(22.0, 25.0)),
        effusion_side=str(rng.choice(["right", "left", "both"], p=[0.4, 0.3, 0.3])),
        effusion_height=float(rng.uniform(50.0, 95.0)),
        opacity_center=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.2, 0.6))),
        opacity_radius=float(rng.uniform(18.0, 30.0)),
        vessel_seed=int(rng.integers(0, 2**31 - 1)),
        exposure=float(rng.uniform(0.9, 1.1)),
        gamma=float(rng.uniform(0.9, 1.1)),
        noise_sigma=float(rng.uniform(0.008, 0.016)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_exogenous(modality: str, rng: np.random.Generator | int) -> BrainExogenous | ChestExogenous:
    """Draw exogenous factors of ``modality`` ("brain" or "chest")."""
    modality = check_modality(modality)
    return sample_brain_exogenous(rng) if modality == "brain" else sample_chest_exogenous(rng)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    return modality


def check_shape(shape: Sequence[int] | None, ndim: int, default: tuple[int, ...], minimum: int = 16) -> tuple:
    if shape is None:
        return default
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of {ndim} integers, got {shape!r}.") from None
    if len(shape) != ndim or any(s < minimum for s in shape):
        raise ValueError(f"shape must be {ndim} integers each >= {minimum}, got {shape!r}.")
    return shape


def check_spacing(spacing: float | None) -> float:
    if spacing is None:
        return DEFAULT_BRAIN_SPACING
    spacing = float(spacing)
    if not math.isfinite(spacing) or not 0.25 <= spacing <= 12.0:
        raise ValueError(f"spacing must be a voxel size in mm within [0.25, 12], got {spacing!r}.")
    return spacing


def _check_age(covariates: Mapping[str, Any], age_range: tuple[float, float]) -> float:
    if "age" not in covariates:
        raise ValueError("covariates['age'] is required (years).")
    try:
        age = float(covariates["age"])
    except (TypeError, ValueError):
        raise ValueError(f"covariates['age'] must be a number of years, got {covariates['age']!r}.") from None
    if not math.isfinite(age) or not age_range[0] <= age <= age_range[1]:
        raise ValueError(f"covariates['age'] must be within {list(age_range)} years, got {covariates['age']!r}.")
    return age


def _check_choice(covariates: Mapping[str, Any], name: str, choices: Sequence[Any]) -> Any:
    if name not in covariates:
        raise ValueError(f"covariates[{name!r}] is required, one of {list(choices)}.")
    value = covariates[name]
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value not in choices:
        raise ValueError(f"covariates[{name!r}] must be one of {list(choices)}, got {covariates[name]!r}.")
    return value


def check_brain_covariates(covariates: Mapping[str, Any]) -> dict[str, Any]:
    """Validated brain covariates ``{"age": float, "sex": "F"|"M", "diagnosis": "CN"|"MCI"|"AD"}``."""
    unknown = sorted(set(covariates) - {"age", "sex", "diagnosis"})
    if unknown:
        raise ValueError(f"unknown brain covariates {unknown}; expected age, sex, diagnosis.")
    return {
        "age": _check_age(covariates, BRAIN_AGE_RANGE),
        "sex": _check_choice(covariates, "sex", SEXES),
        "diagnosis": _check_choice(covariates, "diagnosis", DIAGNOSES),
    }


def check_chest_covariates(covariates: Mapping[str, Any]) -> dict[str, Any]:
    """Validated chest covariates: age, sex, cardiomegaly (0/1), effusion (0/1), optional opacity (0/1, default 0)."""
    unknown = sorted(set(covariates) - {"age", "sex", *BINARY_FINDINGS})
    if unknown:
        raise ValueError(f"unknown chest covariates {unknown}; expected age, sex, {', '.join(BINARY_FINDINGS)}.")
    checked = {"age": _check_age(covariates, CHEST_AGE_RANGE), "sex": _check_choice(covariates, "sex", SEXES)}
    for name in BINARY_FINDINGS:
        if name == "opacity" and name not in covariates:
            checked[name] = 0
            continue
        checked[name] = _check_choice(covariates, name, (0, 1))
    return checked


# ----------------------------------------------------------------------------------------------------------------
# Brain
# ----------------------------------------------------------------------------------------------------------------


def brain_growth_factors(covariates: Mapping[str, Any]) -> dict[str, float]:
    """Causal effect sizes of age and diagnosis relative to ``REFERENCE_AGE`` (volume and thickness factors)."""
    cov = check_brain_covariates(covariates)
    years = cov["age"] - REFERENCE_AGE
    dx = cov["diagnosis"]
    return {
        "ventricle_volume": (1.0 + VENTRICLE_GROWTH_PER_YEAR[dx]) ** years,
        "hippocampus_volume": (1.0 - HIPPOCAMPUS_SHRINK_PER_YEAR[dx]) ** years,
        "cortical_thickness": (1.0 - CORTEX_THINNING_PER_YEAR[dx]) ** years,
        "sulcal_widening_mm": max(SULCAL_WIDENING_MM_PER_YEAR[dx] * years, -0.4),
        "gm_wm_contrast": (1.0 - GM_WM_CONTRAST_DECAY_PER_YEAR) ** years,
        "linear_size": SEX_LINEAR_SCALE[cov["sex"]],
    }
