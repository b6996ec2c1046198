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
(``scripts/cohort_mni152.py``, docs/cohort_mni152.md).

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

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.files import atomic_write

__all__ = [
    "BRAIN_LABELS",
    "CHEST_LABELS",
    "BrainExogenous",
    "ChestExogenous",
    "sample_brain_exogenous",
    "sample_chest_exogenous",
    "sample_exogenous",
    "render_brain",
    "render_chest",
    "render",
    "measure_brain",
    "measure_chest",
    "counterfactual",
    "generate_cohort",
    "write_counterfactual_truth",
    "load_subject",
]

MODALITIES = ("brain", "chest")
# Brain anatomy: the procedural cartoon below, or the MNI152 template under random deformations
# (scripts/cohort_mni152.py, needs nilearn). Both share the causal model, labels, files and oracle.
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

# T1-weighted intensities at the reference age before contrast jitter, bias field and noise.
_T1 = {"wm": 0.86, "gm": 0.56, "deep_gm": 0.64, "csf": 0.10, "scalp": 0.72, "bone": 0.07, "marrow": 0.42}
_T1.update({"hippocampus": 0.58, "brainstem": 0.78, "neck": 0.38})

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


class _Serialisable:
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
class BrainExogenous(_Serialisable):
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
class ChestExogenous(_Serialisable):
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
    modality = _check_modality(modality)
    return sample_brain_exogenous(rng) if modality == "brain" else sample_chest_exogenous(rng)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    return modality


def _check_shape(shape: Sequence[int] | None, ndim: int, default: tuple[int, ...], minimum: int = 16) -> tuple:
    if shape is None:
        return default
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of {ndim} integers, got {shape!r}.") from None
    if len(shape) != ndim or any(s < minimum for s in shape):
        raise ValueError(f"shape must be {ndim} integers each >= {minimum}, got {shape!r}.")
    return shape


def _check_spacing(spacing: float | None) -> float:
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
# Geometry helpers (signed distances in mm: negative inside)
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _grid(shape: tuple[int, ...], spacing: float) -> tuple[np.ndarray, ...]:
    """Voxel-centre coordinates in mm, origin at the grid centre, float32."""
    axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * spacing).astype(np.float32) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij", sparse=False)
    for g in grids:
        g.flags.writeable = False
    return tuple(grids)


def _ellipsoid_sd(points: Sequence[np.ndarray], center: Sequence[float], semi_axes: Sequence[float]) -> np.ndarray:
    """First-order signed distance to an axis-aligned ellipsoid (exact on the surface, smooth everywhere)."""
    scaled = [(p - c) / a for p, c, a in zip(points, center, semi_axes)]
    norm = np.sqrt(sum(s * s for s in scaled))
    grad = np.sqrt(sum((s / a) ** 2 for s, a in zip(scaled, semi_axes)))
    return (norm - 1.0) * norm / np.maximum(grad, 1e-6)


