"""The chest radiograph: an analytic projection of the thorax rendered from exogenous factors and covariates, and its
measurements.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from scripts.cohort.causal_model import (
    BONE_DENSITY_LOSS_PER_YEAR,
    CARDIOMEGALY_WIDTH_FACTOR,
    CHEST_FIELD_OF_VIEW_MM,
    CHEST_LABELS,
    CHEST_SEX_LINEAR_SCALE,
    DEFAULT_CHEST_SHAPE,
    ChestExogenous,
    check_chest_covariates,
    check_shape,
)
from scripts.cohort.geometry import coverage, ellipsoid_distance, mm_grid, random_waves, rotate

# ----------------------------------------------------------------------------------------------------------------
# Chest
# ----------------------------------------------------------------------------------------------------------------


DIAPHRAGM_CURVATURE = 0.009  # of the diaphragm domes (mm^-1), also sets the costophrenic angles' height


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
    shape = check_shape(shape, 2, DEFAULT_CHEST_SHAPE)
    cov = check_chest_covariates(covariates)
    x, y, px = _reference_frame(u, cov["sex"], shape)
    g = _chest_anatomy(u, cov)
    body, soft = _body(x, y, g, px)
    diaphragm, cavity, cavity_half_width = _thoracic_cavity(x, y, g)
    heart, right_lung, left_lung = _heart_and_lungs(x, y, g, cavity)
    air = _air(x, y, g, px, u.vessel_seed, body, diaphragm, cavity, heart, right_lung, left_lung)
    fluid, consolidation = _findings(x, y, g, u, cov, shape, px, right_lung, left_lung)
    air *= 1.0 - np.maximum(fluid * 0.9, consolidation * 0.75)
    bone = _bones(x, y, u, cov["age"], px, cavity_half_width, body)
    breast = _breasts(x, y, shape) if cov["sex"] == "F" else np.zeros(shape, np.float32)
    image = _project(soft, air, breast, bone, u, shape)
    label = _labels(shape, y, body, bone, diaphragm, heart, right_lung, left_lung, consolidation, fluid)
    return image.astype(np.float32), label


def _reference_frame(u: ChestExogenous, sex: str, shape) -> tuple[np.ndarray, np.ndarray, float]:
    """The pixel grid in the subject's reference-size frame (mm, x towards the patient's left, y up) and pixel size."""
    spacing = CHEST_FIELD_OF_VIEW_MM / max(shape)
    rows, cols = mm_grid(shape, spacing)
    scale = CHEST_SEX_LINEAR_SCALE[sex] * u.size_scale
    x = cols / np.float32(scale)
    y = -rows / np.float32(scale * u.aspect)
    return x, y, spacing / scale


def _findings(x, y, g, u: ChestExogenous, cov, shape, px, right_lung, left_lung) -> tuple[np.ndarray, np.ndarray]:
    """The pleural fluid and the consolidation (zero where the covariates say absent)."""
    lung_cov = np.maximum(coverage(right_lung, px), coverage(left_lung, px))
    fluid = _effusion(x, y, g, u, shape) if cov["effusion"] else np.zeros(shape, np.float32)
    consolidation = _opacity(x, y, g, u, lung_cov) if cov["opacity"] else np.zeros(shape, np.float32)
    return fluid, consolidation


def _labels(shape, y, body, bone, diaphragm, heart, right_lung, left_lung, consolidation, fluid) -> np.ndarray:
    """The label map, by priority: effusion/opacity > heart > lungs > bone > soft tissue."""
    label = np.zeros(shape, np.uint8)
    label[body < 0] = CHEST_LABELS["soft_tissue"]
    label[(bone > 6.0) & (body < 0)] = CHEST_LABELS["bone"]
    label[right_lung < 0] = CHEST_LABELS["right_lung"]
    label[left_lung < 0] = CHEST_LABELS["left_lung"]
    label[(heart < 0) & (y > diaphragm)] = CHEST_LABELS["heart"]
    in_lung = (right_lung < 0) | (left_lung < 0)
    label[in_lung & (consolidation > 0.5)] = CHEST_LABELS["opacity"]
    label[in_lung & (fluid > 0.5)] = CHEST_LABELS["effusion"]
    return label


def _body(x, y, g, px) -> tuple[np.ndarray, np.ndarray]:
    """The body outline (signed distance) and the soft-tissue path length through it."""
    ax = np.abs(x)
    torso = ellipsoid_distance((x, y), (0.0, -40.0), (g["half_width"] + 28.0, 260.0))
    torso = np.maximum(torso, y - 150.0 + 0.004 * x**2)  # shoulders slope down laterally
    neck = np.maximum(ax - 50.0, -y + 100.0)
    body = np.minimum(torso, neck)
    body_depth = 230.0 * np.sqrt(np.clip(1.0 - (x / (g["half_width"] + 40.0)) ** 2, 0.02, 1.0))
    return body, body_depth * coverage(body, px)


def _thoracic_cavity(x, y, g) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The diaphragm domes, the thoracic cavity (signed distance) and its half width per row."""
    dome_r = g["dome_right"] - DIAPHRAGM_CURVATURE * (x + 68.0) ** 2
    dome_l = g["dome_left"] - DIAPHRAGM_CURVATURE * (x - 70.0) ** 2
    diaphragm = np.maximum(dome_r, dome_l)
    widest_y = -80.0
    upper = np.clip(1.0 - ((y - widest_y) / 228.0) ** 2, 0.0, None)
    cavity_half_width = g["half_width"] * np.where(y > widest_y, np.sqrt(upper), 1.0)
    cavity = np.maximum(np.abs(x) - cavity_half_width, diaphragm - y)
    return diaphragm, cavity, cavity_half_width


