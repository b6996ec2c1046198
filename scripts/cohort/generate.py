"""Writing cohorts: subjects and visits as NIfTI/PNG files with label maps, measurements and a MONAI datalist; reading
a subject back and writing the true counterfactual of any subject.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scripts.cohort.brain_phantom import measure_brain
from scripts.cohort.causal_model import (
    BONE_DENSITY_LOSS_PER_YEAR,
    BRAIN_LABELS,
    CARDIOMEGALY_WIDTH_FACTOR,
    CHEST_FIELD_OF_VIEW_MM,
    CHEST_LABELS,
    CHEST_SEX_LINEAR_SCALE,
    CORTEX_THINNING_PER_YEAR,
    DEFAULT_BRAIN_SHAPE,
    DEFAULT_CHEST_SHAPE,
    DIAGNOSES,
    GM_WM_CONTRAST_DECAY_PER_YEAR,
    HIPPOCAMPUS_SHRINK_PER_YEAR,
    REFERENCE_AGE,
    SEX_LINEAR_SCALE,
    SEXES,
    SULCAL_WIDENING_MM_PER_YEAR,
    VENTRICLE_GROWTH_PER_YEAR,
    BrainExogenous,
    ChestExogenous,
    check_brain_covariates,
    check_chest_covariates,
    check_modality,
    check_shape,
    check_spacing,
)
from scripts.cohort.chest_phantom import measure_chest
from scripts.cohort.render import (
    check_anatomy,
    check_profile,
    counterfactual,
    identifiable_counterfactual,
    prior_draw,
    render,
)
from scripts.io.files import atomic_write

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


def _sample_brain_visits(rng: np.random.Generator, visits: int, progression: float = 0.0) -> list[dict[str, Any]]:
    """
    A subject's visits 1-3 years apart. With `progression` > 0, the diagnosis advances one stage (CN -> MCI -> AD)
    between two visits with probability 1 - (1 - progression)^years; at 0 no extra number is drawn, so cohorts
    generated before the option existed come out byte for byte.
    """
    sex = str(rng.choice(SEXES))
    stage = int(rng.choice(len(DIAGNOSES), p=[0.4, 0.3, 0.3]))
    age = float(rng.uniform(55.0, 85.0))
    out = []
    for _ in range(visits):
        out.append({"age": round(age, 2), "sex": sex, "diagnosis": str(DIAGNOSES[stage])})
        years = float(rng.uniform(1.0, 3.0))
        age += years
        if progression > 0 and stage < len(DIAGNOSES) - 1 and rng.random() < 1 - (1 - progression) ** years:
            stage += 1
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
    progression: float = 0.0,
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
        progression: brain only: the yearly probability that a subject's diagnosis advances one stage (CN -> MCI
            -> AD) between visits, in [0, 1); 0 (the default) keeps every subject's diagnosis, as in the cohorts
            the shipped models were trained on, so paired models see no diagnosis change.

    Returns:
        path of ``datalist.json``.
    """
    modality = check_modality(modality)
    check_profile(modality, profile)
    check_anatomy(modality, anatomy)
    visits_per_subject = _checked_counts(modality, num_subjects, visits_per_subject, val_fraction, spacing)
    progression = _checked_progression(modality, progression)
    shape, spacing = _grid_of(modality, anatomy, shape, spacing)
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    extras = _anatomy_record(anatomy, output_dir)
    grid = {"shape": shape, "spacing": spacing, "profile": profile, "anatomy": anatomy}
    subjects = [f"sub-{i + 1:04d}" for i in range(int(num_subjects))]
    records = _write_cohort_subjects(output_dir, modality, subjects, int(visits_per_subject), grid, extras, seed,
                                     progression)  # fmt: skip
    datalist = _split_by_subject(subjects, records, val_fraction, seed)
    counts = {"num_subjects": int(num_subjects), "visits_per_subject": int(visits_per_subject)}
    if progression:  # recorded only when used, so the summary of a cohort without it is unchanged
        counts["progression"] = progression
    _write_cohort_summary(output_dir, modality, counts, grid, int(seed), extras)
    datalist_path = os.path.join(output_dir, "datalist.json")
    _write_json(datalist_path, datalist)
    return datalist_path


def _checked_progression(modality: str, progression: Any) -> float:
    if isinstance(progression, bool) or not isinstance(progression, (int, float)) or not 0 <= progression < 1:
        raise ValueError(f"progression must be a yearly probability in [0, 1), got {progression!r}.")
    if progression and modality != "brain":
        raise ValueError("progression (diagnosis conversion between visits) applies to the brain modality only.")
    return float(progression)


def _checked_counts(modality: str, num_subjects, visits_per_subject, val_fraction, spacing) -> int:
    """The subject and visit counts, split fraction and spacing checked; returns the visits per subject."""
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
    return visits_per_subject


