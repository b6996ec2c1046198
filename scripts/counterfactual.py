"""Counterfactual workflow I/O: input records, intensity bookkeeping, atomic output files and the PNG montage."""

from __future__ import annotations

import ast
import json
import os
import shutil
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelWriter
from monai.transforms import LoadImage, MapTransform
from PIL import Image

from scripts.data import load_datalist
from scripts.ood import out_of_distribution
from scripts.transforms import CovariateEncoder

TARGET_PREFIX = "target_"


def _as_mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{name} must be a dict such as \"{{'age': 85}}\", got {value!r}.") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of covariates, got {value!r}.")
    return dict(value)


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
    in `target` keep their source value). `results_dir`, if given, must be creatable and writable. With
    `spatial_dims`, every image is also read once to check that it is a readable 2D image or 3D volume as the
    model needs (`check_image`). Optional user masks, `keep_mask` (the output keeps the input there) and
    `edit_mask` (the change applies only there), come from the record's keys of those names or, for the single
    `image`, from the arguments; each must be a binary image with the input's shape (and affine, for NIfTI).
    """
    if results_dir is not None:
        _check_writable(Path(results_dir))
    target = _as_mapping(target, "target")
    if datalist:
        records = load_datalist(datalist, datalist_key)
    elif image:
        if not Path(image).is_file():
            raise FileNotFoundError(f"image: no file at {image!r}.")
        masks = {key: str(path) for key, path in (("keep_mask", keep_mask), ("edit_mask", edit_mask)) if path}
        records = [{"image": str(image), **masks, **_as_mapping(source, "source")}]
    else:
        raise ValueError("nothing to do: set 'image' (with 'source' and 'target') or 'input_datalist'.")
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
    if not checked:
        raise ValueError(f"{datalist}: '{datalist_key}' holds no record.")
    return checked


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_image(path: str, spatial_dims: int, where: str = "image") -> tuple[int, ...]:
    """
    Read the image at `path` fully (so a corrupt or truncated file fails here, not after the model has run) and
    check that it is what a `spatial_dims` model takes: one 3D volume (a 4D NIfTI only with a single frame) or one
    2D picture (gray, RGB/RGBA, or a single-frame DICOM). Returns its spatial shape; errors name the file.
    """
    try:
        if path.lower().endswith(NIFTI_SUFFIXES):
            import nibabel as nib

            data = np.asanyarray(nib.load(path).dataobj)
        else:
            data = np.asarray(LoadImage(image_only=True)(path))
        shape = tuple(data.shape)
    except Exception as error:  # every reader has its own exception types
        kind = "NIfTI" if path.lower().endswith(NIFTI_SUFFIXES) else "an image"
        problem = f"corrupt, truncated or not an image file: {type(error).__name__}: {error}"
        raise ValueError(f"{where}: cannot read {path!r} as {kind} ({problem}).") from None
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
    else:
        if len(spatial) == 3 and spatial[-1] in (1, 3, 4):  # gray / RGB / RGBA picture or a single DICOM frame
            spatial = spatial[:-1]
    if len(spatial) != spatial_dims or min(spatial) < 2:
        what = {2: "2D images (PNG, JPEG, DICOM)", 3: "3D volumes (NIfTI)"}[spatial_dims]
        raise ValueError(
            f"{where}: {path} has shape {shape}; this model (spatial_dims {spatial_dims}) takes {what}. Use the preset "
            "of the image's modality (configs/brain_mri_3d.json or configs/chest_xray_2d.json) and its weights."
        )
    return spatial


def check_mask(path: str, image_path: str, where: str = "mask") -> None:
    """A user mask must be a readable binary image (two values at most, one of them 0) on the input's grid."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no mask file at {path!r}.")
    try:
        mask, image = LoadImage(image_only=True)(path), LoadImage(image_only=True)(image_path)
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


def _check_writable(folder: Path) -> None:
    """The folder, or the nearest existing folder above it, must accept new files; nothing is created here."""
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"results_dir: cannot write into {str(folder)!r} ({existing} is not a writable folder).")


