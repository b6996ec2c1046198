"""Ignite training logic: the stage-1 VAE-GAN step, the stage-2 drifted batch, checkpoint/resume and sample images."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL
from monai.networks.schedulers import DDIMScheduler
from monai.visualize import plot_2d_or_3d_image
from torch import nn

from scripts.core.covariates import CovariateEncoder
from scripts.core.networks import LatentDriftModel
from scripts.core.sampling import PRECISIONS, precision_context, sample_latents
from scripts.io.datalist import as_flag
from scripts.io.files import atomic_write, atomic_write_json
from scripts.io.weights import load_weights, save_weights

logger = logging.getLogger(__name__)


class AutocastInferer(Inferer):
    """Calls `network(inputs, *args, **kwargs)` under the chosen autocast precision and returns float32."""

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}.")
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with precision_context(inputs.device, self.precision):
            output = network(inputs, *args, **kwargs)
        return output.float() if isinstance(output, torch.Tensor) else output


class ReconstructionInferer(AutocastInferer):
    """Autoencoder reconstruction (encode to the posterior mean, decode) for stage-1 validation."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().__call__(inputs, network.reconstruct)


def batch_tensor(
    batchdata: Mapping[str, Any], key: str, device: torch.device | None = None, non_blocking: bool = False
) -> torch.Tensor:
    """`batchdata[key]` as a plain float tensor on `device` (training needs no MetaTensor tracking)."""
    if key not in batchdata:
        raise KeyError(f"the batch has no '{key}' (keys: {sorted(batchdata)}); check the transforms.")
    value = batchdata[key]
    value = value.as_tensor() if isinstance(value, MetaTensor) else value
    return value.to(device=device, non_blocking=non_blocking).float()


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, I)), summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1)
    return kl.flatten(1).sum(1).mean()


class LocalPerceptualLoss(nn.Module):
    """
    L1 distance between features of a local TorchScript network (a file the user provides).

    MONAI's PerceptualLoss downloads its weights at run time, which this offline bundle never does; so a perceptual
    term is available only from a local file whose module maps an image batch to a feature tensor (or list of them).
    """

    def __init__(self, network_path: str | None) -> None:
        super().__init__()
        if not network_path or not Path(network_path).is_file():
            raise ValueError(
                "perceptual_weight > 0 needs 'perceptual_network' to be a local TorchScript file, got "
                f"{network_path!r}. MONAI's PerceptualLoss downloads weights, which this bundle does not do; "
                "export a feature network with torch.jit.save and set its path, or set perceptual_weight to 0."
            )
        self.network = torch.jit.load(network_path, map_location="cpu").eval()
        for parameter in self.network.parameters():
            parameter.requires_grad_(False)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.network.to(prediction.device)
        features_p, features_t = self.network(prediction), self.network(target)
        if isinstance(features_p, torch.Tensor):
            features_p, features_t = [features_p], [features_t]
        return sum(F.l1_loss(p, t) for p, t in zip(features_p, features_t)) / len(features_p)


