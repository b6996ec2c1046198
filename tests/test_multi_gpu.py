"""Multi-process training (configs/multi_gpu_train.json) with torchrun: 2 CPU processes, gloo backend, both stages."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE_ROOT

from scripts.cohort.generate import generate_cohort
from scripts.io.weights import read_weights

pytestmark = pytest.mark.slow

TINY_2D = [
    "--autoencoder_channels", "[8,16]", "--unet_channels", "[8,16]", "--norm_num_groups", "8",
    "--cross_attention_dim", "16", "--image_size", "[32,32]", "--batch_size", "2", "--learning_rate", "0.002",
    "--val_interval", "2", "--adversarial_weight", "0",
]  # fmt: skip


def torchrun(stage: str, *overrides: str) -> subprocess.CompletedProcess:
    configs = f"['configs/common.json','configs/chest_xray_2d.json','configs/{stage}','configs/multi_gpu_train.json']"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "monai.bundle", "run", "training", "--config_file", configs, *overrides,
        "--logging_file", "configs/logging.conf",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_two_process_training_of_both_stages(tmp_path):
    generate_cohort(tmp_path / "cohort", seed=4, modality="chest", num_subjects=10, shape=(48, 48))
    training = json.loads((tmp_path / "cohort" / "datalist.json").read_text())["training"]
    arguments = [
        "--dataset_dir", str(tmp_path / "cohort"), "--output_dir", str(tmp_path / "runs"),
        "--ckpt_dir", str(tmp_path / "models"), *TINY_2D, "--max_epochs", "2",
    ]  # fmt: skip
    for stage, run, weights, key in (
        ("train_autoencoder.json", "autoencoder", "autoencoder.pt", "autoencoder"),
        ("train_diffusion.json", "diffusion", "model.pt", "model"),
    ):
        result = torchrun(stage, *arguments)
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
        state = torch.load(tmp_path / "runs" / run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
        # each process sees half of the training scans: the epoch length is that of one shard
        assert state["trainer"]["epoch_length"] == math.ceil(math.ceil(len(training) / 2) / 2)
        assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
        final = read_weights(tmp_path / "models" / weights)[0]
        assert all(torch.equal(final[name], value) for name, value in state[key].items())
        history = json.loads((tmp_path / "runs" / run / "loss_history.json").read_text())
        assert [row["epoch"] for row in history] == [1, 2], "only rank 0 writes the loss history, once per epoch"
    model = read_weights(tmp_path / "models" / "model.pt")[0]
    assert float(model["scale_factor"]) != 1.0, "the scale factor is measured (on rank 0) and shared"
