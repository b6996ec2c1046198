"""Specification of the paired (longitudinal) counterfactual mode: batch, sampling, datalist, training CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from scripts.core import inferers, paired
from scripts.core.covariates import CovariateEncoder, CovariateError
from scripts.core.drift import LatentDrift
from scripts.core.networks import ConditionedUNet, LatentDriftModel
from scripts.core.paired import sample_paired
from scripts.core.transforms import DriftNoised, EncodeLatentd
from scripts.io.datalist import paired_datalist
from scripts.io.transforms import PerImaged
from scripts.io.weights import read_weights
from scripts.training.engines import LatentDiffusionPrepareBatch
from scripts.training.residual import LatentDifferenced, measure_residual_scale

SCHEMA = {
    "age": {"type": "continuous", "range": [40, 100]},
    "sex": {"type": "binary", "categories": ["F", "M"]},
    "diagnosis": {"type": "categorical", "categories": ["CN", "MCI", "AD"]},
}
LATENT_CHANNELS, CONTEXT_DIM, IMAGE_SIZE = 3, 16, (16, 16, 16)
SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195}


@pytest.fixture(scope="module")
def encoder() -> CovariateEncoder:
    return CovariateEncoder(SCHEMA)


@pytest.fixture(scope="module")
def model(encoder) -> LatentDriftModel:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        3,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        latent_channels=LATENT_CHANNELS,
        num_res_blocks=1,
        norm_num_groups=8,
        attention_levels=(False, False),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    unet = DiffusionModelUNet(
        3,
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=(0, 16),
        norm_num_groups=8,
        with_conditioning=True,
        cross_attention_dim=CONTEXT_DIM,
    )
    with torch.no_grad():  # MONAI zero-initialises output layers; an untrained UNet would ignore all its inputs
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.05)
    denoiser = ConditionedUNet(unet, condition_size=2 * encoder.size, context_dim=CONTEXT_DIM)
    network = LatentDriftModel(autoencoder, denoiser).eval()
    network.scale_factor.fill_(0.7)
    return network


def conditions(encoder: CovariateEncoder, records: list[dict]) -> torch.Tensor:
    return torch.stack([encoder.encode(record) for record in records]).unsqueeze(1)


@pytest.fixture(scope="module")
def batch(encoder) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sources = [{"age": 60, "sex": "F", "diagnosis": "CN"}, {"age": 70, "sex": "M", "diagnosis": "MCI"}]
    targets = [{"age": 63, "sex": "F", "diagnosis": "CN"}, {"age": 74, "sex": "M", "diagnosis": "AD"}]
    return {
        "image_source": torch.rand((2, 1, *IMAGE_SIZE), generator=generator),
        "image_target": torch.rand((2, 1, *IMAGE_SIZE), generator=generator),
        "condition_source": conditions(encoder, sources),
        "condition_target": conditions(encoder, targets),
    }


def prepare(model: LatentDriftModel, batch: dict, delta: float = 0.0, seed: int = 3):
    """The paired stage-2 path of configs/paired.json: per-sample encoding and drifted noising, collate, prepare."""
    encode = EncodeLatentd(["image_source", "image_target"], model.autoencoder, ["latent_source", "latent_target"])
    noising = DriftNoised(
        "latent_target", DDPMScheduler(**SCHEDULE), LatentDrift(delta), scale=model.scale_factor,
        also_scale="latent_source",
    )  # fmt: skip
    noising.set_random_state(seed=seed)
    samples = [{key: value[i] for key, value in batch.items()} for i in range(len(batch["image_source"]))]
    collated = list_data_collate([noising(encode(sample)) for sample in samples])
    prepare_batch = LatentDiffusionPrepareBatch(
        condition_keys=["condition_source", "condition_target"], source_key="latent_source"
    )
    return prepare_batch(collated)


@pytest.fixture(scope="module")
def source_latent(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(batch["image_source"])


def inference_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, clip_sample=False)


def test_prepare_batch_stacks_the_noisy_target_and_the_source_latent(model, batch, encoder):
    inputs, target, (timesteps, condition), kwargs = prepare(model, batch)
    latent = (2, LATENT_CHANNELS, *(s // 2 for s in IMAGE_SIZE))
    assert inputs.shape == (2, 2 * LATENT_CHANNELS, *latent[2:])
    assert target.shape == latent and timesteps.shape == (2,) and kwargs == {}
    assert condition.shape == (2, 1, 2 * encoder.size)


def test_prepare_batch_source_channels_are_the_encoded_source_latent(model, batch, source_latent):
    inputs, *_ = prepare(model, batch)
    torch.testing.assert_close(inputs[:, LATENT_CHANNELS:], source_latent, rtol=1e-5, atol=1e-5)  # per-sample encoding


def test_prepare_batch_condition_is_source_then_target(model, batch):
    _, _, (_, condition), _ = prepare(model, batch)
    assert torch.equal(condition, torch.cat([batch["condition_source"], batch["condition_target"]], -1))


def test_prepare_batch_with_zero_drift_noises_the_target_like_scheduler_add_noise(model, batch):
    inputs, target, (timesteps, _), _ = prepare(model, batch, delta=0.0)
    with torch.no_grad():
        z_target = torch.cat([model.encode(image[None]) for image in batch["image_target"]])  # per sample, as cached
    expected = DDPMScheduler(**SCHEDULE).add_noise(original_samples=z_target, noise=target, timesteps=timesteps)
    torch.testing.assert_close(inputs[:, :LATENT_CHANNELS], expected, rtol=0, atol=1e-6, msg="z_t must be plain MONAI")


def test_prepare_batch_drift_moves_only_the_noisy_half(model, batch):
    plain, drifted = prepare(model, batch, delta=0.0), prepare(model, batch, delta=0.1)
    assert torch.equal(plain[2][0], drifted[2][0]) and torch.equal(plain[1], drifted[1]), "same timesteps and ε"
    assert not torch.allclose(plain[0][:, :LATENT_CHANNELS], drifted[0][:, :LATENT_CHANNELS])
    assert torch.equal(plain[0][:, LATENT_CHANNELS:], drifted[0][:, LATENT_CHANNELS:])


def test_sample_paired_returns_a_target_latent_of_the_source_shape(model, batch, source_latent):
    latent = sample_paired(
        model,
        inference_scheduler(),
        source_latent,
        batch["condition_source"],
        batch["condition_target"],
        4,
        drift=model.drift,
    )
    assert latent.shape == source_latent.shape and torch.isfinite(latent).all()


def test_sample_paired_is_deterministic_given_the_noise(model, batch, source_latent):
    noise = torch.randn(source_latent.shape, generator=torch.Generator().manual_seed(5))
    arguments = (model, inference_scheduler(), source_latent, batch["condition_source"], batch["condition_target"], 4)
    first, second = (sample_paired(*arguments, noise=noise, drift=model.drift) for _ in range(2))
    assert torch.equal(first, second)


def test_sample_paired_depends_on_the_source_latent(model, batch, source_latent):
    noise = torch.randn(source_latent.shape, generator=torch.Generator().manual_seed(5))
    scheduler, cs, ct = inference_scheduler(), batch["condition_source"], batch["condition_target"]
    first = sample_paired(model, scheduler, source_latent, cs, ct, 4, noise=noise, drift=model.drift)
    second = sample_paired(model, scheduler, source_latent + 1.0, cs, ct, 4, noise=noise, drift=model.drift)
    assert not torch.allclose(first, second)


def test_guidance_scale_one_equals_the_plain_conditional_chain(model, batch, source_latent, encoder):
    noise = torch.randn(source_latent.shape, generator=torch.Generator().manual_seed(6))
    scheduler, drift = inference_scheduler(), LatentDrift(0.1)
    guided = sample_paired(
        model, scheduler, source_latent, batch["condition_source"], batch["condition_target"], 4,
        guidance_scale=1.0, null_condition=encoder.null(), drift=drift, noise=noise,
    )  # fmt: skip
    condition = torch.cat([batch["condition_source"], batch["condition_target"]], -1)
    latent, from_prior = noise + 0.1, LatentDrift(0.1, "marginal")  # a chain from the prior runs the marginal schedule
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model.denoiser(torch.cat([latent, source_latent], 1), t.reshape(1).expand(2), condition)
            latent = from_prior.step(scheduler, output, t, latent)
    torch.testing.assert_close(guided, latent, rtol=0, atol=0)


def test_guidance_scale_zero_samples_with_the_null_condition_for_both_halves(model, batch, source_latent, encoder):
    noise = torch.randn(source_latent.shape, generator=torch.Generator().manual_seed(7))
    scheduler, null = inference_scheduler(), encoder.null()
    unconditional = sample_paired(
        model, scheduler, source_latent, batch["condition_source"], batch["condition_target"], 4,
        guidance_scale=0.0, null_condition=null, noise=noise, drift=model.drift,
    )  # fmt: skip
    nulls = null.reshape(1, 1, -1).expand(2, 1, -1)
    expected = sample_paired(model, scheduler, source_latent, nulls, nulls, 4, noise=noise, drift=model.drift)
    torch.testing.assert_close(unconditional, expected, rtol=1e-3, atol=1e-3)  # batch-of-2 vs batch-of-1 rounding


def test_guidance_without_a_null_condition_is_an_error(model, batch, source_latent):
    with pytest.raises(ValueError, match="null condition"):
        sample_paired(
            model, inference_scheduler(), source_latent, batch["condition_source"], batch["condition_target"], 2,
            guidance_scale=3.0, drift=model.drift,
        )  # fmt: skip


def residual_copy(model: LatentDriftModel, residual_scale: float) -> LatentDriftModel:
    """`model` as a residual paired model (configs/paired_residual.json) with the given residual scale."""
    residual = LatentDriftModel(model.autoencoder, model.denoiser, residual=True).eval()
    residual.load_state_dict({**model.state_dict(), "residual_scale": torch.tensor(residual_scale)})
    return residual


def test_latent_difference_is_the_first_latent_minus_the_second():
    sample = {"latent_target": torch.full((3, 4, 4, 4), 5.0), "latent_source": torch.full((3, 4, 4, 4), 2.0)}
    out = LatentDifferenced(["latent_target", "latent_source"])(sample)
    assert torch.equal(out["latent_residual"], torch.full((3, 4, 4, 4), 3.0))
    with pytest.raises(KeyError, match="EncodeLatentd"):
        LatentDifferenced(["latent_target", "latent_source"])({"latent_target": sample["latent_target"]})


def test_drift_noised_scales_the_clean_latent_by_its_own_scale():
    sample = {"latent_residual": torch.ones(3, 4, 4, 4), "latent_source": torch.ones(3, 4, 4, 4)}
    noising = DriftNoised(
        "latent_residual", DDPMScheduler(**SCHEDULE), LatentDrift(0.0), scale=10.0, also_scale="latent_source",
        clean_scale=0.5,
    )  # fmt: skip
    out = noising(sample)
    assert torch.equal(out["latent_source"], torch.full((3, 4, 4, 4), 0.5))
    t = int(out["timesteps"])
    alpha = DDPMScheduler(**SCHEDULE).alphas_cumprod[t]
    torch.testing.assert_close(out["noisy"], alpha.sqrt() * 10.0 + (1 - alpha).sqrt() * out["target"])


def test_measure_residual_scale_fills_only_a_residual_model(model):
    batches = [{"latent_residual": torch.randn(2, 3, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1}]
    assert measure_residual_scale(model, batches) is None and not hasattr(model, "residual_scale")
    residual = residual_copy(model, 1.0)
    scale = measure_residual_scale(residual, batches)
    assert scale == pytest.approx(10.0, rel=0.1) and float(residual.residual_scale) == pytest.approx(scale)


@pytest.mark.parametrize("sampled", [0.0, 2.0])
def test_residual_inferer_adds_the_sampled_change_to_the_source_latent(model, batch, encoder, monkeypatch, sampled):
    """z_cf = z_source + sample * scale_factor / residual_scale; a zero change returns D(E(x)) exactly."""
    residual = residual_copy(model, 7.0)
    decoded = {}

    def fake_sample(denoiser, scheduler, source_latent, *args, **kwargs):
        return torch.full_like(source_latent, sampled)

    def spy_decode(latent):
        decoded["latent"] = latent.clone()
        return LatentDriftModel.decode(residual, latent)

    monkeypatch.setattr(paired, "sample_paired", fake_sample)
    monkeypatch.setattr(residual, "decode", spy_decode)
    inferer = inferers.CounterfactualInferer(
        inference_scheduler(), num_inference_steps=2, paired=True, composition="none", auto_mask=False
    )
    result = inferer.counterfactual(
        batch["image_source"], residual, batch["condition_source"], batch["condition_target"]
    )
    with torch.no_grad():
        z0 = residual.encode(batch["image_source"])
    torch.testing.assert_close(decoded["latent"], z0 + sampled * 0.7 / 7.0)
    if sampled == 0.0:
        torch.testing.assert_close(result["counterfactual"], result["reconstruction"])


# --- rollout: a long interval walked in steps ----------------------------------------------------------------------


def test_covariate_path_steps_age_evenly_and_switches_categories_at_the_first_step(encoder):
    source = encoder.encode({"age": 60, "sex": "F", "diagnosis": "CN"})
    target = encoder.encode({"age": 80, "sex": "F", "diagnosis": "AD"})
    path = encoder.path(source, target, 4)
    assert len(path) == 5 and torch.equal(path[0], source) and torch.equal(path[-1], target)
    expected = [encoder.encode({"age": 60 + 5 * k, "sex": "F", "diagnosis": "AD" if k else "CN"}) for k in range(5)]
    for got, want in zip(path, expected):
        torch.testing.assert_close(got, want)
    assert torch.equal(encoder.path(source, target, 1)[1], target)


def test_rollout_samples_each_step_from_the_last_one_along_the_covariate_path(model, batch, encoder, monkeypatch):
    """K calls; step k reads [path_k, path_k+1] (the reference half [source, source]) and the latent after k steps;
    later steps draw fresh noise shared by both halves; the result is z0 + K * sample / gain."""
    residual, calls, decoded = residual_copy(model, 7.0), [], {}

    def fake_sample(denoiser, scheduler, source_latent, condition_source, condition_target, *args, noise, **kwargs):
        calls.append((source_latent.clone(), condition_source, condition_target, noise))
        return torch.full_like(source_latent, 2.0)

    monkeypatch.setattr(paired, "sample_paired", fake_sample)

    def spy_decode(latent):
        decoded["latent"] = latent.clone()
        return LatentDriftModel.decode(residual, latent)

    monkeypatch.setattr(residual, "decode", spy_decode)
    inferer = inferers.CounterfactualInferer(
        inference_scheduler(), num_inference_steps=2, paired=True, composition="reference", auto_mask=False,
        rollout_steps=3, covariate_path=encoder.path,
    )  # fmt: skip
    source, target = batch["condition_source"], batch["condition_target"]
    inferer.counterfactual(batch["image_source"], residual, source, target)
    with torch.no_grad():
        z0 = residual.encode(batch["image_source"])
    path = encoder.path(source, target, 3)
    assert len(calls) == 3
    for k, (latent, halves_source, halves_target, noise) in enumerate(calls):
        torch.testing.assert_close(latent, torch.cat([z0, z0]) + k * 2.0 * 0.7 / 7.0)
        torch.testing.assert_close(halves_source, torch.cat([path[k], source]))
        torch.testing.assert_close(halves_target, torch.cat([path[k + 1], source]))
        assert torch.equal(noise[:2], noise[2:])
    assert not torch.equal(calls[1][3], calls[0][3]) and not torch.equal(calls[2][3], calls[1][3])
    torch.testing.assert_close(decoded["latent"], torch.cat([z0, z0]) + 3 * 2.0 * 0.7 / 7.0)


def test_rollout_with_the_target_equal_to_the_source_returns_the_input(model, batch, encoder):
    inferer = inferers.CounterfactualInferer(
        inference_scheduler(), num_inference_steps=2, paired=True, composition="reference", auto_mask=False,
        rollout_steps=2, covariate_path=encoder.path,
    )  # fmt: skip
    image, source = batch["image_source"], batch["condition_source"]
    result = inferer(image, model, source, source)
    torch.testing.assert_close(inferers.compose(image, result["counterfactual"], result["change"], None, "reference"),
                               image)  # fmt: skip


def test_rollout_needs_a_paired_model_and_a_covariate_path(encoder):
    for kwargs in ({"paired": False, "covariate_path": encoder.path}, {"paired": True}):
        with pytest.raises(ValueError, match="rollout_steps > 1 needs a paired model"):
            inferers.CounterfactualInferer(inference_scheduler(), rollout_steps=2, **kwargs)
    with pytest.raises(ValueError, match="rollout_steps must be at least 1"):
        inferers.CounterfactualInferer(inference_scheduler(), rollout_steps=0)


def interval_copy(model: LatentDriftModel, gain: float) -> ConditionedUNet:
    """`model`'s denoiser (same parameters) with the interval condition of configs/paired_interval.json."""
    plain = model.denoiser
    return ConditionedUNet(plain.unet, plain.condition_size, CONTEXT_DIM, plain.conditioning, interval_gain=gain)