class AutoencoderIteration:
    """
    One stage-1 step (the `iteration_update` of a MONAI SupervisedTrainer whose network is the AutoencoderKL):
    generator loss L1 + kl_weight * KL (+ perceptual) (+ adversarial), then, once past the warm-up, one step of
    the patch discriminator on real vs reconstructed images (least-squares GAN).
    """

    def __init__(
        self,
        kl_weight: float = 1e-6,
        discriminator: nn.Module | None = None,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        adversarial_weight: float = 0.01,
        adversarial_warmup_epochs: int = 0,
        perceptual_loss: nn.Module | None = None,
        perceptual_weight: float = 0.0,
        precision: str = "fp32",
    ) -> None:
        if (discriminator is None) != (discriminator_optimizer is None):
            raise ValueError("the adversarial loss needs both 'discriminator' and 'discriminator_optimizer'.")
        if perceptual_weight > 0 and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual loss (set 'perceptual_network').")
        self.kl_weight, self.adversarial_weight, self.warmup = kl_weight, adversarial_weight, adversarial_warmup_epochs
        self.discriminator, self.discriminator_optimizer = discriminator, discriminator_optimizer
        self.perceptual_loss, self.perceptual_weight = perceptual_loss, perceptual_weight
        self.precision = precision
        self.adversarial_loss = PatchAdversarialLoss(criterion="least_squares")

    def __call__(self, engine: Engine, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        images = batch_tensor(batchdata, "image", engine.state.device)
        autoencoder = engine.network
        autoencoder.train()
        adversarial = self.discriminator is not None and engine.state.epoch > self.warmup
        engine.optimizer.zero_grad(set_to_none=True)
        with precision_context(images.device, self.precision):
            reconstruction, z_mu, z_sigma = autoencoder(images)
        reconstruction = reconstruction.float()
        l1 = F.l1_loss(reconstruction, images)
        kl = kl_divergence(z_mu.float(), z_sigma.float())
        loss = l1 + self.kl_weight * kl
        if self.perceptual_loss is not None and self.perceptual_weight > 0:
            loss = loss + self.perceptual_weight * self.perceptual_loss(reconstruction, images)
        output = {"image": images, "pred": reconstruction.detach(), "l1": l1.item(), "kl": kl.item()}
        if adversarial:
            with precision_context(images.device, self.precision):
                logits_fake = self.discriminator(reconstruction)[-1].float()
            generator_adversarial = self.adversarial_loss(logits_fake, target_is_real=True, for_discriminator=False)
            loss = loss + self.adversarial_weight * generator_adversarial
        loss.backward()
        engine.optimizer.step()
        output["loss"] = loss.item()
        if adversarial:
            output["discriminator_loss"] = self._discriminator_step(images, reconstruction.detach())
        return output

    def _discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        self.discriminator.train()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        with precision_context(real.device, self.precision):
            logits_fake = self.discriminator(fake)[-1].float()
            logits_real = self.discriminator(real)[-1].float()
        loss_fake = self.adversarial_loss(logits_fake, target_is_real=False, for_discriminator=True)
        loss_real = self.adversarial_loss(logits_real, target_is_real=True, for_discriminator=True)
        loss = self.adversarial_weight * 0.5 * (loss_fake + loss_real)
        loss.backward()
        self.discriminator_optimizer.step()
        return loss.item()


class LatentDiffusionPrepareBatch:
    """
    Stage-2 batch: reads what the transform chain's `DriftNoised` wrote, z_t, the target and t, with the covariate
    vector, and returns `(z_t, target, (t, condition), {})` for a SupervisedTrainer/Evaluator whose network is the
    model's denoiser and whose loss compares output and target.

    With `source_key` (paired training) the denoiser's input is `[z_t, z_0^source]` along channels and the condition
    `[c_source, c_target]` from `condition_keys`.
    """

    def __init__(
        self,
        noisy_key: str = "noisy",
        target_key: str = "target",
        timesteps_key: str = "timesteps",
        condition_keys: str | Sequence[str] = "condition",
        source_key: str | None = None,
    ) -> None:
        self.noisy_key, self.target_key, self.timesteps_key = noisy_key, target_key, timesteps_key
        self.condition_keys = [condition_keys] if isinstance(condition_keys, str) else list(condition_keys)
        self.source_key = source_key

    def __call__(
        self, batchdata: Mapping[str, Any], device: torch.device | None = None, non_blocking: bool = False, **_
    ):
        def read(key: str) -> torch.Tensor:
            return batch_tensor(batchdata, key, device, non_blocking)

        inputs = read(self.noisy_key)
        if self.source_key is not None:
            inputs = torch.cat([inputs, read(self.source_key)], 1)
        condition = torch.cat([read(key) for key in self.condition_keys], -1)
        timesteps = batchdata[self.timesteps_key].to(device=device, non_blocking=non_blocking).long()
        return inputs, read(self.target_key), (timesteps, condition), {}


def reconstruction_batch(
    batchdata: Mapping[str, Any], device: torch.device | None = None, non_blocking: bool = False, **_
):
    """Stage-1 validation batch: the image is both the input and the target of the autoencoder."""
    images = batch_tensor(batchdata, "image", device, non_blocking)
    return images, images


class LossHistory:
    """Handler: appends each epoch's mean training loss to a JSON file (kept across resumed runs)."""

    def __init__(self, path: str, loss_key: str = "loss") -> None:
        self.path, self.loss_key = Path(path), loss_key
        self.total, self.count = 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.total, self.count = 0.0, 0

    def _accumulate(self, engine: Engine) -> None:
        output = engine.state.output
        output = output[0] if isinstance(output, list) else output
        self.total += float(output[self.loss_key])
        self.count += 1

    def _write(self, engine: Engine) -> None:
        history = json.loads(self.path.read_text()) if self.path.is_file() else []
        history = [row for row in history if row["epoch"] < engine.state.epoch]  # a resumed run rewrites its epochs
        history.append(
            {"epoch": engine.state.epoch, "iteration": engine.state.iteration, "loss": self.total / max(1, self.count)}
        )
        atomic_write_json(history, self.path)


class Reseed:
    """Handler: re-seeds a randomizable transform whenever the engine starts (a reproducible validation loss)."""

    def __init__(self, transform: Any, seed: int = 0) -> None:
        self.transform, self.seed = transform, seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.transform.set_random_state(seed=self.seed))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees a partial file."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary), ".pt")