def _rotate(u: np.ndarray, v: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return c * u - s * v, s * u + c * v


def _coverage(signed_distance: np.ndarray, spacing: float) -> np.ndarray:
    """Partial-volume fraction of a voxel inside a surface (linear ramp one voxel wide); 0.5 on the surface."""
    return np.clip(0.5 - signed_distance / spacing, 0.0, 1.0)


class _Painter:
    """Front-to-back compositing of soft tissue masks into an intensity image and a hard label map."""

    def __init__(self, shape: tuple[int, ...], spacing: float):
        self.image = np.zeros(shape, np.float32)
        self.label = np.zeros(shape, np.uint8)
        self.spacing = spacing

    def paint(self, signed_distance: np.ndarray, intensity: float | np.ndarray, label: int) -> None:
        alpha = _coverage(signed_distance, self.spacing)
        self.image += alpha * (intensity - self.image)
        self.label[signed_distance < 0] = label


def _random_waves(points: Sequence[np.ndarray], seed: int, wavelength: float, count: int) -> np.ndarray:
    """Unit-variance band-limited random field: a sum of plane waves of one wavelength, random directions/phases."""
    rng = np.random.default_rng(seed)
    dims = len(points)
    directions = rng.normal(size=(count, dims))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    phases = rng.uniform(0.0, 2.0 * np.pi, count)
    k = 2.0 * np.pi / wavelength
    field = np.zeros(points[0].shape, np.float32)
    for direction, phase in zip(directions, phases):
        arg = sum(np.float32(k * d) * p for d, p in zip(direction, points))
        field += np.cos(arg + np.float32(phase))
    return field * np.float32(math.sqrt(2.0 / count))


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


def render_brain(
    u: BrainExogenous,
    covariates: Mapping[str, Any],
    shape: Sequence[int] | None = DEFAULT_BRAIN_SHAPE,
    spacing: float | None = DEFAULT_BRAIN_SPACING,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a T1-weighted-like brain MRI volume and its label map; deterministic in (u, covariates, grid).

    Args:
        u: exogenous factors of the subject.
        covariates: ``{"age": years, "sex": "F"|"M", "diagnosis": "CN"|"MCI"|"AD"}``.
        shape: voxel grid (x: left->right, y: posterior->anterior, z: inferior->superior); ``None`` = 64^3.
        spacing: isotropic voxel size in mm; ``None`` = 3 mm. The anatomy is defined in mm, so a grid of
            ``shape * spacing`` about 190 mm wide shows the whole head.

    Returns:
        ``(image, label)``: float32 intensities (about [0, 1], Rician noise) and uint8 ``BRAIN_LABELS``.
    """
    if not isinstance(u, BrainExogenous):
        raise TypeError(f"u must be a BrainExogenous, got {type(u).__name__}.")
    shape = _check_shape(shape, 3, DEFAULT_BRAIN_SHAPE)
    spacing = _check_spacing(spacing)
    cov = check_brain_covariates(covariates)
    effect = brain_growth_factors(cov)

    gx, gy, gz = _grid(shape, spacing)
    # Head pose, then scale the world so that all anatomy below is written for a reference-size head.
    y, z = _rotate(gy, gz, u.pose[0])
    x, y = _rotate(gx, y, u.pose[1])
    scale = effect["linear_size"] * u.size_scale
    sx, sy, sz = (scale * a for a in u.axis_scale)
    x, y, z = x / np.float32(sx), y / np.float32(sy), z / np.float32(sz)
    pts = (x, y, z)
    # Anatomy is built in the scaled frame; distances are converted back to mm for partial-volume ramps.
    mm = float(scale)
    paint = _Painter(shape, spacing / mm)

    contrast = effect["gm_wm_contrast"]
    wm_level = _T1["wm"] * u.contrast[0]
    gm_level = _T1["gm"] * u.contrast[1]
    mid = 0.5 * (wm_level + gm_level)
    wm_level, gm_level = mid + (wm_level - mid) * contrast, mid - (mid - gm_level) * contrast
    deep_gm_level = mid - (mid - _T1["deep_gm"]) * contrast
    csf_level = _T1["csf"] * u.contrast[2]

    # --- head, skull and neck -------------------------------------------------------------------------------
    icv_center, icv_axes = (0.0, -4.0, 8.0), (62.0, 78.0, 60.0)
    head = _ellipsoid_sd(pts, icv_center, [a + 12.0 for a in icv_axes])
    neck = np.maximum(_ellipsoid_sd((x, y), (0.0, -14.0), (42.0, 46.0)), z + 30.0)
    paint.paint(np.minimum(head, neck), _T1["neck"], BRAIN_LABELS["extracranial"])
    paint.paint(np.maximum(head, -(head + 4.0)), _T1["scalp"] * u.contrast[3], BRAIN_LABELS["extracranial"])
    skull = _ellipsoid_sd(pts, icv_center, [a + 7.5 for a in icv_axes])
    paint.paint(skull, _T1["bone"], BRAIN_LABELS["extracranial"])
    diploe = _ellipsoid_sd(pts, icv_center, [a + 5.0 for a in icv_axes])
    paint.paint(np.maximum(diploe, -(diploe + 2.5)), _T1["marrow"], BRAIN_LABELS["extracranial"])
    icv = _ellipsoid_sd(pts, icv_center, icv_axes)
    paint.paint(icv, csf_level, BRAIN_LABELS["csf"])

    # --- cerebrum: distance to the nearest CSF (surface, sulci, fissures) -----------------------------------
    widening = effect["sulcal_widening_mm"]
    depth = -icv - (1.8 + widening)  # depth below the gyral crowns
    folding = _random_waves(pts, u.folding_seed, u.folding_wavelength, 32)
    sulcal_depth = u.sulcal_depth * (1.0 + 0.3 * _random_waves(pts, u.folding_seed + 1, 60.0, 6))
    sulcus_plane = np.abs(folding) * np.float32(u.folding_wavelength / (2.0 * np.pi))
    sulcus = np.sqrt(sulcus_plane**2 + np.maximum(depth - sulcal_depth, 0.0) ** 2) - (0.9 + widening)
    # Interhemispheric fissure: the x=0 plane above the corpus callosum, through to the base at the poles.
    # Interhemispheric fissure: the x=0 plane, except through the central core (corpus callosum, diencephalon).
    core = _ellipsoid_sd((y, z), (-6.0, 6.0), (38.0, 22.0))
    fissure = np.sqrt(x**2 + np.maximum(core, 0.0) ** 2) - (1.0 + 0.5 * widening)
    # Sylvian fissure: a lateral cleft separating the temporal lobe, reaching in to the insula.
    sylvian_z = -6.0 + 0.25 * (y + 10.0)
    sylvian_reach = np.maximum(36.0 - np.abs(x), 0.0) + np.maximum(np.abs(y + 8.0) - 30.0, 0.0)
    sylvian = np.sqrt((z - sylvian_z) ** 2 + sylvian_reach**2) - (1.2 + widening)
    # Tentorium: separates the occipital lobes from the cerebellum.
    tentorium_z = -20.0 + 0.35 * (y + 40.0)
    tentorium = np.where(y < -30.0, z - tentorium_z - 2.0, 1e3)
    to_csf = np.minimum.reduce([depth, sulcus, fissure, sylvian, tentorium])

    cortex_mm = u.cortical_thickness * effect["cortical_thickness"]
    supratentorial = np.where(y < -30.0, -(z - tentorium_z), -1e3)
    paint.paint(np.maximum(-to_csf, supratentorial), gm_level, BRAIN_LABELS["gray_matter"])
    wm_mod = 0.6 * _random_waves(pts, u.folding_seed + 2, 14.0, 8)  # gyral white-matter cores vary in width
    paint.paint(np.maximum(cortex_mm + wm_mod - to_csf, supratentorial), wm_level, BRAIN_LABELS["white_matter"])

    # --- cerebellum and brainstem ---------------------------------------------------------------------------
    cerebellum = np.maximum(_ellipsoid_sd(pts, (0.0, -50.0, -36.0), (54.0, 32.0, 24.0)), icv + 2.5)
    cerebellum = np.maximum(cerebellum, z - tentorium_z + 2.5)
    cb_r = np.sqrt((y + 26.0) ** 2 + (z + 34.0) ** 2 + (0.4 * x) ** 2)  # folia: arcs about the peduncles
    folia = np.cos(2.0 * np.pi * cb_r / 6.5 + 0.6 * np.cos(np.arctan2(z + 34.0, y + 26.0) * 9.0))
    paint.paint(cerebellum, gm_level, BRAIN_LABELS["gray_matter"])
    paint.paint(np.maximum(cerebellum, (0.85 - folia) * 3.0), csf_level, BRAIN_LABELS["csf"])
    arbor = _ellipsoid_sd(pts, (0.0, -40.0, -34.0), (32.0, 16.0, 10.0))
    paint.paint(np.minimum(arbor + 4.0, np.maximum(arbor, (folia + 0.3) * 3.0)), wm_level, BRAIN_LABELS["white_matter"])
    fourth_ventricle = _ellipsoid_sd(pts, (0.0, -33.0, -32.0), (5.0, 4.0, 7.0))
    paint.paint(fourth_ventricle, csf_level, BRAIN_LABELS["csf"])
    stem_y = y - (-18.0 + 0.25 * (np.maximum(z, -45.0) + 5.0))  # midbrain -> pons -> medulla, then the cord
    stem = _ellipsoid_sd((x, stem_y), (0.0, 0.0), (12.0, 11.0))
    paint.paint(np.maximum(stem, z), _T1["brainstem"] * u.contrast[0], BRAIN_LABELS["white_matter"])
    foramen_magnum = z + 45.0  # below it the cord sits in a CSF-filled canal
    paint.paint(np.maximum(stem, foramen_magnum), csf_level, BRAIN_LABELS["csf"])
    cord = _ellipsoid_sd((x, stem_y), (0.0, 0.0), (7.0, 6.5))
    paint.paint(np.maximum(cord, foramen_magnum), _T1["brainstem"] * u.contrast[0], BRAIN_LABELS["white_matter"])

    # --- deep grey nuclei -----------------------------------------------------------------------------------
    vent_linear = (u.ventricle_scale * effect["ventricle_volume"]) ** (1.0 / 3.0)
    for side in (-1.0, 1.0):
        caudate = _ellipsoid_sd(pts, (side * (7.0 + 6.0 * vent_linear), 10.0, 12.0), (5.5, 14.0, 8.0))
        paint.paint(caudate, deep_gm_level, BRAIN_LABELS["gray_matter"])
        putamen = _ellipsoid_sd(pts, (side * 24.0, 2.0, 2.0), (6.0, 15.0, 9.0))
        paint.paint(putamen, deep_gm_level, BRAIN_LABELS["gray_matter"])
        thalamus = _ellipsoid_sd(pts, (side * 9.0, -14.0, 4.0), (8.5, 14.0, 9.0))
        paint.paint(thalamus, deep_gm_level + 0.03, BRAIN_LABELS["gray_matter"])
    third_ventricle = _ellipsoid_sd(pts, (0.0, -8.0, 2.0), (1.0 + 0.5 * vent_linear, 16.0, 9.0))
    paint.paint(third_ventricle, csf_level, BRAIN_LABELS["csf"])

    # --- lateral ventricles: a scaled copy about the ventricular centre, so volume follows the growth law -----
    vent_center = np.array([0.0, -4.0, 14.0])
    for side in (-1.0, 1.0):
        side_linear = vent_linear * (1.0 + side * u.ventricle_asymmetry) ** (1.0 / 3.0)
        lx = (x - vent_center[0]) / side_linear
        ly = (y - vent_center[1]) / side_linear
        lz = (z - vent_center[2]) / side_linear
        parts = []
        # (offset from the ventricular centre, semi-axes, coronal tilt, axial yaw) in degrees: frontal horn,
        # body, atrium, occipital horn, temporal horn.
        for (cx, cy, cz), axes, tilt, yaw in (
            ((5.5, 24.0, 0.0), (4.2, 12.0, 8.0), 35.0, -6.0),
            ((8.0, 4.0, 2.0), (4.8, 16.0, 6.0), 30.0, -4.0),
            ((13.0, -16.0, -2.0), (6.0, 9.0, 8.0), 15.0, -15.0),
            ((16.0, -30.0, -2.0), (3.5, 10.0, 4.0), 0.0, 15.0),
            ((27.0, -12.0, -20.0), (2.8, 10.0, 3.0), 0.0, 15.0),
        ):
            px, pz = _rotate(lx - side * cx, lz - cz, side * tilt)
            px, py = _rotate(px, ly - cy, side * yaw)
            parts.append(_ellipsoid_sd((px, py, pz), (0.0, 0.0, 0.0), axes))
        ventricle = np.minimum.reduce(parts) * side_linear
        ventricle = np.maximum(ventricle, 0.8 - side * x)  # septum pellucidum
        paint.paint(ventricle, csf_level, BRAIN_LABELS["ventricles"])

    # --- hippocampi: medial temporal lobes, under the temporal horns ----------------------------------------
    hippo_linear = (u.hippocampus_scale * effect["hippocampus_volume"]) ** (1.0 / 3.0)
    for side in (-1.0, 1.0):
        center = np.array([side * 25.0, -16.0, -26.0])
        hx, hy = _rotate((x - center[0]) / hippo_linear, (y - center[1]) / hippo_linear, -side * 18.0)
        hz = (z - center[2]) / hippo_linear - 0.012 * hy**2
        hippocampus = _ellipsoid_sd((hx, hy, hz), (0.0, 0.0, 0.0), (6.0, 20.0, 7.0)) * hippo_linear
        paint.paint(hippocampus, _T1["hippocampus"] * u.contrast[1], BRAIN_LABELS["hippocampus"])

    # --- acquisition: smooth multiplicative bias field and Rician noise -------------------------------------
    return _acquire(paint.image, shape, spacing, u.bias_field, u.noise_sigma, u.noise_seed), paint.label


def _acquire(
    image: np.ndarray,
    shape: tuple[int, ...],
    spacing: float,
    bias_field: Sequence[float],
    noise_sigma: float,
    seed: int,
) -> np.ndarray:
    """The brain volume as acquired: a smooth multiplicative bias field (log: a quadratic in grid-centred mm / 100,
    coefficients x, y, z, x^2, y^2, z^2, xy, xz, yz) and Rician noise of ``noise_sigma`` drawn from ``seed``."""
    gx, gy, gz = _grid(tuple(shape), spacing)
    bx, by, bz = (g / np.float32(100.0) for g in (gx, gy, gz))
    c = bias_field
    log_bias = c[0] * bx + c[1] * by + c[2] * bz + c[3] * bx**2 + c[4] * by**2 + c[5] * bz**2
    log_bias += c[6] * bx * by + c[7] * bx * bz + c[8] * by * bz
    image = image * np.exp(log_bias)
    noise = np.random.default_rng(seed).standard_normal((2, *shape), dtype=np.float32)
    sigma = np.float32(noise_sigma)
    image = np.sqrt((image + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2)
    return image.astype(np.float32)


def measure_brain(label: np.ndarray, spacing: float | Sequence[float] = DEFAULT_BRAIN_SPACING) -> dict[str, float]:
    """Volumes in ml from a brain label map: lateral ventricles, hippocampi, brain (GM + WM + hippocampus)."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D label map, got shape {label.shape}.")
    voxel_ml = float(np.prod(np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))) / 1000.0
    count = np.bincount(label.ravel(), minlength=max(BRAIN_LABELS.values()) + 1)
    brain = count[BRAIN_LABELS["gray_matter"]] + count[BRAIN_LABELS["white_matter"]]
    brain += count[BRAIN_LABELS["hippocampus"]]
    return {
        "ventricle_ml": float(count[BRAIN_LABELS["ventricles"]] * voxel_ml),
        "hippocampus_ml": float(count[BRAIN_LABELS["hippocampus"]] * voxel_ml),
        "brain_ml": float(brain * voxel_ml),
    }


