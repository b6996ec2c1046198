"""Specification of the weights format: one versioned file that owns δ, the schedule and the covariate schema."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from torch import nn

from scripts.core.drift import LatentDrift
from scripts.io.weights import (
    FORMAT_VERSION,
    WEIGHTS_FORMAT,
    load_weights,
    read_weights,
    save_weights,
    weights_metadata,
)

SCHEMA = {"age": {"type": "continuous", "range": [40, 100]}}


class Drifting(nn.Module):
    """The smallest module with a state and a drift, like LatentDriftModel."""

    def __init__(self, delta: float = 0.0, schedule: str = "paper") -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.drift = LatentDrift(delta, schedule)


@pytest.mark.parametrize("path", ["models/model.pt", "models/chest/model.pt"])
def test_shipped_weights_hold_their_drift_schedule_and_schema(path):
    content = torch.load(BUNDLE_ROOT / path, map_location="cpu", weights_only=True)
    assert content["format"] == WEIGHTS_FORMAT and content["format_version"] == FORMAT_VERSION
    metadata = content["metadata"]
    expected_delta, covariate = (0.1, "diagnosis") if path == "models/model.pt" else (0.0, "effusion")
    assert metadata["drift"] == {"delta": expected_delta, "schedule": "paper"}
    assert covariate in metadata["covariate_schema"]
    assert len(metadata["reconstruction_error"]["values"]) >= 30, "the OOD profile of the validation scans"


def test_shipped_paired_interval_weights_load_strictly_under_their_overlays():
    """models/paired_interval_model.pt: the residual paired model conditioned on the interval (README, paired mode)."""
    from monai.bundle import ConfigParser

    overlays = ("inference.json", "paired.json", "paired_residual.json", "paired_interval.json")
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in overlays])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    assert Path(parser.get_parsed_content("model_path")) == BUNDLE_ROOT / "models" / "paired_interval_model.pt"
    network = parser.get_parsed_content("network_def")
    state, metadata = read_weights(BUNDLE_ROOT / "models" / "paired_interval_model.pt")
    network.load_state_dict(state, strict=True)
    assert metadata["paired"] is True and metadata["drift"] == {"delta": 0.1, "schedule": "paper"}
    assert float(network.denoiser.interval_gain) == 10.0
    assert float(network.residual_scale) > 2 * float(network.scale_factor), "a follow-up change is smaller than a scan"
    assert len(metadata["reconstruction_error"]["values"]) >= 30, "the OOD profile of the validation baseline scans"
    # the defaults its held-out scores were measured at (docs/results.md, "The edit mask: signed smoothing")
    inferer = parser.get_parsed_content("inferer")
    assert inferer.keep_intensity_scale and inferer.num_samples == 4 and inferer.guidance_scale == 3.0
    assert (inferer.mask_threshold, inferer.mask_signed_smoothing) == (6.0, 1.0)


def test_saved_weights_round_trip_with_their_metadata(tmp_path):
    module = Drifting(0.2, "marginal")
    save_weights(tmp_path / "w.pt", module, weights_metadata(module.drift, SCHEMA, {"spatial_dims": 2, "x": 1}))
    state, metadata = read_weights(tmp_path / "w.pt")
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert metadata == {"drift": {"delta": 0.2, "schedule": "marginal"}, "covariate_schema": SCHEMA,
                        "network": {"spatial_dims": 2}}  # fmt: skip


def test_loading_gives_the_module_the_weights_drift_and_warns_about_a_differing_config(tmp_path, caplog):
    trained = Drifting(0.2, "marginal")
    save_weights(tmp_path / "w.pt", trained, weights_metadata(trained.drift))
    configured = Drifting(0.1, "paper")
    with caplog.at_level(logging.WARNING):
        load_weights(configured, str(tmp_path / "w.pt"))
    assert configured.drift.delta.tolist() == pytest.approx(0.2) and configured.drift.schedule == "marginal"
    assert "is ignored" in caplog.text
    assert configured.weights_info["sha256"] and configured.weights_info["metadata"]["drift"]["delta"] == 0.2


def test_fine_tuning_keeps_the_configured_drift_and_says_what_the_weights_had(tmp_path, caplog):
    trained = Drifting(0.0)
    save_weights(tmp_path / "w.pt", trained, weights_metadata(trained.drift))
    configured = Drifting(0.1, "paper")  # LD in training: configs/finetune.json loads with adopt_drift=False
    with caplog.at_level(logging.INFO):
        load_weights(configured, str(tmp_path / "w.pt"), adopt_drift=False)
    assert configured.drift.delta.tolist() == pytest.approx(0.1)
    assert "fine-tuning at the config's delta" in caplog.text and "is ignored" not in caplog.text


def test_weights_of_the_earlier_format_still_load_and_keep_the_config_drift(tmp_path, caplog):
    module = Drifting(0.1)
    torch.save(module.state_dict(), tmp_path / "old.pt")
    with caplog.at_level(logging.INFO):
        load_weights(module, str(tmp_path / "old.pt"))
    assert "earlier format" in caplog.text
    assert module.weights_info["metadata"] is None and module.drift.delta.tolist() == pytest.approx(0.1)


@pytest.mark.parametrize("content", [[1, 2], torch.zeros(3), {"a": "text"}])
def test_a_file_that_holds_no_state_dict_is_refused_naming_it(tmp_path, content):
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt"):
        load_weights(Drifting(), str(tmp_path / "odd.pt"))


def test_a_truncated_weights_file_is_refused_naming_it(tmp_path):
    save_weights(tmp_path / "w.pt", Drifting())
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt: not a readable weights file"):
        load_weights(Drifting(), str(tmp_path / "cut.pt"))


def test_a_newer_format_version_is_refused(tmp_path):
    torch.save({"format": WEIGHTS_FORMAT, "format_version": FORMAT_VERSION + 1, "state_dict": {}}, tmp_path / "n.pt")
    with pytest.raises(ValueError, match="newer than this bundle reads"):
        read_weights(tmp_path / "n.pt")


def test_a_pickle_of_arbitrary_objects_is_refused_without_suggesting_to_unpickle_it(tmp_path):
    torch.save({"state_dict": {}, "module": nn.Linear(2, 2)}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"p\.pt: holds Python objects") as caught:
        read_weights(tmp_path / "p.pt")
    assert "weights_only=False" not in str(caught.value)


def test_gpu_overlay_builds_a_wider_network_in_its_own_folder_and_default_widths_refuse_its_weights(tmp_path):
    """configs/gpu.json on the chest preset: weights it trains name the widths the default network lacks."""
    from monai.bundle import ConfigParser

    def parsed(*names: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in names])
        parser.update({"bundle_root": str(tmp_path), "image_size": [32, 32]})
        return parser

    gpu = parsed("inference.json", "chest_xray_2d.json", "gpu.json")
    assert Path(gpu.get_parsed_content("model_path")) == tmp_path / "runs" / "gpu_chest" / "models" / "model.pt"
    wide = gpu.get_parsed_content("network_def")
    assert list(wide.denoiser.unet.block_out_channels) == [64, 128, 256]
    network = {key: gpu.get_parsed_content(key) for key in ("spatial_dims", "unet_channels", "cross_attention_dim")}
    save_weights(tmp_path / "wide.pt", wide, weights_metadata(None, None, network))
    default = parsed("inference.json", "chest_xray_2d.json").get_parsed_content("network_def")
    with pytest.raises(ValueError, match=r"does not fit .*record spatial_dims 2, unet_channels \[64, 128, 256\]"):
        load_weights(default, str(tmp_path / "wide.pt"))
