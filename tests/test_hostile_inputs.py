"""Inputs a hostile but realistic user gives, through the real CLI: each gets a correct result, a clear error before
compute, or an explicit policy (a warning, a results folder that never mixes runs, a lock).

The single-error cases (a NaN affine, a truncated file, a tiny volume, weights that are not weights...) live in
tests/test_bad_inputs.py; this file holds the cases that need more than one run or more than an error line.
"""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, bundle_command, tiny_chest_overrides, tiny_overrides, write_dicom
from PIL import Image

from scripts.io.results import ResultsFolder

pytestmark = pytest.mark.slow

BRAIN = ["inference.json"]
CHEST = ["inference.json", "chest_xray_2d.json"]
BRAIN_SOURCE = "{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}"
CHEST_SOURCE = {"age": 55, "sex": "F", "cardiomegaly": 0, "effusion": 0}


def run(config_files: list[str], *arguments: str, preexec_fn=None) -> subprocess.CompletedProcess:
    command, env = bundle_command("run", config_files, *arguments)
    return subprocess.run(
        command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def radiograph(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """A smooth 12-bit picture with structure (so intensity percentiles differ), not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    picture = 1500 + 1200 * np.sin(x / 7.0 + seed) * np.cos(y / 9.0) + rng.normal(0, 60, shape)
    return np.clip(picture, 0, 4095)


@pytest.fixture(scope="module")
def chest_datalist_run(untrained_chest_bundle, tmp_path_factory):
    """One datalist run through the chest preset: PNG, DICOM (MONOCHROME1), DICOM (MONOCHROME2 without
    PixelSpacing), a palette PNG, a grey + alpha PNG and a 16-bit PNG, in that order."""
    folder = tmp_path_factory.mktemp("chest_inputs")
    gray = (radiograph(0, (70, 60)) / 16).astype(np.uint8)
    Image.fromarray(gray).save(folder / "plain.png")
    pixels = radiograph(1, (96, 80))
    write_dicom(folder / "mono1.dcm", pixels, "MONOCHROME1")
    write_dicom(folder / "mono2.dcm", pixels, "MONOCHROME2", spacing=False)
    Image.fromarray(gray).convert("P").save(folder / "palette.png")
    Image.fromarray(gray).convert("LA").save(folder / "grey_alpha.png")
    Image.fromarray(radiograph(2, (64, 72)).astype(np.uint16) * 16).save(folder / "deep.png")
    names = ["plain.png", "mono1.dcm", "mono2.dcm", "palette.png", "grey_alpha.png", "deep.png"]
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": name, **CHEST_SOURCE} for name in names]}))
    out = folder / "results"
    arguments = ["--input_datalist", str(datalist), "--target", "{'effusion': 1}", "--results_dir", str(out)]
    result = run(CHEST, *tiny_chest_overrides(untrained_chest_bundle), *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, out


def test_every_2d_input_kind_of_one_datalist_comes_back_in_its_own_size_and_bit_depth(chest_datalist_run):
    import pydicom

    folder, out = chest_datalist_run
    expected = {
        "plain": ((70, 60), np.uint8),
        "mono1": ((96, 80), np.uint16),
        "mono2": ((96, 80), np.uint16),
        "palette": ((70, 60), np.uint8),
        "grey_alpha": ((70, 60), np.uint8),
        "deep": ((64, 72), np.uint16),
    }
    for name, (shape, dtype) in expected.items():
        picture = np.asarray(Image.open(out / f"{name}_counterfactual.png"))
        assert picture.shape == shape and picture.dtype == dtype, (name, picture.shape, picture.dtype)
        record = json.loads((out / f"{name}_record.json").read_text())
        assert record["outputs"]["counterfactual"] == str(out / f"{name}_counterfactual.png")
    # the counterfactual is the input plus the model's change inside the edit mask: where the mask is 0 it is the
    # input itself, so MONOCHROME1 (white = air) comes back inverted like the preset reads it (air dark)
    stored = pydicom.dcmread(folder / "mono2.dcm").pixel_array.astype(float)
    for name, sign in (("mono2", 1), ("mono1", -1)):
        picture = np.asarray(Image.open(out / f"{name}_counterfactual.png")).astype(float)
        mask = np.asarray(Image.open(out / f"{name}_mask.png")) == 0
        assert mask.mean() > 0.5, f"{name}: the untrained model's edit mask should leave most of the image alone"
        assert sign * np.corrcoef(picture[mask], stored[mask])[0, 1] > 0.99, name
    # palette and grey + alpha pictures are read as their grey levels, not as palette indices or two channels
    gray = np.asarray(Image.open(folder / "plain.png")).astype(float)
    for name in ("palette", "grey_alpha"):
        picture = np.asarray(Image.open(out / f"{name}_counterfactual.png")).astype(float)
        mask = np.asarray(Image.open(out / f"{name}_mask.png")) == 0
        assert np.corrcoef(picture[mask], gray[mask])[0, 1] > 0.95, name


def test_no_patient_identifying_dicom_tag_reaches_the_record(chest_datalist_run):
    _, out = chest_datalist_run
    for name in ("mono1", "mono2"):
        text = (out / f"{name}_record.json").read_text()
        assert not any(value in text for value in ("Doe", "Jane", "PID-93017", "19600101")), text


def test_records_sharing_a_file_name_get_unique_output_names(untrained_bundle, tmp_path):
    scan = untrained_bundle / "scan.nii.gz"
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        (tmp_path / site / "T1w.nii.gz").write_bytes(scan.read_bytes())
    records = [{"image": f"{site}/T1w.nii.gz", "age": 65, "sex": "F", "diagnosis": "CN"} for site in ("siteA", "siteB")]
    records.append(dict(records[0]))  # the same file twice
    (tmp_path / "datalist.json").write_text(json.dumps({"test": records}))
    out = tmp_path / "results"
    arguments = ["--input_datalist", str(tmp_path / "datalist.json"), "--target", "{'age': 85}"]
    result = run(BRAIN, *tiny_overrides(untrained_bundle), *arguments, "--results_dir", str(out), "--progress", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("siteA_T1w", "siteB_T1w", "siteA_T1w_2"):
        record = json.loads((out / f"{name}_record.json").read_text())
        assert record["outputs"]["counterfactual"] == str(out / f"{name}_counterfactual.nii.gz")
    assert record["input"].endswith("siteA/T1w.nii.gz")


def test_a_rerun_replaces_the_previous_results_whole(untrained_bundle, tmp_path):
    out = tmp_path / "results"
    base = [*tiny_overrides(untrained_bundle), "--image", str(untrained_bundle / "scan.nii.gz")]
    base += ["--source", BRAIN_SOURCE, "--results_dir", str(out), "--progress", "0"]
    first = run(BRAIN, *base, "--target", "{'age': 85}", "--num_samples", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "scan_std.nii.gz").is_file()
    (out / "scan_oracle.json").write_text("{}")  # configs/oracle_check.json's score of the first run
    second = run(BRAIN, *base, "--target", "{'age': 70}")
    assert second.returncode == 0, second.stderr[-3000:]
    for stale in ("scan_std.nii.gz", "scan_oracle.json"):
        assert not (out / stale).exists(), "the first run's files must not stay beside the second's record"
    record = json.loads((out / "scan_record.json").read_text())
    assert record["target"]["age"] == 70 and record["parameters"]["num_samples"] == 1
    written = sorted([*(Path(p).name for p in record["outputs"].values()), "scan_record.json"])
    assert sorted(p.name for p in out.iterdir()) == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"], "no staging, lock or previous folder left"


def test_a_folder_holding_other_files_is_refused_before_compute(untrained_bundle, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    arguments = ["--image", str(untrained_bundle / "scan.nii.gz"), "--source", BRAIN_SOURCE, "--target", "{'age': 85}"]
    result = run(BRAIN, *tiny_overrides(untrained_bundle), *arguments, "--results_dir", str(tmp_path))
    assert result.returncode != 0
    assert "holds files this bundle did not write (notes.txt)" in last_line(result), result.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_second_run_on_a_locked_results_folder_fails_clearly(untrained_bundle, tmp_path):
    out = tmp_path / "results"
    arguments = ["--image", str(untrained_bundle / "scan.nii.gz"), "--source", BRAIN_SOURCE, "--target", "{'age': 85}"]
    with ResultsFolder(out).lock():  # held as a running process holds it
        result = run(BRAIN, *tiny_overrides(untrained_bundle), *arguments, "--results_dir", str(out))
    assert result.returncode != 0
    assert f"results_dir: {out} is being written by another run" in last_line(result), result.stderr[-2000:]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_header_claiming_a_huge_volume_fails_under_a_memory_limit(untrained_bundle, tmp_path):
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + np.ones(900, np.float32).tobytes()))
    assert path.stat().st_size < 4096

    def limit_memory():  # 3 GiB of address space: the whole claimed array (4 GiB) cannot be allocated
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))

    arguments = ["--image", str(path), "--source", BRAIN_SOURCE, "--target", "{'age': 85}"]
    out = tmp_path / "results"
    result = run(
        BRAIN, *tiny_overrides(untrained_bundle), *arguments, "--results_dir", str(out), preexec_fn=limit_memory
    )
    assert result.returncode != 0
    assert "the header claims shape (1024, 1024, 1024) (1,073,741,824 voxels)" in last_line(result), result.stderr
    assert not out.exists()


def test_a_scan_wider_than_the_field_of_view_is_warned_about_and_kept_outside_it(untrained_bundle, tmp_path):
    # a 256 mm head-sized ball at 2 mm; the tiny preset sees 32 voxels x 6 mm = 192 mm
    grid = (np.mgrid[:128, :128, :128] - 63.5) * 2.0
    ball = (np.sqrt((grid**2).sum(0)) < 124).astype(np.float32)
    volume = ball * (100 + 20 * np.sin(grid[0] / 9)) + np.random.default_rng(0).normal(0, 1, ball.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp_path / "wide.nii.gz")
    out = tmp_path / "results"
    arguments = ["--image", str(tmp_path / "wide.nii.gz"), "--source", BRAIN_SOURCE, "--target", "{'age': 85}"]
    result = run(BRAIN, *tiny_overrides(untrained_bundle), *arguments, "--results_dir", str(out), "--progress", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "wide_record.json").read_text())
    (warning,) = record["warnings"]
    share = float(warning.split("% of the scan's foreground lies outside")[0].split()[-1])
    assert 18 <= share <= 26, warning  # a ball of radius 124 mm has 21% of its volume outside a 192 mm cube
    assert "crop the scan to the anatomy, or use a coarser pixdim" in warning
    assert warning in result.stderr + result.stdout
    output = np.asarray(nib.load(out / "wide_counterfactual.nii.gz").dataobj)
    edge = np.zeros(ball.shape, bool)
    edge[:10], edge[-10:] = True, True  # outside the model's view: the input, voxel for voxel
    np.testing.assert_array_equal(output[edge], volume.astype(np.float32)[edge])


def test_results_folder_publishes_all_or_nothing(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old_record.json").write_text("{}")
    folder = ResultsFolder(out)

    def failing_run():
        (folder.staging / "a_record.json").write_text("{}")  # record 1 written, then record 2 fails
        raise RuntimeError("record 2 failed")

    with pytest.raises(RuntimeError, match="record 2 failed"):
        folder.write(failing_run)
    assert [p.name for p in out.iterdir()] == ["old_record.json"], "a failed run leaves the previous results alone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    folder.write(lambda: (folder.staging / "b_record.json").write_text("{}"))
    assert [p.name for p in out.iterdir()] == ["b_record.json"]
    assert folder.staging == out.absolute(), "outside write() the writer writes into the folder itself"
