"""The cartoon brain (`anatomy="phantom"`): a procedural 3D T1-weighted head rendered from exogenous factors and
covariates, and its measurements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scripts.cohort.causal_model import (
    BRAIN_LABELS,
    DEFAULT_BRAIN_SHAPE,
    DEFAULT_BRAIN_SPACING,
    BrainExogenous,
    brain_growth_factors,
    check_brain_covariates,
    check_shape,
    check_spacing,
)
from scripts.cohort.geometry import Painter, ellipsoid_distance, mm_grid, random_waves, rotate

# T1-weighted intensities at the reference age before contrast jitter, bias field and noise.
T1_INTENSITIES = {"wm": 0.86, "gm": 0.56, "deep_gm": 0.64, "csf": 0.10, "scalp": 0.72, "bone": 0.07, "marrow": 0.42}
T1_INTENSITIES.update({"hippocampus": 0.58, "brainstem": 0.78, "neck": 0.38})


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
    shape = check_shape(shape, 3, DEFAULT_BRAIN_SHAPE)
    spacing = check_spacing(spacing)
    effect = brain_growth_factors(check_brain_covariates(covariates))
    pts, scale = _head_frame(u, effect, shape, spacing)
    # Anatomy is built in the scaled frame; distances are converted back to mm for partial-volume ramps.
    paint = Painter(shape, spacing / float(scale))
    levels = _tissue_levels(u, effect)
    icv = _paint_head(paint, pts, u, levels)
    tentorium_z = _paint_cerebrum(paint, pts, icv, u, effect, levels)
    _paint_hindbrain(paint, pts, icv, tentorium_z, u, levels)
    vent_linear = (u.ventricle_scale * effect["ventricle_volume"]) ** (1.0 / 3.0)
    _paint_deep_grey(paint, pts, vent_linear, levels)
    _paint_lateral_ventricles(paint, pts, u, vent_linear, levels)
    _paint_hippocampi(paint, pts, u, effect)
    # Acquisition: smooth multiplicative bias field and Rician noise.
    return acquire(paint.image, shape, spacing, u.bias_field, u.noise_sigma, u.noise_seed), paint.label


def _head_frame(u: BrainExogenous, effect: Mapping[str, float], shape, spacing) -> tuple[tuple[np.ndarray, ...], float]:
    """Voxel positions in the head's frame: pose, then the world scaled so the anatomy is that of a reference head."""
    gx, gy, gz = mm_grid(shape, spacing)
    y, z = rotate(gy, gz, u.pose[0])
    x, y = rotate(gx, y, u.pose[1])
    scale = effect["linear_size"] * u.size_scale
    sx, sy, sz = (scale * a for a in u.axis_scale)
    return (x / np.float32(sx), y / np.float32(sy), z / np.float32(sz)), scale


def _tissue_levels(u: BrainExogenous, effect: Mapping[str, float]) -> dict[str, float]:
    """T1 intensities of white and grey matter (their contrast fading with age), deep grey nuclei and CSF."""
    contrast = effect["gm_wm_contrast"]
    wm_level = T1_INTENSITIES["wm"] * u.contrast[0]
    gm_level = T1_INTENSITIES["gm"] * u.contrast[1]
    mid = 0.5 * (wm_level + gm_level)
    wm_level, gm_level = mid + (wm_level - mid) * contrast, mid - (mid - gm_level) * contrast
    deep_gm_level = mid - (mid - T1_INTENSITIES["deep_gm"]) * contrast
    return {"wm": wm_level, "gm": gm_level, "deep_gm": deep_gm_level, "csf": T1_INTENSITIES["csf"] * u.contrast[2]}