# ----------------------------------------------------------------------------------------------------------------
# Chest
# ----------------------------------------------------------------------------------------------------------------


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _tube_thickness(distance: np.ndarray, radius: float, wall: float) -> np.ndarray:
    """Path length through a hollow cylinder (cortical bone) seen side-on, at ``distance`` from its axis."""
    outer = np.sqrt(np.clip(radius**2 - distance**2, 0.0, None))
    inner = np.sqrt(np.clip((radius - wall) ** 2 - distance**2, 0.0, None))
    return 2.0 * (outer - 0.55 * inner)


def _vessel_tree(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Soft-tissue path length (mm) of pulmonary vessels: random branching polylines from the two hila."""
    rng = np.random.default_rng(seed)
    segments = []  # (x0, y0, x1, y1, radius)
    for side, hilum in ((-1.0, (-50.0, 12.0)), (1.0, (55.0, 12.0))):
        for angle in np.linspace(-75.0, 80.0, 9) + rng.uniform(-8.0, 8.0, 9):
            stack = [(hilum[0], hilum[1], math.radians(angle), 3.2, 0)]
            while stack:
                x0, y0, heading, radius, depth = stack.pop()
                length = rng.uniform(14.0, 24.0)
                heading += math.radians(rng.uniform(-14.0, 14.0))
                x1, y1 = x0 + side * length * math.cos(heading), y0 + length * math.sin(heading)
                segments.append((x0, y0, x1, y1, radius))
                if depth < 5 and radius > 0.9:
                    stack.append((x1, y1, heading, radius * 0.85, depth + 1))
                    if rng.random() < 0.45:
                        branch = heading + math.radians(rng.choice([-1, 1]) * 30.0)
                        stack.append((x1, y1, branch, radius * 0.6, depth + 1))
    path = np.zeros(x.shape, np.float32)
    for x0, y0, x1, y1, radius in segments:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        distance_sq = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
        path = np.maximum(path, 2.0 * np.sqrt(np.clip(radius * radius - distance_sq, 0.0, None)))
    return path


def _chest_anatomy(u: ChestExogenous, cov: Mapping[str, Any]) -> dict[str, float]:
    """Scalar anatomy of one subject (reference-size frame, mm): thoracic cavity, domes, heart ellipse."""
    half_width = 135.0  # inner thoracic half-width at its widest row
    dome_left = -100.0 + u.diaphragm_level
    dome_right = dome_left + u.right_dome_raise
    ctr = u.ctr_baseline * (CARDIOMEGALY_WIDTH_FACTOR if cov["cardiomegaly"] else 1.0)
    angle = math.radians(30.0 + u.heart_angle)  # long axis tilted down towards the patient's left
    long_axis, short_axis = 1.0, 0.72
    unit_extent_x = math.sqrt((long_axis * math.cos(angle)) ** 2 + (short_axis * math.sin(angle)) ** 2)
    k = ctr * half_width / unit_extent_x  # heart horizontal half-extent = ctr * thoracic half-width
    p, q = k * long_axis, k * short_axis
    extent_x = k * unit_extent_x
    # Height of the left-most/right-most heart points relative to the centre; keep both above the domes.
    drop = (p * p - q * q) * math.sin(angle) * math.cos(angle) / extent_x
    right_border = -38.0 - 0.25 * (extent_x - 60.0) + u.heart_shift  # enlargement is mostly to the left
    center_x = right_border + extent_x
    center_y = dome_left + drop + 10.0 + 0.12 * (center_x - 60.0)
    return {
        "half_width": half_width,
        "dome_left": dome_left,
        "dome_right": dome_right,
        "heart_cx": center_x,
        "heart_cy": max(center_y, dome_left + 0.45 * q + drop),
        "heart_p": p,
        "heart_q": q,
        "heart_angle": math.degrees(angle),
    }


def render_chest(
    u: ChestExogenous, covariates: Mapping[str, Any], shape: Sequence[int] | None = DEFAULT_CHEST_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """Render a postero-anterior chest radiograph and its label map; deterministic in (u, covariates, shape).

    Args:
        u: exogenous factors of the subject.
        covariates: ``{"age": years, "sex": "F"|"M", "cardiomegaly": 0|1, "effusion": 0|1}`` and optionally
            ``"opacity": 0|1``.
        shape: (rows, columns); row 0 is superior, column 0 the patient's right. The field of view is
            ``CHEST_FIELD_OF_VIEW_MM`` along the longer side; ``None`` = 128 x 128.

    Returns:
        ``(image, label)``: float32 in [0, 1] (air black, bone white) and uint8 ``CHEST_LABELS``.
    """
    if not isinstance(u, ChestExogenous):
        raise TypeError(f"u must be a ChestExogenous, got {type(u).__name__}.")
    shape = _check_shape(shape, 2, DEFAULT_CHEST_SHAPE)
    cov = check_chest_covariates(covariates)
    spacing = CHEST_FIELD_OF_VIEW_MM / max(shape)
    rows, cols = _grid(shape, spacing)
    scale = CHEST_SEX_LINEAR_SCALE[cov["sex"]] * u.size_scale
    x = cols / np.float32(scale)
    y = -rows / np.float32(scale * u.aspect)
    px = spacing / scale  # pixel size in the reference frame
    g = _chest_anatomy(u, cov)
    ax = np.abs(x)

    # --- body outline and soft-tissue path length -----------------------------------------------------------
    torso = _ellipsoid_sd((x, y), (0.0, -40.0), (g["half_width"] + 28.0, 260.0))
    torso = np.maximum(torso, y - 150.0 + 0.004 * x**2)  # shoulders slope down laterally
    neck = np.maximum(ax - 50.0, -y + 100.0)
    body = np.minimum(torso, neck)
    body_depth = 230.0 * np.sqrt(np.clip(1.0 - (x / (g["half_width"] + 40.0)) ** 2, 0.02, 1.0))
    soft = body_depth * _coverage(body, px)

    # --- diaphragm domes and thoracic cavity ----------------------------------------------------------------
    curvature = 0.009
    dome_r = g["dome_right"] - curvature * (x + 68.0) ** 2
    dome_l = g["dome_left"] - curvature * (x - 70.0) ** 2
    diaphragm = np.maximum(dome_r, dome_l)
    widest_y = -80.0
    upper = np.clip(1.0 - ((y - widest_y) / 228.0) ** 2, 0.0, None)
    cavity_half_width = g["half_width"] * np.where(y > widest_y, np.sqrt(upper), 1.0)
    cavity = np.maximum(ax - cavity_half_width, diaphragm - y)

    # --- mediastinum, heart, aorta --------------------------------------------------------------------------
    hx, hy = _rotate(x - g["heart_cx"], y - g["heart_cy"], -g["heart_angle"])
    heart = _ellipsoid_sd((hx, hy), (0.0, 0.0), (g["heart_p"], g["heart_q"]))
    aortic_knob = _ellipsoid_sd((x, y), (22.0, 68.0), (12.0, 13.0))
    mediastinum = np.minimum(np.where(x < 0, -x - 27.0, x - 22.0), aortic_knob)
    mediastinum = np.maximum(mediastinum, -(y - g["heart_cy"]) - 10.0)  # above the heart the mediastinum
    mediastinum = np.minimum(mediastinum, np.where(y < g["heart_cy"], ax - 20.0, 1e3))
    lung_sd = np.maximum.reduce([cavity, -heart, -mediastinum])
    right_lung = np.maximum(lung_sd, x)
    left_lung = np.maximum(lung_sd, -x)

    # Air path length: deepest mid-lung, thin at the apex, lateral wall and medially.
    lung_depth = 200.0 * np.sqrt(np.clip(1.0 - ((ax - 70.0) / 90.0) ** 2, 0.0, 1.0))
    lung_depth *= np.sqrt(np.clip((150.0 - y) / 60.0, 0.0, 1.0))
    air = lung_depth * np.maximum(_coverage(right_lung, px), _coverage(left_lung, px))
    air += 0.05 * lung_depth * _coverage(np.maximum(np.maximum(heart, cavity), diaphragm - y), px)
    trachea = np.maximum(ax - 8.0, -(y - 55.0))
    air += 18.0 * _coverage(np.maximum(trachea, body), px)
    bronchi = np.minimum(np.abs((x + 2.0) + 0.8 * (y - 55.0)) - 6.0, np.abs((x - 2.0) - 1.0 * (y - 55.0)) - 6.0)
    air += 14.0 * _coverage(np.maximum.reduce([bronchi, y - 58.0, 30.0 - y]), px)
    gastric = _ellipsoid_sd((x, y), (72.0, g["dome_left"] - 32.0), (26.0, 16.0))
    air += 45.0 * _coverage(np.maximum(gastric, y - diaphragm + 6.0), px)

    # Pulmonary vessels: branching trees from each hilum, tapering towards the periphery.
    vessels = _vessel_tree(x, y, u.vessel_seed) * np.maximum(_coverage(right_lung, px), _coverage(left_lung, px))
    air = np.clip(air - 2.5 * vessels, 0.0, None)

    # --- pathology ------------------------------------------------------------------------------------------
    fluid = np.zeros(shape, np.float32)
    if cov["effusion"]:
        sides = {"right": (-1.0,), "left": (1.0,), "both": (-1.0, 1.0)}[u.effusion_side]
        for side in sides:
            dome_level = g["dome_right"] if side < 0 else g["dome_left"]
            angle_y = dome_level - curvature * (g["half_width"] - 70.0) ** 2  # costophrenic angle height
            lateral = np.clip((side * x - 25.0) / (g["half_width"] - 25.0), 0.0, 1.0)
            level = angle_y + u.effusion_height * (0.45 + 0.55 * lateral**2)  # meniscus rises laterally
            fluid = np.maximum(fluid, _smoothstep((level - y) / 10.0 + 0.5) * (side * x > 0))
    lung_cov = np.maximum(_coverage(right_lung, px), _coverage(left_lung, px))
    consolidation = np.zeros(shape, np.float32)
    if cov["opacity"]:
        side = -1.0 if u.opacity_center[0] < 0.5 else 1.0
        ox = side * (40.0 + 85.0 * abs(u.opacity_center[0] - 0.5) * 2.0)
        oy = g["dome_right"] + 25.0 + 160.0 * u.opacity_center[1]
        blob = _ellipsoid_sd((x, y), (ox, oy), (u.opacity_radius, 0.8 * u.opacity_radius))
        texture = _random_waves((x, y), u.vessel_seed + 7, 22.0, 12)
        consolidation = _smoothstep(-(blob + 6.0 * texture) / 12.0 + 0.5) * lung_cov
    air *= 1.0 - np.maximum(fluid * 0.9, consolidation * 0.75)

    # --- bones ----------------------------------------------------------------------------------------------
    bone_density = 1.0 - BONE_DENSITY_LOSS_PER_YEAR * max(cov["age"] - 40.0, 0.0)
    spine_phase = np.cos(2.0 * np.pi * (y - u.rib_offset) / 26.0)
    bone = 11.0 * _coverage(ax - 16.0, px) * (0.8 + 0.2 * _smoothstep(spine_phase * 3.0 + 1.5))
    bone += 10.0 * _coverage(_ellipsoid_sd((ax, np.mod(y - u.rib_offset, 26.0)), (14.0, 13.0), (4.0, 5.0)), px)
    for i in range(11):
        level = 118.0 + u.rib_offset - i * u.rib_spacing
        t = np.clip(ax - 14.0, 0.0, None)
        rib_y = level + 0.35 * t - 0.0045 * t**2  # posterior rib: up from the spine, then curving down
        slope = 0.35 - 0.0090 * t
        distance = np.abs(y - rib_y) / np.sqrt(1.0 + slope**2)
        reach = _smoothstep((cavity_half_width + 14.0 - ax) / 10.0)
        bone += 0.75 * _tube_thickness(distance, 4.5 + 0.15 * i, 1.4) * reach * (ax > 14.0)
        # anterior rib: from the lateral wall down towards the sternum, fading where the cartilage starts
        front_y = level + 20.0 - 0.6 * (cavity_half_width - ax)
        distance = np.abs(y - front_y) / np.sqrt(1.0 + 0.6**2)
        fade = _smoothstep((ax - 45.0) / 40.0) * reach
        bone += 0.4 * _tube_thickness(distance, 4.5, 1.3) * fade
    for side in (-1.0, 1.0):
        t = side * x
        clavicle_y = 128.0 + 0.22 * (t - 20.0) - 8.0 * np.sin(np.clip((t - 20.0) / 120.0, 0.0, 1.0) * np.pi)
        distance = np.abs(y - clavicle_y)
        bone += _tube_thickness(distance, 6.5, 2.0) * (t > 18.0) * (t < 155.0)
    bone *= bone_density * _coverage(body, px)

    breast = np.zeros(shape, np.float32)
    if cov["sex"] == "F":
        for side in (-1.0, 1.0):
            b = _ellipsoid_sd((x, y), (side * 100.0, -70.0), (75.0, 55.0))
            breast += 40.0 * _smoothstep(-b / 30.0)

    # --- projection, film response, blur and noise ----------------------------------------------------------
    attenuation = (soft - air + breast) / 150.0 + bone / 45.0
    gain = 1.3 * u.exposure
    image = 1.0 - np.exp(-gain * np.clip(attenuation, 0.0, None))
    image = np.clip(image / (1.0 - math.exp(-2.6 * gain)), 0.0, 1.0) ** (1.3 * u.gamma)
    image = ndimage.gaussian_filter(image.astype(np.float32), sigma=0.6 * max(shape) / 256.0 + 0.3)
    noise = np.random.default_rng(u.noise_seed).standard_normal(shape, dtype=np.float32)
    image = np.clip(image + np.float32(u.noise_sigma) * np.sqrt(image + 0.05) * noise, 0.0, 1.0)

    # --- labels (priority: effusion/opacity > heart > lungs > bone > soft tissue) ---------------------------
    label = np.zeros(shape, np.uint8)
    label[body < 0] = CHEST_LABELS["soft_tissue"]
    label[(bone > 6.0) & (body < 0)] = CHEST_LABELS["bone"]
    label[right_lung < 0] = CHEST_LABELS["right_lung"]
    label[left_lung < 0] = CHEST_LABELS["left_lung"]
    label[(heart < 0) & (y > diaphragm)] = CHEST_LABELS["heart"]
    in_lung = (right_lung < 0) | (left_lung < 0)
    label[in_lung & (consolidation > 0.5)] = CHEST_LABELS["opacity"]
    label[in_lung & (fluid > 0.5)] = CHEST_LABELS["effusion"]
    return image.astype(np.float32), label


def measure_chest(label: np.ndarray) -> dict[str, float]:
    """Cardiothoracic ratio and effusion fraction from a chest label map.

    The cardiothoracic ratio is the widest horizontal extent of the heart over the widest inner thoracic extent
    (lungs, effusion, opacity and heart), both taken row by row. The effusion fraction is the share of the lung
    fields (aerated lung + effusion + opacity) occupied by effusion.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be a 2D label map, got shape {label.shape}.")
    lung_ids = [CHEST_LABELS[k] for k in ("right_lung", "left_lung", "effusion", "opacity")]
    thorax = np.isin(label, lung_ids + [CHEST_LABELS["heart"]])
    heart = label == CHEST_LABELS["heart"]
    lungs = np.isin(label, lung_ids)

    def widest(mask: np.ndarray) -> int:
        rows = np.flatnonzero(mask.any(axis=1))
        if rows.size == 0:
            return 0
        sub = mask[rows]
        first = sub.argmax(axis=1)
        last = sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
        return int((last - first + 1).max())

    thorax_width = widest(thorax)
    effusion_px = int((label == CHEST_LABELS["effusion"]).sum())
    return {
        "cardiothoracic_ratio": widest(heart) / thorax_width if thorax_width else float("nan"),
        "effusion_fraction": effusion_px / int(lungs.sum()) if lungs.any() else 0.0,
    }


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
    modality = _check_modality(modality)
    _check_profile(modality, profile)
    if _check_anatomy(modality, anatomy) == "mni152":
        from scripts.cohort_mni152 import render_mni152

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


def _check_anatomy(modality: str, anatomy: str) -> str:
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {list(ANATOMIES)}, got {anatomy!r}.")
    if anatomy != "phantom" and modality != "brain":
        raise ValueError(f"anatomy {anatomy!r} is a brain anatomy; leave anatomy 'phantom' for {modality}.")
    return anatomy


def _check_profile(modality: str, profile: str) -> str:
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
    _check_profile(modality, profile)
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
    modality = _check_modality(modality)
    if not isinstance(changes, Mapping):
        raise ValueError(f"changes must be a dict of covariate -> new value, got {type(changes).__name__}.")
    allowed = ("age", "sex", "diagnosis") if modality == "brain" else ("age", "sex", *BINARY_FINDINGS)
    unknown = sorted(set(changes) - set(allowed))
    if unknown:
        raise ValueError(f"changes has unknown {modality} covariates {unknown}; allowed: {list(allowed)}.")
    target = {**covariates, **changes}
    return render(modality, u, target, shape=shape, spacing=spacing, profile=profile, anatomy=anatomy)


# ----------------------------------------------------------------------------------------------------------------
# Cohort files
# ----------------------------------------------------------------------------------------------------------------


def _write_json(path: str, content: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=4)
            f.write("\n")

    atomic_write(path, write, ".json")


def _write_nifti(path: str, array: np.ndarray, spacing: float) -> None:
    import nibabel as nib

    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.asarray(array.shape) - 1) / 2.0 * spacing  # RAS, origin at the grid centre
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(image, tmp), ".nii.gz")


