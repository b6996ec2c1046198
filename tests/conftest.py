"""Shared test helpers: the bundle root on sys.path and a runner for the real bundle CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


def bundle_command(run_id: str, config_files: list[str], *overrides: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `python -m monai.bundle run <run_id> --config_file [...] <overrides>`."""
    configs = "[" + ",".join(f"'configs/{name}'" for name in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, *overrides]
    command += ["--logging_file", "configs/logging.conf"]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return command, env


def run_bundle(run_id: str, config_files: list[str], *overrides: str, timeout: int = 600, check: bool = True):
    """Run `python -m monai.bundle run <run_id> --config_file [...] <overrides>` from the bundle root."""
    command, env = bundle_command(run_id, config_files, *overrides)
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """In-process test models are tiny: one thread is faster, and immune to OpenMP spin-waits on a shared CPU.
    (CLI runs are subprocesses and keep their own thread count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bundle_cli():
    return run_bundle


# A tiny 3D configuration of the bundle's own network (overrides of configs/common.json) for CLI tests.
TINY = {
    "autoencoder_channels": [8, 16],
    "latent_channels": 3,
    "unet_channels": [8, 16],
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
    "image_size": [32, 32, 32],
    "pixdim": [6.0, 6.0, 6.0],
}


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """CLI overrides for TINY with the untrained weights of `untrained_bundle` and 4 DDIM steps."""
    arguments = []
    for key, value in TINY.items():
        arguments += [f"--{key}", json.dumps(value)]
    return [*arguments, "--model_path", str(root / "model.pt"), "--num_inference_steps", "4", *extra]


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory):
    """A tiny 3D network built from the bundle's own config and saved as model.pt, with an odd-shaped input scan."""
    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("cf")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in ("inference.json",)])
    parser.update(TINY)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "model.pt")
    rng = np.random.default_rng(0)
    volume = rng.random((40, 36, 30)).astype(np.float32) * 100
    affine = np.array([[-5.0, 0, 0, 90], [0, 5.0, 0, -100], [0, 0, 4.0, -60], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), root / "scan.nii.gz")
    return root


# The same for the chest preset: a tiny 2D network (overrides of configs/common.json + configs/chest_xray_2d.json).
TINY_2D = {
    "autoencoder_channels": [8, 16],
    "latent_channels": 3,
    "unet_channels": [8, 16],
    "norm_num_groups": 8,
    "cross_attention_dim": 16,
    "image_size": [32, 32],
}


def tiny_chest_overrides(root: Path, *extra: str) -> list[str]:
    """CLI overrides for TINY_2D with the untrained weights of `untrained_chest_bundle` and 2 DDIM steps."""
    arguments = []
    for key, value in TINY_2D.items():
        arguments += [f"--{key}", json.dumps(value)]
    return [*arguments, "--model_path", str(root / "model.pt"), "--num_inference_steps", "2", "--progress", "false",
            *extra]  # fmt: skip


@pytest.fixture(scope="session")
def untrained_chest_bundle(tmp_path_factory):
    """A tiny untrained 2D chest network built from the bundle's own configs, saved as model.pt."""
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("chest")
    parser = ConfigParser()
    names = ("inference.json", "chest_xray_2d.json")
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in names])
    parser.update(TINY_2D)
    torch.manual_seed(0)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "model.pt")
    return root


# Patient-identifying tags written into test DICOMs (no output or record may carry them).
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PID-93017", "PatientBirthDate": "19600101"}


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, spacing: bool = True) -> Path:
    """A single-frame DX radiograph, 12 bits stored in 16, with patient-identifying tags."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    rows, columns = pixels.shape
    dataset.update(
        {"SOPClassUID": meta.MediaStorageSOPClassUID, "SOPInstanceUID": meta.MediaStorageSOPInstanceUID,
         "Modality": "DX", "Rows": rows, "Columns": columns, "SamplesPerPixel": 1,
         "PhotometricInterpretation": photometric, "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11,
         "PixelRepresentation": 0, **PATIENT}  # fmt: skip
    )
    if spacing:
        dataset.PixelSpacing = [0.5, 0.5]
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    dataset.save_as(path, enforce_file_format=True)
    return path
