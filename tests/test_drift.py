"""Specification of the Latent Drift component (DESIGN section 2)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from scripts.core.drift import LatentDrift

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def ddim(prediction_type: str = "epsilon", steps: int = 20) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", clip_sample=False, prediction_type=prediction_type
    )
    scheduler.set_timesteps(steps)
    return scheduler


def ddpm(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, schedule="scaled_linear_beta", clip_sample=False, prediction_type=prediction_type
    )


def fake_model(z: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for ε_θ that depends on both the state and the timestep."""
    return torch.tanh(0.7 * z + 0.001 * t)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_zero_delta_forward_is_bit_identical_to_monai(prediction_type):
    scheduler = ddpm(prediction_type)
    z0, noise = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    t = torch.tensor([10, 900])
    z_t, target = LatentDrift(0.0).add_noise(scheduler, z0, noise, t)
    assert torch.equal(z_t, scheduler.add_noise(z0, noise, t))
    expected = {"epsilon": noise, "v_prediction": scheduler.get_velocity(z0, noise, t), "sample": z0}[prediction_type]
    assert torch.equal(target, expected)


@pytest.mark.parametrize("schedule", ["paper", "marginal"])
def test_zero_delta_ddim_sampling_is_bit_identical_to_monai(schedule):
    scheduler, drift = ddim(), LatentDrift(0.0, schedule)
    start = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, drifted = start.clone(), drift.prior(start.clone())
    for t in scheduler.timesteps:
        plain, _ = scheduler.step(fake_model(plain, int(t)), t, plain)
        drifted = drift.step(scheduler, fake_model(drifted, int(t)), t, drifted)
    assert torch.equal(plain, drifted)


def test_zero_delta_ddpm_sampling_with_same_seed_is_bit_identical_to_monai():
    scheduler, drift = ddpm(), LatentDrift(0.0)
    plain = drifted = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    plain_rng, drift_rng = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t in range(999, 979, -1):
        plain, _ = scheduler.step(fake_model(plain, t), t, plain, generator=plain_rng)
        drifted = drift.step(scheduler, fake_model(drifted, t), t, drifted, generator=drift_rng)
    assert torch.equal(plain, drifted)


def test_prior_mean_equals_delta():
    noise = torch.randn(4096, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prior = LatentDrift(0.15).prior(noise)
    assert abs(prior.mean().item() - 0.15) < 0.005
    assert abs(prior.std().item() - 1.0) < 0.005


def test_forward_noising_shifts_by_sqrt_one_minus_alpha_bar_times_delta():
    scheduler, delta = ddpm(), 0.2
    z0, noise, t = torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6), torch.tensor([0, 500, 999])
    plain, target_plain = LatentDrift(0.0).add_noise(scheduler, z0, noise, t)
    drifted, target = LatentDrift(delta).add_noise(scheduler, z0, noise, t)
    expected_shift = (1 - scheduler.alphas_cumprod[t]) ** 0.5 * delta
    torch.testing.assert_close(drifted - plain, expected_shift.view(3, 1, 1, 1).expand_as(plain))
    assert torch.equal(target, target_plain), "the loss target must stay the model's usual target"


@pytest.mark.parametrize("scheduler_factory", [ddim, ddpm])
def test_paper_schedule_moves_every_reverse_mean_by_delta(scheduler_factory):
    scheduler = scheduler_factory()
    z, output = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    t = int(scheduler.timesteps[3])
    plain = LatentDrift(0.0).step(scheduler, output, t, z, generator=torch.Generator().manual_seed(3))
    drifted = LatentDrift(-0.1).step(scheduler, output, t, z, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(drifted - plain, torch.full_like(plain, -0.1))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", ["paper", "marginal"])
@pytest.mark.parametrize("delta", [0.0, 0.1, [0.05, -0.2, 0.1]])
def test_invert_then_step_returns_the_input_latent(prediction_type, schedule, delta):
    scheduler, drift = ddim(prediction_type), LatentDrift(delta, schedule)
    z_prev = torch.randn(2, 3, 8, 8, 8, dtype=torch.float64)
    for t in scheduler.timesteps[:-1]:
        output = fake_model(z_prev, int(t))
        z_t = drift.invert_step(scheduler, output, t, z_prev)
        torch.testing.assert_close(drift.step(scheduler, output, t, z_t), z_prev, rtol=1e-9, atol=1e-9)


def test_last_step_of_sample_prediction_cannot_be_inverted():
    scheduler, z = ddim("sample"), torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="cannot be inverted"):
        LatentDrift(0.1).invert_step(scheduler, z, scheduler.timesteps[-1], z)