def _write_png(path: str, array: np.ndarray, is_label: bool) -> None:
    from PIL import Image

    pixels = array.astype(np.uint8) if is_label else np.round(np.clip(array, 0.0, 1.0) * 65535.0).astype(np.uint16)
    atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"), ".png")


def _write_pair(
    modality: str, folder: str, stem: str, image: np.ndarray, label: np.ndarray, spacing: float
) -> tuple[str, str]:
    """Write an image and its label map under ``folder/images`` and ``folder/labels``; return relative paths."""
    ext = ".nii.gz" if modality == "brain" else ".png"
    image_rel, label_rel = f"images/{stem}{ext}", f"labels/{stem}{ext}"
    if modality == "brain":
        _write_nifti(os.path.join(folder, image_rel), image.astype(np.float32), spacing)
        _write_nifti(os.path.join(folder, label_rel), label.astype(np.uint8), spacing)
    else:
        _write_png(os.path.join(folder, image_rel), image, is_label=False)
        _write_png(os.path.join(folder, label_rel), label, is_label=True)
    return image_rel, label_rel


def _sample_brain_visits(rng: np.random.Generator, visits: int) -> list[dict[str, Any]]:
    sex = str(rng.choice(SEXES))
    diagnosis = str(rng.choice(DIAGNOSES, p=[0.4, 0.3, 0.3]))
    age = float(rng.uniform(55.0, 85.0))
    out = []
    for _ in range(visits):
        out.append({"age": round(age, 2), "sex": sex, "diagnosis": diagnosis})
        age += float(rng.uniform(1.0, 3.0))
    return out