def init_distributed(enabled: bool) -> int:
    """
    Multi-process training (configs/multi_gpu_train.json, launched by torchrun): join the process group (NCCL on
    CUDA, gloo on CPU) and pin this process's GPU; returns the rank (0 when `enabled` is false: a no-op).
    """
    if not as_flag(enabled, "distributed"):
        return 0
    if "RANK" not in os.environ:
        raise RuntimeError(
            "distributed is true but no RANK is set: launch with torchrun, e.g. "
            "torchrun --nproc_per_node 2 -m monai.bundle run training --config_file [..., multi_gpu_train.json]"
        )
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.distributed.get_rank()


def same_on_all_ranks(value: float) -> float:
    """Rank 0's value on every process (e.g. the latent scale factor measured on each rank's own data shard)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        tensor = tensor.cuda()
    torch.distributed.broadcast(tensor, src=0)
    return float(tensor.item())


@torch.no_grad()
def latent_scale_factor(
    autoencoder: AutoencoderKL,
    batches: Iterable,
    image_key: str = "image",
    max_batches: int = 4,
    latent_key: str | None = None,
) -> float:
    """
    1 / std of the autoencoder's latents (posterior means) over a few training batches (Rombach et al. 2022): the
    latents the batches cached under `latent_key` (unscaled, `EncodeLatentd`), else `image_key` encoded here.
    """
    was_training = autoencoder.training
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    latents = []
    for index, batch in enumerate(batches):
        if index >= max_batches:
            break
        if latent_key is not None:
            latents.append(torch.as_tensor(batch[latent_key]).flatten().float().cpu())
        else:
            latents.append(autoencoder.encode(batch[image_key].to(device))[0].flatten().float().cpu())
    autoencoder.train(was_training)
    if not latents:
        raise ValueError("cannot compute the latent scale factor: the training data loader yielded no batch.")
    std = torch.cat(latents).std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"cannot compute the latent scale factor: latent std is {std.item()}; check stage 1.")
    return float(1.0 / std)


class TrainingCheckpoint:
    """
    Handler: saves {name: state_dict} of `save_dict` (network, optimizers, trainer...) atomically to
    `<checkpoint_dir>/checkpoint_last.pt` every `save_every_epochs` epochs and at the end, writes the final network
    weights to `final_path` (strict keys), resumes from the last checkpoint when training starts (if `resume`), and
    otherwise can fine-tune from the model weights in `finetune_from`. The final weights are written in the bundle's
    weights format (scripts/io/weights.py) with `final_metadata` (a dict, or a callable evaluated when training ends).
    """

    def __init__(
        self,
        checkpoint_dir: str,
        save_dict: Mapping[str, Any],
        final_path: str | None = None,
        final_key: str = "model",
        save_every_epochs: int = 1,
        resume: bool = True,
        finetune_from: str | None = None,
        write: bool = True,
        final_metadata: Callable[[], Mapping[str, Any]] | Mapping[str, Any] | None = None,
    ) -> None:
        if finetune_from and not Path(finetune_from).is_file():
            raise FileNotFoundError(f"finetune_from: no checkpoint file at {finetune_from!r}.")
        self.checkpoint_path = Path(checkpoint_dir) / "checkpoint_last.pt"
        self.save_dict, self.final_path, self.final_key = dict(save_dict), final_path, final_key
        self.save_every_epochs, self.finetune_from = save_every_epochs, finetune_from
        self.resume = as_flag(resume, "resume")
        self.write = as_flag(write, "write")  # False on every rank but 0 in multi-process training: load, never save
        self.final_metadata = final_metadata

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=max(1, self.save_every_epochs)), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load(self, engine: Engine) -> None:
        if self.resume and self.checkpoint_path.is_file():
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            max_epochs = engine.state.max_epochs
            for name, obj in self.save_dict.items():
                obj.load_state_dict(state[name])
            if engine.state.epoch > max_epochs:
                raise ValueError(
                    f"{self.checkpoint_path} is at epoch {engine.state.epoch}, beyond max_epochs={max_epochs}: raise "
                    "max_epochs to train further, or set resume to false to start over."
                )
            engine.state.max_epochs = max_epochs
            logger.info(f"resumed from {self.checkpoint_path} at epoch {engine.state.epoch}")
        elif self.finetune_from:
            load_weights(self.save_dict[self.final_key], self.finetune_from, checkpoint_key=self.final_key)
            logger.info(f"fine-tuning from {self.finetune_from}")

    def save(self, engine: Engine) -> None:
        if not self.write:
            return
        atomic_save({name: obj.state_dict() for name, obj in self.save_dict.items()}, self.checkpoint_path)

    def save_final(self, engine: Engine) -> None:
        self.save(engine)
        if self.final_path and self.write:
            metadata = self.final_metadata() if callable(self.final_metadata) else self.final_metadata
            save_weights(self.final_path, self.save_dict[self.final_key], metadata)
            logger.info(f"saved final weights to {self.final_path}")


class SampleImages:
    """
    Handler: every `every_epochs` epochs, draws drifted DDIM samples for a few covariate records with a fixed seed
    and writes them to TensorBoard, so training progress can be seen, not only read off a loss.
    """

    def __init__(
        self,
        model: LatentDriftModel,
        scheduler: DDIMScheduler,
        encoder: CovariateEncoder,
        records: Sequence[Mapping[str, Any]],
        latent_shape: Sequence[int],
        log_dir: str,
        every_epochs: int = 1,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int = 0,
        precision: str = "fp32",
    ) -> None:
        self.model, self.scheduler, self.log_dir = model, scheduler, log_dir
        self.conditions = torch.stack([encoder.encode(r, source="sample_records") for r in records]).unsqueeze(1)
        self.null = encoder.null()
        self.latent_shape, self.every_epochs = tuple(latent_shape), every_epochs
        self.steps, self.guidance_scale, self.seed, self.precision = (
            num_inference_steps,
            guidance_scale,
            seed,
            precision,
        )
        self.writer = None

    def attach(self, engine: Engine) -> None:
        if self.every_epochs > 0:  # 0 turns sampling off
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every_epochs), self)

    def __call__(self, engine: Engine) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = self.writer or SummaryWriter(log_dir=self.log_dir)
        device = next(self.model.parameters()).device
        noise = torch.randn(
            (len(self.conditions), *self.latent_shape), generator=torch.Generator().manual_seed(self.seed)
        ).to(device)
        was_training = self.model.denoiser.training
        self.model.eval()
        latents = sample_latents(
            self.model,
            self.scheduler,
            noise,
            self.conditions.to(device),
            drift=self.model.drift,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            null_condition=self.null.to(device),
            precision=self.precision,
        )
        with torch.inference_mode():
            images = self.model.decode(latents).float().clamp(0, 1).cpu()
        self.model.denoiser.train(was_training)
        for index, image in enumerate(images):
            plot_2d_or_3d_image(image[None], engine.state.epoch, self.writer, tag=f"sample_{index}", max_channels=1)
        self.writer.flush()
