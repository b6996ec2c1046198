"""Bad input through the real CLI: each case exits non-zero, ends with one line naming the problem, writes nothing.

Every case runs `python -m monai.bundle run --config_file configs/inference.json` on a tiny untrained
network (see conftest.untrained_bundle) with one input, covariate, datalist or config value broken.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, tiny_overrides
from PIL import Image

SOURCE = "{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}"


def _volume(folder: Path, name: str, array: np.ndarray) -> str:
    path = folder / name
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)
    return str(path)


def _datalist(folder: Path, name: str, content: str) -> str:
    path = folder / name
    path.write_text(content)
    return str(path)


def _truncated(folder: Path, scan: Path) -> str:
    path = folder / "truncated.nii.gz"
    path.write_bytes(scan.read_bytes()[: scan.stat().st_size // 2])
    return str(path)


def _wrong_network(folder: Path) -> str:
    import torch
    from conftest import BUNDLE_ROOT, TINY
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in ("inference.json",)])
    parser.update({**TINY, "unet_channels": [16, 16]})
    path = folder / "other_model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return str(path)


# (id, overrides as a function of (case folder, untrained bundle root), expected message). Overrides replace the
# defaults --image <odd-shaped scan> --source SOURCE --target "{'age': 85}".
CASES = [
    ("missing-file", lambda d, r: ["--image", "/nonexistent/scan.nii.gz"], "no file at '/nonexistent/scan.nii.gz'"),
    ("folder-as-image", lambda d, r: ["--image", str(d)], "image: no file at"),
    ("empty-file", lambda d, r: ["--image", _datalist(d, "empty.nii.gz", "")], "cannot read"),
    (
        "corrupt-nifti",
        lambda d, r: ["--image", str(_write_bytes(d / "corrupt.nii.gz", gzip.compress(b"not a nifti header" * 20)))],
        "as NIfTI (corrupt, truncated or not an image file",
    ),
    (
        "truncated-nifti",
        lambda d, r: ["--image", _truncated(d, r / "scan.nii.gz")],
        "as NIfTI (truncated: the header promises",
    ),
    (
        "2d-image-to-3d-model",
        lambda d, r: ["--image", str(_png(d / "film.png"))],
        "this model (spatial_dims 3) takes 3D volumes (NIfTI)",
    ),
    (
        "4d-series",
        lambda d, r: ["--image", _volume(d, "series.nii.gz", np.random.rand(12, 12, 12, 3) + 1)],
        "is a 4D series of 3 volumes",
    ),
    (
        "nan-voxels",
        lambda d, r: ["--image", _volume(d, "nan.nii.gz", _with(np.random.rand(20, 20, 20), np.nan))],
        "holds NaN/Inf voxels",
    ),
    (
        "inf-voxels",
        lambda d, r: ["--image", _volume(d, "inf.nii.gz", _with(np.random.rand(20, 20, 20), np.inf))],
        "holds NaN/Inf voxels",
    ),
    (
        "constant-image",
        lambda d, r: ["--image", _volume(d, "constant.nii.gz", np.full((20, 20, 20), 7.0))],
        "the image is constant",
    ),
    ("out-of-range-target", lambda d, r: ["--target", "{'age': 130}"], "'age' = 130 is outside its range"),
    ("unknown-target", lambda d, r: ["--target", "{'weight': 80}"], "unknown covariate(s) ['weight']"),
    ("unknown-category", lambda d, r: ["--target", "{'diagnosis': 'PD'}"], "'diagnosis' = 'PD' is unknown"),
    (
        "wrong-type",
        lambda d, r: ["--source", "{'age': 'old', 'sex': 'F', 'diagnosis': 'CN'}"],
        "'age' must be a number, got 'old'",
    ),
    ("missing-source", lambda d, r: ["--source", "{'age': 65, 'sex': 'F'}"], "covariate 'diagnosis' is missing"),
    ("source-not-a-dict", lambda d, r: ["--source", "age=65"], "source must be a dict"),
    (
        "unwritable-results-dir",
        lambda d, r: ["--results_dir", str(r / "scan.nii.gz" / "out")],
        "results_dir: cannot write into",
    ),
    (
        "malformed-datalist",
        lambda d, r: ["--input_datalist", _datalist(d, "bad.json", '{"test": [')],
        "is not valid JSON (line 1",
    ),
    (
        "datalist-without-section",
        lambda d, r: ["--input_datalist", _datalist(d, "other.json", '{"training": []}')],
        "has no key 'test'",
    ),
    (
        "datalist-record-without-image",
        lambda d, r: ["--input_datalist", _datalist(d, "noimage.json", '{"test": [{"age": 60}]}')],
        "record 0 of 'test' has no 'image' entry",
    ),
    (
        "image-size-the-model-cannot-take",
        lambda d, r: ["--image_size", "[30,30,30]"],
        "image_size [30, 30, 30]: every side must be a positive multiple of 4",
    ),
    ("strength-out-of-range", lambda d, r: ["--strength", "1.5"], "strength must be in (0, 1]"),
    ("zero-steps", lambda d, r: ["--num_inference_steps", "0"], "num_inference_steps must be at least 1"),
    ("rollout-without-paired", lambda d, r: ["--rollout_steps", "3"], "rollout_steps > 1 needs a paired model"),
    ("unknown-precision", lambda d, r: ["--precision", "fp8"], "precision must be one of"),
    ("missing-weights", lambda d, r: ["--model_path", str(d / "none.pt")], "no weights file at"),
    (
        "weights-of-another-network",
        lambda d, r: ["--model_path", _wrong_network(d)],
        "does not fit the network built from the config",
    ),
    ("bad-flag", lambda d, r: ["--auto_mask", "maybe"], "auto_mask must be true or false, got 'maybe'"),
    # hostile but realistic inputs (each was a failure after compute, a crash or a silent wrong result once)
    (
        "datalist-record-2-with-nan-affine",
        lambda d, r: ["--input_datalist", _two_records(d, r, _nan_affine(d))],
        "nan_affine.nii.gz has a non-finite or singular affine",
    ),
    (
        "truncated-uncompressed-nifti",
        lambda d, r: ["--image", _truncated_uncompressed(d)],
        "as NIfTI (truncated: the header promises 32,352 bytes, the file holds 16,176)",
    ),
    (
        "tiny-volume",
        lambda d, r: ["--image", _volume(d, "tiny.nii.gz", np.random.rand(8, 8, 8) + 1)],
        "has shape (8, 8, 8): fewer than 16 voxels along an axis",
    ),
    (
        "zero-spacing-without-qform-or-sform",
        lambda d, r: ["--image", _zero_spacing(d)],
        "has voxel sizes [0.0, 0.0, 0.0] and no qform/sform in its header",
    ),
    ("weights-holding-a-list", lambda d, r: ["--model_path", _saved(d, [1, 2])], "holds a list, not a weights dict"),
    (
        "weights-holding-a-tensor",
        lambda d, r: ["--model_path", _saved(d, np.zeros(3, np.float32))],
        "holds a Tensor, not a weights dict",
    ),
    ("truncated-weights", lambda d, r: ["--model_path", _half_of(d, r / "model.pt")], "not a readable weights file"),
    (
        "weights-pickling-python-objects",
        lambda d, r: ["--model_path", _saved(d, {"state_dict": {}, "args": argparse.Namespace(lr=1)})],
        "holds Python objects besides tensors and plain values, which are not loaded",
    ),
]


def _two_records(folder: Path, root: Path, second: str) -> str:
    records = [{"image": str(root / "scan.nii.gz"), "age": 65, "sex": "F", "diagnosis": "CN"}]
    records.append({**records[0], "image": second})
    return _datalist(folder, "two.json", json.dumps({"test": records}))


def _nan_affine(folder: Path) -> str:
    affine = np.eye(4)
    affine[0, 3] = np.nan
    image = nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32) + 1, np.eye(4))
    image.set_sform(affine, 1)
    image.set_qform(affine, 1)
    nib.save(image, folder / "nan_affine.nii.gz")
    return str(folder / "nan_affine.nii.gz")


def _truncated_uncompressed(folder: Path) -> str:
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), folder / "whole.nii")
    return _half_of(folder, folder / "whole.nii")


def _half_of(folder: Path, path: Path) -> str:
    cut = folder / f"half_{path.name}"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(cut)


def _zero_spacing(folder: Path) -> str:
    image = nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), None)
    image.header["pixdim"][1:4] = 0
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, folder / "no_geometry.nii.gz")
    return str(folder / "no_geometry.nii.gz")


def _saved(folder: Path, content: object) -> str:
    import torch

    path = folder / "not_weights.pt"
    torch.save(torch.as_tensor(content) if isinstance(content, np.ndarray) else content, path)
    return str(path)


def _write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _png(path: Path) -> Path:
    Image.fromarray((np.random.rand(32, 32) * 255).astype(np.uint8)).save(path)
    return path


def _with(array: np.ndarray, value: float) -> np.ndarray:
    array[3, 4, 5] = value
    return array


def test_the_suite_covers_at_least_twenty_cases():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


# The cases that only concern the inputs (image, covariates, datalist, results folder) also run in-process, in the
# fast tier: the same checks the CLI runs first (`records` in configs/counterfactual.json).
INPUT_ARGUMENTS = {"--image": "image", "--source": "source", "--target": "target", "--input_datalist": "datalist",
                   "--results_dir": "results_dir"}  # fmt: skip
CONFIG_CASES = {"image-size-the-model-cannot-take", "strength-out-of-range", "zero-steps", "rollout-without-paired",
                "unknown-precision", "missing-weights", "weights-of-another-network", "bad-flag",
                "weights-holding-a-list", "weights-holding-a-tensor", "truncated-weights",
                "weights-pickling-python-objects"}  # fmt: skip
INPUT_CASES = [case for case in CASES if case[0] not in CONFIG_CASES]


@pytest.mark.parametrize("make, message", [case[1:] for case in INPUT_CASES], ids=[case[0] for case in INPUT_CASES])
def test_bad_input_is_refused_by_the_input_checks(untrained_bundle, tmp_path, make, message):
    from monai.bundle import ConfigParser

    from scripts.core.covariates import CovariateEncoder
    from scripts.io.inputs import counterfactual_records

    np.random.seed(0)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "common.json"))
    encoder = CovariateEncoder(parser.get("covariate_schema"))
    arguments = {"image": str(untrained_bundle / "scan.nii.gz"), "source": SOURCE, "target": "{'age': 85}"}
    arguments["results_dir"] = str(tmp_path / "results")
    overrides = make(tmp_path, untrained_bundle)
    arguments.update({INPUT_ARGUMENTS[key]: value for key, value in zip(overrides[::2], overrides[1::2])})
    with pytest.raises((ValueError, FileNotFoundError, PermissionError)) as error:
        counterfactual_records(encoder, spatial_dims=3, **arguments)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "results").exists()


def test_most_cases_run_in_process_too():
    assert len(INPUT_CASES) >= 20


@pytest.mark.slow
@pytest.mark.parametrize("make, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_fails_clearly_before_compute_and_writes_nothing(
    untrained_bundle, bundle_cli, tmp_path, make, message
):
    np.random.seed(0)
    out = tmp_path / "results"
    arguments = {"--image": str(untrained_bundle / "scan.nii.gz"), "--source": SOURCE, "--target": "{'age': 85}"}
    arguments["--results_dir"] = str(out)
    overrides = make(tmp_path, untrained_bundle)
    arguments.update(dict(zip(overrides[::2], overrides[1::2])))
    flat = [item for pair in arguments.items() for item in pair]
    result = bundle_cli("run", ["inference.json"], *tiny_overrides(untrained_bundle), *flat, check=False)
    last_line = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert result.returncode != 0, result.stdout[-2000:]
    assert message in last_line, result.stderr[-3000:]
    assert not out.exists(), "a failed run must not leave a results folder behind"
    results_dir = Path(arguments["--results_dir"])
    assert not (results_dir.exists() and any(results_dir.iterdir())), "no output files may be written"