def _sample_chest_visits(rng: np.random.Generator, visits: int) -> list[dict[str, Any]]:
    sex = str(rng.choice(SEXES))
    age = float(rng.uniform(25.0, 90.0))
    out = []
    for _ in range(visits):
        out.append(
            {
                "age": round(age, 2),
                "sex": sex,
                "cardiomegaly": int(rng.random() < 0.35),
                "effusion": int(rng.random() < 0.35),
            }
        )
        age += float(rng.uniform(0.5, 3.0))
    return out


def generate_cohort(
    output_dir: str | os.PathLike,
    modality: str = "brain",
    num_subjects: int = 40,
    visits_per_subject: int | None = None,
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    profile: str = "standard",
    anatomy: str = "phantom",
) -> str:
    """Write a synthetic cohort with a MONAI datalist and the exogenous factors needed to re-render any subject.

    Layout of ``output_dir``: ``images/`` and ``labels/`` (brain: NIfTI in RAS with a ``spacing`` mm grid; chest:
    16-bit image / 8-bit label PNG), ``exogenous/sub-XXXX.json`` (U, visit covariates, grid), ``cohort.json``
    (generator settings and causal constants) and, written last, ``datalist.json``:
    ``{"training": [...], "validation": [...]}`` split by subject with paths relative to ``output_dir``.

    Args:
        output_dir: cohort folder, created if needed.
        modality: "brain" (3D T1-like MRI, longitudinal) or "chest" (2D PA radiograph).
        num_subjects: number of subjects, >= 1.
        visits_per_subject: scans per subject; ``None`` = 3 for brain (1-3 years apart), 1 for chest.
        shape: grid; ``None`` = (64, 64, 64) for the brain phantom, ``cohort_mni152.default_shape(spacing)`` for
            mni152 (a 192 x 240 x 192 mm field of view: (64, 80, 64) at 3 mm), (128, 128) for chest.
        spacing: brain voxel size in mm; ``None`` = 3.0. Must be ``None`` for chest (fixed field of view).
        seed: seed of covariates and exogenous factors; same arguments give identical files.
        val_fraction: fraction of subjects in ``validation``, in [0, 1).
        profile: acquisition profile of every image (``PROFILES``; "standard" unless studying domain shift).
        anatomy: brain anatomy, ``ANATOMIES``: "phantom" (procedural cartoon) or "mni152" (the MNI152 template of
            the installed nilearn under random deformations; its label map is cached in ``output_dir/template``
            and each subject's exogenous file also holds the measured volumes of every visit).

    Returns:
        path of ``datalist.json``.
    """
    modality = _check_modality(modality)
    _check_profile(modality, profile)
    _check_anatomy(modality, anatomy)
    if isinstance(num_subjects, bool) or not isinstance(num_subjects, (int, np.integer)) or num_subjects < 1:
        raise ValueError(f"num_subjects must be an integer >= 1, got {num_subjects!r}.")
    if visits_per_subject is None:
        visits_per_subject = 3 if modality == "brain" else 1
    if isinstance(visits_per_subject, bool) or not isinstance(visits_per_subject, (int, np.integer)):
        raise ValueError(f"visits_per_subject must be an integer >= 1, got {visits_per_subject!r}.")
    if visits_per_subject < 1:
        raise ValueError(f"visits_per_subject must be an integer >= 1, got {visits_per_subject!r}.")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}.")
    if spacing is not None and modality != "brain":
        raise ValueError("spacing applies to brain volumes only; leave it null for chest and choose shape.")
    shape, spacing = _grid_of(modality, anatomy, shape, spacing)
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    extras = _anatomy_record(anatomy, output_dir)

    rng = np.random.default_rng(seed)
    subjects = [f"sub-{i + 1:04d}" for i in range(int(num_subjects))]
    records: dict[str, list[dict[str, Any]]] = {}
    progress = _progress(subjects, f"{modality} cohort ({anatomy})", int(num_subjects) * int(visits_per_subject))
    for subject in progress:
        subject_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        u = _sample_u(modality, anatomy, subject_rng)
        sample_visits = _sample_brain_visits if modality == "brain" else _sample_chest_visits
        visits = sample_visits(subject_rng, int(visits_per_subject))
        grid = {"shape": shape, "spacing": spacing, "profile": profile, "anatomy": anatomy}
        records[subject] = _write_cohort_subject(output_dir, modality, subject, u, visits, grid, extras)
    datalist = _split_by_subject(subjects, records, val_fraction, seed)
    _write_json(
        os.path.join(output_dir, "cohort.json"),
        {
            "modality": modality,
            "num_subjects": int(num_subjects),
            "visits_per_subject": int(visits_per_subject),
            "shape": list(shape),
            "spacing": spacing,
            "seed": int(seed),
            "profile": profile,
            "labels": BRAIN_LABELS if modality == "brain" else CHEST_LABELS,
            "mechanisms": _mechanisms(modality),
            **extras,
        },
    )
    datalist_path = os.path.join(output_dir, "datalist.json")
    _write_json(datalist_path, datalist)
    return datalist_path