def _paint_head(paint: Painter, pts, u: BrainExogenous, levels: Mapping[str, float]) -> np.ndarray:
    """Neck, scalp, skull and marrow, then the intracranial CSF; returns the intracranial surface's distance."""
    x, y, z = pts
    icv_center, icv_axes = (0.0, -4.0, 8.0), (62.0, 78.0, 60.0)
    head = ellipsoid_distance(pts, icv_center, [a + 12.0 for a in icv_axes])
    neck = np.maximum(ellipsoid_distance((x, y), (0.0, -14.0), (42.0, 46.0)), z + 30.0)
    paint.paint(np.minimum(head, neck), T1_INTENSITIES["neck"], BRAIN_LABELS["extracranial"])
    paint.paint(np.maximum(head, -(head + 4.0)), T1_INTENSITIES["scalp"] * u.contrast[3], BRAIN_LABELS["extracranial"])
    skull = ellipsoid_distance(pts, icv_center, [a + 7.5 for a in icv_axes])
    paint.paint(skull, T1_INTENSITIES["bone"], BRAIN_LABELS["extracranial"])
    diploe = ellipsoid_distance(pts, icv_center, [a + 5.0 for a in icv_axes])
    paint.paint(np.maximum(diploe, -(diploe + 2.5)), T1_INTENSITIES["marrow"], BRAIN_LABELS["extracranial"])
    icv = ellipsoid_distance(pts, icv_center, icv_axes)
    paint.paint(icv, levels["csf"], BRAIN_LABELS["csf"])
    return icv


def _paint_cerebrum(paint: Painter, pts, icv, u: BrainExogenous, effect, levels) -> np.ndarray:
    """Cortex and white matter by depth below the nearest CSF (surface, sulci, fissures); returns the tentorium."""
    x, y, z = pts
    widening = effect["sulcal_widening_mm"]
    depth = -icv - (1.8 + widening)  # depth below the gyral crowns
    folding = random_waves(pts, u.folding_seed, u.folding_wavelength, 32)
    sulcal_depth = u.sulcal_depth * (1.0 + 0.3 * random_waves(pts, u.folding_seed + 1, 60.0, 6))
    sulcus_plane = np.abs(folding) * np.float32(u.folding_wavelength / (2.0 * np.pi))
    sulcus = np.sqrt(sulcus_plane**2 + np.maximum(depth - sulcal_depth, 0.0) ** 2) - (0.9 + widening)
    # Interhemispheric fissure: the x=0 plane, except through the central core (corpus callosum, diencephalon).
    core = ellipsoid_distance((y, z), (-6.0, 6.0), (38.0, 22.0))
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
    paint.paint(np.maximum(-to_csf, supratentorial), levels["gm"], BRAIN_LABELS["gray_matter"])
    wm_mod = 0.6 * random_waves(pts, u.folding_seed + 2, 14.0, 8)  # gyral white-matter cores vary in width
    paint.paint(np.maximum(cortex_mm + wm_mod - to_csf, supratentorial), levels["wm"], BRAIN_LABELS["white_matter"])
    return tentorium_z


def _paint_hindbrain(paint: Painter, pts, icv, tentorium_z, u: BrainExogenous, levels) -> None:
    """Cerebellum with its folia and arbor vitae, fourth ventricle, brainstem and the cord in its canal."""
    x, y, z = pts
    csf_level, brainstem_level = levels["csf"], T1_INTENSITIES["brainstem"] * u.contrast[0]
    cerebellum = np.maximum(ellipsoid_distance(pts, (0.0, -50.0, -36.0), (54.0, 32.0, 24.0)), icv + 2.5)
    cerebellum = np.maximum(cerebellum, z - tentorium_z + 2.5)
    cb_r = np.sqrt((y + 26.0) ** 2 + (z + 34.0) ** 2 + (0.4 * x) ** 2)  # folia: arcs about the peduncles
    folia = np.cos(2.0 * np.pi * cb_r / 6.5 + 0.6 * np.cos(np.arctan2(z + 34.0, y + 26.0) * 9.0))
    paint.paint(cerebellum, levels["gm"], BRAIN_LABELS["gray_matter"])
    paint.paint(np.maximum(cerebellum, (0.85 - folia) * 3.0), csf_level, BRAIN_LABELS["csf"])
    arbor = ellipsoid_distance(pts, (0.0, -40.0, -34.0), (32.0, 16.0, 10.0))
    arbor_vitae = np.minimum(arbor + 4.0, np.maximum(arbor, (folia + 0.3) * 3.0))
    paint.paint(arbor_vitae, levels["wm"], BRAIN_LABELS["white_matter"])
    fourth_ventricle = ellipsoid_distance(pts, (0.0, -33.0, -32.0), (5.0, 4.0, 7.0))
    paint.paint(fourth_ventricle, csf_level, BRAIN_LABELS["csf"])
    stem_y = y - (-18.0 + 0.25 * (np.maximum(z, -45.0) + 5.0))  # midbrain -> pons -> medulla, then the cord
    stem = ellipsoid_distance((x, stem_y), (0.0, 0.0), (12.0, 11.0))
    paint.paint(np.maximum(stem, z), brainstem_level, BRAIN_LABELS["white_matter"])
    foramen_magnum = z + 45.0  # below it the cord sits in a CSF-filled canal
    paint.paint(np.maximum(stem, foramen_magnum), csf_level, BRAIN_LABELS["csf"])
    cord = ellipsoid_distance((x, stem_y), (0.0, 0.0), (7.0, 6.5))
    paint.paint(np.maximum(cord, foramen_magnum), brainstem_level, BRAIN_LABELS["white_matter"])


