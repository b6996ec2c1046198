"""MONAI Label: the real monailabel package serves the bundle's counterfactual (scripts/apps/monailabel_app).

Needs the monailabel venv that `.ci/monailabel` builds; without monailabel the module is skipped.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("monailabel")

import httpx  # noqa: E402  (a monailabel dependency)
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monailabel.interfaces.utils.app import app_instance, clear_cache  # noqa: E402
from PIL import Image  # noqa: E402
from requests_toolbelt.multipart.decoder import MultipartDecoder  # noqa: E402

pytestmark = pytest.mark.monailabel
BUNDLE_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = BUNDLE_ROOT / "scripts" / "apps" / "monailabel_app"
SAMPLE = BUNDLE_ROOT / "docs" / "samples" / "brain" / "images" / "sample_visit-0.nii.gz"
SAMPLE_LABELS = BUNDLE_ROOT / "docs" / "samples" / "brain" / "labels" / "sample_visit-0.nii.gz"
SOURCE = {"age": 65, "sex": "F", "diagnosis": "CN"}  # the sample's covariates (docs/samples/brain/exogenous)
REQUEST = {  # options as a MONAI Label client sends them: flat, values as text
    "model": "counterfactual_brain",
    "image": "sample_visit-0",  # the datastore id of the studies' copy of SAMPLE
    "target_age": "85",
    "target_diagnosis": "AD",
    "strength": "0.6",
    "inference_delta": "0.05",
    "num_inference_steps": "5",
    "seed": "3",
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Overrides conftest's one-thread rule: the shipped full-size network runs faster on every core."""
    yield


def make_studies(folder: Path) -> Path:
    """A MONAI Label studies folder: the brain sample and a datalist that gives its source covariates."""
    folder.mkdir(parents=True)
    shutil.copy(SAMPLE, folder / SAMPLE.name)
    datalist = {"studies": [{"image": SAMPLE.name, **SOURCE}]}
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app as `monailabel start_server` loads it (main.py), its bundle_root left to default: this bundle."""
    root = tmp_path_factory.mktemp("monailabel")
    conf = {"models": "counterfactual_brain", "results_dir": str(root / "results")}
    instance = app_instance(str(APP_DIR), str(make_studies(root / "studies")), conf)
    yield instance
    clear_cache()


@pytest.fixture(scope="module")
def brain_result(app):
    """One counterfactual through app.infer: source covariates from the studies' datalist, options from REQUEST."""
    result = app.infer(dict(REQUEST))
    yield result
    Path(result["file"]).unlink(missing_ok=True)


def test_options_are_target_covariates_and_bundle_parameters(app):
    config = app.info()["models"]["counterfactual_brain"]["config"]
    assert config["target_age"] == 85 and config["target_diagnosis"][0] == "AD"  # the bundle config's target
    assert config["target_sex"] == ["source", "F", "M"]  # a choice; "source" keeps the scan's own value
    assert config["strength"] == 1.0 and config["inference_delta"] is None and config["guidance_scale"] == 3.0
    assert {"num_inference_steps", "seed", "num_samples"} <= set(config)


def test_counterfactual_is_a_nifti_on_the_input_grid(brain_result):
    source = nib.load(SAMPLE)
    result = nib.load(brain_result["file"])
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    before, after = source.get_fdata(), result.get_fdata()
    head = nib.load(SAMPLE_LABELS).get_fdata() > 0
    # the scan plus the model's change inside the edit mask, the scan itself elsewhere (the barely-responding demo
    # weights may leave the mask empty at 5 steps)
    mask = nib.load(brain_result["params"]["outputs"]["mask"]).get_fdata()
    assert mask.shape == before.shape and head.any()
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.9  # still this subject's scan


def test_result_json_echoes_the_request(brain_result):
    record = brain_result["params"]
    assert record["source"] == SOURCE  # from the studies' datalist
    assert record["target"] == {"age": 85, "sex": "F", "diagnosis": "AD"}
    parameters = record["parameters"]
    assert (parameters["strength"], parameters["num_inference_steps"]) == (0.6, 5)
    assert record["drift"] == {"delta": 0.05, "schedule": "paper", "delta_from": "inference_delta"}
    assert (parameters["seed"], parameters["guidance_scale"]) == (3, 3.0)
    for kind in ("counterfactual", "difference", "montage"):  # the bundle's own outputs, kept in results_dir
        assert Path(record["outputs"][kind]).is_file()


def test_counterfactual_equals_the_bundle_cli_with_the_same_options(brain_result, bundle_cli, tmp_path):
    bundle_cli(
        "run",
        ["inference.json", "brain_mri_3d.json"],
        "--image", brain_result["params"]["input"],
        "--source", repr(SOURCE), "--target", "{'age': 85, 'diagnosis': 'AD'}",
        "--strength", "0.6", "--inference_delta", "0.05", "--num_inference_steps", "5", "--seed", "3",
        "--results_dir", str(tmp_path), "--progress", "false",
    )  # fmt: skip
    expected = nib.load(tmp_path / "sample_visit-0_counterfactual.nii.gz").get_fdata()
    np.testing.assert_allclose(nib.load(brain_result["file"]).get_fdata(), expected, rtol=0, atol=1e-4)


