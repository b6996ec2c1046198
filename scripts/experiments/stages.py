"""Resumable experiment stages: each stage is one run of the bundle's own configs in a child process.

An experiment (the fine-tuning ablation, the conditioning comparison) is a list of stages; a stage whose output
exists is skipped, so an interrupted experiment resumes where it stopped, and every stage's wall time is kept in
`timings.json` beside its log in `logs/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.io.files import atomic_write_json


def run_bundle(run_id: str, configs: Sequence[str], overrides: Mapping[str, Any], log: Path) -> float:
    """Run one bundle workflow in a child process; returns its wall time. The log keeps its output."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(list(configs))]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd(), check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"stage {log.stem} failed (log: {log}): {' | '.join(tail)}")
    return time.perf_counter() - started


class Stages:
    """The stages of one experiment in `root`: run each unless its output exists, and time it."""

    def __init__(self, root: Path, base: Sequence[str], label: str) -> None:
        self.root, self.base, self.label = Path(root), list(base), label
        timings = self.root / "timings.json"
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    def run(
        self,
        name: str,
        done: Path,
        configs: Sequence[str],
        overrides: Mapping[str, Any],
        run_id: str = "run",
        base: Sequence[str] | None = None,
    ) -> None:
        """Stage `name`: `configs` after the base configs with `overrides`, unless `done` exists."""
        if done.exists():
            print(f"[{self.label}] {name}: done before ({done})")
            return
        print(f"[{self.label}] {name} ...", flush=True)
        files = list(self.base if base is None else base) + list(configs)
        self.timings[name] = round(run_bundle(run_id, files, overrides, self.root / "logs" / f"{name}.log"), 1)
        atomic_write_json(self.timings, self.root / "timings.json")
        print(f"[{self.label}] {name}: {self.timings[name]} s", flush=True)

    def cohort(self, name: str, modality: str, overrides: Mapping[str, Any]) -> Path:
        """A cohort of the generator config in `root`/cohort_`name` (its datalist marks it done)."""
        folder = self.root / f"cohort_{name}"
        settings = {"modality": modality, "output_dir": str(folder), **overrides}
        self.run(f"cohort_{name}", folder / "datalist.json", ["configs/generate_cohort.json"], settings, "generate", [])
        return folder
