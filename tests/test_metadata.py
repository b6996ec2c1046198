"""Specification of the bundle metadata: valid against the shipped Model Zoo schema, offline, and self-consistent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METADATA = ROOT / "configs" / "metadata.json"
SCHEMA = ROOT / "docs" / "meta_schema.json"
# Widths of one covariate in the conditioning vector, by type.
WIDTH = {"continuous": lambda c: 1, "binary": lambda c: 1, "categorical": lambda c: len(c["categories"])}


def verify_metadata(meta_file: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", "verify_metadata"]
    command += ["--meta_file", str(meta_file), "--filepath", str(SCHEMA)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def load_metadata() -> dict:
    return json.loads(METADATA.read_text())


@pytest.mark.slow
def test_metadata_passes_verify_metadata_with_the_shipped_schema():
    result = verify_metadata(METADATA)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "metadata is verified with no error" in output
    assert "skipped downloading" in output  # the shipped schema is used; nothing is fetched


@pytest.mark.slow
@pytest.mark.parametrize("field", ["network_data_format", "numpy_version", "required_packages_version", "authors"])
def test_metadata_missing_a_required_field_fails_verification(tmp_path, field):
    metadata = load_metadata()
    del metadata[field]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata, indent=4))

    result = verify_metadata(broken)

    assert result.returncode != 0
    assert f"'{field}' is a required property" in result.stdout + result.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.json")), ids=lambda p: p.name)
def test_config_json_is_pretty_printed_with_four_spaces(path):
    text = path.read_text()
    assert json.dumps(json.loads(text), indent=4) == text.strip()


def test_network_data_format_uses_the_keys_verify_net_in_out_expects():
    data_format = load_metadata()["network_data_format"]
    assert list(data_format["inputs"]) == ["image"]
    assert list(data_format["outputs"]) == ["pred"]
    image, pred = data_format["inputs"]["image"], data_format["outputs"]["pred"]
    assert image["spatial_shape"] == pred["spatial_shape"]
    assert image["num_channels"] == pred["num_channels"] == 1


def test_intended_use_says_research_only_not_clinical():
    intended_use = load_metadata()["intended_use"].lower()
    assert "research" in intended_use
    assert "not a medical device" in intended_use
    assert "must not be used for clinical" in intended_use


@pytest.mark.parametrize("preset", ["brain_mri_3d", "chest_xray_2d"])
def test_covariate_encoding_length_matches_the_documented_vector(preset):
    encoding = load_metadata()["covariate_encoding"][preset]
    widths = sum(WIDTH[c["type"]](c) for c in encoding["covariates"].values())
    null_flag = 1
    assert widths + null_flag == encoding["length"] == len(encoding["vector"])
    assert encoding["vector"][-1] == "null_flag"
    assert encoding["null_condition"] == [0] * (encoding["length"] - 1) + [1]


def test_brain_conditioning_vector_is_age_sex_diagnosis_null():
    encoding = load_metadata()["covariate_encoding"]["brain_mri_3d"]
    assert encoding["vector"] == ["age_norm", "sex", "CN", "MCI", "AD", "null_flag"]
    assert encoding["covariates"]["diagnosis"]["categories"] == ["CN", "MCI", "AD"]
    assert encoding["covariates"]["age"]["range"] == [40, 100]


@pytest.mark.parametrize(
    "preset, key", [("brain_mri_3d.json", "brain_mri_3d"), ("chest_xray_2d.json", "chest_xray_2d")]
)
def test_metadata_covariate_encoding_matches_the_encoder_built_from_the_configs(preset, key):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "common.json"), str(ROOT / "configs" / preset)])
    encoder = parser.get_parsed_content("covariate_encoder")
    documented = json.loads((ROOT / "configs" / "metadata.json").read_text())["covariate_encoding"][key]
    assert documented["length"] == encoder.size
    assert list(documented["covariates"]) == list(encoder.schema)
    for name, spec in encoder.schema.items():
        assert documented["covariates"][name]["type"] == spec["type"]
        assert documented["covariates"][name].get("range") == spec.get("range")
        assert documented["covariates"][name].get("categories") == spec.get("categories")
    assert documented["null_condition"] == encoder.null().tolist()