def test_chest_counterfactual_is_a_png_of_the_input_size_and_bit_depth(tmp_path):
    sample = BUNDLE_ROOT / "docs" / "samples" / "chest" / "images" / "sample_visit-0.png"
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(sample, studies / sample.name)
    conf = {"models": "counterfactual_chest", "results_dir": str(tmp_path / "results")}
    chest = app_instance(str(APP_DIR), str(studies), conf)
    try:
        source = "{'age': 55, 'sex': 'F', 'cardiomegaly': 0, 'effusion': 0}"  # as text, the way clients send it
        result = chest.infer({"model": "counterfactual_chest", "image": "sample_visit-0", "source": source,
                              "num_inference_steps": "4"})  # fmt: skip
    finally:
        clear_cache()
    film, counterfactual = Image.open(sample), Image.open(result["file"])
    assert (counterfactual.size, counterfactual.mode) == (film.size, film.mode)
    assert result["params"]["target"] == {"age": 55, "sex": "F", "cardiomegaly": 1, "effusion": 1}  # preset target
    assert np.abs(np.asarray(counterfactual, float) - np.asarray(film, float)).mean() > 0
    Path(result["file"]).unlink()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_diagnosis": "XYZ"}, "covariate 'diagnosis' = 'XYZ' is unknown; expected one of ['CN', 'MCI', 'AD']"),
        ({"target_age": "150"}, "covariate 'age' = 150 is outside its range [40, 100]"),
        ({"target_weight": "80"}, "unknown option(s) ['target_weight']"),
        ({"strength": "1.5"}, "strength must be in (0, 1], got 1.5"),
        ({"num_inference_steps": "ten"}, "option 'num_inference_steps' must be a whole number"),
        ({"image": "unlisted.nii.gz"}, "source: the covariates of"),  # not in the datalist, no 'source' given
    ],
)
def test_bad_request_is_refused_before_any_compute(app, change, message, tmp_path, monkeypatch):
    if change.get("image"):
        change = {"image": str(shutil.copy(SAMPLE, tmp_path / change["image"]))}
    task = app._infers["counterfactual_brain"]
    monkeypatch.setattr(task, "run_inferer", lambda *args, **kwargs: pytest.fail("the model ran"))
    results = Path(app.conf["results_dir"])
    before = sorted(results.rglob("*")) if results.exists() else []
    with pytest.raises(ValueError) as raised:
        app.infer({**REQUEST, **change})
    assert message in str(raised.value)
    assert raised.value.status_code == 422  # what the server answers, with the message as detail
    assert (sorted(results.rglob("*")) if results.exists() else []) == before  # nothing written


@pytest.mark.parametrize("field", ["target_diagnosis", "source", "device"])
def test_request_text_is_never_evaluated_as_a_config_expression(app, field, tmp_path):
    sentinel = tmp_path / "evaluated"
    expression = f"$__import__('pathlib').Path({str(sentinel)!r}).touch()"  # MONAI config syntax for Python code
    value = {**SOURCE, "diagnosis": expression} if field == "source" else expression
    with pytest.raises(ValueError):
        app.infer({**REQUEST, field: value})
    config = app._infers["counterfactual_brain"].bundle_config
    for key in ("device", "source", "target"):  # a fresh parse would run anything the request planted there
        config.get_parsed_content(key, lazy=False)
    assert not sentinel.exists()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """`monailabel start_server` on a local port (the app copied, since the server adds folders to the app dir)."""
    app_dir = shutil.copytree(APP_DIR, tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    port, log = free_port(), (tmp_path / "server.log").open("w")
    command = [
        sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir),
        "--studies", str(make_studies(tmp_path / "studies")), "--host", "127.0.0.1", "--port", str(port),
        "--conf", "bundle_root", str(BUNDLE_ROOT), "--conf", "models", "counterfactual_brain",
        "--conf", "results_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the server exited ({process.returncode}):\n{(tmp_path / 'server.log').read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer from the server in 120 s:\n{(tmp_path / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_server_answers_post_infer_with_the_counterfactual_and_its_record(server, tmp_path):
    params = {"source": SOURCE, "target_age": 80, "target_diagnosis": "MCI", "num_inference_steps": 5}
    response = httpx.post(
        f"{server}/infer/counterfactual_brain",
        params={"image": "sample_visit-0", "output": "all"},
        files={"params": (None, json.dumps(params))},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    parts = {}
    for part in MultipartDecoder(response.content, response.headers["content-type"]).parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        parts[disposition.split('name="')[1].split('"')[0]] = part.content
    record = json.loads(parts["params"])
    assert record["source"] == SOURCE and record["target"] == {"age": 80, "sex": "F", "diagnosis": "MCI"}
    assert record["parameters"]["num_inference_steps"] == 5
    (tmp_path / "result.nii.gz").write_bytes(parts["image"])
    result, source = nib.load(tmp_path / "result.nii.gz"), nib.load(SAMPLE)
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)

    refused = httpx.post(
        f"{server}/infer/counterfactual_brain",
        params={"image": "sample_visit-0", "output": "json"},
        files={"params": (None, json.dumps({**params, "target_diagnosis": "XYZ"}))},
        timeout=60,
    )
    assert refused.status_code == 422
    assert "covariate 'diagnosis' = 'XYZ' is unknown" in refused.json()["detail"]


def test_torch_is_the_cpu_build_the_bundle_pins():
    assert torch.__version__.startswith("2.13.0")  # monailabel's dependencies did not replace the pinned torch
