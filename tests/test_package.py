"""Model Zoo path: a reproducible zip, downloaded by `python -m monai.bundle download` and run from where it lands."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from scripts.tools.package import build_zip

pytestmark = pytest.mark.slow
BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return Path(build_zip(BUNDLE_ROOT, tmp_path_factory.mktemp("dist")))


def test_the_zip_is_reproducible_and_holds_the_bundle_but_not_the_tests(archive, tmp_path):
    metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert archive.name == f"{metadata['name']}_v{metadata['version']}.zip"
    assert sha256(build_zip(BUNDLE_ROOT, tmp_path)) == sha256(archive)
    names = zipfile.ZipFile(archive).namelist()
    prefix = metadata["name"] + "/"
    assert all(name.startswith(prefix) for name in names)
    for required in ("configs/metadata.json", "configs/inference.json", "LICENSE", "large_files.yml",
                     "docs/README.md", "docs/data_license.txt", "models/chest/model.pt"):  # fmt: skip
        assert prefix + required in names, required
    assert not [name for name in names if "/tests/" in name or "__pycache__" in name]


def test_monai_bundle_download_from_a_file_url_then_inference_runs_there(archive, tmp_path):
    metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    name, version = metadata["name"], metadata["version"]
    bundles = tmp_path / "bundles"
    download = [
        sys.executable, "-m", "monai.bundle", "download", "--name", name, "--version", version,
        "--url", archive.resolve().as_uri(), "--bundle_dir", str(bundles),
    ]  # fmt: skip
    subprocess.run(download, check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    bundle = bundles / name
    assert (bundle / "configs" / "metadata.json").is_file()

    # run from the extracted bundle only (its own scripts package, not this checkout's)
    env = {**os.environ, "PYTHONPATH": str(bundle), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    configs = "['configs/inference.json','configs/chest_xray_2d.json']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--num_inference_steps", "10"]
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((bundle / "eval" / "counterfactual" / "sample_visit-0_record.json").read_text())
    assert Path(record["outputs"]["counterfactual"]).is_file()
    assert Path(record["outputs"]["montage"]).is_file()


def test_ckpt_export_traces_the_network_component_to_torchscript(tmp_path, bundle_cli):
    import torch
    from monai.bundle import ConfigParser

    from scripts.io.weights import read_weights

    configs = ["inference.json", "chest_xray_2d.json"]
    exported = tmp_path / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
        "--ckpt_file", "models/chest/model.pt", "--meta_file", "configs/metadata.json",
        "--config_file", "[" + ",".join(f"'configs/{name}'" for name in configs) + "]",
        "--use_trace", "true", "--input_shape", "[1,1,128,128]", "--key_in_ckpt", "state_dict",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT)}
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    traced = torch.jit.load(str(exported))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in configs])
    network = parser.get_parsed_content("network_def")
    state, metadata = read_weights(BUNDLE_ROOT / "models" / "chest" / "model.pt")
    assert metadata["drift"] == {"delta": 0.0, "schedule": "paper"}
    network.load_state_dict(state)  # the weights file's own tensors: the export must hold these, not fresh ones
    image = torch.rand(1, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(image), network.eval()(image), atol=1e-4, rtol=1e-4)
