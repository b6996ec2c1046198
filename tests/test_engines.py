"""Specification of the training helpers: perceptual loss from a local file, atomic checkpoints, DICOM input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom
from monai.bundle import ConfigParser

from scripts.training.engines import LocalPerceptualLoss, atomic_save

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def test_perceptual_loss_without_a_local_file_explains_why_and_what_to_do():
    with pytest.raises(ValueError, match="local TorchScript file.*downloads weights"):
        LocalPerceptualLoss(None)


def test_perceptual_loss_from_a_local_torchscript_file_compares_features(tmp_path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 4, 3)), tmp_path / "features.pt")
    loss = LocalPerceptualLoss(str(tmp_path / "features.pt"))
    image = torch.rand(2, 1, 16, 16)
    assert loss(image, image).item() == 0.0
    assert loss(image, image + 0.1 * torch.randn_like(image)).item() > 0.0
    assert not any(p.requires_grad for p in loss.network.parameters()), "the feature network stays frozen"


def test_atomic_save_leaves_no_partial_file_when_writing_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"bad": Unpicklable()}, tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def chest_preprocessing(path: Path) -> dict:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / n) for n in ("common.json", "chest_xray_2d.json")])
    record = {"image": str(path), "age": 60, "sex": "M", "cardiomegaly": 0, "effusion": 1}
    for step in parser.get_parsed_content("preprocessing"):
        record = step(record)
    return record


def test_chest_preset_reads_a_dicom_radiograph(tmp_path):
    pixels = np.linspace(0, 4000, 96 * 80).reshape(96, 80).astype(np.uint16)
    write_dicom(tmp_path / "cxr.dcm", pixels, "MONOCHROME2")
    record = chest_preprocessing(tmp_path / "cxr.dcm")
    assert tuple(record["image"].shape) == (1, 128, 128)
    assert 0.0 <= float(record["image"].min()) and float(record["image"].max()) <= 1.0
    assert record["condition"].shape == (1, 5)
    # the window the output is written back in: the film's own 0.5th and 99.5th percentiles, as plain floats
    low, high = record["image"].meta["intensity_range"]
    assert isinstance(low, float) and isinstance(high, float)
    np.testing.assert_allclose([low, high], np.percentile(pixels, [0.5, 99.5]), atol=0.02 * 4000)  # after resizing


def test_monochrome1_dicom_is_inverted_so_air_is_dark(tmp_path):
    ramp = np.linspace(0, 4000, 96 * 80).reshape(96, 80).astype(np.uint16)
    write_dicom(tmp_path / "m2.dcm", ramp, "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", ramp, "MONOCHROME1")
    normal, inverted = (
        chest_preprocessing(tmp_path / "m2.dcm")["image"],
        chest_preprocessing(tmp_path / "m1.dcm")["image"],
    )
    torch.testing.assert_close(inverted, 1 - normal, atol=0.02, rtol=0)


def test_shipped_weights_that_do_not_match_their_sha256_are_refused(tmp_path):
    from scripts.io.weights import file_sha256, load_weights

    module = torch.nn.Linear(2, 2)
    torch.save(module.state_dict(), tmp_path / "model.pt")
    listing = "large_files:\n- path: model.pt\n  url: ''\n  hash_val: {}\n  hash_type: sha256\n"
    (tmp_path / "large_files.yml").write_text(listing.format(file_sha256(tmp_path / "model.pt")))
    load_weights(module, str(tmp_path / "model.pt"), bundle_root=str(tmp_path))  # matches: loads
    (tmp_path / "large_files.yml").write_text(listing.format("0" * 64))
    with pytest.raises(ValueError, match="does not match"):
        load_weights(module, str(tmp_path / "model.pt"), bundle_root=str(tmp_path))
