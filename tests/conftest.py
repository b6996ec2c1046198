"""Shared test helpers: the bundle root on sys.path and a runner for the real bundle CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))


def run_bundle(run_id: str, config_files: list[str], *overrides: str, timeout: int = 600, check: bool = True):
    """Run `python -m monai.bundle run <run_id> --config_file [...] <overrides>` from the bundle root."""
    configs = "[" + ",".join(f"'configs/{name}'" for name in config_files) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs, *overrides]
    command += ["--logging_file", "configs/logging.conf"]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
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