def test_interval_denoiser_sees_the_scaled_interval_and_the_target(model, batch, source_latent):
    """[c_source, c_target] reaches the UNet as [g (c_target - c_source), c_target]; the gain is saved."""
    denoiser = interval_copy(model, 10.0).eval()
    denoiser.embedding = model.denoiser.embedding
    assert float(denoiser.state_dict()["interval_gain"]) == 10.0
    source, target = batch["condition_source"], batch["condition_target"]
    x, t = torch.cat([source_latent, source_latent], 1), torch.tensor([500, 500])
    with torch.no_grad():
        got = denoiser(x, t, torch.cat([source, target], -1))
        expected = model.denoiser(x, t, torch.cat([10.0 * (target - source), target], -1))
        swapped = denoiser(x, t, torch.cat([target, source], -1))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, swapped), "the interval's sign must reach the network"


def test_interval_denoiser_passes_the_null_condition_unchanged(model, encoder, source_latent):
    """The guidance null [null, null] stays null (not a zero interval), so guidance still contrasts with it."""
    denoiser = interval_copy(model, 10.0).eval()
    denoiser.embedding = model.denoiser.embedding
    null = encoder.null().reshape(1, 1, -1).expand(2, 1, -1)
    null_pair = torch.cat([null, null], -1)
    x, t = torch.cat([source_latent, source_latent], 1), torch.tensor([500, 500])
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, t, null_pair), model.denoiser(x, t, null_pair))


