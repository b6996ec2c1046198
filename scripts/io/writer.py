"""Counterfactual outputs: intensity bookkeeping, the composed counterfactual written atomically, the PNG montage."""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import NibabelWriter
from monai.transforms import MapTransform
from PIL import Image

from scripts.core.covariates import CovariateEncoder, parse_covariates
from scripts.io.files import staged_folder
from scripts.io.inputs import TARGET_PREFIX, file_stem, load_scan
from scripts.io.ood import out_of_distribution
from scripts.io.pictures import counterfactual_montage, diverging, views_row
from scripts.io.results import ResultsFolder


def scan_name(image: Any) -> str:
    meta = getattr(image, "meta", {})
    return str(meta.get("filename_or_obj", "image"))


class WriteCounterfactuald(MapTransform):
    """
    Composes and writes one counterfactual, on the input's own grid and intensity scale.

    The inferer's change (D(z_cf) - D(base), already carried back through the inverse preprocessing) is added to
    the original input inside the edit mask: the automatic mask (if the inferer made one) times the record's
    optional `edit_mask` file, times one minus its optional `keep_mask` file; outside it the output is the input,
    voxel for voxel. With composition "none" the raw decode replaces the input inside the mask.

    Outputs, named after the record's `output_name` (unique within a run; the file's stem otherwise), each
    record's set written into a hidden temporary folder first and then renamed into place: `<name>_counterfactual`
    (NIfTI with the input's affine and shape in 3D, PNG in the input's size and bit depth in 2D),
    `<name>_difference` (counterfactual minus input, signed), `<name>_mask` (the edit mask applied),
    `<name>_std` when several samples were drawn, `<name>_montage.png` (input | counterfactual | difference | mask,
    mid slices in 3D) and `<name>_record.json` (inputs, parameters, the drift actually used, the weights' sha256,
    the out-of-distribution check and any warning). `output_dir` is a folder, or a `ResultsFolder` (the CLI's: the
    run's records are staged and published together; the records name the published files).
    """

    def __init__(
        self,
        output_dir: str | ResultsFolder,
        encoder: CovariateEncoder,
        parameters: Mapping[str, Any] | None = None,
        composition: str = "reference",
        inferer: Any = None,
        network: Any = None,
        prefix: str = "pred_",
        write_std: bool = False,
    ) -> None:
        super().__init__(keys=[prefix + "counterfactual"], allow_missing_keys=False)
        self.results = output_dir if isinstance(output_dir, ResultsFolder) else ResultsFolder(output_dir)
        self.encoder, self.parameters = encoder, dict(parameters or {})
        self.composition, self.inferer, self.network = composition, inferer, network
        self.prefix, self.write_std = prefix, write_std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source_path = scan_name(d["image"])
        low, high = d["image"].meta["intensity_range"]
        original = load_scan(source_path)
        mask = self._mask(d, original)
        if self.composition == "none":
            change = self._on_input_grid(d, "counterfactual", source_path, original) * (high - low) + low - original
        else:
            change = self._on_input_grid(d, "change", source_path, original) * (high - low)
        counterfactual = torch.where(mask > 0, original + mask * change, original)
        name = str(d.get("output_name") or file_stem(source_path))
        with staged_folder(self.results.staging, prefix=f".{name}.") as staged:
            outputs = {"counterfactual": counterfactual, "difference": counterfactual - original, "mask": mask}
            if self.write_std:
                outputs["std"] = self._on_input_grid(d, "std", source_path, original) * (high - low)
            files = {kind: self._write_image(staged, f"{name}_{kind}", array, original, (low, high), kind)
                     for kind, array in outputs.items()}  # fmt: skip
            files["montage"] = counterfactual_montage(
                staged / f"{name}_montage.png", original, counterfactual, outputs["difference"], (low, high), mask
            )
            record = self._record(d, source_path, files)
            (staged / f"{name}_record.json").write_text(json.dumps(record, indent=4))
        d["output_record"] = str(self.results.path / f"{name}_record.json")
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
            mask = mask * (load_scan(str(d["edit_mask"])) > 0).float()
        if d.get("keep_mask"):
            mask = mask * (load_scan(str(d["keep_mask"])) <= 0).float()
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
            "outputs": {kind: str(self.results.path / Path(path).name) for kind, path in files.items()},
        }
        if d.get("warnings"):
            record["warnings"] = [str(d["warnings"])]
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
            picture = diverging(values, (high - low) / 2)
        elif kind == "mask":
            picture = (np.clip(values, 0, 1) * 255).astype(np.uint8)
        else:  # std, scaled to the input's intensity window
            picture = (np.clip(values / (high - low), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(picture).save(path)
        return str(path)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


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
    from scripts.core.sampling import sample_latents

    record = parse_covariates(covariates, "covariates")
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
    names = []
    with staged_folder(output_dir, prefix=".samples.") as staged:
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
        rows = [views_row(image[0].numpy()) for image in images]
        Image.fromarray(np.round(np.concatenate(rows, 0) * 255).astype(np.uint8)).save(staged / "samples_montage.png")
        meta = {"covariates": record, "num_samples": num_samples, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "seed": seed, "files": names}  # fmt: skip
        (staged / "samples_record.json").write_text(json.dumps(meta, indent=4))
    return [str(Path(output_dir) / name) for name in names]
