"""Both training stages, end to end through the real bundle CLI, on tiny generated cohorts in 3D and 2D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scripts.cohort.generate import generate_cohort
from scripts.io.weights import read_weights

pytestmark = pytest.mark.slow

TINY_NETWORKS = [
    "--autoencoder_channels", "[8,16]",
    "--unet_channels", "[8,16]",
    "--norm_num_groups", "8",
    "--cross_attention_dim", "16",
    "--batch_size", "4",
    "--learning_rate", "0.002",
    "--val_interval", "2",
]  # fmt: skip
AUTOENCODER = ["common.json", "train_autoencoder.json"]
DIFFUSION = ["common.json", "train_diffusion.json"]
MODALITIES = {
    "3d": {
        "cohort": {
            "modality": "brain",
            "num_subjects": 5,
            "visits_per_subject": 2,
            "shape": (32, 32, 32),
            "spacing": 6.0,
        },
        "presets": ["brain_mri_3d.json"],
        "overrides": ["--image_size", "[32,32,32]", "--pixdim", "[6.0,6.0,6.0]", "--delta", "0.1"],
    },
    "2d": {
        "cohort": {"modality": "chest", "num_subjects": 10, "shape": (64, 64)},
        "presets": ["chest_xray_2d.json"],
        "overrides": ["--image_size", "[32,32]", "--delta", "[0.05,-0.05,0.1]"],
    },
}


def with_preset(stage: list[str], presets: list[str]) -> list[str]:
    return stage[:1] + presets + stage[1:]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in json.loads((run_dir / "loss_history.json").read_text())]


def epochs(run_dir: Path) -> list[int]:
    return [row["epoch"] for row in json.loads((run_dir / "loss_history.json").read_text())]


@pytest.fixture(scope="module", params=sorted(MODALITIES))
def trained(request, tmp_path_factory, bundle_cli):
    """Stage 1 for 6 epochs then resumed to 8; stage 2 for 6 epochs then resumed to 8."""
    spec = MODALITIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    generate_cohort(root / "cohort", seed=1, **spec["cohort"])
    common = [
        "--dataset_dir", str(root / "cohort"), "--output_dir", str(root / "runs"), "--ckpt_dir", str(root / "models"),
        *TINY_NETWORKS, *spec["overrides"],
    ]  # fmt: skip
    stage1 = with_preset(AUTOENCODER, spec["presets"])
    stage1_args = [*common, "--discriminator_channels", "8", "--discriminator_layers", "2"]
    bundle_cli("training", stage1, *stage1_args, "--max_epochs", "6", "--adversarial_warmup_epochs", "3")
    first_autoencoder = read_weights(root / "models" / "autoencoder.pt")[0]
    bundle_cli("training", stage1, *stage1_args, "--max_epochs", "8", "--adversarial_warmup_epochs", "3")
    stage2 = with_preset(DIFFUSION, spec["presets"])
    bundle_cli("training", stage2, *common, "--max_epochs", "6", "--sample_every_epochs", "3")
    first_model = read_weights(root / "models" / "model.pt")[0]
    bundle_cli("training", stage2, *common, "--max_epochs", "8", "--sample_every_epochs", "3")
    return {
        "root": root,
        "common": common,
        "stage2": stage2,
        "first_autoencoder": first_autoencoder,
        "first_model": first_model,
    }


def test_autoencoder_loss_falls(trained):
    history = losses(trained["root"] / "runs" / "autoencoder")
    assert history[-1] < 0.8 * history[0], history


def test_diffusion_loss_falls(trained):
    history = losses(trained["root"] / "runs" / "diffusion")
    assert sum(history[-3:]) / 3 < sum(history[:2]) / 2, history


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_checkpoints_hold_weights_optimizer_and_trainer_state(trained, stage):
    checkpoint = torch.load(trained["root"] / "runs" / stage / "checkpoint_last.pt", weights_only=True)
    assert {"optimizer", "trainer"} <= set(checkpoint)
    assert checkpoint["trainer"]["iteration"] == 8 * checkpoint["trainer"]["epoch_length"]


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_resumed_run_continues_from_the_saved_epoch(trained, stage):
    assert epochs(trained["root"] / "runs" / stage) == list(range(1, 9)), "epochs 7-8 must follow epoch 6, once each"


def test_resumed_run_changed_the_final_weights(trained):
    final = read_weights(trained["root"] / "models" / "autoencoder.pt")[0]
    assert any(not torch.equal(final[k], trained["first_autoencoder"][k]) for k in final)


def test_final_model_loads_with_strict_keys_into_the_network_definition(trained):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([f"configs/{name}" for name in trained["stage2"][:-1]])
    arguments = trained["common"]
    for flag, value in zip(arguments[::2], arguments[1::2]):
        parser[flag.lstrip("-")] = json.loads(value) if value[:1] in "[0123456789-" else value
    network = parser.get_parsed_content("network_def")
    state = read_weights(trained["root"] / "models" / "model.pt")[0]
    network.load_state_dict(state, strict=True)
    assert float(network.scale_factor) != 1.0, "stage 2 must measure the latent scale factor from data"


def test_final_weights_carry_what_they_were_trained_with(trained):
    _, metadata = read_weights(trained["root"] / "models" / "model.pt")
    delta = json.loads(trained["common"][trained["common"].index("--delta") + 1])
    assert metadata["drift"] == {"delta": delta, "schedule": "paper"}
    assert set(metadata["covariate_schema"]) >= {"age", "sex"}
    image_size = trained["common"][trained["common"].index("--image_size") + 1]
    assert metadata["network"]["image_size"] == json.loads(image_size)
    profile = metadata["reconstruction_error"]
    assert len(profile["values"]) >= 2 and profile["percentile"] == 99.9
    assert min(profile["values"]) < profile["threshold"] < 10 * max(profile["values"])  # a fitted upper tail
    assert metadata["input_profile"]["count"] > 0


def test_tensorboard_has_sample_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(trained["root"] / "runs" / "diffusion"), size_guidance={"images": 0})
    accumulator.Reload()
    assert any(tag.startswith("sample_0") for tag in accumulator.Tags()["images"]), accumulator.Tags()


def test_embedding_finetuning_from_a_checkpoint_changes_only_the_embedding(trained, bundle_cli):
    root = trained["root"]
    before = read_weights(root / "models" / "model.pt")[0]
    common = list(trained["common"])
    common[common.index("--delta") + 1] = "0.0"  # fine-tuning owns its δ: LD off here, whatever the weights had
    bundle_cli(
        "training",
        [*trained["stage2"], "finetune.json"],  # the fine-tune mode: an overlay that loads the whole model
        *common,
        "--finetune_from", str(root / "models" / "model.pt"),
        "--finetune_scheme", "embedding",
        "--model_path", str(root / "finetuned.pt"),
        "--run_dir", str(root / "runs" / "finetune"),
        "--max_epochs", "2",
        "--sample_every_epochs", "0",
    )  # fmt: skip
    after, metadata = read_weights(root / "finetuned.pt")
    assert metadata["drift"]["delta"] == 0.0, "the fine-tuned weights record the δ they were fine-tuned with"
    changed = {key for key in after if not torch.equal(after[key], before[key])}
    # the covariate embeddings: the context tokens and, where the preset uses it, the timestep-embedding MLP
    embeddings = ("denoiser.embedding.", "denoiser.unet.class_embedding.")
    assert changed and all(key.startswith(embeddings) for key in changed), changed


def test_bad_covariate_in_the_datalist_stops_before_training(trained, bundle_cli, tmp_path):
    datalist = json.loads((trained["root"] / "cohort" / "datalist.json").read_text())
    datalist["training"][1]["sex"] = "X"
    for split in datalist.values():
        for record in split:
            record["image"] = str(trained["root"] / "cohort" / record["image"])
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    result = bundle_cli(
        "training", trained["stage2"], *trained["common"],
        "--datalist", str(tmp_path / "datalist.json"), "--run_dir", str(tmp_path / "run"), check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "record 1" in result.stderr and "covariate 'sex' = 'X' is unknown" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written for a run that cannot start"
