"""Counterfactual inputs, checked before any compute: records, image headers, pictures, user masks.

Every check raises one line that names the file (or field) and what to do. Images are checked header first:
the voxel count, the bytes the header promises against the file's size, a finite non-singular affine with
positive spacing and a size the preset can use, before any array is read; only then is the array read once to
catch corrupt data, NaN/Inf and constant images.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import PILReader
from monai.transforms import LoadImage, LoadImaged

from scripts.core.covariates import TARGET_PREFIX, CovariateEncoder, parse_covariates
from scripts.io.datalist import load_datalist

__all__ = [
    "MAX_VOXELS",
    "MIN_SIDE",
    "TARGET_PREFIX",
    "LoadScand",
    "PictureReader",
    "check_image",
    "check_mask",
    "check_results_dir",
    "counterfactual_records",
    "load_scan",
    "output_names",
]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# The largest image accepted (about 1 GB as float32: a 0.8 mm whole-body CT, a 16k x 16k radiograph), so a header
# that claims more fails before anything is allocated.
MAX_VOXELS = 256 * 1024 * 1024
# Fewer voxels than this along an axis is no scan the networks can use (a thumbnail, a single slab).
MIN_SIDE = 16


def counterfactual_records(
    encoder: CovariateEncoder,
    image: str | None = None,
    source: Mapping[str, Any] | str | None = None,
    target: Mapping[str, Any] | str | None = None,
    datalist: str | None = None,
    datalist_key: str = "test",
    results_dir: str | None = None,
    spatial_dims: int | None = None,
    keep_mask: str | None = None,
    edit_mask: str | None = None,
) -> list[dict[str, Any]]:
    """
    The inputs of a counterfactual run, checked before any compute: every record of `datalist[datalist_key]` when a
    datalist is given (target covariates are keys prefixed "target_"; missing ones come from `target`, then from the
    source), otherwise the one `image` with its `source` covariates and the `target` changes (covariates not named
    in `target` keep their source value). `results_dir`, if given, must be creatable and writable and may not hold
    files the bundle did not write. With `spatial_dims`, every image is also checked (`check_image`). Optional user
    masks, `keep_mask` (the output keeps the input there) and `edit_mask` (the change applies only there), come from
    the record's keys of those names or, for the single `image`, from the arguments; each must be a binary image
    with the input's shape (and affine, for NIfTI). Each record gets its `output_name`, unique within the run.
    """
    if results_dir is not None:
        check_results_dir(results_dir)
    target = parse_covariates(target, "target")
    if datalist:
        records = load_datalist(datalist, datalist_key)
    elif image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image: no file at {image!r}.")
        masks = {key: str(path) for key, path in (("keep_mask", keep_mask), ("edit_mask", edit_mask)) if path}
        records = [{"image": str(image), **masks, **parse_covariates(source, "source")}]
    else:
        raise ValueError("nothing to do: set 'image' (with 'source' and 'target') or 'input_datalist'.")
    if not records:
        raise ValueError(f"{datalist}: '{datalist_key}' holds no record.")
    unknown = sorted(set(target) - set(encoder.schema))
    if unknown:
        raise ValueError(f"target: unknown covariate(s) {unknown}; the schema has {sorted(encoder.schema)}.")
    checked = []
    for index, record in enumerate(records):
        where = f"input {index} ({record.get('image')})"
        if not Path(str(record.get("image", ""))).is_file():
            raise FileNotFoundError(f"{where}: image file not found.")
        encoder.encode(record, source=f"{where}, source covariates")
        if spatial_dims is not None:
            check_image(str(record["image"]), spatial_dims, where)
        for key in ("keep_mask", "edit_mask"):
            if record.get(key):
                check_mask(str(record[key]), str(record["image"]), f"{where}, {key}")
        changes = {
            name: record.get(TARGET_PREFIX + name, target.get(name, record.get(name))) for name in encoder.schema
        }
        encoder.encode(changes, source=f"{where}, target covariates")
        checked.append({**record, **{TARGET_PREFIX + name: value for name, value in changes.items()}})
    for record, name in zip(checked, output_names([str(r["image"]) for r in checked])):
        record["output_name"] = name
    return checked


def output_names(paths: list[str]) -> list[str]:
    """
    The stem of each file ("T1w" for ".../T1w.nii.gz"), made unique within one run: files that share a stem are
    named by their path below the folder they share ("siteA_T1w", "siteB_T1w"); the same file twice gets its
    position ("T1w_2").
    """
    stems = [file_stem(path) for path in paths]
    names = list(stems)
    for stem in set(stems):
        clashing = [i for i, s in enumerate(stems) if s == stem]
        if len(clashing) < 2:
            continue
        folders = [Path(paths[i]).resolve().parent for i in clashing]
        common = Path(os.path.commonpath([str(f) for f in folders]))
        for i, folder in zip(clashing, folders):
            parts = folder.relative_to(common).parts
            names[i] = "_".join((*parts, stem))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names


def file_stem(path: str) -> str:
    name = Path(path).name
    for suffix in (*NIFTI_SUFFIXES, *PICTURE_SUFFIXES, ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def check_image(path: str, spatial_dims: int, where: str = "image") -> tuple[int, ...]:
    """
    Check that `path` is what a `spatial_dims` model takes: one 3D volume (a 4D NIfTI only with a single frame) or
    one 2D picture (gray, gray + alpha, palette, RGB/RGBA, or a single-frame DICOM). NIfTI headers are checked before
    any voxel is read (`check_nifti_header`); then the image is read once, fully, so a corrupt or truncated file
    fails here and not after the model has run. Returns its spatial shape; errors are one line naming the file.
    """
    if path.lower().endswith(NIFTI_SUFFIXES):
        check_nifti_header(path, where)
    try:
        data = np.asarray(load_scan(path, channel_first=False))
    except Exception as error:  # every reader has its own exception types
        kind = "NIfTI" if path.lower().endswith(NIFTI_SUFFIXES) else "an image"
        problem = f"corrupt, truncated or not an image file: {type(error).__name__}: {_one_line(error)}"
        raise ValueError(f"{where}: cannot read {path!r} as {kind} ({problem}).") from None
    shape = tuple(data.shape)
    bad = int(data.size - np.isfinite(data).sum()) if np.issubdtype(data.dtype, np.floating) else 0
    if bad:
        raise ValueError(f"{where}: {path} holds NaN/Inf voxels ({bad} of {data.size}); fix or mask them first.")
    if data.size and data.min() == data.max():
        raise ValueError(f"{where}: {path}: the image is constant ({data.flat[0]}); there is nothing to condition on.")
    spatial = shape
    if spatial_dims == 3:
        while len(spatial) > 3 and spatial[-1] == 1:
            spatial = spatial[:-1]
        if len(spatial) == 4:
            raise ValueError(
                f"{where}: {path} is a 4D series of {spatial[-1]} volumes {shape}; the model takes one 3D volume: "
                "extract the frame you want (e.g. nibabel: img.slicer[..., 0]) and pass that file."
            )
    elif len(spatial) == 3 and spatial[-1] in (1, 3, 4):  # gray / RGB / RGBA picture or a single DICOM frame
        spatial = spatial[:-1]
    if len(spatial) != spatial_dims or min(spatial) < 2:
        what = {2: "2D images (PNG, JPEG, DICOM)", 3: "3D volumes (NIfTI)"}[spatial_dims]
        raise ValueError(
            f"{where}: {path} has shape {shape}; this model (spatial_dims {spatial_dims}) takes {what}. Use the preset "
            "of the image's modality (configs/brain_mri_3d.json or configs/chest_xray_2d.json) and its weights."
        )
    if min(spatial) < MIN_SIDE:
        raise ValueError(
            f"{where}: {path} has shape {shape}: fewer than {MIN_SIDE} voxels along an axis is too small a scan for "
            "this model; give the full-resolution image."
        )
    return spatial


def check_nifti_header(path: str, where: str = "image") -> None:
    """
    A NIfTI file's header, before any voxel is read: at most MAX_VOXELS voxels, as many bytes of voxels as the
    header promises (uncompressed: the file size; gzip: the stream is decompressed and counted, not kept), and a
    finite, non-singular affine, and positive voxel sizes where no qform/sform places the scan.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        image = nib.load(path)
        shape, dtype = tuple(int(s) for s in image.shape), image.get_data_dtype()
        offset = int(image.dataobj.offset)
        affine = np.asarray(image.affine, dtype=float)
        with ImageOpener(path) as stream:  # as stored: nibabel's loaded header replaces zero voxel sizes by 1
            raw = type(image.header).from_fileobj(stream, check=False)
        zooms = np.asarray(raw["pixdim"][1 : 1 + min(3, len(shape))], dtype=float)
        placed = int(raw["qform_code"]) > 0 or int(raw["sform_code"]) > 0
    except Exception as error:  # nibabel raises several types for broken headers
        problem = f"corrupt, truncated or not an image file: {type(error).__name__}: {_one_line(error)}"
        raise ValueError(f"{where}: cannot read {path!r} as NIfTI ({problem}).") from None
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOXELS:
        raise ValueError(
            f"{where}: {path}: the header claims shape {shape} ({voxels:,} voxels), more than the {MAX_VOXELS:,} this "
            "bundle reads; the header is wrong or the scan needs downsampling first."
        )
    expected = offset + voxels * dtype.itemsize
    available = _stored_bytes(path, expected, where)
    if available < expected:
        raise ValueError(
            f"{where}: cannot read {path!r} as NIfTI (truncated: the header promises {expected:,} bytes, the file "
            f"holds {available:,}); copy the file again."
        )
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(
            f"{where}: {path} has a non-finite or singular affine (voxel sizes {zooms.round(4).tolist()}); fix the "
            "header's qform/sform and pixdim (e.g. nibabel: img.set_qform(affine, 1))."
        )
    if not placed and not (np.isfinite(zooms) & (zooms > 0)).all():
        raise ValueError(
            f"{where}: {path} has voxel sizes {zooms.round(4).tolist()} and no qform/sform in its header, so its "
            "geometry is unknown; write the scan's spacing and orientation into the header."
        )


