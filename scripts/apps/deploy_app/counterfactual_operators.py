"""MONAI Deploy operators of the counterfactual app: stage the input as NIfTI, run the bundle, write the outputs."""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# tags describing the source pixels that would be wrong for the counterfactual's
STALE_PIXEL_TAGS = (
    "WindowCenter",
    "WindowWidth",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "RealWorldValueMappingSequence",
)


def nifti_stem(path: str | Path) -> str:
    """The file name without .nii / .nii.gz, as the bundle names its outputs."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def series_affine(instances: Sequence[Any]) -> np.ndarray:
    """
    The RAS affine of a sorted DICOM series whose volume is indexed (column, row, slice): columns step along the row
    direction cosine by the column spacing PixelSpacing[1], rows along the column cosine by PixelSpacing[0], slices
    from the first to the last ImagePositionPatient. (The SDK's own affine pairs PixelSpacing[0] with the row cosine,
    which is right only for square pixels.)
    """
    first, last = instances[0], instances[-1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, dtype=float)
    if len(instances) > 1:
        slice_step = (np.asarray(last.ImagePositionPatient, dtype=float) - origin) / (len(instances) - 1)
    else:
        slice_step = np.cross(orientation[:3], orientation[3:])
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * column_spacing
    lps[:3, 1] = orientation[3:] * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def dicom_covariates(dataset: Any) -> dict[str, Any]:
    """Source covariates a DICOM header holds: age from PatientAge ("065Y", months/weeks/days converted to years)
    and sex from PatientSex ("F" or "M"); absent or other values are left out."""
    found: dict[str, Any] = {}
    match = re.fullmatch(r"(\d{1,3})([DWMY])", str(getattr(dataset, "PatientAge", "") or "").strip())
    if match:
        found["age"] = round(int(match.group(1)) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[match.group(2)], 2)
    sex = str(getattr(dataset, "PatientSex", "") or "").strip().upper()
    if sex in ("F", "M"):
        found["sex"] = sex
    return found


def _safe_name(text: str, default: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name[:64] or default


class ImageFileInputOperator(Operator):
    """
    Emits the input file (a NIfTI volume; for the 2D chest preset also PNG, JPEG or a single-frame DICOM) as the case
    to process. The bundle's own `LoadImaged` reads it, so the affine and the intensities reach the model exactly as
    in `python -m monai.bundle run` (the SDK's NiftiDataLoader returns a bare array without the affine).

    Named output: case, {"image": path, "source_hint": {}, "series": None}.
    """

    def __init__(self, fragment: Fragment, *args: Any, path: Path, **kwargs: Any) -> None:
        self.path = Path(path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        op_output.emit({"image": str(self.path), "source_hint": {}, "series": None}, "case")


class DicomSeriesToNiftiOperator(Operator):
    """
    Writes the one selected DICOM series as a NIfTI volume (RAS affine from the headers) into a work folder, for the
    bundle's preprocessing to read like any NIfTI input, and reads the source covariates the headers hold.

    Named inputs: image (the SDK Image, DHW, from DICOMSeriesToVolumeOperator) and study_selected_series_list.
    Named output: case, {"image": nifti path, "source_hint": covariates from the header, "series", "input_folder"}.
    """

    def __init__(self, fragment: Fragment, *args: Any, workdir: Path, input_folder: Path, **kwargs: Any) -> None:
        self.workdir, self.input_folder = Path(workdir), Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.input("study_selected_series_list")
        spec.output("case")

    def compute(self, op_input, op_output, context) -> None:
        image = op_input.receive("image")
        selections = op_input.receive("study_selected_series_list")
        series_list = [selected.series for study in selections or [] for selected in study.selected_series]
        if len(series_list) != 1:
            found = ", ".join(f"{s.SeriesInstanceUID} ({s.SeriesDescription})" for s in series_list) or "none"
            raise ValueError(
                f"input {self.input_folder}: expected exactly one DICOM series, found {len(series_list)}: {found}. "
                "Put one series per input folder."
            )
        series = series_list[0]
        instances = [instance.get_native_sop_instance() for instance in series.get_sop_instances()]
        volume = np.swapaxes(np.asarray(image.asnumpy(), dtype=np.float32), 0, 2)  # DHW -> (column, row, slice)
        if len(instances) < 2 or volume.ndim != 3 or volume.shape[2] < 2:
            raise ValueError(
                f"input {self.input_folder}: series {series.SeriesInstanceUID} has {len(instances)} image(s) of "
                f"shape {volume.shape}; the 3D model takes a volume of several slices."
            )
        geometry = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        missing = [tag for tag in geometry if tag not in instances[0]]
        if missing:
            raise ValueError(f"input {self.input_folder}: series {series.SeriesInstanceUID} lacks {missing}.")
        name = _safe_name(str(series.SeriesDescription or ""), "dicom_series")
        path = self.workdir / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, series_affine(instances)), str(path))
        hint = dicom_covariates(instances[0])
        logger.info(
            f"DICOM series {series.SeriesInstanceUID}: {volume.shape} staged as {path}; header covariates {hint}"
        )
        case = {"image": str(path), "source_hint": hint, "series": series, "input_folder": str(self.input_folder)}
        op_output.emit(case, "case")


class CounterfactualOperator(Operator):
    """
    Runs the bundle's counterfactual workflow (`configs/inference.json` with the preset on top, the same
    program as `python -m monai.bundle run`) on the case, with the app's settings as config overrides. The bundle
    checks the covariates before any compute and writes its outputs atomically into `results_dir`.

    Named input: case. Named output: result, the case plus "record" (the bundle's JSON record of the run).
    """

    def __init__(
        self,
        fragment: Fragment,
        *args: Any,
        bundle_dir: Path,
        preset: str,
        settings: Mapping[str, Any],
        results_dir: Path,
        **kwargs: Any,
    ) -> None:
        self.bundle_dir, self.preset, self.results_dir = Path(bundle_dir), preset, Path(results_dir)
        self.settings = dict(settings)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("case")
        spec.output("result")

    def overrides(self, case: Mapping[str, Any]) -> dict[str, Any]:
        """The config overrides of one run: input, covariates, parameters and where to write."""
        source = {**case["source_hint"], **self.settings.get("source", {})}
        values = {
            "bundle_root": str(self.bundle_dir),
            "image": case["image"],
            "source": source,
            "target": self.settings["target"],
            "results_dir": str(self.results_dir),
        }
        config_ids = {"strength": "strength", "delta": "inference_delta", "steps": "num_inference_steps"}
        for setting, config_id in config_ids.items():
            if setting in self.settings:
                values[config_id] = self.settings[setting]
        return values

    def compute(self, op_input, op_output, context) -> None:
        from monai.bundle import run

        case = op_input.receive("case")
        if str(self.bundle_dir) not in sys.path:  # the configs' "$import scripts" needs the bundle root
            sys.path.insert(0, str(self.bundle_dir))
        names = ("inference.json", f"{self.preset}.json")
        configs = [str(self.bundle_dir / "configs" / name) for name in names]
        values = self.overrides(case)
        logger.info(f"counterfactual of {case['image']}: source {values['source']}, target {values['target']}")
        run(config_file=configs, meta_file=str(self.bundle_dir / "configs" / "metadata.json"), **values)
        record = self.results_dir / f"{nifti_stem(case['image'])}_record.json"
        if not record.is_file():
            raise RuntimeError(f"the bundle wrote no record at {record}; see the log above.")
        op_output.emit({**case, "record": str(record)}, "result")


class CounterfactualWriterOperator(Operator):
    """
    Moves the bundle's outputs from the hidden staging folder into the output folder, only once every file exists:
    `<name>_counterfactual.nii.gz`, `<name>_difference.nii.gz` and `<name>_mask.nii.gz` (the input's grid and
    affine; for DICOM input the series' patient geometry), `<name>_montage.png`, `<name>_record.json`, and for
    DICOM input also `<name>_counterfactual_dicom/`, the counterfactual as a new DICOM series beside the input's.

    Named input: result.
    """

    def __init__(self, fragment: Fragment, *args: Any, output_dir: Path, staging_dir: Path, **kwargs: Any) -> None:
        self.output_dir, self.staging_dir = Path(output_dir), Path(staging_dir)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("result")

    def compute(self, op_input, op_output, context) -> None:
        result = op_input.receive("result")
        record_path = Path(result["record"])
        record = json.loads(record_path.read_text())
        staged = {kind: self.staging_dir / Path(path).name for kind, path in record["outputs"].items()}
        series = result.get("series")
        if series is not None:
            name = nifti_stem(result["image"])
            folder = self.staging_dir / f"{name}_counterfactual_dicom"
            counterfactual = np.asarray(nib.load(str(staged["counterfactual"])).dataobj, dtype=np.float32)
            write_dicom_series(counterfactual, series.get_sop_instances(), folder, record["target"])
            staged["counterfactual_dicom"] = folder
            record["input"] = str(result.get("input_folder", record["input"]))
            record["dicom"] = {
                "study_instance_uid": str(series.get_sop_instances()[0].get_native_sop_instance().StudyInstanceUID),
                "series_instance_uid": str(series.SeriesInstanceUID),
                "source_covariates_from_header": result["source_hint"],
            }
        record["outputs"] = {kind: str((self.output_dir / path.name).resolve()) for kind, path in staged.items()}
        record_path.write_text(json.dumps(record, indent=4))
        for path in [*staged.values(), record_path]:
            target = self.output_dir / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
        logger.info(f"wrote {sorted(record['outputs'].values())} and {self.output_dir / record_path.name}")


def write_dicom_series(volume: np.ndarray, instances: Sequence[Any], folder: Path, target: Mapping[str, Any]) -> None:
    """
    Writes `volume` (column, row, slice; the input series' grid and slice order) as a new derived DICOM series: each
    slice keeps its source instance's patient, study and geometry tags, gets new series and instance UIDs, and stores
    signed 16-bit values with a RescaleSlope that maps them back to the volume's intensities.
    """
    folder.mkdir(parents=True)
    slope = max(float(np.abs(volume).max()), 1e-6) / 32000.0
    series_uid = generate_uid()
    description = ("Counterfactual " + ", ".join(f"{k}={v}" for k, v in target.items()))[:64]
    now = datetime.datetime.now()
    for index, instance in enumerate(instances):
        dataset = copy.deepcopy(instance.get_native_sop_instance())
        for tag in STALE_PIXEL_TAGS:
            if tag in dataset:
                del dataset[tag]
        pixels = np.round(volume[:, :, index].T / slope).astype("<i2")  # (column, row) -> rows x columns
        dataset.update(
            {
                "SOPInstanceUID": generate_uid(),
                "SeriesInstanceUID": series_uid,
                "SeriesNumber": int(getattr(dataset, "SeriesNumber", 0) or 0) + 1000,
                "SeriesDescription": description,
                "ImageType": ["DERIVED", "SECONDARY"],
                "DerivationDescription": "Latent Drift counterfactual (latent_drift_counterfactual MONAI bundle)",
                "SeriesDate": now.strftime("%Y%m%d"),
                "SeriesTime": now.strftime("%H%M%S"),
                "InstanceNumber": index + 1,
                "SamplesPerPixel": 1,
                "PhotometricInterpretation": "MONOCHROME2",
                "Rows": pixels.shape[0],
                "Columns": pixels.shape[1],
                "BitsAllocated": 16,
                "BitsStored": 16,
                "HighBit": 15,
                "PixelRepresentation": 1,
                "RescaleSlope": f"{slope:.10g}",
                "RescaleIntercept": "0",
            }
        )
        dataset.PixelData = pixels.tobytes()
        dataset["PixelData"].VR = "OW"
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.save_as(folder / f"slice_{index:04d}.dcm", enforce_file_format=True)