def _write_cohort_subject(
    output_dir: str, modality: str, subject: str, u: Any, visits: list[dict], grid: dict, extras: dict
) -> list[dict[str, Any]]:
    """Render and write every visit of one subject and its exogenous file; return its datalist records.
    ``grid`` holds ``shape``, ``spacing``, ``profile`` and ``anatomy``; ``extras`` the anatomy's keys."""
    shape, spacing, anatomy = grid["shape"], grid["spacing"], grid["anatomy"]
    records, measurements = [], []
    for visit, covariates in enumerate(visits):
        image, label = render(modality, u, covariates, shape, spacing, profile=grid["profile"], anatomy=anatomy)
        stem = f"{subject}_visit-{visit}"
        image_rel, label_rel = _write_pair(modality, output_dir, stem, image, label, spacing or 0.0)
        records.append({"image": image_rel, "label": label_rel, "subject": subject, "visit": visit, **covariates})
        measurements.append(_measure_scan(anatomy, label, spacing))
    content = {"modality": modality, "subject": subject, "shape": list(shape), "spacing": spacing}
    content.update({"exogenous": u.to_dict(), "visits": visits, "profile": grid["profile"]})
    if extras:
        content.update({**extras, "measurements": measurements})
    _write_json(os.path.join(output_dir, "exogenous", f"{subject}.json"), content)
    return records


