"""The MNI152 (ICBM 2009a, nonlinear symmetric) template shipped inside nilearn, and the label map derived from it.

nilearn ships the template's T1 image and its grey- and white-matter probability maps (197 x 233 x 189 voxels of
1 mm, uint8, brain-extracted) in ``nilearn/datasets/data``; they are read from the installed package with nibabel,
never downloaded. The real-anatomy cohort (``scripts/cohort/mni152.py``) needs ``BRAIN_LABELS``, derived here by
documented rules in MNI millimetres:

- tissue: inside the brain mask (T1 > 0) each voxel takes the most probable of CSF (``1 - p_gm - p_wm``), grey
  matter and white matter;
- lateral ventricles: the largest connected component of CSF that lies at least ``VENTRICLE_MIN_DEPTH_MM`` inside
  the brain mask within the central box ``VENTRICLE_BOX_MM`` (in the template: the frontal horns, bodies and atria
  of both lateral ventricles, about 17 ml; the third ventricle and the cisterns are separate components and stay CSF);
- hippocampus: grey matter within ``HIPPOCAMPUS_RADIUS_MM`` of the segment from the hippocampal head
  ``HIPPOCAMPUS_HEAD_MM`` to the tail ``HIPPOCAMPUS_TAIL_MM`` (mirrored in x for the right side), the long axis of
  the medial temporal lobe under the temporal horn (about 3.4 ml a side). It is an approximate hippocampal
  formation, not a manual tracing: good enough for a causal model whose effects are relative volume changes.

The label map is derived once per run and cached with its SHA-256 in a cohort folder (``load_template``), so a
cohort's oracle can check that it renders from the same labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.io.files import atomic_write, atomic_write_json

__all__ = ["NILEARN_PIN", "Mni152Template", "template_files", "derive_labels", "load_template"]

NILEARN_PIN = "nilearn==0.13.1"
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Label values: the brain labels of scripts/cohort/causal_model.py (no extracranial tissue: the template is brain-extracted).
LABELS = {"background": 0, "ventricles": 1, "gray_matter": 2, "white_matter": 3, "hippocampus": 4, "csf": 5}
VENTRICLE_MIN_DEPTH_MM = 10.0
VENTRICLE_BOX_MM = ((-30.0, 30.0), (-50.0, 35.0), (-30.0, 35.0))
VENTRICLE_VOLUME_RANGE_ML = (8.0, 40.0)
HIPPOCAMPUS_HEAD_MM = (-24.0, -10.0, -20.0)
HIPPOCAMPUS_TAIL_MM = (-24.0, -38.0, -2.0)
HIPPOCAMPUS_RADIUS_MM = 6.0
CACHE_FOLDER = "template"
CACHE_STEM = "mni152_labels"


@dataclass(frozen=True, eq=False)
class Mni152Template:
    """The template on its 1 mm grid: T1 intensities, derived labels and where they sit in MNI space."""

    t1: np.ndarray  # float32, the template's own uint8 intensities (0 outside the brain)
    label: np.ndarray  # uint8 LABELS
    origin: tuple[float, float, float]  # MNI mm of voxel (0, 0, 0); voxels are 1 mm and axis-aligned (RAS)
    centre: tuple[float, float, float]  # MNI mm of the centre of the brain's bounding box
    levels: dict[str, float]  # median template T1 of the lateral ventricles, grey matter and white matter
    sha256: str  # of the label map (C order uint8 bytes)
    source_sha256: dict[str, str]  # of the three template files


def template_files() -> dict[str, Path]:
    """Paths of the template's T1, GM and WM files inside the installed nilearn package (no download)."""
    try:
        import nilearn
    except ImportError:
        raise ModuleNotFoundError(
            f"--anatomy mni152 needs the nilearn package, which ships the MNI152 template: pip install {NILEARN_PIN}"
        ) from None
    folder = Path(nilearn.__file__).resolve().parent / "datasets" / "data"
    paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the installed nilearn lacks the MNI152 template files {missing}: pip install {NILEARN_PIN}"
        )
    return paths


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha256_array(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _read(paths: dict[str, Path]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The three template volumes (float32) and their common affine; checks the 1 mm RAS grid the rules assume."""
    import nibabel as nib

    volumes, affine = {}, None
    for key, path in paths.items():
        image = nib.load(str(path))
        volumes[key] = np.asarray(image.dataobj, dtype=np.float32)
        affine = image.affine if affine is None else affine
        if not np.allclose(image.affine, affine) or not np.allclose(image.affine[:3, :3], np.eye(3)):
            raise ValueError(f"{path}: expected the 1 mm RAS grid of the nilearn MNI152 template, got {image.affine}.")
    return volumes, np.asarray(affine)


def _mni_axes(shape: tuple[int, ...], origin: np.ndarray) -> list[np.ndarray]:
    return [np.arange(n, dtype=np.float32) + np.float32(o) for n, o in zip(shape, origin)]


def _lateral_ventricles(csf: np.ndarray, inside: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The largest deep, central connected component of CSF (``VENTRICLE_*`` rules)."""
    x, y, z = np.meshgrid(*_mni_axes(csf.shape, origin), indexing="ij", sparse=True)
    (x0, x1), (y0, y1), (z0, z1) = VENTRICLE_BOX_MM
    box = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)
    candidates = csf & box & (ndimage.distance_transform_edt(inside) >= VENTRICLE_MIN_DEPTH_MM)
    components, count = ndimage.label(candidates)
    if count == 0:
        raise ValueError("no deep central CSF in the MNI152 template: the tissue maps are not the expected ones.")
    sizes = np.bincount(components.ravel())[1:]
    ventricles = components == (int(np.argmax(sizes)) + 1)
    volume = float(ventricles.sum()) / 1000.0
    if not VENTRICLE_VOLUME_RANGE_ML[0] <= volume <= VENTRICLE_VOLUME_RANGE_ML[1]:
        raise ValueError(f"derived lateral ventricles of {volume:.1f} ml: not the nilearn MNI152 template expected.")
    return ventricles


def _hippocampi(gray_matter: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Grey matter within ``HIPPOCAMPUS_RADIUS_MM`` of the head-tail segment of each side."""
    x, y, z = np.meshgrid(*_mni_axes(gray_matter.shape, origin), indexing="ij", sparse=True)
    near = np.zeros(gray_matter.shape, bool)
    for side in (-1.0, 1.0):
        head = np.array(HIPPOCAMPUS_HEAD_MM) * (side, 1.0, 1.0)
        axis = np.array(HIPPOCAMPUS_TAIL_MM) * (side, 1.0, 1.0) - head
        rel = (x - head[0], y - head[1], z - head[2])
        t = np.clip(sum(r * a for r, a in zip(rel, axis)) / float(axis @ axis), 0.0, 1.0)
        near |= sum((r - t * a) ** 2 for r, a in zip(rel, axis)) <= HIPPOCAMPUS_RADIUS_MM**2
    return near & gray_matter


def derive_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """``LABELS`` map of the template from its T1 (brain mask) and GM/WM probability maps (0-255), by the rules."""
    inside = t1 > 0
    p_gm, p_wm = gm / 255.0, wm / 255.0
    tissue = np.argmax(np.stack([np.clip(1.0 - p_gm - p_wm, 0.0, 1.0), p_gm, p_wm]), axis=0)
    label = np.array([LABELS["csf"], LABELS["gray_matter"], LABELS["white_matter"]], np.uint8)[tissue]
    label[~inside] = LABELS["background"]
    label[_lateral_ventricles(label == LABELS["csf"], inside, origin)] = LABELS["ventricles"]
    label[_hippocampi(label == LABELS["gray_matter"], origin)] = LABELS["hippocampus"]
    return label


def _write_cache(folder: Path, label: np.ndarray, affine: np.ndarray, record: dict) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(label, affine)
    image.set_qform(affine, code=4)  # MNI152 space
    image.set_sform(affine, code=4)
    atomic_write(folder / f"{CACHE_STEM}.nii.gz", lambda tmp: nib.save(image, tmp), ".nii.gz")
    atomic_write_json(record, folder / f"{CACHE_STEM}.json")


def _read_cache(folder: Path, source_sha256: dict[str, str]) -> np.ndarray | None:
    """The cached label map if it was derived from the same template files and its hash checks out."""
    meta_path, label_path = folder / f"{CACHE_STEM}.json", folder / f"{CACHE_STEM}.nii.gz"
    if not (meta_path.is_file() and label_path.is_file()):
        return None
    record = json.loads(meta_path.read_text())
    if record.get("source_sha256") != source_sha256:
        return None
    import nibabel as nib

    label = np.asarray(nib.load(str(label_path)).dataobj, dtype=np.uint8)
    if _sha256_array(label) != record.get("sha256"):
        raise ValueError(f"{label_path} does not match the sha256 in {meta_path}: delete both to derive them again.")
    return label


_MEMO: dict[str, Mni152Template] = {}


def load_template(cache_dir: str | os.PathLike | None = None, write_cache: bool = True) -> Mni152Template:
    """The template and its label map: from memory, else from ``<cache_dir>/template/`` if it was derived from the
    same template files, else derived now (and written there when ``write_cache``)."""
    paths = template_files()
    source_sha256 = {key: _sha256_file(path) for key, path in paths.items()}
    key = json.dumps(source_sha256, sort_keys=True)
    folder = Path(cache_dir) / CACHE_FOLDER if cache_dir is not None else None
    if key in _MEMO:
        template = _MEMO[key]
        if folder is not None and write_cache and _read_cache(folder, source_sha256) is None:
            _write_cache(folder, template.label, _affine(template.origin), _cache_record(template))
        return template
    volumes, affine = _read(paths)
    origin = affine[:3, 3]
    label = _read_cache(folder, source_sha256) if folder is not None else None
    if label is None:
        label = derive_labels(volumes["t1"], volumes["gm"], volumes["wm"], origin)
    template = _assemble(volumes["t1"], label, origin, source_sha256)
    if folder is not None and write_cache and _read_cache(folder, source_sha256) is None:
        _write_cache(folder, label, affine, _cache_record(template))
    _MEMO[key] = template
    return template


def _affine(origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 3] = origin
    return affine


def _assemble(t1: np.ndarray, label: np.ndarray, origin: np.ndarray, source_sha256: dict[str, str]) -> Mni152Template:
    inside = np.argwhere(label > 0)
    centre = (inside.min(axis=0) + inside.max(axis=0)) / 2.0 + origin
    levels = {
        name: float(np.median(t1[label == LABELS[key]]))
        for name, key in (("csf", "ventricles"), ("gm", "gray_matter"), ("wm", "white_matter"))
    }
    for array in (t1, label):
        array.flags.writeable = False
    return Mni152Template(
        t1=t1,
        label=label,
        origin=tuple(float(o) for o in origin),
        centre=tuple(float(c) for c in centre),
        levels=levels,
        sha256=_sha256_array(label),
        source_sha256=source_sha256,
    )


def _cache_record(template: Mni152Template) -> dict:
    counts = np.bincount(template.label.ravel(), minlength=max(LABELS.values()) + 1)
    return {
        "description": "labels derived from the nilearn MNI152 ICBM 2009a template by scripts/cohort/mni152_template.py",
        "sha256": template.sha256,
        "source_sha256": template.source_sha256,
        "labels": LABELS,
        "volumes_ml": {name: float(counts[value]) / 1000.0 for name, value in LABELS.items() if value > 0},
        "rules": {
            "ventricle_min_depth_mm": VENTRICLE_MIN_DEPTH_MM,
            "ventricle_box_mm": VENTRICLE_BOX_MM,
            "hippocampus_head_mm": HIPPOCAMPUS_HEAD_MM,
            "hippocampus_tail_mm": HIPPOCAMPUS_TAIL_MM,
            "hippocampus_radius_mm": HIPPOCAMPUS_RADIUS_MM,
        },
        "levels": template.levels,
        "centre_mm": template.centre,
    }
