"""MONAI Deploy app (scripts/apps/deploy_app): end-to-end runs like a user's, on a NIfTI volume and on a DICOM series."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

pytest.importorskip("monai.deploy")
pytestmark = pytest.mark.deploy

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
APP = BUNDLE_ROOT / "scripts" / "apps" / "deploy_app" / "app.py"
SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "brain" / "images" / "sample_visit-0.nii.gz"
SOURCE = "{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}"
TARGET = "{'age': 85, 'diagnosis': 'AD'}"
STEPS = "5"


def run_app(input_path: Path, output_dir: Path, *flags: str, env: dict[str, str] | None = None):
    """`python scripts/apps/deploy_app/app.py -i <input> -o <output> -m <bundle> <flags>`, as a user runs it."""
    command = [sys.executable, str(APP), "-i", str(input_path), "-o", str(output_dir), "-m", str(BUNDLE_ROOT), *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)


def succeeded(result) -> None:
    assert (
        result.returncode == 0
    ), f"app failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, folder: Path, **patient: str) -> list[Path]:
    """
    One MR Image Storage file per slice of a (column, row, slice) volume with a RAS `affine`: ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing from the affine (RAS -> DICOM's LPS), int16 pixels with a rescale slope,
    one study and series UID.
    """
    folder.mkdir(parents=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    column_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    slope = float(np.abs(volume).max()) / 30000.0
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "MR", "T1 sample", 3, k + 1
        ds.PatientName, ds.PatientID = "Sample^Brain", "sample"
        for keyword, value in patient.items():
            setattr(ds, keyword, value)
        ds.ImagePositionPatient = [f"{v:.6f}" for v in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [
            f"{v:.8f}" for v in (*column_step / np.linalg.norm(column_step), *row_step / np.linalg.norm(row_step))
        ]
        ds.PixelSpacing = [f"{np.linalg.norm(row_step):.6f}", f"{np.linalg.norm(column_step):.6f}"]
        ds.SliceThickness = f"{np.linalg.norm(slice_step):.6f}"
        pixels = np.round(volume[:, :, k].T / slope).astype("<i2")  # rows x columns
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", "0"
        ds.PixelData = pixels.tobytes()
        paths.append(folder / f"{k:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("deploy") / "nifti_output"
    result = run_app(SAMPLE, output, "--source", SOURCE, "--target", TARGET, "--steps", STEPS)
    succeeded(result)
    return output


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    """A DICOM series made from the brain sample, with non-square pixels (2.5 mm rows, 3 mm columns), PatientAge and
    PatientSex in the headers, the diagnosis and target in counterfactual.json, and the steps from the environment."""
    folder = tmp_path_factory.mktemp("deploy")
    sample = nib.load(str(SAMPLE))
    affine = sample.affine.copy()
    affine[:3, 1] *= 2.5 / 3.0
    series = folder / "series"
    write_dicom_series(np.asarray(sample.dataobj, dtype=np.float32), affine, series, PatientAge="065Y", PatientSex="F")
    (series / "counterfactual.json").write_text(json.dumps({"source": {"diagnosis": "CN"}, "target": {"age": 85}}))
    output = folder / "dicom_output"
    succeeded(run_app(series, output, env={"COUNTERFACTUAL_STEPS": STEPS}))
    return series, affine, output


def test_nifti_input_gives_counterfactual_on_the_input_grid(nifti_run):
    source = nib.load(str(SAMPLE))
    result = nib.load(str(nifti_run / "sample_visit-0_counterfactual.nii.gz"))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    original, counterfactual = np.asarray(source.dataobj, np.float32), np.asarray(result.dataobj, np.float32)
    # the composed counterfactual is the input plus the model's change inside the edit mask, the input elsewhere
    # (the demo brain weights barely respond to covariates, so the mask may well be empty at few steps)
    mask = np.asarray(nib.load(str(nifti_run / "sample_visit-0_mask.nii.gz")).dataobj, np.float32)
    assert mask.shape == original.shape and 0 <= mask.min() and mask.max() <= 1
    assert np.array_equal(counterfactual[mask == 0], original[mask == 0])
    record = json.loads((nifti_run / "sample_visit-0_record.json").read_text())
    assert record["out_of_distribution"]["reconstruction_error"] > 0, "the network ran on the scan"
    assert record["drift"]["delta_from"] == "weights"


def test_nifti_outputs_and_record(nifti_run):
    names = sorted(path.name for path in nifti_run.iterdir())
    kinds = ("counterfactual.nii.gz", "difference.nii.gz", "mask.nii.gz", "montage.png", "record.json")
    assert names == [f"sample_visit-0_{kind}" for kind in kinds]
    record = json.loads((nifti_run / "sample_visit-0_record.json").read_text())
    assert record["source"] == {"age": 65, "sex": "F", "diagnosis": "CN"}
    assert record["target"] == {"age": 85, "sex": "F", "diagnosis": "AD"}
    assert record["parameters"]["num_inference_steps"] == int(STEPS)
    assert all(Path(path).parent == nifti_run.resolve() and Path(path).exists() for path in record["outputs"].values())


def test_dicom_input_gives_nifti_in_the_series_geometry(dicom_run):
    series, affine, output = dicom_run
    result = nib.load(str(output / "T1_sample_counterfactual.nii.gz"))
    assert result.shape == (64, 80, 64)
    np.testing.assert_allclose(result.affine, affine, atol=1e-4)
    difference = nib.load(str(output / "T1_sample_difference.nii.gz"))
    assert difference.shape == result.shape and np.isfinite(np.asarray(difference.dataobj)).all()
    np.testing.assert_allclose(difference.affine, affine, atol=1e-4)
    record = json.loads((output / "T1_sample_record.json").read_text())
    assert record["out_of_distribution"]["reconstruction_error"] > 0, "the network ran on the series"


def test_dicom_input_covariates_come_from_headers_and_settings_file(dicom_run):
    _, _, output = dicom_run
    record = json.loads((output / "T1_sample_record.json").read_text())
    assert record["source"] == {"age": 65, "sex": "F", "diagnosis": "CN"}
    assert record["target"] == {"age": 85, "sex": "F", "diagnosis": "CN"}
    assert record["dicom"]["source_covariates_from_header"] == {"age": 65, "sex": "F"}
    assert record["parameters"]["num_inference_steps"] == int(STEPS)


def test_dicom_input_gives_a_derived_dicom_series(dicom_run):
    series, _, output = dicom_run
    inputs = [pydicom.dcmread(path) for path in sorted(series.glob("*.dcm"))]
    written = [pydicom.dcmread(path) for path in sorted((output / "T1_sample_counterfactual_dicom").glob("*.dcm"))]
    assert len(written) == len(inputs)
    assert {str(ds.SeriesInstanceUID) for ds in written} != {str(inputs[0].SeriesInstanceUID)}
    assert len({str(ds.SeriesInstanceUID) for ds in written}) == 1
    assert {str(ds.StudyInstanceUID) for ds in written} == {str(inputs[0].StudyInstanceUID)}
    assert sorted(tuple(map(float, ds.ImagePositionPatient)) for ds in written) == sorted(
        tuple(map(float, ds.ImagePositionPatient)) for ds in inputs
    )
    counterfactual = np.asarray(nib.load(str(output / "T1_sample_counterfactual.nii.gz")).dataobj, np.float32)
    for index in (0, 32, 63):
        values = written[index].pixel_array * float(written[index].RescaleSlope)
        np.testing.assert_allclose(values, counterfactual[:, :, index].T, atol=float(written[index].RescaleSlope))


def test_empty_input_folder_fails_with_a_clear_message_and_no_output(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_app(tmp_path / "empty", tmp_path / "output", "--target", TARGET)
    assert result.returncode != 0
    assert "is empty" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "output").exists()


def test_unknown_covariate_fails_with_a_clear_message_and_no_output(tmp_path):
    output = tmp_path / "output"
    result = run_app(SAMPLE, output, "--source", SOURCE, "--target", "{'mood': 'happy'}", "--steps", STEPS)
    assert result.returncode != 0
    assert "unknown covariate(s) ['mood']" in result.stderr.strip().splitlines()[-1]
    assert not output.exists() or not any(output.iterdir())


@pytest.fixture(scope="module")
def app_module():
    sys.path.insert(0, str(APP.parent))
    try:
        import app

        yield app
    finally:
        sys.path.remove(str(APP.parent))


def test_settings_command_line_over_environment_over_file(app_module, tmp_path):
    settings_file = tmp_path / "counterfactual.json"
    settings_file.write_text(json.dumps({"target": {"age": 70}, "strength": 0.5, "steps": 20, "delta": 0.05}))
    environment = {"COUNTERFACTUAL_STEPS": "10", "COUNTERFACTUAL_TARGET": "{'age': 80}"}
    settings = app_module.resolve_settings({"target": "{'age': 90}", "strength": None}, environment, settings_file)
    assert settings == {"target": {"age": 90}, "strength": 0.5, "steps": 10, "delta": 0.05}


def test_bad_setting_names_the_setting_and_where_it_came_from(app_module, tmp_path):
    with pytest.raises(ValueError, match=r"strength \(from environment\) must be in \[1e-06, 1.0\]"):
        app_module.resolve_settings({"target": "{'age': 90}"}, {"COUNTERFACTUAL_STRENGTH": "2"}, None)
    (tmp_path / "counterfactual.json").write_text(json.dumps({"target": {"age": 90}, "step": 5}))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['step'\]"):
        app_module.resolve_settings({}, {}, tmp_path / "counterfactual.json")


def test_missing_target_is_refused(app_module):
    with pytest.raises(ValueError, match="no target covariates"):
        app_module.resolve_settings({"source": "{'age': 60}"}, {}, None)


def test_bundle_is_found_in_a_models_folder_as_in_a_map(app_module, tmp_path):
    (tmp_path / "models" / "latent_drift_counterfactual" / "configs").mkdir(parents=True)
    (tmp_path / "models" / "latent_drift_counterfactual" / "configs" / "inference.json").write_text("{}")
    assert (
        app_module.find_bundle(tmp_path / "models") == (tmp_path / "models" / "latent_drift_counterfactual").resolve()
    )
    assert app_module.find_bundle(BUNDLE_ROOT) == BUNDLE_ROOT
    with pytest.raises(ValueError, match="holds no bundle"):
        app_module.find_bundle(tmp_path)


def test_chest_preset_takes_a_png_film(tmp_path):
    from PIL import Image

    film = BUNDLE_ROOT / "docs" / "samples" / "chest" / "images" / "sample_visit-0.png"
    source = "{'age': 55, 'sex': 'F', 'cardiomegaly': 0, 'effusion': 0}"
    flags = ("--preset", "chest_xray_2d", "--source", source, "--target", "{'cardiomegaly': 1}", "--steps", STEPS)
    succeeded(run_app(film, tmp_path / "output", *flags))
    result = Image.open(tmp_path / "output" / "sample_visit-0_counterfactual.png")
    assert result.size == Image.open(film).size
    record = json.loads((tmp_path / "output" / "sample_visit-0_record.json").read_text())
    assert record["target"]["cardiomegaly"] == 1 and record["target"]["effusion"] == 0