def _write_cohort_subjects(
    output_dir: str, modality: str, subjects: list[str], visits_per_subject: int, grid: dict, extras: dict, seed,
    progression: float = 0.0,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Draw every subject's exogenous factors and visits from ``seed`` and write them; return records per subject."""
    anatomy = grid["anatomy"]
    rng = np.random.default_rng(seed)
    records: dict[str, list[dict[str, Any]]] = {}
    progress = _progress(subjects, f"{modality} cohort ({anatomy})", len(subjects) * visits_per_subject)
    for subject in progress:
        subject_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        u = prior_draw(modality, anatomy, subject_rng)
        if modality == "brain":
            visits = _sample_brain_visits(subject_rng, visits_per_subject, progression)
        else:
            visits = _sample_chest_visits(subject_rng, visits_per_subject)
        records[subject] = _write_cohort_subject(output_dir, modality, subject, u, visits, grid, extras)
    return records


def _write_cohort_summary(
    output_dir: str, modality: str, counts: Mapping[str, Any], grid: Mapping[str, Any], seed: int, extras: dict
) -> None:
    """Write ``cohort.json``: the generator settings, the label ids and the causal constants of the modality."""
    _write_json(
        os.path.join(output_dir, "cohort.json"),
        {
            "modality": modality,
            "num_subjects": counts["num_subjects"],
            "visits_per_subject": counts["visits_per_subject"],
            **{key: counts[key] for key in ("progression",) if key in counts},
            "shape": list(grid["shape"]),
            "spacing": grid["spacing"],
            "seed": seed,
            "profile": grid["profile"],
            "labels": BRAIN_LABELS if modality == "brain" else CHEST_LABELS,
            "mechanisms": _mechanisms(modality),
            **extras,
        },
    )


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
        return check_shape(shape, 2, DEFAULT_CHEST_SHAPE), None
    spacing = check_spacing(spacing)
    if anatomy == "mni152":
        from scripts.cohort.mni152 import default_shape

        return check_shape(shape, 3, default_shape(spacing)), spacing
    return check_shape(shape, 3, DEFAULT_BRAIN_SHAPE), spacing


def _anatomy_record(anatomy: str, cohort_dir: str, write_cache: bool = True) -> dict[str, Any]:
    """Keys the exogenous and cohort files add for a real anatomy: its name and the hash of its label map (derived
    once and cached under ``cohort_dir/template``); empty for the phantom, whose files stay as they were."""
    if anatomy == "phantom":
        return {}
    from scripts.cohort.mni152_template import load_template

    template = load_template(cohort_dir, write_cache=write_cache)
    return {"anatomy": anatomy, "template_sha256": template.sha256}


def _measure_scan(anatomy: str, label: np.ndarray, spacing: float | None) -> dict[str, float]:
    if anatomy != "mni152":
        return {}
    from scripts.cohort.mni152 import measure_mni152

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
    modality = check_modality(modality)
    check_anatomy(modality, anatomy)
    u = prior_draw(modality, anatomy, np.random.default_rng(seed))
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
    modality = check_modality(content["modality"])
    anatomy = check_anatomy(modality, content.get("anatomy", "phantom"))
    if anatomy == "mni152":
        from scripts.cohort.mni152 import Mni152Exogenous

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
        from scripts.cohort.mni152_template import NILEARN_PIN

        raise ValueError(
            f"{cohort_dir}/exogenous/{subject}.json was rendered from template labels sha256 {recorded}, but this "
            f"installation gives {current} (another nilearn or scripts/cohort/mni152_template.py): install {NILEARN_PIN} "
            "or regenerate the cohort."
        )


def write_counterfactual_truth(
    cohort_dir: str | os.PathLike,
    subject: str,
    changes: Mapping[str, Any],
    visit: int = 0,
    output_dir: str | os.PathLike | None = None,
    unobserved_draws: int = 0,
) -> dict[str, Any]:
    """Write the ground-truth counterfactual of a cohort scan under ``changes`` (e.g. ``{"age": 80}``).

    Files go to ``output_dir`` (default ``<cohort_dir>/counterfactuals``): ``images/<stem>``, ``labels/<stem>``
    and ``<stem>.json`` with the factual and counterfactual covariates and measurements, where ``<stem>`` is
    ``sub-XXXX_visit-V_cf-<change>``. Returns that JSON content with absolute ``image``/``label`` paths.
    ``unobserved_draws`` > 0 writes instead the best counterfactual the scan alone allows (`identifiable_counterfactual`
    over that many draws; stem suffix ``_identifiable``, and ``unobserved_factors`` in the JSON).
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
    hidden = None
    if unobserved_draws:
        image, label, hidden = identifiable_counterfactual(
            modality, u, factual, changes, draws=unobserved_draws, **grid, anatomy=anatomy
        )
    else:
        image, label = counterfactual(modality, u, factual, changes, **grid, anatomy=anatomy)
    target = {**factual, **changes}
    tag = "_".join(f"{k}-{v}" for k, v in sorted(changes.items())) or "none"
    stem = f"{subject}_visit-{visit}_cf-{tag}" + ("_identifiable" if unobserved_draws else "")
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
    if hidden is not None:
        summary.update({"unobserved_factors": hidden, "unobserved_draws": int(unobserved_draws)})
    _write_json(os.path.join(folder, f"{stem}.json"), summary)
    return summary