def test_per_image_runs_a_single_image_chain_on_each_key():
    double = PerImaged(["image_source", "image_target"], lambda d: {"image": d["image"] * 2, "other": 0})
    out = double({"image_source": torch.ones(1), "image_target": torch.full((1,), 3.0), "age": 60})
    assert set(out) == {"image_source", "image_target", "age"} and out["age"] == 60
    assert out["image_source"].item() == 2.0 and out["image_target"].item() == 6.0


def write_datalist(folder: Path, records: list[dict]) -> Path:
    for record in records:
        (folder / record["image"]).touch()
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": records}))
    return path


def scan(subject: str, visit: int, age: float, sex: str = "F", diagnosis: str = "CN") -> dict:
    image = f"{subject}_{visit}.nii.gz"
    return {"image": image, "subject": subject, "visit": visit, "age": age, "sex": sex, "diagnosis": diagnosis}


def test_paired_datalist_pairs_scans_only_within_a_subject_in_time_order(tmp_path, encoder):
    records = [scan("a", 1, 61.0), scan("b", 0, 70.0), scan("a", 0, 60.0), scan("c", 0, 80.0), scan("b", 1, 72.0)]
    pairs = paired_datalist(write_datalist(tmp_path, records), "training", encoder)
    assert [(p["subject"], p["source_age"], p["target_age"]) for p in pairs] == [("a", 60.0, 61.0), ("b", 70.0, 72.0)]
    for pair in pairs:
        assert Path(pair["image_source"]).name.startswith(pair["subject"] + "_")
        assert Path(pair["image_target"]).name.startswith(pair["subject"] + "_")
        assert Path(pair["image_source"]).is_absolute()


