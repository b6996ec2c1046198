"""Specification of the network component: conditioned denoiser, fine-tuning schemes, the saved model, helpers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from scripts.core.drift import LatentDrift
from scripts.core.networks import ConditionedUNet, LatentDriftModel, select_trainable
from scripts.io.weights import load_weights
from scripts.training.engines import latent_scale_factor

ROOT = Path(__file__).resolve().parents[1]
CONDITION_SIZE, CONTEXT_DIM = 6, 16
CROSS_ATTENTION_KV = re.compile(r"\.attn2\.to_[kv]\.weight$")


def autoencoder(spatial_dims: int = 2) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 16),
        latent_channels=3,
        num_res_blocks=1,
        norm_num_groups=8,
        attention_levels=(False, False),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def unet(spatial_dims: int = 2, attention_levels=(False, True), with_conditioning: bool = True) -> DiffusionModelUNet:
    return DiffusionModelUNet(
        spatial_dims,
        in_channels=3,
        out_channels=3,
        channels=(8, 16),
        attention_levels=attention_levels,
        num_res_blocks=1,
        num_head_channels=(0, 16),
        norm_num_groups=8,
        with_conditioning=with_conditioning,
        cross_attention_dim=CONTEXT_DIM if with_conditioning else None,
    )


def denoiser(spatial_dims: int = 2, attention_levels=(False, True)) -> ConditionedUNet:
    return ConditionedUNet(unet(spatial_dims, attention_levels), condition_size=CONDITION_SIZE, context_dim=CONTEXT_DIM)


def model(spatial_dims: int = 2, seed: int = 0) -> LatentDriftModel:
    torch.manual_seed(seed)
    return LatentDriftModel(autoencoder(spatial_dims), denoiser(spatial_dims), LatentDrift(0.1)).eval()


def image(spatial_dims: int = 2) -> torch.Tensor:
    return torch.randn((1, 1) + (16,) * spatial_dims, generator=torch.Generator().manual_seed(1))


def trainable_denoiser() -> ConditionedUNet:
    """A denoiser whose zero-initialised layers (MONAI's output convs and attention projections) are made non-zero,
    so that every parameter on a gradient path actually receives a non-zero gradient."""
    torch.manual_seed(0)
    network = denoiser()
    with torch.no_grad():
        for parameter in network.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)
    return network


def backward_once(network: ConditionedUNet) -> None:
    generator = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 3, 8, 8, generator=generator)
    condition = torch.rand(2, 1, CONDITION_SIZE, generator=generator)
    network(latent, torch.tensor([10, 500]), condition).square().mean().backward()


def names_of(network: nn.Module, parameters: list[nn.Parameter]) -> set[str]:
    chosen = {id(p) for p in parameters}
    return {name for name, p in network.named_parameters() if id(p) in chosen}


# --- ConditionedUNet ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_denoiser_output_has_the_latent_shape(spatial_dims):
    network = denoiser(spatial_dims)
    latent = torch.randn((2, 3) + (8,) * spatial_dims)
    output = network(latent, torch.tensor([1, 999]), torch.rand(2, 1, CONDITION_SIZE))
    assert output.shape == latent.shape


def test_denoiser_needs_a_unet_built_with_conditioning():
    with pytest.raises(ValueError, match="with_conditioning=True"):
        ConditionedUNet(unet(with_conditioning=False), condition_size=CONDITION_SIZE, context_dim=CONTEXT_DIM)


# --- select_trainable ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["full", "cross_attention", "embedding"])
def test_selected_parameters_receive_a_non_zero_gradient(scheme):
    network = trainable_denoiser()
    selected = names_of(network, select_trainable(network, scheme))
    backward_once(network)
    for name, parameter in network.named_parameters():
        if name in selected:
            assert parameter.requires_grad and parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("scheme", ["full", "cross_attention", "embedding"])
def test_unselected_parameters_are_frozen_and_get_no_gradient(scheme):
    network = trainable_denoiser()
    selected = names_of(network, select_trainable(network, scheme))
    backward_once(network)
    for name, parameter in network.named_parameters():
        if name not in selected:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_covariate_tokens_give_cross_attention_query_and_key_a_gradient():
    # With one context token softmax would be 1 and to_q / to_k inert; one token per covariate entry avoids that.
    network = trainable_denoiser()
    select_trainable(network, "full")
    backward_once(network)
    query_key = {name: p for name, p in network.named_parameters() if re.search(r"\.attn2\.to_[qk]\.", name)}
    assert query_key and all(p.grad is not None and p.grad.any() for p in query_key.values())


def test_full_scheme_selects_every_denoiser_parameter():
    network = denoiser()
    assert names_of(network, select_trainable(network, "full")) == {name for name, _ in network.named_parameters()}


def test_cross_attention_scheme_selects_exactly_the_cross_attention_key_value_weights():
    network = denoiser()
    selected = names_of(network, select_trainable(network, "cross_attention"))
    expected = {name for name, _ in network.named_parameters() if CROSS_ATTENTION_KV.search(name)}
    assert expected and selected == expected


def test_cross_attention_scheme_selects_no_self_attention_or_query_parameter():
    network = denoiser()
    selected = names_of(network, select_trainable(network, "cross_attention"))
    assert not any(".attn1." in name or ".to_q." in name or ".out_proj." in name for name in selected)


def test_cross_attention_scheme_on_a_unet_without_attention_levels_trains_the_middle_block_key_value():
    # MONAI's conditioned UNet always has a cross-attention block in the middle, whatever attention_levels says.
    network = denoiser(attention_levels=(False, False))
    selected = names_of(network, select_trainable(network, "cross_attention"))
    expected = {name for name, _ in network.named_parameters() if CROSS_ATTENTION_KV.search(name)}
    assert expected and all(name.startswith("unet.middle_block.") for name in expected)
    assert selected == expected


def test_cross_attention_scheme_without_any_cross_attention_layer_raises():
    network = denoiser()
    network.unet = nn.Conv2d(3, 3, 1)  # a backbone with no cross-attention at all
    with pytest.raises(ValueError, match="selects no parameter"):
        select_trainable(network, "cross_attention")


def test_embedding_scheme_selects_only_the_covariate_embedding():
    network = denoiser()
    selected = names_of(network, select_trainable(network, "embedding"))
    assert selected == {"embedding.weight", "embedding.bias"}


def test_a_later_scheme_refreezes_what_an_earlier_one_unfroze():
    network = denoiser()
    select_trainable(network, "full")
    select_trainable(network, "embedding")
    assert {name for name, p in network.named_parameters() if p.requires_grad} == {"embedding.weight", "embedding.bias"}


def test_unknown_scheme_raises_naming_the_choices():
    with pytest.raises(ValueError, match=r"'full', 'cross_attention', 'embedding'.*'lora'"):
        select_trainable(denoiser(), "lora")


# --- LatentDriftModel -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_returns_an_image_of_the_input_shape(spatial_dims):
    x = image(spatial_dims)
    with torch.no_grad():
        assert model(spatial_dims)(x).shape == x.shape


def test_encode_multiplies_the_autoencoder_latent_by_the_scale_factor():
    network, x = model(), image()
    network.scale_factor.fill_(2.0)
    with torch.no_grad():
        latent = network.encode(x)
        expected = 2.0 * network.autoencoder.encode(x)[0]  # the posterior mean: encoding is deterministic
    assert torch.allclose(latent, expected)


def test_decode_divides_the_latent_by_the_scale_factor():
    network = model()
    network.scale_factor.fill_(2.0)
    latent = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(network.decode(latent), network.autoencoder.decode_stage_2_outputs(latent / 2.0))


def test_state_dict_saves_the_scale_factor():
    assert "scale_factor" in model().state_dict()


def test_state_dict_does_not_save_the_drift_delta():
    assert not any("delta" in key or key.startswith("drift.") for key in model().state_dict())


def test_saved_weights_load_strictly_into_a_fresh_model_and_reproduce_its_outputs(tmp_path):
    saved = model(seed=0)
    saved.scale_factor.fill_(2.0)
    path = tmp_path / "model.pt"
    torch.save(saved.state_dict(), path)
    fresh = load_weights(model(seed=1), str(path))
    x = image()
    with torch.no_grad():
        torch.manual_seed(7)
        expected = saved(x)
        torch.manual_seed(7)
        reproduced = fresh(x)
    assert fresh.scale_factor.item() == 2.0
    assert torch.equal(reproduced, expected)


# --- latent_scale_factor ------------------------------------------------------------------------------------------


def batches(count: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(2, 1, 16, 16, generator=generator)} for _ in range(count)]


def test_latent_scale_factor_is_one_over_the_latent_std():
    torch.manual_seed(0)
    network = autoencoder().eval()
    data = batches(3)
    torch.manual_seed(9)
    factor = latent_scale_factor(network, data)
    torch.manual_seed(9)
    with torch.no_grad():
        latents = torch.cat([network.encode(batch["image"])[0].flatten() for batch in data])
    assert factor == pytest.approx(1.0 / latents.std().item(), rel=1e-5)


def test_latent_scale_factor_reads_at_most_max_batches():
    torch.manual_seed(0)
    network = autoencoder()
    data = batches(3)
    torch.manual_seed(9)
    first_two = latent_scale_factor(network, data[:2])
    torch.manual_seed(9)
    capped = latent_scale_factor(network, data, max_batches=2)
    assert capped == first_two


def test_latent_scale_factor_restores_the_training_mode():
    network = autoencoder().train()
    latent_scale_factor(network, batches(1))
    assert network.training


def test_latent_scale_factor_on_no_batch_raises_clearly():
    with pytest.raises(ValueError, match="yielded no batch"):
        latent_scale_factor(autoencoder(), iter([]))


# --- load_weights ---------------------------------------------------------------------------------------------------


def test_load_weights_on_a_missing_file_raises_with_the_hint(tmp_path):
    path = tmp_path / "autoencoder.pt"
    with pytest.raises(FileNotFoundError, match=r"autoencoder\.pt.*run train_autoencoder first"):
        load_weights(autoencoder(), str(path), hint="run train_autoencoder first")


def test_load_weights_rejects_a_state_dict_with_unexpected_keys(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({**autoencoder().state_dict(), "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"does not fit the network .*1 unexpected.*unexpected extra\.weight"):
        load_weights(autoencoder(), str(path))


def test_load_weights_rejects_a_state_dict_with_missing_keys(tmp_path):
    path = tmp_path / "model.pt"
    state = autoencoder().state_dict()
    state.pop(next(iter(state)))
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not fit the network .*1 missing.*missing "):
        load_weights(autoencoder(), str(path))


DESIGNS = [
    ["cross_attention"],
    ["timestep_embedding"],
    ["input_channels"],
    ["cross_attention", "timestep_embedding"],
    ["timestep_embedding", "input_channels"],
]


def configured_network(conditioning, paired: bool = False):
    """The chest preset's network (2D, small) built by the bundle's configs with `conditioning`."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    files = ["configs/common.json", "configs/chest_xray_2d.json"] + (["configs/paired.json"] if paired else [])
    parser.read_config([str(ROOT / f) for f in files])
    parser["bundle_root"], parser["conditioning"], parser["device"] = str(ROOT), conditioning, "$torch.device('cpu')"
    return parser.get_parsed_content("network_def"), parser.get_parsed_content("covariate_encoder")


@pytest.mark.parametrize("conditioning", DESIGNS, ids=["+".join(d) for d in DESIGNS])
def test_every_conditioning_design_builds_from_the_configs_and_hears_the_covariates(conditioning):
    torch.manual_seed(0)
    network, encoder = configured_network(conditioning)
    denoiser = network.denoiser
    for parameter in denoiser.parameters():  # MONAI zero-initialises the output convolution (and we the MLP's end)
        if not parameter.any():
            nn.init.normal_(parameter, std=0.5)
    latent = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    old = encoder.encode({"age": 40, "sex": "F", "cardiomegaly": 0, "effusion": 0}).reshape(1, 1, -1)
    ill = encoder.encode({"age": 80, "sex": "M", "cardiomegaly": 1, "effusion": 1}).reshape(1, 1, -1)
    timesteps = torch.tensor([500, 500])
    with torch.no_grad():
        out = denoiser(latent, timesteps, torch.cat([old, ill]).float())
        same = denoiser(latent, timesteps, torch.cat([old, old]).float())
    assert out.shape == latent.shape
    torch.testing.assert_close(out[0], same[0])
    assert not torch.allclose(out[1], same[1], atol=1e-5), "the covariates must change the noise estimate"


def test_the_timestep_embedding_starts_as_a_no_op():
    torch.manual_seed(0)
    network, encoder = configured_network(["timestep_embedding"])
    latent = torch.randn(1, 3, 32, 32)
    records = (
        {"age": 20, "sex": "F", "cardiomegaly": 0, "effusion": 0},
        {"age": 90, "sex": "M", "cardiomegaly": 1, "effusion": 1},
    )
    conditions = [encoder.encode(c).reshape(1, 1, -1).float() for c in records]
    nn.init.normal_(network.denoiser.unet.out[-1].conv.weight, std=0.5)  # MONAI starts the output at zero
    with torch.no_grad():
        first, second = (network.denoiser(latent, torch.tensor([10]), c) for c in conditions)
    torch.testing.assert_close(first, second)


def test_the_paired_overlay_adds_the_source_latent_to_every_design():
    network, encoder = configured_network(["input_channels"], paired=True)
    assert network.denoiser.unet.in_channels == 2 * 3 + 2 * encoder.size


@pytest.mark.parametrize("conditioning", DESIGNS, ids=["+".join(d) for d in DESIGNS])
def test_a_paired_model_warm_started_from_unpaired_weights_starts_as_the_unpaired_one(conditioning, tmp_path):
    from scripts.io.weights import save_weights
    from scripts.training.warm_start import warm_start_paired

    torch.manual_seed(0)
    unpaired, encoder = configured_network(conditioning)
    for parameter in unpaired.denoiser.parameters():  # MONAI zero-initialises the output convolution
        if not parameter.any():
            nn.init.normal_(parameter, std=0.5)
    unpaired.scale_factor.fill_(0.7)
    save_weights(tmp_path / "model.pt", unpaired, {"paired": False, "network": {"conditioning": conditioning}})
    paired, _ = configured_network(conditioning, paired=True)
    warm_start_paired(paired, str(tmp_path / "model.pt"))
    assert float(paired.scale_factor) == pytest.approx(0.7)
    latent, source = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    old = encoder.encode({"age": 40, "sex": "F", "cardiomegaly": 0, "effusion": 0}).reshape(1, 1, -1).float()
    ill = encoder.encode({"age": 80, "sex": "M", "cardiomegaly": 1, "effusion": 1}).reshape(1, 1, -1).float()
    timesteps = torch.tensor([300, 700])
    with torch.no_grad():
        expected = unpaired.denoiser(latent, timesteps, torch.cat([old, ill]))
        same = paired.denoiser(torch.cat([latent, source], 1), timesteps, torch.cat([old, ill]).repeat(1, 1, 2))
    torch.testing.assert_close(same, expected, rtol=1e-3, atol=1e-4)  # c_source = c_target: the unpaired one
    with torch.no_grad():
        changed = paired.denoiser(torch.cat([latent, source], 1), timesteps, torch.cat([ill, old]).repeat(1, 1, 2))
    assert not torch.allclose(changed, expected, atol=1e-5), "the target covariates must still be heard"


def test_a_warm_start_names_weights_of_another_design(tmp_path):
    from scripts.io.weights import save_weights
    from scripts.training.warm_start import warm_start_paired

    unpaired, _ = configured_network(["cross_attention"])
    save_weights(tmp_path / "model.pt", unpaired, {"paired": False, "network": {"conditioning": ["cross_attention"]}})
    with pytest.raises(ValueError, match="not paired; add configs/paired.json"):
        warm_start_paired(unpaired, str(tmp_path / "model.pt"))
    paired, _ = configured_network(["timestep_embedding"], paired=True)
    with pytest.raises(ValueError, match="model.pt: unpaired weights trained with conditioning"):
        warm_start_paired(paired, str(tmp_path / "model.pt"))
    paired, _ = configured_network(["cross_attention"], paired=True)
    save_weights(tmp_path / "paired.pt", paired, {"paired": True})
    with pytest.raises(ValueError, match="already a paired model"):
        warm_start_paired(paired, str(tmp_path / "paired.pt"))


def test_a_conditioning_the_unet_was_not_built_for_is_named():
    with pytest.raises(ValueError, match="num_class_embeds"):
        ConditionedUNet(unet(), CONDITION_SIZE, CONTEXT_DIM, conditioning=["timestep_embedding"])
    with pytest.raises(ValueError, match="conditioning must be"):
        ConditionedUNet(unet(), CONDITION_SIZE, CONTEXT_DIM, conditioning=["film"])
    with pytest.raises(ValueError, match="16 channels|channels, its UNet takes"):
        ConditionedUNet(unet(), CONDITION_SIZE, CONTEXT_DIM, conditioning=["cross_attention", "input_channels"])(
            torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.zeros(1, 1, CONDITION_SIZE)
        )


def test_weights_say_which_conditioning_they_were_trained_with(tmp_path):
    from scripts.io.weights import save_weights, weights_metadata

    network, _ = configured_network(["timestep_embedding"])
    path = tmp_path / "model.pt"
    save_weights(path, network, weights_metadata(network.drift, network=network_config(["timestep_embedding"])))
    other, _ = configured_network(["cross_attention"])
    with pytest.raises(ValueError, match=r"trained with conditioning \['timestep_embedding'\]"):
        load_weights(other, str(path))
    same, _ = configured_network(["timestep_embedding"])
    load_weights(same, str(path))


def network_config(conditioning):
    return {"conditioning": conditioning, "spatial_dims": 2}