def test_inversion_is_exact_in_float32_too():
    scheduler, drift = ddim(), LatentDrift(0.1)
    z_prev = torch.randn(1, 4, 16, 16)
    t = scheduler.timesteps[0]
    output = fake_model(z_prev, int(t))
    z_t = drift.invert_step(scheduler, output, t, z_prev)
    torch.testing.assert_close(drift.step(scheduler, output, t, z_t), z_prev, rtol=1e-5, atol=1e-5)


def test_inversion_refuses_clipping_and_ddpm():
    clipping = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    clipping.set_timesteps(10)
    z = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="clip_sample=False"):
        LatentDrift(0.1).invert_step(clipping, z, clipping.timesteps[0], z)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        LatentDrift(0.1).invert_step(ddpm(), z, 999, z)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 4, 6, 8)], ids=["2d", "3d"])
def test_per_channel_delta_broadcasts_over_batch_and_space(shape):
    drift = LatentDrift([0.1, -0.2, 0.3])
    shifted = drift.prior(torch.zeros(shape))
    assert shifted.shape == shape
    for channel, value in enumerate([0.1, -0.2, 0.3]):
        torch.testing.assert_close(shifted[:, channel], torch.full(shape[:1] + shape[2:], value))


def test_per_channel_delta_must_match_the_latent_channels():
    with pytest.raises(ValueError, match="3 values but the latent has 4 channels"):
        LatentDrift([0.1, 0.2, 0.3]).prior(torch.zeros(1, 4, 8, 8))


def test_marginal_schedule_leaves_no_drift_at_the_end_of_a_linear_chain():
    """With a noise estimate that ignores δ, the chain carries the drift sqrt(1 - ᾱ_t) δ at every t, so 0 at t=0."""
    scheduler, drift = ddim(steps=25), LatentDrift(0.3, "marginal")
    scheduler.timesteps = torch.arange(999, 0, -40)  # a grid on the scheduler's own t - T/N convention
    constant_output = torch.zeros(1, 1, 4, 4)
    plain = start = torch.randn(1, 1, 4, 4)
    drifted = (
        start + 0.3 * (1 - scheduler.alphas_cumprod[scheduler.timesteps[0]]) ** 0.5
    )  # the forward marginal's drift
    for t in scheduler.timesteps:
        plain, _ = scheduler.step(constant_output, t, plain)
        drifted = drift.step(scheduler, constant_output, t, drifted)
    torch.testing.assert_close(drifted, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["paper", "marginal"])
def test_a_chain_from_the_prior_ends_at_the_data_the_drifted_forward_process_started_from(schedule):
    """
    With the exact noise of the drifted forward process (an oracle ε_θ for one z_0), sampling from z_T = ε + δ
    must end at z_0 whatever the weights' schedule: the paper's δ at each of 50 DDIM steps would compound far off it.
    """
    from types import SimpleNamespace

    from scripts.core.sampling import sample_latents

    scheduler, z0, delta = ddim(steps=50), torch.randn(1, 2, 4, 4), 0.1
    alphas = scheduler.alphas_cumprod

    def oracle(latent, timesteps, condition):
        a = alphas[int(timesteps[0])]
        return (latent - a**0.5 * z0) / (1 - a) ** 0.5 - delta

    model = SimpleNamespace(denoiser=oracle)
    noise, condition = torch.randn(1, 2, 4, 4), torch.zeros(1, 1, 3)
    out = sample_latents(model, scheduler, noise, condition, drift=LatentDrift(delta, schedule), num_inference_steps=50)
    torch.testing.assert_close(out, z0, rtol=1e-3, atol=1e-3)
    assert LatentDrift(delta, schedule).for_prior_start().schedule == "marginal"
    assert LatentDrift(0.0).for_prior_start().schedule == "paper"  # δ = 0: nothing to change, plain MONAI


@pytest.mark.parametrize("bad", [[], [[0.1]], float("nan")])
def test_bad_delta_is_refused_with_a_clear_message(bad):
    with pytest.raises(ValueError, match="drift delta"):
        LatentDrift(bad)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        LatentDrift(0.1, "linear")


def test_delta_is_not_a_saved_weight():
    assert LatentDrift(0.1).state_dict() == {}