class RecordIntensityRanged(MapTransform):
    """
    Stores the image's lower and upper intensity percentiles in its metadata ("intensity_range") before
    ScaleIntensityRangePercentilesd maps them to [0, 1], so outputs can be written back in the input's intensities.
    """

    def __init__(self, keys: KeysCollection, lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = lower, upper

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            values = torch.as_tensor(d[key]).float().flatten()
            if values.numel() == 0 or not torch.isfinite(values).all():
                raise ValueError(f"{_filename(d[key])}: the image is empty or holds NaN/Inf voxels.")
            low, high = torch.quantile(
                values[:: max(1, values.numel() // 2_000_000)], torch.tensor([self.lower, self.upper]) / 100
            )
            if not high > low:
                raise ValueError(f"{_filename(d[key])}: the image is constant; there is nothing to condition on.")
            d[key].meta["intensity_range"] = [float(low), float(high)]
        return d


def _filename(image: Any) -> str:
    meta = getattr(image, "meta", {})
    return str(meta.get("filename_or_obj", "image"))


def _atomic_copy_into(folder: Path, staged: Path) -> None:
    for item in staged.iterdir():
        os.replace(item, folder / item.name)


class WriteCounterfactuald(MapTransform):
    """
    Composes and writes one counterfactual, on the input's own grid and intensity scale.

    The inferer's change (D(z_cf) - D(base), already carried back through the inverse preprocessing) is added to
    the original input inside the edit mask: the automatic mask (if the inferer made one) times the record's
    optional `edit_mask` file, times one minus its optional `keep_mask` file; outside it the output is the input,
    voxel for voxel. With composition "none" the raw decode replaces the input inside the mask.

    Outputs, written into a hidden temporary folder first and then renamed into place (a failure before the last
    write leaves nothing behind): `<name>_counterfactual` (NIfTI with the input's affine and shape in 3D, PNG in 2D),
    `<name>_difference` (counterfactual minus input, signed), `<name>_mask` (the edit mask applied),
    `<name>_std` when several samples were drawn, `<name>_montage.png` (input | counterfactual | difference | mask,
    mid slices in 3D) and `<name>_record.json` (inputs, parameters, the drift actually used, the weights' sha256 and
    the out-of-distribution check).
    """

    def __init__(
        self,
        output_dir: str,
        encoder: CovariateEncoder,
        parameters: Mapping[str, Any] | None = None,
        composition: str = "reference",
        inferer: Any = None,
        network: Any = None,
        prefix: str = "pred_",
        write_std: bool = False,
    ) -> None:
        super().__init__(keys=[prefix + "counterfactual"], allow_missing_keys=False)
        self.output_dir, self.encoder, self.parameters = Path(output_dir), encoder, dict(parameters or {})
        self.composition, self.inferer, self.network = composition, inferer, network
        self.prefix, self.write_std = prefix, write_std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source_path = _filename(d["image"])
        low, high = d["image"].meta["intensity_range"]
        original = load_original(source_path)
        mask = self._mask(d, original)
        if self.composition == "none":
            change = self._on_input_grid(d, "counterfactual", source_path, original) * (high - low) + low - original
        else:
            change = self._on_input_grid(d, "change", source_path, original) * (high - low)
        counterfactual = torch.where(mask > 0, original + mask * change, original)
        name = _stem(source_path)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.output_dir))
        try:
            outputs = {"counterfactual": counterfactual, "difference": counterfactual - original, "mask": mask}
            if self.write_std:
                outputs["std"] = self._on_input_grid(d, "std", source_path, original) * (high - low)
            files = {kind: self._write_image(staged, f"{name}_{kind}", array, original, (low, high), kind)
                     for kind, array in outputs.items()}  # fmt: skip
            files["montage"] = write_montage(
                staged / f"{name}_montage.png", original, counterfactual, outputs["difference"], (low, high), mask
            )
            record = self._record(d, source_path, files)
            (staged / f"{name}_record.json").write_text(json.dumps(record, indent=4))
            _atomic_copy_into(self.output_dir, staged)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        d["output_record"] = str((self.output_dir / f"{name}_record.json").resolve())
        return d

    def _on_input_grid(self, d: Mapping, kind: str, source_path: str, original: torch.Tensor) -> torch.Tensor:
        array = torch.as_tensor(d[self.prefix + kind]).float()
        if tuple(array.shape[1:]) != tuple(original.shape[1:]):
            raise RuntimeError(f"{source_path}: output shape {tuple(array.shape)} != input {tuple(original.shape)}.")
        return array

    def _mask(self, d: Mapping, original: torch.Tensor) -> torch.Tensor:
        """The automatic mask (ones without one) times the user's edit mask, times one minus the keep mask."""
        key = self.prefix + "edit_mask"
        mask = torch.ones_like(original)
        if key in d and d[key] is not None:
            mask = torch.as_tensor(d[key]).float().clamp(0, 1)
            mask = torch.where(mask < 0.01, torch.zeros_like(mask), mask)  # interpolation leaves tiny values
        if d.get("edit_mask"):
            mask = mask * (load_original(str(d["edit_mask"])) > 0).float()
        if d.get("keep_mask"):
            mask = mask * (load_original(str(d["keep_mask"])) <= 0).float()
        return mask

    def _record(self, d: Mapping, source_path: str, files: Mapping[str, str]) -> dict[str, Any]:
        parameters = {**self.parameters, "composition": self.composition}
        for key in ("edit_mask", "keep_mask"):
            parameters[key] = str(d[key]) if d.get(key) else None
        record = {
            "input": source_path,
            "source": {k: _plain(d.get(k)) for k in self.encoder.schema},
            "target": {k: _plain(d.get(TARGET_PREFIX + k)) for k in self.encoder.schema},
            "parameters": parameters,
            "outputs": {kind: str((self.output_dir / Path(path).name).resolve()) for kind, path in files.items()},
        }
        if self.inferer is not None and self.network is not None:
            record["drift"] = self.inferer.describe_drift(self.network)
        if self.network is not None:
            info = getattr(self.network, "weights_info", None) or {}
            record["weights"] = {"path": info.get("path"), "sha256": info.get("sha256")}
            error = d.get(self.prefix + "reconstruction_error")
            record["out_of_distribution"] = out_of_distribution(
                info.get("metadata"), None if error is None else float(error), source_path
            )
        return record

    @staticmethod
    def _write_image(folder: Path, stem: str, array: torch.Tensor, original: Any, window: tuple, kind: str) -> str:
        if array.ndim == 4:  # (C, H, W, D): NIfTI with the input's affine
            path = folder / f"{stem}.nii.gz"
            writer = NibabelWriter(output_dtype=np.float32)
            writer.set_data_array(array, channel_dim=0, squeeze_end_dims=True)
            writer.set_metadata(
                {"affine": original.meta.get("affine"), "original_affine": original.meta.get("affine")}, resample=False
            )
            writer.write(str(path), verbose=False)
            return str(path)
        path = folder / f"{stem}.png"
        low, high = window
        values = array[0].numpy().T
        if kind == "counterfactual":  # the input's own intensity scale: 16-bit if the input was, else 8-bit
            top = 65535 if float(original.max()) > 255 else 255
            picture = np.clip(np.round(values), 0, top).astype(np.uint16 if top > 255 else np.uint8)
        elif kind == "difference":
            picture = _diverging(values, (high - low) / 2)
        elif kind == "mask":
            picture = (np.clip(values, 0, 1) * 255).astype(np.uint8)
        else:  # std, scaled to the input's intensity window
            picture = (np.clip(values / (high - low), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(picture).save(path)
        return str(path)


def load_original(path: str) -> torch.Tensor:
    """The file as the user gave it, channel first, gray (RGB/RGBA pictures averaged), float32."""
    original = LoadImage(image_only=True, ensure_channel_first=True)(path).float()
    return original.mean(0, keepdim=True) if original.shape[0] in (3, 4) else original


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def _diverging(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values -> RGB: blue for negative, white for zero, red for positive (saturating at ±scale)."""
    t = np.clip(values / max(scale, 1e-8), -1, 1)
    red = np.where(t < 0, 1 + t, 1.0)
    blue = np.where(t > 0, 1 - t, 1.0)
    green = 1 - np.abs(t)
    return (np.stack([red, green, blue], -1) * 255).astype(np.uint8)


def _views(volume: np.ndarray) -> list[np.ndarray]:
    """Mid axial, coronal and sagittal slices of a RAS (X, Y, Z) volume, oriented for display; a 2D image as is."""
    if volume.ndim == 2:
        return [volume.T]
    x, y, z = (s // 2 for s in volume.shape)
    return [np.flipud(volume[:, :, z].T), np.flipud(volume[:, y, :].T), np.flipud(volume[x, :, :].T)]


def write_montage(
    path: Path,
    original: torch.Tensor,
    counterfactual: torch.Tensor,
    difference: torch.Tensor,
    window: Sequence[float],
    mask: torch.Tensor | None = None,
) -> str:
    """
    A PNG for people: rows = views (3 mid slices in 3D), columns = input | counterfactual | difference (blue darker,
    red brighter, saturating at a quarter of the intensity window) | edit mask (if given).
    """
    low, high = window
    volumes = [original, counterfactual, difference] + ([mask] if mask is not None else [])
    rows = []
    for views in zip(*(_views(volume[0].numpy()) for volume in volumes)):
        gray = [np.clip((v - low) / (high - low), 0, 1) for v in views[:2]] + [np.clip(v, 0, 1) for v in views[3:]]
        panels = [np.repeat((g * 255).astype(np.uint8)[..., None], 3, -1) for g in gray]
        panels.insert(2, _diverging(views[2], 0.25 * (high - low)))
        height = max(p.shape[0] for p in panels)
        panels = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
        rows.append(np.concatenate(panels, 1))
    width = max(r.shape[1] for r in rows)
    picture = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows], 0)
    scale = max(1, -(-384 // picture.shape[0]))  # at least 384 px tall
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)
    return str(path)


def counterfactual_batch(
    batchdata: Mapping[str, Any], device: torch.device | None = None, non_blocking: bool = False, **_
):
    """Evaluator batch: (image, no target, (), {source_condition, target_condition}) for the CounterfactualInferer."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    conditions = {
        "source_condition": batchdata["condition"].to(device=device, non_blocking=non_blocking).float(),
        "target_condition": batchdata["target_condition"].to(device=device, non_blocking=non_blocking).float(),
    }
    return image, None, (), conditions


def write_samples(
    model: Any,
    scheduler: Any,
    encoder: CovariateEncoder,
    covariates: Mapping[str, Any] | str,
    latent_shape: Sequence[int],
    output_dir: str,
    num_samples: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    pixdim: Sequence[float] | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> list[str]:
    """
    Plain conditional sampling: `num_samples` images for one covariate record, written as NIfTI (3D, on a grid of
    `pixdim` mm) or PNG (2D) plus a montage of their middle slices and a JSON record, all atomically.
    """
    from scripts.inferers import sample_latents

    record = _as_mapping(covariates, "covariates")
    condition = encoder.encode(record, source="covariates").reshape(1, 1, -1)
    device = next(model.parameters()).device
    noise = torch.randn((num_samples, *latent_shape), generator=torch.Generator().manual_seed(seed)).to(device)
    latents = sample_latents(
        model,
        scheduler,
        noise,
        condition.expand(num_samples, 1, -1).to(device),
        drift=model.drift,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        null_condition=encoder.null().to(device),
        precision=precision,
    )
    with torch.inference_mode():
        images = model.decode(latents).float().clamp(0, 1).cpu()
    folder = Path(output_dir)
    staged = Path(tempfile.mkdtemp(prefix=".samples.", dir=_made(folder)))
    try:
        names = []
        for index, image in enumerate(images):
            if image.ndim == 4:
                affine = np.diag([*(pixdim or (1.0, 1.0, 1.0)), 1.0])
                writer = NibabelWriter(output_dtype=np.float32)
                writer.set_data_array(image, channel_dim=0, squeeze_end_dims=True)
                writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
                writer.write(str(staged / f"sample_{index}.nii.gz"), verbose=False)
                names.append(f"sample_{index}.nii.gz")
            else:
                Image.fromarray((image[0].numpy().T * 255).astype(np.uint8)).save(staged / f"sample_{index}.png")
                names.append(f"sample_{index}.png")
        rows = [np.concatenate([(v * 255).astype(np.uint8) for v in _views(image[0].numpy())], 1) for image in images]
        Image.fromarray(np.concatenate(rows, 0)).save(staged / "samples_montage.png")
        meta = {"covariates": record, "num_samples": num_samples, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "seed": seed, "files": names}  # fmt: skip
        (staged / "samples_record.json").write_text(json.dumps(meta, indent=4))
        _atomic_copy_into(folder, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return [str(folder / name) for name in names]


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