def _stored_bytes(path: str, needed: int, where: str) -> int:
    """The bytes the file holds, decompressed for gzip: counted in bounded chunks up to `needed`, never kept."""
    if not path.lower().endswith(".gz"):
        return os.path.getsize(path)
    count, stream = 0, zlib.decompressobj(zlib.MAX_WBITS | 16)
    try:
        with open(path, "rb") as file:
            data = file.read(1 << 20)
            while data and count < needed:
                count += len(stream.decompress(data, 1 << 24))
                data = stream.unconsumed_tail
                if stream.eof:  # the end of one gzip member; another may follow
                    data, stream = stream.unused_data, zlib.decompressobj(zlib.MAX_WBITS | 16)
                if not data:
                    data = file.read(1 << 20)
    except zlib.error as error:
        raise ValueError(f"{where}: cannot read {path!r} as NIfTI (corrupt gzip stream: {_one_line(error)}).") from None
    return count


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_mask(path: str, image_path: str, where: str = "mask") -> None:
    """A user mask must be a readable binary image (two values at most, one of them 0) on the input's grid."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no mask file at {path!r}.")
    try:
        mask, image = load_scan(path, channel_first=False), load_scan(image_path, channel_first=False)
    except Exception as error:  # every reader has its own exception types
        raise ValueError(f"{where}: cannot read {path!r} as an image ({type(error).__name__}).") from None
    if tuple(mask.shape) != tuple(image.shape):
        raise ValueError(f"{where}: {path} has shape {tuple(mask.shape)}, the input {tuple(image.shape)}; give a mask "
                         "on the input's own grid.")  # fmt: skip
    affine, image_affine = mask.meta.get("affine"), image.meta.get("affine")
    if path.lower().endswith(NIFTI_SUFFIXES) and not np.allclose(
        np.asarray(affine), np.asarray(image_affine), atol=1e-3
    ):
        raise ValueError(f"{where}: {path} has another affine than the input; resample the mask onto the input's grid.")
    values = torch.unique(torch.as_tensor(mask))
    if len(values) > 2 or (len(values) == 2 and float(values[0]) != 0) or not bool((values >= 0).all()):
        shown = [round(float(v), 3) for v in values[:4]]
        raise ValueError(f"{where}: {path} is not binary (values {shown}...); give 0 outside, one value inside.")


def check_results_dir(results_dir: str | os.PathLike) -> None:
    """
    The results folder, or the nearest existing folder above it, must accept new files, and an existing results
    folder may hold only what the bundle writes there (a run replaces it whole). Nothing is created here.
    """
    from scripts.io.results import foreign_entries

    folder = Path(results_dir)
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"results_dir: cannot write into {str(folder)!r} ({existing} is not a writable folder).")
    if existing == folder.resolve():
        foreign = foreign_entries(folder)
        if foreign:
            raise ValueError(
                f"results_dir: {str(folder)!r} holds files this bundle did not write ({', '.join(foreign[:3])}); a run "
                "replaces its results folder whole, so choose a new or empty folder."
            )


def _picture_as_gray_or_color(picture: Any) -> Any:
    """A PIL picture as the bundle reads it: palette and 1-bit pictures as gray levels, alpha dropped from gray."""
    if picture.mode in ("P", "PA", "1", "LA", "La"):
        return picture.convert("L")
    if picture.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return picture.convert("RGB")
    return picture


class PictureReader(PILReader):
    """MONAI's PIL reader, with palette (P), gray + alpha (LA) and 1-bit pictures read as gray levels."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(converter=_picture_as_gray_or_color, **kwargs)


def _with_picture_reader(loader: LoadImage) -> LoadImage:
    """Swap MONAI's default PIL reader for PictureReader, keeping suffix-based reader selection for every file."""
    loader.readers = [PictureReader() if type(reader) is PILReader else reader for reader in loader.readers]
    return loader


class LoadScand(LoadImaged):
    """LoadImaged whose pictures are read as gray levels or colour (see PictureReader); other files as MONAI does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _with_picture_reader(self._loader)


def load_scan(path: str, channel_first: bool = True) -> torch.Tensor:
    """
    The file as the user gave it, float32, read like the presets read it. With `channel_first`: channel first,
    gray (RGB/RGBA pictures averaged), and a single-frame DICOM's trailing frame axis dropped.
    """
    loader = _with_picture_reader(LoadImage(image_only=True, ensure_channel_first=channel_first))
    scan = loader(path).float()
    if not channel_first:
        return scan
    if scan.ndim == 4 and scan.shape[-1] == 1 and not path.lower().endswith(NIFTI_SUFFIXES):
        scan = scan[..., 0]  # a DICOM radiograph: (1, W, H, 1)
    return scan.mean(0, keepdim=True) if scan.shape[0] in (3, 4) else scan
