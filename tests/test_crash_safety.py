"""Crash safety: training killed with SIGKILL mid-run resumes from its last checkpoint, losing at most one interval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT, bundle_command

from scripts.cohort.generate import generate_cohort
from scripts.io.weights import read_weights

pytestmark = pytest.mark.slow

STAGE1 = ["common.json", "chest_xray_2d.json", "train_autoencoder.json"]
TINY_2D = [
    "--autoencoder_channels", "[8,16]", "--unet_channels", "[8,16]", "--norm_num_groups", "8",
    "--cross_attention_dim", "16", "--image_size", "[32,32]", "--batch_size", "2", "--learning_rate", "0.002",
    "--val_interval", "1000", "--adversarial_weight", "0", "--save_every_epochs", "1",
]  # fmt: skip


def completed_epochs(run_dir: Path) -> int:
    history = run_dir / "loss_history.json"
    if not history.is_file():
        return 0
    try:
        return max((row["epoch"] for row in json.loads(history.read_text())), default=0)
    except json.JSONDecodeError:  # never expected: loss_history.json is written atomically too
        pytest.fail(f"{history} was seen half written")


def test_sigkill_mid_training_resumes_from_the_last_checkpoint(tmp_path):
    generate_cohort(tmp_path / "cohort", seed=3, modality="chest", num_subjects=12, shape=(48, 48))
    run_dir = tmp_path / "runs" / "autoencoder"
    arguments = [
        "--dataset_dir", str(tmp_path / "cohort"), "--output_dir", str(tmp_path / "runs"),
        "--ckpt_dir", str(tmp_path / "models"), *TINY_2D,
    ]  # fmt: skip
    command, env = bundle_command("training", STAGE1, *arguments, "--max_epochs", "200")
    process = subprocess.Popen(command, cwd=BUNDLE_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while completed_epochs(run_dir) < 3:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "training did not reach epoch 3 in 5 minutes"
            time.sleep(0.05)
        time.sleep(0.7)  # somewhere inside a later epoch, possibly while a checkpoint is being written
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = completed_epochs(run_dir)
    assert process.returncode == -signal.SIGKILL

    # the last checkpoint is whole (written to a temporary file, then renamed) and at most one interval behind
    state = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    saved_epoch = state["trainer"]["iteration"] // state["trainer"]["epoch_length"]
    assert killed_at - 1 <= saved_epoch <= killed_at, (saved_epoch, killed_at)
    assert not (tmp_path / "models" / "autoencoder.pt").exists(), "final weights appear only when training completes"

    # the same command with a reachable max_epochs resumes there and finishes
    command, env = bundle_command("training", STAGE1, *arguments, "--max_epochs", str(saved_epoch + 2))
    resumed = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoint_last.pt'} at epoch {saved_epoch}" in resumed.stdout
    rows = json.loads((run_dir / "loss_history.json").read_text())
    assert [row["epoch"] for row in rows] == list(range(1, saved_epoch + 3))
    final = read_weights(tmp_path / "models" / "autoencoder.pt")[0]
    resumed_state = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert resumed_state["trainer"]["iteration"] // resumed_state["trainer"]["epoch_length"] == saved_epoch + 2
    assert all(torch.equal(final[k], resumed_state["autoencoder"][k]) for k in final)