def _heart_and_lungs(x, y, g, cavity) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heart, then the lungs: the cavity less the heart and the mediastinum (with the aortic knob)."""
    hx, hy = rotate(x - g["heart_cx"], y - g["heart_cy"], -g["heart_angle"])
    heart = ellipsoid_distance((hx, hy), (0.0, 0.0), (g["heart_p"], g["heart_q"]))
    aortic_knob = ellipsoid_distance((x, y), (22.0, 68.0), (12.0, 13.0))
    mediastinum = np.minimum(np.where(x < 0, -x - 27.0, x - 22.0), aortic_knob)
    mediastinum = np.maximum(mediastinum, -(y - g["heart_cy"]) - 10.0)  # above the heart the mediastinum
    mediastinum = np.minimum(mediastinum, np.where(y < g["heart_cy"], np.abs(x) - 20.0, 1e3))
    lung_sd = np.maximum.reduce([cavity, -heart, -mediastinum])
    return heart, np.maximum(lung_sd, x), np.maximum(lung_sd, -x)


def _air(x, y, g, px, vessel_seed, body, diaphragm, cavity, heart, right_lung, left_lung) -> np.ndarray:
    """Air path length: deepest mid-lung, thin at the apex, lateral wall and medially; airways, gastric bubble and
    pulmonary vessels branching from each hilum."""
    ax = np.abs(x)
    lung_depth = 200.0 * np.sqrt(np.clip(1.0 - ((ax - 70.0) / 90.0) ** 2, 0.0, 1.0))
    lung_depth *= np.sqrt(np.clip((150.0 - y) / 60.0, 0.0, 1.0))
    air = lung_depth * np.maximum(coverage(right_lung, px), coverage(left_lung, px))
    air += 0.05 * lung_depth * coverage(np.maximum(np.maximum(heart, cavity), diaphragm - y), px)
    trachea = np.maximum(ax - 8.0, -(y - 55.0))
    air += 18.0 * coverage(np.maximum(trachea, body), px)
    bronchi = np.minimum(np.abs((x + 2.0) + 0.8 * (y - 55.0)) - 6.0, np.abs((x - 2.0) - 1.0 * (y - 55.0)) - 6.0)
    air += 14.0 * coverage(np.maximum.reduce([bronchi, y - 58.0, 30.0 - y]), px)
    gastric = ellipsoid_distance((x, y), (72.0, g["dome_left"] - 32.0), (26.0, 16.0))
    air += 45.0 * coverage(np.maximum(gastric, y - diaphragm + 6.0), px)
    vessels = _vessel_tree(x, y, vessel_seed) * np.maximum(coverage(right_lung, px), coverage(left_lung, px))
    return np.clip(air - 2.5 * vessels, 0.0, None)


def _effusion(x, y, g, u: ChestExogenous, shape) -> np.ndarray:
    """Pleural fluid filling the costophrenic angle(s) up to a meniscus that rises towards the lateral wall."""
    fluid = np.zeros(shape, np.float32)
    sides = {"right": (-1.0,), "left": (1.0,), "both": (-1.0, 1.0)}[u.effusion_side]
    for side in sides:
        dome_level = g["dome_right"] if side < 0 else g["dome_left"]
        angle_y = dome_level - DIAPHRAGM_CURVATURE * (g["half_width"] - 70.0) ** 2  # costophrenic angle height
        lateral = np.clip((side * x - 25.0) / (g["half_width"] - 25.0), 0.0, 1.0)
        level = angle_y + u.effusion_height * (0.45 + 0.55 * lateral**2)  # meniscus rises laterally
        fluid = np.maximum(fluid, _smoothstep((level - y) / 10.0 + 0.5) * (side * x > 0))
    return fluid


def _opacity(x, y, g, u: ChestExogenous, lung_cov) -> np.ndarray:
    """A patchy consolidation inside one lung at the subject's opacity centre."""
    side = -1.0 if u.opacity_center[0] < 0.5 else 1.0
    ox = side * (40.0 + 85.0 * abs(u.opacity_center[0] - 0.5) * 2.0)
    oy = g["dome_right"] + 25.0 + 160.0 * u.opacity_center[1]
    blob = ellipsoid_distance((x, y), (ox, oy), (u.opacity_radius, 0.8 * u.opacity_radius))
    texture = random_waves((x, y), u.vessel_seed + 7, 22.0, 12)
    return _smoothstep(-(blob + 6.0 * texture) / 12.0 + 0.5) * lung_cov