def test_paired_datalist_without_longitudinal_subjects_is_a_clear_error(tmp_path, encoder):
    path = write_datalist(tmp_path, [scan("a", 0, 60.0), scan("b", 0, 70.0)])
    with pytest.raises(ValueError, match=r"no longitudinal pair \(2 scans of 2 subjects\).*two or more time points"):
        paired_datalist(path, "training", encoder)


def test_paired_datalist_bad_covariate_names_the_pair_and_its_files(tmp_path, encoder):
    records = [scan("a", 0, 60.0), scan("a", 1, 61.0), scan("b", 0, 70.0), scan("b", 1, 72.0, diagnosis="XX")]
    with pytest.raises(CovariateError, match=r"pair 1 \(.*b_0\.nii\.gz -> .*b_1\.nii\.gz\), target covariates.*'XX'"):
        paired_datalist(write_datalist(tmp_path, records), "training", encoder)


TINY = [
    "--autoencoder_channels", "[8,16]",
    "--unet_channels", "[8,16]",
    "--norm_num_groups", "8",
    "--cross_attention_dim", "16",
    "--image_size", "[32,32,32]",
    "--pixdim", "[6.0,6.0,6.0]",
    "--batch_size", "4",
    "--learning_rate", "0.002",
    "--val_interval", "2",
]  # fmt: skip


