"""Specification of counterfactual inference: composition, determinism and geometry (bad inputs: test_bad_inputs)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler
from PIL import Image

from scripts.core.drift import LatentDrift
from scripts.core.inferers import CounterfactualInferer, compose, edit_mask, match_intensity_scale
from scripts.core.networks import ConditionedUNet, LatentDriftModel
from scripts.core.sampling import denoise_latents, invert_latents, set_inference_timesteps


def tiny_model(delta: float = 0.1, seed: int = 0) -> LatentDriftModel:
    torch.manual_seed(seed)
    autoencoder = AutoencoderKL(
        2, in_channels=1, out_channels=1, channels=(8, 16), latent_channels=3, num_res_blocks=1, norm_num_groups=8,
        attention_levels=(False, False), with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    )  # fmt: skip
    unet = DiffusionModelUNet(
        2, in_channels=3, out_channels=3, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
        num_head_channels=(0, 16), norm_num_groups=8, with_conditioning=True, cross_attention_dim=16,
    )  # fmt: skip
    with torch.no_grad():  # MONAI zero-initialises output layers; make the untrained denoiser non-trivial
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
    return LatentDriftModel(autoencoder, ConditionedUNet(unet, 6, 16), LatentDrift(delta)).eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195, clip_sample=False)


def condition(value: float) -> torch.Tensor:
    return torch.tensor([[[value, 1.0, 1.0, 0.0, 0.0, 0.0]]])


@pytest.mark.parametrize("delta", [0.0, 0.1])
def test_invert_then_generate_with_unchanged_covariates_reproduces_the_latent(delta):
    model, ddim = tiny_model(delta), scheduler()
    z0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = set_inference_timesteps(ddim, 20)[8:]
    inverted = invert_latents(model, ddim, z0, condition(0.3), timesteps, drift=model.drift, fixed_point_iterations=16)
    reconstructed = denoise_latents(model, ddim, inverted, condition(0.3), timesteps, drift=model.drift)
    torch.testing.assert_close(reconstructed, z0, rtol=1e-4, atol=1e-4)


def test_fixed_point_refinement_makes_the_composition_tighter():
    model, ddim = tiny_model(0.1), scheduler()
    z0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = set_inference_timesteps(ddim, 20)[8:]

    def error(iterations: int) -> float:
        inverted = invert_latents(
            model, ddim, z0, condition(0.3), timesteps, drift=model.drift, fixed_point_iterations=iterations
        )
        return (denoise_latents(model, ddim, inverted, condition(0.3), timesteps, drift=model.drift) - z0).abs().max()

    assert error(4) < error(0)


def test_same_seed_gives_the_same_counterfactual_and_samples_differ_between_draws():
    model, image = tiny_model(), torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    inferer = CounterfactualInferer(scheduler(), num_inference_steps=10, num_samples=3, seed=5)
    first = inferer(image, model, condition(0.2), condition(0.8))
    second = CounterfactualInferer(scheduler(), num_inference_steps=10, num_samples=3, seed=5)(
        image, model, condition(0.2), condition(0.8)
    )
    for key in ("counterfactual", "change", "edit_mask", "std"):
        assert torch.equal(first[key], second[key]), key
        assert first[key].shape == (1, 1, 32, 32), key
    assert first["std"].max() > 0, "n > 1 must give a non-zero std"


@pytest.mark.slow
def test_compiled_denoiser_gives_the_eager_counterfactual():
    model, image = tiny_model(), torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    arguments = (image, model, condition(0.2), condition(0.8))
    eager = CounterfactualInferer(scheduler(), num_inference_steps=4, seed=1)(*arguments)
    compiled = CounterfactualInferer(scheduler(), num_inference_steps=4, seed=1, compile=True)(*arguments)
    for key in ("counterfactual", "change"):
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-4, rtol=1e-4)


def test_guidance_without_a_null_condition_is_refused():
    with pytest.raises(ValueError, match="null condition"):
        CounterfactualInferer(scheduler(), guidance_scale=3.0)


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_strength_outside_its_range_is_refused(strength):
    with pytest.raises(ValueError, match="strength"):
        CounterfactualInferer(scheduler(), strength=strength)


def test_counterfactual_has_the_input_geometry_and_all_outputs(untrained_bundle, bundle_cli):
    out = untrained_bundle / "out"
    bundle_cli(
        "run", ["inference.json"], *tiny_overrides(untrained_bundle),
        "--image", str(untrained_bundle / "scan.nii.gz"), "--results_dir", str(out), "--num_samples", "2",
        "--source", "{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}", "--target", "{'age': 85, 'diagnosis': 'AD'}",
    )  # fmt: skip
    source = nib.load(untrained_bundle / "scan.nii.gz")
    for kind in ("counterfactual", "difference", "mask", "std"):
        result = nib.load(out / f"scan_{kind}.nii.gz")
        assert result.shape == source.shape, kind
        np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    record = json.loads((out / "scan_record.json").read_text())
    assert record["target"] == {"age": 85, "sex": "F", "diagnosis": "AD"}
    assert (out / "scan_montage.png").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files may be left behind"


def test_a_datalist_runs_in_batches_and_matches_one_by_one(untrained_bundle, bundle_cli, tmp_path):
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(1)
    records = []
    for index in range(3):
        path = tmp_path / f"scan{index}.nii.gz"
        nib.save(
            nib.Nifti1Image((rng.random((36, 36, 30)) * 100).astype(np.float32), np.diag([5.0, 5.0, 5.0, 1.0])), path
        )
        records.append({"image": path.name, "age": 60 + index, "sex": "F", "diagnosis": "CN", "target_age": 85})
    datalist = tmp_path / "inputs.json"
    datalist.write_text(json.dumps({"test": records}))
    outputs = {}
    for batch in ("1", "3"):
        out = tmp_path / f"batch{batch}"
        bundle_cli(
            "run", ["inference.json"], *tiny_overrides(untrained_bundle), "--input_datalist",
            str(datalist), "--inference_batch_size", batch, "--results_dir", str(out), "--progress", "false",
        )  # fmt: skip
        outputs[batch] = [np.asarray(nib.load(out / f"scan{i}_counterfactual.nii.gz").dataobj) for i in range(3)]
        for index in range(3):
            record = json.loads((out / f"scan{index}_record.json").read_text())
            assert record["source"]["age"] == 60 + index and record["target"]["age"] == 85
    for one, batched in zip(outputs["1"], outputs["3"]):
        np.testing.assert_allclose(batched, one, atol=1e-3)


# --- keeping the subject: composition and masks ----------------------------------------------------------------------


def test_target_equal_to_source_gives_the_input_back():
    model, image = tiny_model(), torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    inferer = CounterfactualInferer(scheduler(), num_inference_steps=6, composition="reference", auto_mask=False)
    result = inferer(image, model, condition(0.4), condition(0.4))
    torch.testing.assert_close(compose(image, result["counterfactual"], result["change"], None, "reference"), image)
    masked = CounterfactualInferer(scheduler(), num_inference_steps=6)(image, model, condition(0.4), condition(0.4))
    assert not masked["edit_mask"].any(), "no change: the automatic mask must be empty"
    assert torch.equal(
        compose(image, masked["counterfactual"], masked["change"], masked["edit_mask"], "reference"), image
    )


def test_voxels_outside_the_mask_are_bit_identical_to_the_input():
    image = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    change = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros_like(image)
    mask[..., :8] = torch.linspace(0.2, 1.0, 8)
    for composition in ("reference", "reconstruction", "none"):
        output = compose(image, image + change, change, mask, composition)
        assert torch.equal(output[..., 8:], image[..., 8:]), composition
        assert not torch.equal(output[..., :8], image[..., :8]), composition


def test_the_automatic_mask_covers_a_large_change_and_nothing_far_from_it():
    change = torch.zeros(1, 1, 32, 32)
    change[..., 10:16, 10:16] = 0.5
    chain_noise = torch.full_like(change, 0.01)
    mask = edit_mask(change, chain_noise, threshold=2.0, smoothing=1.0)
    assert mask[..., 12, 12] > 0.9 and mask[..., 30, 30] == 0 and mask[..., 2, 28] == 0
    assert ((mask > 0) & (mask < 1)).any(), "the edge is soft"
    assert not edit_mask(torch.zeros_like(change), chain_noise).any()


def test_signed_smoothing_drops_a_redrawn_edge_and_keeps_a_one_signed_change():
    generator = torch.Generator().manual_seed(8)
    coarse = torch.randn(1, 1, 6, 6, generator=generator)  # the chain's own change is smooth, not white
    chain_change = 0.02 * torch.nn.functional.interpolate(coarse, size=(48, 48), mode="bilinear")
    change = chain_change.clone()
    change[..., 8:40, 10] += 0.3  # an edge drawn one voxel further out: a +/- pair of thin lines
    change[..., 8:40, 11] -= 0.3
    change[..., 24:34, 28:38] += 0.2  # a one-signed change (fluid added)
    unsigned = edit_mask(change, chain_change, threshold=4.0, smoothing=1.0)
    signed = edit_mask(change, chain_change, threshold=4.0, smoothing=1.0, signed_smoothing=2.0)
    assert unsigned[..., 24, 10] > 0.9 and signed[..., 24, 10] == 0, "the +/- pair cancels only when signed"
    assert unsigned[..., 29, 33] > 0.9 and signed[..., 29, 33] > 0.9, "the one-signed change stays in both"
    assert signed.mean() < 0.1 < unsigned.mean(), "little beyond the added fluid when signed"
    with pytest.raises(ValueError, match="mask_signed_smoothing"):
        CounterfactualInferer(scheduler(), mask_signed_smoothing=-1.0)


def test_the_median_of_the_draws_keeps_the_change_most_draws_agree_on():
    image, reference = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    right, left = image.clone(), image.clone()
    right[..., 4:, :4], left[..., 4:, 4:] = 0.6, 0.6  # fluid drawn on one side or the other
    draws = [right, right, left]
    parts = {reduction: CounterfactualInferer(scheduler(), num_samples=3, sample_reduction=reduction, auto_mask=False)
             ._result(image, draws, [reference] * 3, reference, None) for reduction in ("mean", "median")}  # fmt: skip
    torch.testing.assert_close(parts["median"]["change"], right)
    torch.testing.assert_close(parts["mean"]["change"], (2 * right + left) / 3)
    assert torch.equal(parts["median"]["std"], parts["mean"]["std"]) and parts["median"]["std"].max() > 0
    with pytest.raises(ValueError, match="sample_reduction"):
        CounterfactualInferer(scheduler(), sample_reduction="mode")


def test_a_global_rescale_is_taken_out_and_a_local_change_kept():
    base = torch.zeros(2, 1, 32, 32)
    base[..., 4:28, 4:28] = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(7)) * 0.8 + 0.2
    edited = base.clone()
    edited[..., 10:14, 10:14] = 0.05  # a small local change (a dark, growing ventricle)
    matched = match_intensity_scale(edited * torch.tensor([1.04, 0.97]).reshape(2, 1, 1, 1), base)
    torch.testing.assert_close(matched, edited)
    assert torch.equal(match_intensity_scale(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))


def test_keeping_the_intensity_scale_still_gives_the_input_back_without_a_change():
    model, image = tiny_model(), torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    kept = CounterfactualInferer(scheduler(), num_inference_steps=6, composition="reference", auto_mask=False,
                                 keep_intensity_scale=True)  # fmt: skip
    plain = CounterfactualInferer(scheduler(), num_inference_steps=6, composition="reference", auto_mask=False)
    same = kept(image, model, condition(0.4), condition(0.4))
    torch.testing.assert_close(compose(image, same["counterfactual"], same["change"], None, "reference"), image)
    changed, unmatched = (i(image, model, condition(0.4), condition(0.9)) for i in (kept, plain))
    assert not torch.equal(changed["counterfactual"], unmatched["counterfactual"]), "the option must act"


def test_the_inferer_runs_at_the_weights_drift_unless_told_otherwise():
    model = tiny_model(delta=0.2)
    own = CounterfactualInferer(scheduler())
    assert own.resolve_drift(model) is model.drift
    marginal = CounterfactualInferer(scheduler(), drift_schedule="marginal").resolve_drift(model)
    assert marginal.schedule == "marginal" and marginal.delta.tolist() == pytest.approx(0.2)
    override = CounterfactualInferer(scheduler(), delta=0.05, drift_schedule="marginal")
    assert override.describe_drift(model) == {"delta": pytest.approx(0.05), "schedule": "marginal",
                                              "delta_from": "inference_delta"}  # fmt: skip


@pytest.mark.parametrize("arguments", [{"composition": "blend"}, {"mask_threshold": 0}, {"drift_schedule": "linear"}])
def test_unknown_composition_mask_or_schedule_settings_are_refused(arguments):
    with pytest.raises(ValueError):
        CounterfactualInferer(scheduler(), **arguments)


def test_samples_of_a_non_cubic_volume_are_written_with_their_montage(tmp_path):
    """configs/sample.json's writer on the brain grid's shape (64 x 80 x 64 has views of two heights)."""
    from torch import nn

    from scripts.core.covariates import CovariateEncoder
    from scripts.io.writer import write_samples

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.drift = nn.Parameter(torch.ones(())), LatentDrift(0.1)

        def denoiser(self, latent, timesteps, condition):
            return 0.1 * latent * self.scale

        def decode(self, latent):
            return torch.sigmoid(nn.functional.interpolate(latent[:, :1], scale_factor=4))

    scheduler = DDIMScheduler(1000, schedule="scaled_linear_beta", clip_sample=False)
    encoder = CovariateEncoder({"age": {"type": "continuous", "range": [40, 100]}})
    files = write_samples(
        Tiny(), scheduler, encoder, {"age": 70}, [2, 4, 5, 4], str(tmp_path / "samples"), num_samples=2,
        num_inference_steps=3, guidance_scale=2.0, pixdim=[3.0, 3.0, 3.0],
    )  # fmt: skip
    assert [nib.load(f).shape for f in files] == [(16, 20, 16)] * 2
    montage = np.asarray(Image.open(tmp_path / "samples" / "samples_montage.png"))
    assert montage.shape == (2 * 20, 16 + 16 + 20 + 3 * 2) and montage.std() > 0  # views padded to the tallest
    assert json.loads((tmp_path / "samples" / "samples_record.json").read_text())["num_samples"] == 2