def _bones(x, y, u: ChestExogenous, age: float, px, cavity_half_width, body) -> np.ndarray:
    """Spine, posterior and anterior ribs and clavicles, their density falling with age after 40."""
    ax = np.abs(x)
    bone_density = 1.0 - BONE_DENSITY_LOSS_PER_YEAR * max(age - 40.0, 0.0)
    spine_phase = np.cos(2.0 * np.pi * (y - u.rib_offset) / 26.0)
    bone = 11.0 * coverage(ax - 16.0, px) * (0.8 + 0.2 * _smoothstep(spine_phase * 3.0 + 1.5))
    bone += 10.0 * coverage(ellipsoid_distance((ax, np.mod(y - u.rib_offset, 26.0)), (14.0, 13.0), (4.0, 5.0)), px)
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
    return bone * bone_density * coverage(body, px)


def _breasts(x, y, shape) -> np.ndarray:
    """Breast soft-tissue shadows ("F")."""
    breast = np.zeros(shape, np.float32)
    for side in (-1.0, 1.0):
        b = ellipsoid_distance((x, y), (side * 100.0, -70.0), (75.0, 55.0))
        breast += 40.0 * _smoothstep(-b / 30.0)
    return breast


def _project(soft, air, breast, bone, u: ChestExogenous, shape) -> np.ndarray:
    """Projection, film response, blur and noise."""
    attenuation = (soft - air + breast) / 150.0 + bone / 45.0
    gain = 1.3 * u.exposure
    image = 1.0 - np.exp(-gain * np.clip(attenuation, 0.0, None))
    image = np.clip(image / (1.0 - math.exp(-2.6 * gain)), 0.0, 1.0) ** (1.3 * u.gamma)
    image = ndimage.gaussian_filter(image.astype(np.float32), sigma=0.6 * max(shape) / 256.0 + 0.3)
    noise = np.random.default_rng(u.noise_seed).standard_normal(shape, dtype=np.float32)
    return np.clip(image + np.float32(u.noise_sigma) * np.sqrt(image + 0.05) * noise, 0.0, 1.0)


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
