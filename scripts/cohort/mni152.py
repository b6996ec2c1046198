"""Brain MRI subjects on real anatomy: the MNI152 template under exogenous factors and the causal model's effects.

``render_mni152(U, covariates)`` is deterministic, like the cartoon brain of ``scripts/generate.py``, and follows
the same causal model (``causal_model.brain_growth_factors``) with the same labels and file layout, so the cohort, its
exact counterfactuals (``render.counterfactual``) and ``scripts/cohort/oracle.py`` work unchanged. Each output voxel
``p`` (grid-centred RAS mm) shows the template at ``t = psi_cov(phi_U(p / size) + centre)``:

1. size: the sex effect ``SEX_LINEAR_SCALE`` times the subject's ``size_scale`` and ``axis_scale``, after a small
   head ``pose`` rotation;
2. ``phi_U``: a smooth random diffeomorphism, the exponential (scaling and squaring) of a Gaussian-smoothed white
   noise velocity field of RMS ``warp_amplitude`` mm and correlation length ``warp_smoothness`` mm
   (seed ``warp_seed``): the subject's own anatomy, far more varied than any covariate effect;
3. ``psi_cov``: the covariate effects on the template anatomy, each a diffeomorphism (stationary velocity field)
   whose amplitude is calibrated once per run on the 1 mm template so the structure reaches its target volume:

   - lateral ventricles: velocity along the gradient of the Gaussian-blurred (``sigma`` 5 mm) ventricle mask, so
     the ventricles grow into (shrink from) the surrounding white and deep grey matter;
   - hippocampi: the same construction around the hippocampi (``sigma`` 3 mm), run backwards to shrink them;
   - cortex: a displacement along the gradient of the blurred (1.5 mm) outer CSF and background, ``mm`` of
     cortical thinning at the pial surface (sulci widen, the brain shrinks), zero near the deep structures.

Target factors relative to the template (a young-adult average: ICBM 2009 is built from 152 adults of 18-44 years)
are ``TEMPLATE_TO_REFERENCE_AGE[k] * U_scale * brain_growth_factors(covariates)[k]``, where the first factor puts the
template at the causal model's reference age (60 years, cognitively normal) by published norms (docs/cohort_mni152.md):
lateral ventricles about 1.5x larger than in young adults, hippocampi about 10 % smaller, cortex about 10 % thinner.
The growth laws themselves (ventricles +2.0/3.0/4.5 %/yr, hippocampi -1.0/2.0/3.5 %/yr for CN/MCI/AD, ...) are the
causal model's. Intensities map the template's ventricle, grey- and white-matter levels to the phantom's T1 levels
at the reference age (GM/WM contrast falling ``GM_WM_CONTRAST_DECAY_PER_YEAR``), with the subject's contrast
jitter; then the phantom's bias field and Rician noise. The brain stays skull-stripped, like the template.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.interpolate import PchipInterpolator

from scripts.cohort import brain_phantom, causal_model, geometry
from scripts.cohort.mni152_template import LABELS, Mni152Template, load_template

__all__ = [
    "Mni152Exogenous",
    "sample_mni152_exogenous",
    "render_mni152",
    "measure_mni152",
    "default_shape",
    "TEMPLATE_TO_REFERENCE_AGE",
]

# Field of view (mm) of the default grids: holds every subject's whole brain (measured: docs/cohort_mni152.md).
FIELD_OF_VIEW_MM = (192.0, 240.0, 192.0)
DEFAULT_SPACING = 3.0
TEMPLATE_TO_REFERENCE_AGE = {"ventricle_volume": 1.5, "hippocampus_volume": 0.9, "cortical_thickness": 0.9}
TEMPLATE_CORTICAL_THICKNESS_MM = 2.5
FIELD_SPACING_MM = 2.0  # grid of the covariate effects' velocity fields
WARP_SPACING_MM = 6.0  # grid of the subject's random velocity field
WARP_HALF_EXTENT_MM = (96.0, 120.0, 102.0)


@dataclass(frozen=True)
class Mni152Exogenous(causal_model.Serialisable):
    """Per-subject exogenous factors U of a real-anatomy brain: everything about the image no covariate causes."""

    size_scale: float  # global linear size on top of the sex effect
    axis_scale: tuple[float, float, float]  # relative L-R, A-P, I-S stretch
    pose: tuple[float, float, float]  # pitch (about L-R), yaw (about I-S), roll (about A-P), degrees
    warp_seed: int  # random velocity field of the subject's anatomy
    warp_amplitude: float  # mm, RMS of that velocity field
    warp_smoothness: float  # mm, its Gaussian correlation length
    ventricle_scale: float  # lateral ventricle volume factor at the reference age
    hippocampus_scale: float  # hippocampal volume factor at the reference age
    contrast: tuple[float, float, float]  # multiplicative jitter of WM, GM, CSF intensities
    bias_field: tuple[float, ...]  # 9 coefficients of the log bias field, as in causal_model.BrainExogenous
    noise_sigma: float  # Rician noise standard deviation (image range ~[0, 1])
    noise_seed: int


def sample_mni152_exogenous(rng: np.random.Generator | int) -> Mni152Exogenous:
    """Draw real-anatomy brain exogenous factors from a generator or an integer seed."""
    rng = np.random.default_rng(rng)
    return Mni152Exogenous(
        size_scale=float(np.clip(rng.normal(1.0, 0.025), 0.94, 1.06)),
        axis_scale=tuple(float(v) for v in np.clip(rng.normal(1.0, 0.02, 3), 0.95, 1.05)),
        pose=(float(rng.uniform(-4.0, 4.0)), float(rng.uniform(-3.0, 3.0)), float(rng.uniform(-3.0, 3.0))),
        warp_seed=int(rng.integers(0, 2**31 - 1)),
        warp_amplitude=float(rng.uniform(2.0, 4.0)),
        warp_smoothness=float(rng.uniform(20.0, 30.0)),
        ventricle_scale=float(np.clip(rng.lognormal(0.0, 0.2), 0.65, 1.5)),
        hippocampus_scale=float(np.clip(rng.normal(1.0, 0.07), 0.85, 1.15)),
        contrast=tuple(float(v) for v in np.clip(rng.normal(1.0, 0.03, 3), 0.92, 1.08)),
        bias_field=tuple(float(v) for v in rng.normal(0.0, 1.0, 9) * np.array([0.06] * 3 + [0.05] * 3 + [0.03] * 3)),
        noise_sigma=float(rng.uniform(0.012, 0.025)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def default_shape(spacing: float) -> tuple[int, int, int]:
    """The grid of ``FIELD_OF_VIEW_MM`` at ``spacing`` mm, each side rounded up to a multiple of 16 voxels (what the
    bundle's networks need): (64, 80, 64) at 3 mm, (96, 128, 96) at 2 mm, (192, 240, 192) at 1 mm."""
    return tuple(int(16 * math.ceil(fov / spacing / 16.0)) for fov in FIELD_OF_VIEW_MM)


# ----------------------------------------------------------------------------------------------------------------
# Diffeomorphisms on regular grids
# ----------------------------------------------------------------------------------------------------------------


def _exponential(velocity: np.ndarray, spacing: float) -> np.ndarray:
    """Displacement (mm) after unit time of the flow of a stationary velocity field (mm), by scaling and squaring:
    halved until no vector exceeds a quarter voxel, then composed with itself as often."""
    largest = float(np.sqrt((velocity**2).sum(axis=0)).max())
    steps = max(int(math.ceil(math.log2(max(largest / (0.25 * spacing), 1.0)))), 1)
    displacement = (velocity / np.float32(2**steps)).astype(np.float32)
    nodes = np.indices(velocity.shape[1:], dtype=np.float32)
    for _ in range(steps):
        where = nodes + displacement / np.float32(spacing)
        displacement = displacement + np.stack(
            [ndimage.map_coordinates(d, where, order=1, mode="nearest") for d in displacement]
        )
    return displacement


def _sample_field(field: np.ndarray, lo: np.ndarray, spacing: float, points: np.ndarray) -> np.ndarray:
    """A (3, ...) field on a grid starting at ``lo`` mm, linearly interpolated at (3, N) points; zero outside."""
    where = (points - lo[:, None]) / np.float32(spacing)
    inside = np.all((where >= 0) & (where <= np.array(field.shape[1:], np.float32)[:, None] - 1), axis=0)
    values = np.zeros(points.shape, np.float32)
    for axis, component in enumerate(field):
        values[axis, inside] = ndimage.map_coordinates(component, where[:, inside], order=1, mode="nearest")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Covariate effects on the template, calibrated once per run
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _StructureEffect:
    """Velocity field that grows (alpha > 0) or shrinks (alpha < 0) one structure, with its volume calibration."""

    lo: np.ndarray  # MNI mm of the field's first node
    velocity: np.ndarray  # (3, nx, ny, nz), mm per unit alpha, largest norm 1
    alphas: np.ndarray  # increasing amplitudes (mm)
    ratios: np.ndarray  # structure volume under exp(alpha * velocity) over the template's, increasing

    def alpha(self, ratio: float) -> float:
        """Amplitude that brings the structure to ``ratio`` times its template volume: monotone cubic interpolation
        of the table in log volume, clipped to the table's range."""
        log_ratios = np.log(self.ratios)
        log_ratio = min(max(math.log(ratio), log_ratios[0]), log_ratios[-1])
        return float(PchipInterpolator(log_ratios, self.alphas)(log_ratio))

    def displacement(self, alpha: float) -> np.ndarray:
        return _exponential(np.float32(alpha) * self.velocity, FIELD_SPACING_MM)


def _box(mask: np.ndarray, margin: float) -> tuple[slice, ...]:
    found = np.argwhere(mask)
    lo = np.maximum(found.min(axis=0) - int(margin), 0)
    hi = np.minimum(found.max(axis=0) + int(margin) + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _gradient_velocity(mask: np.ndarray, sigma: float, step: int) -> np.ndarray:
    """Gradient of the Gaussian-blurred mask (1 mm voxels) on every ``step``-th voxel, scaled to largest norm 1."""
    blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma)[::step, ::step, ::step]
    velocity = np.stack(np.gradient(blurred, float(step))).astype(np.float32)
    return velocity / np.float32(np.sqrt((velocity**2).sum(axis=0)).max())


def _fade(masks: np.ndarray, step: int, dilation: int = 4) -> np.ndarray:
    """1 far from ``masks``, falling smoothly to 0 within ``dilation`` mm of them, on every ``step``-th voxel."""
    near = ndimage.binary_dilation(masks, iterations=dilation).astype(np.float32)
    return 1.0 - np.clip(2.0 * ndimage.gaussian_filter(near, 2.0)[::step, ::step, ::step], 0.0, 1.0)


def _structure_effect(
    template: Mni152Template, value: int, sigma: float, alphas: Sequence[float], spare: int
) -> _StructureEffect:
    """Velocity field of one label (faded out near the label ``spare``, whose volume has its own law) and its volume
    table, measured on the 1 mm template inside the field's box."""
    region = _box(template.label == value, 4.0 * sigma + 12.0)
    step = int(FIELD_SPACING_MM)
    velocity = _gradient_velocity(template.label[region] == value, sigma, step)
    velocity *= _fade(template.label[region] == spare, step)
    lo = np.array([s.start for s in region], np.float32) + np.array(template.origin, np.float32)
    # Only voxels the flow can reach change label: those within the blurred mask's support.
    support = ndimage.gaussian_filter((template.label[region] == value).astype(np.float32), sigma) > 1e-4
    points = np.argwhere(support).T.astype(np.float32) + lo[:, None]
    base = float((template.label[region] == value).sum())
    effect = _StructureEffect(lo, velocity, np.asarray(alphas, np.float64), np.ones(len(alphas)))
    ratios = []
    for alpha in alphas:
        moved = points + _sample_field(effect.displacement(alpha), lo, FIELD_SPACING_MM, points)
        ratios.append(float((_label_at(template, moved) == value).sum()) / base)
    ratios = np.maximum.accumulate(np.asarray(ratios)) * (1.0 + 1e-9 * np.arange(len(ratios)))  # strictly increasing
    return _StructureEffect(lo, velocity, np.asarray(alphas, np.float64), ratios)


def _cortex_displacement(template: Mni152Template) -> tuple[np.ndarray, np.ndarray]:
    """Unit displacement (2 mm grid over the template) pointing from the cortex into the outer CSF and background,
    faded out near the lateral ventricles and hippocampi whose volumes have their own laws."""
    label = template.label
    depth = ndimage.distance_transform_edt(label > 0)
    outer = (label == LABELS["background"]) | ((label == LABELS["csf"]) & (depth < 10.0))
    step = int(FIELD_SPACING_MM)
    displacement = _gradient_velocity(outer, 1.5, step)
    fade = _fade(np.isin(label, [LABELS["ventricles"], LABELS["hippocampus"]]), step)
    return displacement * fade, np.array(template.origin, np.float32)


@lru_cache(maxsize=2)
def _effects(template: Mni152Template) -> dict[str, Any]:
    """The covariate effects of ``template`` (about 20 s once per process)."""
    return {
        "ventricles": _structure_effect(
            template, LABELS["ventricles"], 5.0, np.linspace(-6.0, 30.0, 13), LABELS["hippocampus"]
        ),
        "hippocampus": _structure_effect(
            template, LABELS["hippocampus"], 3.0, np.linspace(-10.0, 3.0, 14), LABELS["ventricles"]
        ),
        "cortex": _cortex_displacement(template),
    }


def _label_at(template: Mni152Template, points: np.ndarray) -> np.ndarray:
    where = points - np.array(template.origin, np.float32)[:, None]
    return ndimage.map_coordinates(template.label, where, order=0, mode="constant", cval=0)


# ----------------------------------------------------------------------------------------------------------------
# Subject
# ----------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _subject_warp(seed: int, amplitude: float, smoothness: float) -> np.ndarray:
    """Displacement (mm, 6 mm grid over ``WARP_HALF_EXTENT_MM``) of the subject's random diffeomorphism."""
    shape = tuple(int(2 * h / WARP_SPACING_MM) + 1 for h in WARP_HALF_EXTENT_MM)
    noise = np.random.default_rng(seed).standard_normal((3, *shape)).astype(np.float32)
    velocity = np.stack([ndimage.gaussian_filter(n, smoothness / WARP_SPACING_MM, mode="wrap") for n in noise])
    velocity *= np.float32(amplitude / np.sqrt((velocity**2).sum(axis=0).mean()))
    displacement = _exponential(velocity, WARP_SPACING_MM)
    displacement.flags.writeable = False
    return displacement


def _template_points(
    u: Mni152Exogenous, sex: str, shape: tuple[int, ...], spacing: float, centre: Sequence[float]
) -> np.ndarray:
    """(3, N) MNI mm each output voxel shows before the age and diagnosis effects: size, pose, then ``phi_U``."""
    gx, gy, gz = geometry.mm_grid(shape, spacing)
    y, z = geometry.rotate(gy, gz, u.pose[0])
    x, y = geometry.rotate(gx, y, u.pose[1])
    x, z = geometry.rotate(x, z, u.pose[2])
    scale = causal_model.SEX_LINEAR_SCALE[sex] * u.size_scale
    points = np.stack([c.ravel() / np.float32(scale * a) for c, a in zip((x, y, z), u.axis_scale)])
    warp = _subject_warp(u.warp_seed, u.warp_amplitude, u.warp_smoothness)
    points += _sample_field(warp, -np.array(WARP_HALF_EXTENT_MM, np.float32), WARP_SPACING_MM, points)
    return points + np.array(centre, np.float32)[:, None]


def _effect_targets(u: Mni152Exogenous, covariates: Mapping[str, Any]) -> dict[str, float]:
    """Ventricle and hippocampus volume factors and cortical thinning (mm), all relative to the template."""
    growth = causal_model.brain_growth_factors(covariates)
    anchor = TEMPLATE_TO_REFERENCE_AGE
    thickness = anchor["cortical_thickness"] * growth["cortical_thickness"]
    return {
        "ventricles": anchor["ventricle_volume"] * u.ventricle_scale * growth["ventricle_volume"],
        "hippocampus": anchor["hippocampus_volume"] * u.hippocampus_scale * growth["hippocampus_volume"],
        "cortex_mm": TEMPLATE_CORTICAL_THICKNESS_MM * (1.0 - thickness),
    }


def _apply_effects(template: Mni152Template, u: Mni152Exogenous, covariates: Mapping[str, Any], q: np.ndarray):
    """Template points ``psi_cov(q)``: ventricles, then hippocampi, then cortex (pull-back order)."""
    effects, targets = _effects(template), _effect_targets(u, covariates)
    for name in ("ventricles", "hippocampus"):
        effect = effects[name]
        q = q + _sample_field(effect.displacement(effect.alpha(targets[name])), effect.lo, FIELD_SPACING_MM, q)
    cortex, lo = effects["cortex"]
    return q + np.float32(targets["cortex_mm"]) * _sample_field(cortex, lo, FIELD_SPACING_MM, q)


@lru_cache(maxsize=4)
def _smoothed_t1(template: Mni152Template, spacing: float) -> np.ndarray:
    """The template T1 blurred to the output voxel size (FWHM ``sqrt(spacing^2 - 1)`` mm) against aliasing."""
    sigma = math.sqrt(max(spacing**2 - 1.0, 0.0)) / 2.355
    return ndimage.gaussian_filter(template.t1, sigma) if sigma > 0 else template.t1


def _intensities(template: Mni152Template, u: Mni152Exogenous, covariates: Mapping[str, Any], t1: np.ndarray):
    """Template T1 values mapped piecewise-linearly to the reference-age levels with age contrast and U's jitter."""
    contrast = causal_model.brain_growth_factors(covariates)["gm_wm_contrast"]
    wm, gm = brain_phantom.T1_INTENSITIES["wm"] * u.contrast[0], brain_phantom.T1_INTENSITIES["gm"] * u.contrast[1]
    mid = 0.5 * (wm + gm)
    wm, gm = mid + (wm - mid) * contrast, mid - (mid - gm) * contrast
    csf = brain_phantom.T1_INTENSITIES["csf"] * u.contrast[2]
    levels = template.levels
    slope = (wm - gm) / (levels["wm"] - levels["gm"])
    knots = [0.0, levels["csf"], levels["gm"], levels["wm"], 255.0]
    values = [0.0, csf, gm, wm, wm + (255.0 - levels["wm"]) * slope]
    return np.interp(t1, knots, values).astype(np.float32)


def render_mni152(
    u: Mni152Exogenous,
    covariates: Mapping[str, Any],
    shape: Sequence[int] | None = None,
    spacing: float | None = None,
    template: Mni152Template | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a T1-weighted brain of real anatomy and its label map; deterministic in (u, covariates, grid).

    Args:
        u: exogenous factors of the subject.
        covariates: ``{"age": years, "sex": "F"|"M", "diagnosis": "CN"|"MCI"|"AD"}``.
        shape: voxel grid (RAS, centred on the brain); ``None`` = ``default_shape(spacing)``.
        spacing: isotropic voxel size in mm; ``None`` = 3 mm.
        template: the template (``load_template()``); ``None`` = the installed nilearn's, derived or from memory.

    Returns:
        ``(image, label)``: float32 intensities (about [0, 1], Rician noise) and uint8 ``BRAIN_LABELS``.
    """
    if not isinstance(u, Mni152Exogenous):
        raise TypeError(f"u must be a Mni152Exogenous for --anatomy mni152, got {type(u).__name__}.")
    spacing = causal_model.check_spacing(spacing if spacing is not None else DEFAULT_SPACING)
    shape = causal_model.check_shape(shape, 3, default_shape(spacing))
    cov = causal_model.check_brain_covariates(covariates)
    template = template or load_template()
    points = _apply_effects(template, u, cov, _template_points(u, cov["sex"], shape, spacing, template.centre))
    label = _label_at(template, points).reshape(shape)
    where = points - np.array(template.origin, np.float32)[:, None]
    t1 = ndimage.map_coordinates(_smoothed_t1(template, spacing), where, order=1, mode="constant", cval=0.0)
    image = _intensities(template, u, cov, t1.reshape(shape))
    return brain_phantom.acquire(image, shape, spacing, u.bias_field, u.noise_sigma, u.noise_seed), label


def measure_mni152(label: np.ndarray, spacing: float) -> dict[str, float]:
    """``brain_phantom.measure_brain`` volumes (ml) plus grey matter (cortex and deep grey, without hippocampi)."""
    volumes = brain_phantom.measure_brain(label, spacing)
    volumes["gray_matter_ml"] = float((np.asarray(label) == LABELS["gray_matter"]).sum()) * float(spacing) ** 3 / 1000.0
    return volumes