def _paint_deep_grey(paint: Painter, pts, vent_linear: float, levels) -> None:
    """Caudate (hugging the ventricles as they grow), putamen, thalamus and the third ventricle."""
    for side in (-1.0, 1.0):
        caudate = ellipsoid_distance(pts, (side * (7.0 + 6.0 * vent_linear), 10.0, 12.0), (5.5, 14.0, 8.0))
        paint.paint(caudate, levels["deep_gm"], BRAIN_LABELS["gray_matter"])
        putamen = ellipsoid_distance(pts, (side * 24.0, 2.0, 2.0), (6.0, 15.0, 9.0))
        paint.paint(putamen, levels["deep_gm"], BRAIN_LABELS["gray_matter"])
        thalamus = ellipsoid_distance(pts, (side * 9.0, -14.0, 4.0), (8.5, 14.0, 9.0))
        paint.paint(thalamus, levels["deep_gm"] + 0.03, BRAIN_LABELS["gray_matter"])
    third_ventricle = ellipsoid_distance(pts, (0.0, -8.0, 2.0), (1.0 + 0.5 * vent_linear, 16.0, 9.0))
    paint.paint(third_ventricle, levels["csf"], BRAIN_LABELS["csf"])


def _paint_lateral_ventricles(paint: Painter, pts, u: BrainExogenous, vent_linear: float, levels) -> None:
    """Lateral ventricles: a scaled copy about the ventricular centre, so their volume follows the growth law."""
    x, y, z = pts
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
            px, pz = rotate(lx - side * cx, lz - cz, side * tilt)
            px, py = rotate(px, ly - cy, side * yaw)
            parts.append(ellipsoid_distance((px, py, pz), (0.0, 0.0, 0.0), axes))
        ventricle = np.minimum.reduce(parts) * side_linear
        ventricle = np.maximum(ventricle, 0.8 - side * x)  # septum pellucidum
        paint.paint(ventricle, levels["csf"], BRAIN_LABELS["ventricles"])


def _paint_hippocampi(paint: Painter, pts, u: BrainExogenous, effect) -> None:
    """Hippocampi in the medial temporal lobes, under the temporal horns, scaled by the atrophy law."""
    x, y, z = pts
    hippo_linear = (u.hippocampus_scale * effect["hippocampus_volume"]) ** (1.0 / 3.0)
    for side in (-1.0, 1.0):
        center = np.array([side * 25.0, -16.0, -26.0])
        hx, hy = rotate((x - center[0]) / hippo_linear, (y - center[1]) / hippo_linear, -side * 18.0)
        hz = (z - center[2]) / hippo_linear - 0.012 * hy**2
        hippocampus = ellipsoid_distance((hx, hy, hz), (0.0, 0.0, 0.0), (6.0, 20.0, 7.0)) * hippo_linear
        paint.paint(hippocampus, T1_INTENSITIES["hippocampus"] * u.contrast[1], BRAIN_LABELS["hippocampus"])


def acquire(
    image: np.ndarray,
    shape: tuple[int, ...],
    spacing: float,
    bias_field: Sequence[float],
    noise_sigma: float,
    seed: int,
) -> np.ndarray:
    """The brain volume as acquired: a smooth multiplicative bias field (log: a quadratic in grid-centred mm / 100,
    coefficients x, y, z, x^2, y^2, z^2, xy, xz, yz) and Rician noise of ``noise_sigma`` drawn from ``seed``."""
    gx, gy, gz = mm_grid(tuple(shape), spacing)
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