@pytest.mark.slow
def test_paired_training_cli_end_to_end(tmp_path, bundle_cli):
    from monai.bundle import ConfigParser

    from scripts.cohort.generate import generate_cohort

    cohort = {"modality": "brain", "num_subjects": 4, "visits_per_subject": 2, "shape": (32, 32, 32), "spacing": 6.0}
    generate_cohort(tmp_path / "cohort", seed=1, **cohort)
    common = [
        "--dataset_dir", str(tmp_path / "cohort"), "--output_dir", str(tmp_path / "runs"),
        "--ckpt_dir", str(tmp_path / "models"), *TINY,
    ]  # fmt: skip
    bundle_cli(
        "training", ["common.json", "brain_mri_3d.json", "train_autoencoder.json"], *common,
        "--max_epochs", "2", "--adversarial_weight", "0",
    )  # fmt: skip
    paired = ["common.json", "brain_mri_3d.json", "train_diffusion.json", "paired.json"]
    bundle_cli("training", paired, *common, "--max_epochs", "3", "--delta", "0.1")

    weights = tmp_path / "models" / "paired_model.pt"
    assert weights.is_file()
    parser = ConfigParser()
    parser.read_config([f"configs/{name}" for name in paired])
    for flag, value in zip(common[::2], common[1::2]):
        parser[flag.lstrip("-")] = json.loads(value) if value[:1] in "[0123456789-" else value
    network = parser.get_parsed_content("network")
    network.load_state_dict(read_weights(weights)[0], strict=True)
    assert float(network.scale_factor) != 1.0, "the paired stage must measure the latent scale factor"
    history = json.loads((tmp_path / "runs" / "paired" / "loss_history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]

    # configs/paired_warm_start.json starts a paired run from unpaired weights (their scale factor kept)
    bundle_cli("training", ["common.json", "brain_mri_3d.json", "train_diffusion.json"], *common, "--max_epochs", "1")
    unpaired = read_weights(tmp_path / "models" / "model.pt")[0]
    warm = tmp_path / "models" / "paired_warm.pt"
    bundle_cli(
        "training", [*paired, "paired_warm_start.json"], *common, "--max_epochs", "1",
        "--model_path", str(warm), "--run_dir", str(tmp_path / "runs" / "paired_warm"),
    )  # fmt: skip
    started = read_weights(warm)[0]
    assert float(started["scale_factor"]) == float(unpaired["scale_factor"])
    assert (
        started["denoiser.unet.conv_in.conv.weight"].shape[1]
        == 2 * unpaired["denoiser.unet.conv_in.conv.weight"].shape[1]
    )

    # configs/paired_residual.json: the same warm start learning the change g (z_target - z_source) instead
    residual = tmp_path / "models" / "paired_residual.pt"
    bundle_cli(
        "training", [*paired, "paired_residual.json", "paired_warm_start.json"], *common, "--max_epochs", "1",
        "--model_path", str(residual), "--run_dir", str(tmp_path / "runs" / "paired_residual"),
    )  # fmt: skip
    learned = read_weights(residual)[0]
    assert float(learned["scale_factor"]) == float(unpaired["scale_factor"])
    assert float(learned["residual_scale"]) > 2 * float(learned["scale_factor"]), "a change is smaller than a latent"

    # configs/paired_interval.json on top: the residual conditioned on [g (c_target - c_source), c_target], g saved
    interval = tmp_path / "models" / "paired_interval.pt"
    bundle_cli(
        "training", [*paired, "paired_residual.json", "paired_interval.json", "paired_warm_start.json"], *common,
        "--max_epochs", "1", "--model_path", str(interval), "--run_dir", str(tmp_path / "runs" / "paired_interval"),
    )  # fmt: skip
    assert float(read_weights(interval)[0]["denoiser.interval_gain"]) == 10.0

    # the inference config with the same overlay runs the paired model: no inversion, source latent as input
    image = sorted((tmp_path / "cohort" / "images").glob("*.nii.gz"))[0]
    results = tmp_path / "paired_out"
    inference = ["inference.json", "brain_mri_3d.json", "paired.json"]
    arguments = [
        *common, "--image", str(image), "--results_dir", str(results),
        "--source", "{'age': 60, 'sex': 'F', 'diagnosis': 'CN'}", "--target", "{'age': 80, 'diagnosis': 'AD'}",
        "--num_inference_steps", "5", "--num_samples", "2", "--progress", "false",
    ]  # fmt: skip
    bundle_cli("run", inference, *arguments)
    name = image.name[: -len(".nii.gz")]
    written = {path.name for path in results.iterdir()}
    assert {f"{name}_{kind}" for kind in ("counterfactual.nii.gz", "std.nii.gz", "montage.png")} <= written
    record = json.loads((results / f"{name}_record.json").read_text())
    assert record["parameters"]["paired"] is True
    assert record["parameters"]["model_path"].endswith("paired_model.pt")
    source = nib.load(image)
    counterfactual = nib.load(results / f"{name}_counterfactual.nii.gz")
    assert counterfactual.shape == source.shape
    np.testing.assert_allclose(counterfactual.affine, source.affine, atol=1e-4)
    std = np.asarray(nib.load(results / f"{name}_std.nii.gz").dataobj)
    assert std.max() > 0, "two paired draws from different noise must differ"

    # the residual weights need their overlay, and run with it
    failed = bundle_cli("run", inference, *arguments, "--model_path", str(residual), check=False)
    assert failed.returncode != 0 and "configs/paired_residual.json" in failed.stderr
    residual_results = tmp_path / "residual_out"
    bundle_cli(
        "run", [*inference, "paired_residual.json"], *arguments, "--model_path", str(residual),
        "--results_dir", str(residual_results),
    )  # fmt: skip
    assert nib.load(residual_results / f"{name}_counterfactual.nii.gz").shape == source.shape
    failed = bundle_cli(
        "run", [*inference, "paired_residual.json"], *arguments, "--model_path", str(interval), check=False
    )
    assert failed.returncode != 0 and "configs/paired_interval.json" in failed.stderr
    bundle_cli(
        "run", [*inference, "paired_residual.json", "paired_interval.json"], *arguments, "--model_path", str(interval),
        "--results_dir", str(tmp_path / "interval_out"),
    )  # fmt: skip
    assert nib.load(tmp_path / "interval_out" / f"{name}_counterfactual.nii.gz").shape == source.shape