def _split_by_subject(
    subjects: list[str], records: Mapping[str, list[dict]], val_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """``{"training", "validation"}`` records, a seeded ``val_fraction`` of subjects (at least one) held out."""
    order = list(np.random.default_rng(seed + 1).permutation(len(subjects)))
    num_val = int(round(float(val_fraction) * len(subjects)))
    if val_fraction > 0 and len(subjects) >= 2:
        num_val = min(max(num_val, 1), len(subjects) - 1)
    val_subjects = {subjects[i] for i in order[:num_val]}
    return {
        "training": [r for s in subjects if s not in val_subjects for r in records[s]],
        "validation": [r for s in subjects if s in val_subjects for r in records[s]],
    }


def _grid_of(
    modality: str, anatomy: str, shape: Sequence[int] | None, spacing: float | None
) -> tuple[tuple[int, ...], float | None]:
    """Checked grid of a cohort: (shape, spacing) with the defaults of the modality and anatomy filled in."""
    if modality == "chest":
        return _check_shape(shape, 2, DEFAULT_CHEST_SHAPE), None
    spacing = _check_spacing(spacing)
    if anatomy == "mni152":
        from scripts.cohort_mni152 import default_shape

        return _check_shape(shape, 3, default_shape(spacing)), spacing
    return _check_shape(shape, 3, DEFAULT_BRAIN_SHAPE), spacing


def _anatomy_record(anatomy: str, cohort_dir: str, write_cache: bool = True) -> dict[str, Any]:
    """Keys the exogenous and cohort files add for a real anatomy: its name and the hash of its label map (derived
    once and cached under ``cohort_dir/template``); empty for the phantom, whose files stay as they were."""
    if anatomy == "phantom":
        return {}
    from scripts.mni152_template import load_template

    template = load_template(cohort_dir, write_cache=write_cache)
    return {"anatomy": anatomy, "template_sha256": template.sha256}


def _sample_u(modality: str, anatomy: str, rng: np.random.Generator) -> Any:
    if anatomy == "mni152":
        from scripts.cohort_mni152 import sample_mni152_exogenous

        return sample_mni152_exogenous(rng)
    return sample_exogenous(modality, rng)


def _measure_scan(anatomy: str, label: np.ndarray, spacing: float | None) -> dict[str, float]:
    if anatomy != "mni152":
        return {}
    from scripts.cohort_mni152 import measure_mni152

    return measure_mni152(label, float(spacing))


def _progress(items: Sequence[str], description: str, renders: int):
    """``items`` wrapped in a tqdm progress bar on stderr when the run is long enough to want one (>= 30 scans)."""
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="subject", disable=renders < 30)


