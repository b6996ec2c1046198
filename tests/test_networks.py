"""Specification of the network component: conditioned denoiser, fine-tuning schemes, the saved model, helpers."""

from __future__ import annotations

import re

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from torch import nn

from scripts.core.drift import LatentDrift
from scripts.core.networks import ConditionedUNet, LatentDriftModel, latent_scale_factor, select_trainable
from scripts.io.weights import load_weights

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
