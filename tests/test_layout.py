"""The layout a newcomer reads: the README's Layout section names every config and script, and presets only override.

(The MONAI bundle CLI merges config files top-level key by key, so a preset key equal to common.json's is dead weight
that drifts out of date the day common.json changes.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["brain_mri_3d.json", "chest_xray_2d.json"]


def layout_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```", 2)[1]


def named_in(block: str, folder: str) -> set[str]:
    """File and folder names listed in the block's paragraph for `folder/` (up to the next top-level folder)."""
    paragraph = re.search(rf"^{folder}/\s+(.*?)(?=^\S+/\s)", block + "\nend/ ", re.S | re.M).group(1)
    return set(re.findall(r"[\w.]+\.(?:json|conf|py|sh)\b|[\w]+_app/", paragraph))


SCRIPT_FOLDERS = sorted(p.name for p in (ROOT / "scripts").iterdir() if (p / "__init__.py").is_file())


@pytest.mark.parametrize("folder", ["configs"] + [f"scripts/{name}" for name in SCRIPT_FOLDERS])
def test_the_readme_layout_names_every_file_and_only_files_that_exist(folder):
    named = named_in(layout_block(), folder)
    present = {p.name for p in (ROOT / folder).glob("*.*") if p.suffix in (".json", ".conf", ".py", ".sh")}
    present |= {f"{p.name}/" for p in (ROOT / folder).iterdir() if p.is_dir() and p.name.endswith("_app")}
    present.discard("__init__.py")
    assert sorted(present - named) == [], "in the tree but not in the README's layout"
    assert sorted(named - present) == [], "in the README's layout but not in the tree"


def test_scripts_holds_only_its_folders_each_in_the_readme():
    loose = sorted(p.name for p in (ROOT / "scripts").iterdir() if p.is_file() and p.name != "__init__.py")
    assert loose == [], "a module belongs in the folder of its concern"
    listed = set(re.findall(r"^scripts/(\w+)/", layout_block(), re.M))
    assert listed == set(SCRIPT_FOLDERS)


def test_the_method_reads_in_under_1300_lines():
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "scripts" / "core").glob("*.py"))
    assert lines < 1300, f"scripts/core/ holds {lines} lines"


def test_the_layout_check_notices_a_missing_file():
    block = layout_block().replace("results.py", "")
    assert "results.py" not in named_in(block, "scripts/io")


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_holds_only_what_differs_from_common(preset):
    common = json.loads((ROOT / "configs" / "common.json").read_text())
    overrides = json.loads((ROOT / "configs" / preset).read_text())
    assert sorted(key for key in overrides if key not in common) == [], "a preset overrides; new keys go in common"
    assert sorted(key for key, value in overrides.items() if common.get(key) == value) == [], "repeats common.json"


STAGE_CONFIGS = {  # an experiment's settings dict -> the configs of the stage it overrides
    "network": ["common.json"], "autoencoder": ["common.json", "train_autoencoder.json"],
    "pretrain": ["common.json", "train_diffusion.json"], "diffusion": ["common.json", "train_diffusion.json"],
    "finetune": ["common.json", "train_diffusion.json", "finetune.json"], "evaluators": ["train_evaluators.json"],
    "evaluation": ["common.json", "counterfactual.json", "evaluate.json"],
}  # fmt: skip


def _keys(*names: str) -> set[str]:
    return {key for name in names for key in json.loads((ROOT / "configs" / name).read_text())}


@pytest.mark.parametrize(
    "overlay, bases",
    [("ablation_gpu.json", ["ablation.json"]), ("ablation_brain.json", ["ablation.json"]),
     ("conditioning_gpu.json", ["conditioning.json"]), ("paired_rollout.json", ["common.json", "counterfactual.json"]),
     ("gpu.json", ["common.json", "train_diffusion.json", "train_autoencoder.json"])],
)  # fmt: skip
def test_an_overlay_only_overrides_keys_its_configs_read(overlay, bases):
    """A misspelt key in an overlay would be added silently and change nothing: every key must exist where it goes."""
    overrides = json.loads((ROOT / "configs" / overlay).read_text())
    assert sorted(set(overrides) - _keys(*bases)) == []
    for key, value in overrides.items():  # an experiment's settings dict: keys of the configs its stage runs
        if key in STAGE_CONFIGS:
            assert sorted(set(value) - _keys(*STAGE_CONFIGS[key])) == [], f"{overlay}: {key}"