def write_subject(
    output_dir: str | os.PathLike,
    modality: str,
    covariates: Mapping[str, Any],
    seed: int,
    subject: str = "sample",
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    profile: str = "standard",
    anatomy: str = "phantom",
) -> dict[str, Any]:
    """Render one subject with the given covariates (U drawn from ``seed``) in the cohort layout, so that
    ``load_subject`` and ``write_counterfactual_truth`` work on ``output_dir``. Returns the datalist-style record.
    A real ``anatomy`` records its template hash but writes no template cache (a shipped sample stays small)."""
    modality = _check_modality(modality)
    _check_anatomy(modality, anatomy)
    u = _sample_u(modality, anatomy, np.random.default_rng(seed))
    covariates = check_brain_covariates(covariates) if modality == "brain" else check_chest_covariates(covariates)
    shape, spacing = _grid_of(modality, anatomy, shape, spacing)
    folder = os.path.abspath(os.fspath(output_dir))
    extras = _anatomy_record(anatomy, folder, write_cache=False)
    image, label = render(modality, u, covariates, shape=shape, spacing=spacing, profile=profile, anatomy=anatomy)
    image_rel, label_rel = _write_pair(modality, folder, f"{subject}_visit-0", image, label, spacing or 0.0)
    content = {"modality": modality, "subject": subject, "shape": list(shape), "spacing": spacing}
    content.update({"exogenous": u.to_dict(), "visits": [dict(covariates)], "profile": profile})
    if extras:
        content.update({**extras, "measurements": [_measure_scan(anatomy, label, spacing)]})
    _write_json(os.path.join(folder, "exogenous", f"{subject}.json"), content)
    return {"image": image_rel, "label": label_rel, "subject": subject, "visit": 0, **covariates}


def _mechanisms(modality: str) -> dict[str, Any]:
    if modality == "brain":
        return {
            "reference_age": REFERENCE_AGE,
            "ventricle_growth_per_year": VENTRICLE_GROWTH_PER_YEAR,
            "hippocampus_shrink_per_year": HIPPOCAMPUS_SHRINK_PER_YEAR,
            "cortex_thinning_per_year": CORTEX_THINNING_PER_YEAR,
            "sulcal_widening_mm_per_year": SULCAL_WIDENING_MM_PER_YEAR,
            "gm_wm_contrast_decay_per_year": GM_WM_CONTRAST_DECAY_PER_YEAR,
            "sex_linear_scale": SEX_LINEAR_SCALE,
        }
    return {
        "cardiomegaly_width_factor": CARDIOMEGALY_WIDTH_FACTOR,
        "sex_linear_scale": CHEST_SEX_LINEAR_SCALE,
        "bone_density_loss_per_year_after_40": BONE_DENSITY_LOSS_PER_YEAR,
        "field_of_view_mm": CHEST_FIELD_OF_VIEW_MM,
    }


def load_subject(cohort_dir: str | os.PathLike, subject: str) -> dict[str, Any]:
    """Exogenous factors and visits of one cohort subject: ``{"modality", "u", "visits", "shape", "spacing",
    "profile", "anatomy", "template_sha256"}`` (the last ``None`` for the phantom)."""
    path = os.path.join(os.fspath(cohort_dir), "exogenous", f"{subject}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subject {subject!r} not found: no exogenous file '{path}'.")
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    modality = _check_modality(content["modality"])
    anatomy = _check_anatomy(modality, content.get("anatomy", "phantom"))
    if anatomy == "mni152":
        from scripts.cohort_mni152 import Mni152Exogenous

        cls = Mni152Exogenous
    else:
        cls = BrainExogenous if modality == "brain" else ChestExogenous
    return {
        "modality": modality,
        "u": cls.from_dict(content["exogenous"]),
        "visits": content["visits"],
        "shape": tuple(content["shape"]),
        "spacing": content["spacing"],
        "profile": content.get("profile", "standard"),
        "anatomy": anatomy,
        "template_sha256": content.get("template_sha256"),
    }


def _check_template(cohort_dir: str | os.PathLike, subject: str, subject_info: Mapping[str, Any]) -> None:
    """A real-anatomy subject re-renders only from the template labels it was generated with."""
    if subject_info["anatomy"] == "phantom":
        return
    recorded = subject_info["template_sha256"]
    current = _anatomy_record(subject_info["anatomy"], os.fspath(cohort_dir), write_cache=False)["template_sha256"]
    if recorded != current:
        from scripts.mni152_template import NILEARN_PIN

        raise ValueError(
            f"{cohort_dir}/exogenous/{subject}.json was rendered from template labels sha256 {recorded}, but this "
            f"installation gives {current} (another nilearn or scripts/mni152_template.py): install {NILEARN_PIN} "
            "or regenerate the cohort."
        )


def write_counterfactual_truth(
    cohort_dir: str | os.PathLike,
    subject: str,
    changes: Mapping[str, Any],
    visit: int = 0,
    output_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the ground-truth counterfactual of a cohort scan under ``changes`` (e.g. ``{"age": 80}``).

    Files go to ``output_dir`` (default ``<cohort_dir>/counterfactuals``): ``images/<stem>``, ``labels/<stem>``
    and ``<stem>.json`` with the factual and counterfactual covariates and measurements, where ``<stem>`` is
    ``sub-XXXX_visit-V_cf-<change>``. Returns that JSON content with absolute ``image``/``label`` paths.
    """
    subject_info = load_subject(cohort_dir, subject)
    visits = subject_info["visits"]
    if isinstance(visit, bool) or not isinstance(visit, (int, np.integer)) or not 0 <= visit < len(visits):
        raise ValueError(f"visit must be an integer in [0, {len(visits) - 1}] for {subject}, got {visit!r}.")
    modality, u, anatomy = subject_info["modality"], subject_info["u"], subject_info["anatomy"]
    _check_template(cohort_dir, subject, subject_info)
    factual = dict(visits[visit])
    spacing = subject_info["spacing"]
    grid = {"shape": subject_info["shape"], "spacing": spacing, "profile": subject_info["profile"]}
    image, label = counterfactual(modality, u, factual, changes, **grid, anatomy=anatomy)
    target = {**factual, **changes}
    tag = "_".join(f"{k}-{v}" for k, v in sorted(changes.items())) or "none"
    stem = f"{subject}_visit-{visit}_cf-{tag}"
    folder = os.path.abspath(os.fspath(output_dir or os.path.join(os.fspath(cohort_dir), "counterfactuals")))
    image_rel, label_rel = _write_pair(modality, folder, stem, image, label, spacing or 0.0)
    measure = measure_brain(label, spacing) if modality == "brain" else measure_chest(label)
    measure.update(_measure_scan(anatomy, label, spacing))
    summary = {
        "subject": subject,
        "visit": int(visit),
        "factual_covariates": factual,
        "counterfactual_covariates": target,
        "counterfactual_measurements": measure,
        "image": os.path.join(folder, image_rel),
        "label": os.path.join(folder, label_rel),
    }
    _write_json(os.path.join(folder, f"{stem}.json"), summary)
    return summary
