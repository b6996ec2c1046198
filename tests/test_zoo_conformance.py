"""The Model Zoo's own checks (ci/verify_bundle.py and its format and lint settings), run offline.

CI cannot fetch the zoo, so each check is its equivalent here: the zoo runs `configs/inference.json` alone (what a
user types after `monai.bundle download`), verifies the metadata against its schema, builds `network_def` from that
config and checks its input and output (`verify_net_in_out`), exports the checkpoint (`ckpt_export`), and lints with
black --skip-magic-trailing-comma, isort, flake8 (bugbear, comprehensions, executable, pep8-naming) and the
pre-commit hooks (end of file, trailing whitespace, JSON pretty-printed with 4 spaces and ASCII, docstring first,
shebangs on executables). TorchScript *scripting* is the one zoo check the bundle cannot pass (MONAI's generative
networks cannot be scripted); the traced export below is what it offers instead (docs/README.md).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts.io.weights import read_weights
from scripts.tools.package import check_standalone_configs, standalone_config, write_standalone_configs

ROOT = Path(__file__).resolve().parents[1]
METADATA = json.loads((ROOT / "configs" / "metadata.json").read_text())


def run(*command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------- standalone inference
def test_inference_json_is_the_merge_of_common_and_the_counterfactual_workflow():
    check_standalone_configs(ROOT)
    committed = json.loads((ROOT / "configs" / "inference.json").read_text())
    assert committed == standalone_config(ROOT)
    for key in ("network_def", "checked_image_size", "preprocessing", "inferer", "evaluator", "run"):
        assert key in committed, key


def test_a_stale_inference_json_is_refused_with_the_command_that_regenerates_it(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    common = json.loads((tmp_path / "configs" / "common.json").read_text())
    common["num_train_timesteps"] = 500
    (tmp_path / "configs" / "common.json").write_text(json.dumps(common, indent=4) + "\n")
    with pytest.raises(ValueError, match="regenerate it with python -m monai.bundle run standalone"):
        check_standalone_configs(tmp_path)
    write_standalone_configs(tmp_path)
    check_standalone_configs(tmp_path)
    assert json.loads((tmp_path / "configs" / "inference.json").read_text())["num_train_timesteps"] == 500


def test_presets_layer_on_the_standalone_config():
    from monai.bundle import ConfigParser

    for preset, dims in (("brain_mri_3d.json", 3), ("chest_xray_2d.json", 2)):
        layered = ConfigParser()
        layered.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / preset)])
        reference = ConfigParser()
        names = ("common.json", preset, "counterfactual.json")
        reference.read_config([str(ROOT / "configs" / name) for name in names])
        for key in ("spatial_dims", "image_size", "covariate_schema", "model_path", "preprocessing", "latent_shape"):
            assert layered.get(key) == reference.get(key), (preset, key)
        assert layered.get_parsed_content("spatial_dims") == dims


# ---------------------------------------------------------------------------------------------------- metadata
def test_metadata_lists_every_runtime_requirement_at_its_pinned_version():
    pinned = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name] = version
    assert pinned.pop("torch") == METADATA["pytorch_version"]
    assert pinned.pop("monai") == METADATA["monai_version"]
    assert pinned.pop("numpy") == METADATA["numpy_version"]
    assert METADATA["required_packages_version"] == pinned


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["brain_mri_3d", "chest_xray_2d"])
def test_network_def_passes_verify_net_in_out(preset):
    """The zoo's call for the default network; the chest preset layered on top with its own documented format."""
    command = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
    command += ["--meta_file", "configs/metadata.json"]
    if preset == "brain_mri_3d":
        command += ["--config_file", "configs/inference.json"]
    else:
        data_format = json.dumps(METADATA["preset_networks"][preset])
        command += ["--config_file", f"['configs/inference.json','configs/{preset}.json']"]
        command += ["--_meta_#network_data_format", data_format]
    result = run(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


@pytest.mark.slow
def test_verify_net_in_out_fails_for_the_chest_network_with_the_brain_format():
    command = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def"]
    command += ["--meta_file", "configs/metadata.json"]
    command += ["--config_file", "['configs/inference.json','configs/chest_xray_2d.json']"]
    assert run(*command).returncode != 0


@pytest.mark.slow
def test_ckpt_export_on_inference_json_alone_exports_the_shipped_brain_weights(tmp_path):
    from monai.bundle import ConfigParser

    exported = tmp_path / "model.ts"
    result = run(
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
        "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", "--key_in_ckpt", "state_dict",
        "--use_trace", "true", "--input_shape", "[1,1,64,80,64]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    traced = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(read_weights(ROOT / "models" / "model.pt")[0])
    image = torch.rand(1, 1, 64, 80, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(image), network.eval()(image), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ format and lint
def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed.stdout.split("\0") if name and (ROOT / name).is_file()]


BINARY_SUFFIXES = (".pt", ".ts", ".png", ".gz", ".zip", ".dcm")


def pre_commit_problems(path: Path) -> list[str]:
    """The zoo's pre-commit hooks on one file, as problems found (its hooks would fix or refuse them)."""
    if path.name.endswith(BINARY_SUFFIXES):
        return []
    text = path.read_bytes().decode("utf-8")
    problems = []
    if text and (not text.endswith("\n") or text.endswith("\n\n")):
        problems.append("end-of-file-fixer: the file must end in exactly one newline")
    if any(line != line.rstrip() for line in text.split("\n")):
        problems.append("trailing-whitespace")
    if "\r" in text:
        problems.append("mixed-line-ending")
    if path.suffix == ".json" and text != json.dumps(json.loads(text), indent=4) + "\n":
        problems.append("pretty-format-json --indent=4 --no-sort-keys (ASCII)")
    if path.suffix == ".py":
        body = ast.parse(text).body
        strings = [i for i, node in enumerate(body) if isinstance(getattr(node, "value", None), ast.Constant)
                   and isinstance(node, ast.Expr) and isinstance(node.value.value, str)]  # fmt: skip
        if strings and strings != [0]:
            problems.append("check-docstring-first: a module docstring after code")
    if os.access(path, os.X_OK) and not text.startswith("#!"):
        problems.append("check-executables-have-shebangs")
    return problems


def test_tracked_files_pass_the_zoo_pre_commit_hooks():
    problems = {str(path.relative_to(ROOT)): found for path in tracked_files() if (found := pre_commit_problems(path))}
    assert problems == {}


def test_the_pre_commit_check_finds_what_the_hooks_refuse(tmp_path):
    (tmp_path / "a.md").write_text("text\n\n")
    (tmp_path / "b.json").write_text('{"a": 1}\n')
    (tmp_path / "c.py").write_text("x = 1\n'''docstring'''\n")
    assert pre_commit_problems(tmp_path / "a.md") == ["end-of-file-fixer: the file must end in exactly one newline"]
    assert pre_commit_problems(tmp_path / "b.json") == ["pretty-format-json --indent=4 --no-sort-keys (ASCII)"]
    assert pre_commit_problems(tmp_path / "c.py") == ["check-docstring-first: a module docstring after code"]


@pytest.mark.parametrize(
    "tool",
    [
        ["black", "--skip-magic-trailing-comma", "--check", "scripts", "tests"],
        ["isort", "--check", "scripts", "tests"],
        ["flake8", "scripts", "tests"],
    ],
    ids=["black", "isort", "flake8"],
)
def test_code_passes_the_zoo_format_and_lint_settings(tool):
    result = run(sys.executable, "-m", *tool)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
