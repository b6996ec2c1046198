"""In-domain evaluator networks trained on a cohort: the anti-causal covariate predictor and the tissue segmenter.

Counterfactuals are judged with networks that never saw a generated image (docs/evaluation.md):

- `CovariatePredictor` reads an image and predicts every covariate of the bundle's `covariate_schema` (age
  regression, sex / finding logits, diagnosis classes). It gives *effectiveness* and *minimality* (did the asked
  covariate change, did the others stay?) and its pooled feature vector is the in-domain feature space of FID and
  KID (no download, unlike Inception).
- a MONAI `UNet` segmenter trained on the cohort's label maps measures ventricle / hippocampus / brain volumes (brain)
  or cardiothoracic ratio and effusion fraction (chest) of any image with `scripts.cohort.brain_phantom.measure_brain` /
  `measure_chest`, so a counterfactual's volumes can be compared with the oracle's exact ones.

`train_evaluators` trains both on the `training` subjects of a cohort datalist, scores them on the held-out
`validation` subjects and writes `predictor.pt`, `segmenter.pt` and `evaluators.json` (held-out accuracy) to the
evaluator folder. Images go through the bundle's own `preprocessing`, so evaluators see exactly what the diffusion
model sees; label maps must already lie on that grid (generate the cohort at the network's `image_size`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_roc_auc
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from monai.transforms import LoadImage
from torch import nn

from scripts.cohort import brain_phantom, causal_model, chest_phantom
from scripts.core.covariates import CovariateEncoder
from scripts.io.datalist import load_datalist
from scripts.io.files import atomic_write, atomic_write_json

# The predictor looks at anatomy, not texture: it blurs every input by a fixed Gaussian (sigma in voxels) before its
# first layer, and trains with extra random blur. Measured on the chest cohort at 128 px: without them the age
# regressor keyed on the film's fine noise and bone edges, its held-out age error rose from 7 to 21 years under a
# 1-voxel blur and to 65 years on autoencoder reconstructions (which carry the same anatomy).
INPUT_BLUR_SIGMA = 1.0
AUGMENT_BLUR_MAX_SIGMA = 1.5


class CovariatePredictor(nn.Module):
    """Strided convolutions -> global average pool -> feature vector -> one output per encoded covariate entry.

    Outputs follow the covariate encoder's layout without its null flag: a continuous covariate is regressed on its
    normalised [0, 1] scale, a binary one is a logit, a categorical one a block of class logits.
    """

    def __init__(
        self,
        spatial_dims: int,
        out_size: int,
        channels: Sequence[int] = (16, 32, 64, 96),
        feature_size: int = 128,
        input_blur: float = INPUT_BLUR_SIGMA,
    ) -> None:
        super().__init__()
        self.input_blur = float(input_blur)
        layers, previous = [], 1
        for channel in channels:
            layers.append(Convolution(spatial_dims, previous, channel, strides=2, kernel_size=3, norm="batch"))
            layers.append(Convolution(spatial_dims, channel, channel, strides=1, kernel_size=3, norm="batch"))
            previous = channel
        self.encoder = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(previous, feature_size), nn.PReLU())
        self.head = nn.Linear(feature_size, out_size)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """(B, feature_size): the in-domain features used for FID / KID."""
        if self.input_blur > 0:
            image = gaussian_blur(image, self.input_blur)
        return self.embed(self.encoder(image).flatten(2).mean(-1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def build_predictor(spatial_dims: int, encoder: CovariateEncoder, channels: Sequence[int]) -> CovariatePredictor:
    return CovariatePredictor(spatial_dims, encoder.size - 1, channels)


def build_segmenter(spatial_dims: int, num_labels: int, channels: Sequence[int]) -> UNet:
    strides = [2] * (len(channels) - 1)
    return UNet(spatial_dims, 1, num_labels, channels=channels, strides=strides, num_res_units=1, norm="batch")


def cohort_labels(spatial_dims: int) -> dict[str, int]:
    return causal_model.BRAIN_LABELS if spatial_dims == 3 else causal_model.CHEST_LABELS


def measure(label: np.ndarray, spatial_dims: int, spacing: Sequence[float] | float = 3.0) -> dict[str, float]:
    """The causal quantities of a label map on the network grid (chest maps are loaded transposed by MONAI)."""
    label = np.asarray(label).astype(np.int64)
    if spatial_dims == 3:
        return brain_phantom.measure_brain(label, spacing)
    return chest_phantom.measure_chest(label.T)


# ----------------------------------------------------------------------------------------------------------------
# Predictions back to covariate values
# ----------------------------------------------------------------------------------------------------------------


def prediction_loss(encoder: CovariateEncoder, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over covariates: MSE (continuous, normalised), BCE (binary), CE (categorical)."""
    loss = output.new_zeros(())
    for name, spec in encoder.schema.items():
        start, stop = encoder.describe()["layout"][name]["slice"]
        if spec["type"] == "continuous":
            loss = loss + 10.0 * F.mse_loss(output[:, start], target[:, start])
        elif spec["type"] == "binary":
            loss = loss + F.binary_cross_entropy_with_logits(output[:, start], target[:, start])
        else:
            loss = loss + F.cross_entropy(output[:, start:stop], target[:, start:stop].argmax(1))
    return loss


def decode_predictions(encoder: CovariateEncoder, output: torch.Tensor) -> list[dict[str, Any]]:
    """Covariate values predicted for each image, plus ``<name>_prob`` (probability of the second category)."""
    layout = encoder.describe()["layout"]
    rows: list[dict[str, Any]] = [{} for _ in range(output.shape[0])]
    for name, spec in encoder.schema.items():
        start, stop = layout[name]["slice"]
        for row, values in zip(rows, output[:, start:stop].float().cpu()):
            if spec["type"] == "continuous":
                low, high = (float(v) for v in spec["range"])
                row[name] = low + min(max(float(values[0]), 0.0), 1.0) * (high - low)  # inside the schema range
            elif spec["type"] == "binary":
                probability = float(torch.sigmoid(values[0]))
                row[name], row[f"{name}_prob"] = spec["categories"][int(probability > 0.5)], probability
            else:
                row[name] = spec["categories"][int(values.argmax())]
    return rows


def same_value(spec: Mapping[str, Any], a: Any, b: Any) -> bool:
    """Equality of covariate values as the encoder sees them (binary 0/1 vs category names)."""
    if spec["type"] == "binary":
        categories = [str(c) for c in spec["categories"]]
        index = lambda v: categories.index(str(v)) if str(v) in categories else int(float(v))  # noqa: E731
        return index(a) == index(b)
    return str(a) == str(b)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def load_cohort_split(
    datalist: str,
    key: str,
    encoder: CovariateEncoder,
    transform: Callable[[dict], dict],
    image_size: Sequence[int],
    with_labels: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """Images (N, 1, *image_size) through the bundle preprocessing, label maps (N, 1, ...) and encoded covariates."""
    records = load_datalist(datalist, key)[:limit]
    if not records:
        raise ValueError(f"{datalist}: '{key}' has no records; the evaluators need a cohort with both splits.")
    images, labels, targets = [], [], []
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    for index, record in enumerate(records):
        where = f"{datalist}, record {index} of '{key}' ({record.get('image')})"
        targets.append(encoder.encode(record, source=where)[:-1])
        images.append(torch.as_tensor(transform(dict(record))["image"]).float())
        if tuple(images[-1].shape[1:]) != tuple(image_size):
            raise ValueError(f"{where}: preprocessed image has shape {tuple(images[-1].shape[1:])}, not image_size.")
        if with_labels:
            if not record.get("label"):
                raise ValueError(f"{where}: no 'label' map; the segmenter is trained on the cohort's label maps.")
            label = torch.as_tensor(np.asarray(loader(record["label"]))).long()
            if tuple(label.shape[1:]) != tuple(image_size):
                raise ValueError(
                    f"{where}: label map {record['label']} has shape {tuple(label.shape[1:])}, but the network grid "
                    f"(image_size) is {tuple(image_size)}; generate the cohort with shape = image_size."
                )
            labels.append(label)
    return {
        "records": records,
        "images": torch.stack(images),
        "labels": torch.stack(labels) if with_labels else None,
        "targets": torch.stack(targets),
    }


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = AUGMENT_BLUR_MAX_SIGMA):
    """Gaussian blur with a random sigma per batch (half of the batches stay sharp)."""
    if torch.rand((), generator=generator) < 0.5:
        return images
    return gaussian_blur(images, float(torch.rand((), generator=generator)) * max_sigma + 0.2)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, 1, ...) batch, edges replicated."""
    radius = max(1, int(round(2 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    spatial_dims = images.dim() - 2
    conv = F.conv3d if spatial_dims == 3 else F.conv2d
    out = images
    for axis in range(spatial_dims):
        shape = [1, 1] + [1] * spatial_dims
        shape[2 + axis] = len(kernel)
        pad = [0] * (2 * spatial_dims)
        pad[2 * (spatial_dims - 1 - axis)] = pad[2 * (spatial_dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.reshape(shape))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batch_norm(network: nn.Module, images: torch.Tensor, batch_size: int, device) -> None:
    """Recompute BatchNorm running statistics as exact averages over the (unaugmented) training images.

    Running averages collected during training lag the weights and include augmented batches; with small cohorts
    that shifts eval-mode outputs (measured: a constant +0.35 offset on the normalised age).
    """
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average
    network.train()
    for start in range(0, len(images), batch_size):
        network(images[start : start + batch_size].to(device))
    network.eval()


def _batches(count: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def fit(
    network: nn.Module,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    name: str = "network",
) -> list[float]:
    """Adam with a cosine schedule and blur augmentation, then BatchNorm recalibration; returns the loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, epochs))
    history = []
    network.to(device).train()
    started = time.perf_counter()
    for epoch in range(epochs):
        total = 0.0
        for index in _batches(len(images), batch_size, generator):
            batch = random_blur(images[index], generator).to(device)
            loss = loss_function(network(batch), targets[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        schedule.step()
        history.append(total / len(images))
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == epochs:
            print(f"{name}: epoch {epoch + 1}/{epochs}, loss {history[-1]:.4f}, {time.perf_counter() - started:.0f} s")
    recalibrate_batch_norm(network, images, batch_size, device)
    return history


def fit_predictor(
    predictor: CovariatePredictor,
    encoder: CovariateEncoder,
    images: torch.Tensor,
    targets: torch.Tensor,
    epochs: int,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train the covariate predictor on encoded covariate targets (see `prediction_loss`)."""
    loss = lambda output, target: prediction_loss(encoder, output, target)  # noqa: E731
    return fit(predictor, loss, images, targets, epochs, batch_size, learning_rate, seed, device, "predictor")


def fit_segmenter(
    segmenter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int = 8,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train the segmenter on label maps with Dice + cross-entropy."""
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    return fit(segmenter, loss, images, labels, epochs, batch_size, learning_rate, seed, device, "segmenter")


@torch.inference_mode()
def predict(predictor: CovariatePredictor, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    device = next(predictor.parameters()).device
    predictor.eval()
    return torch.cat(
        [predictor(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    )


@torch.inference_mode()
def features(predictor: CovariatePredictor, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    device = next(predictor.parameters()).device
    predictor.eval()
    chunks = [
        predictor.features(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).double()


@torch.inference_mode()
def segment(segmenter: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N, 1, ...) label maps."""
    device = next(segmenter.parameters()).device
    segmenter.eval()
    chunks = [
        segmenter(images[i : i + batch_size].to(device)).argmax(1, keepdim=True).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def predictor_scores(encoder: CovariateEncoder, records: Sequence[Mapping], output: torch.Tensor) -> dict[str, float]:
    """Held-out scores per covariate: age MAE in its unit, accuracy (and AUC for binaries) for the others."""
    predictions = decode_predictions(encoder, output)
    scores: dict[str, float] = {}
    for name, spec in encoder.schema.items():
        truth = [record[name] for record in records]
        guess = [row[name] for row in predictions]
        if spec["type"] == "continuous":
            scores[f"{name}_mae"] = float(np.mean([abs(float(a) - float(b)) for a, b in zip(truth, guess)]))
            mean = float(np.mean([float(a) for a in truth]))  # what predicting the average would score
            scores[f"{name}_mae_of_mean_guess"] = float(np.mean([abs(float(a) - mean) for a in truth]))
        else:
            scores[f"{name}_accuracy"] = float(np.mean([same_value(spec, a, b) for a, b in zip(truth, guess)]))
            if spec["type"] == "binary":
                positive = [float(not same_value(spec, t, spec["categories"][0])) for t in truth]
                if 0 < sum(positive) < len(positive):
                    probs = torch.tensor([row[f"{name}_prob"] for row in predictions])
                    scores[f"{name}_auc"] = float(compute_roc_auc(probs, torch.tensor(positive)))
    return scores


def segmenter_scores(predicted: torch.Tensor, truth: torch.Tensor, spatial_dims: int, spacing) -> dict[str, Any]:
    """Held-out Dice per label and the mean absolute (relative) error of each measured quantity."""
    labels = cohort_labels(spatial_dims)
    dice = {}
    for name, value in labels.items():
        if value == 0:
            continue
        p, t = predicted == value, truth == value
        denominator = float(p.sum() + t.sum())
        if denominator:
            dice[name] = 2.0 * float((p & t).sum()) / denominator
    errors: dict[str, list[float]] = {}
    for p, t in zip(predicted, truth):
        measured, true = measure(p[0].numpy(), spatial_dims, spacing), measure(t[0].numpy(), spatial_dims, spacing)
        for key in true:
            errors.setdefault(f"{key}_abs_error", []).append(abs(measured[key] - true[key]))
            if spatial_dims == 3 and true[key] > 0:
                errors.setdefault(f"{key}_rel_error", []).append(abs(measured[key] - true[key]) / true[key])
    return {
        "dice": dice,
        "mean_dice": float(np.mean(list(dice.values()))),
        **{k: float(np.mean(v)) for k, v in errors.items()},
    }


def train_evaluators(
    datalist: str,
    encoder: CovariateEncoder,
    transform: Callable[[dict], dict],
    image_size: Sequence[int],
    spatial_dims: int,
    output_dir: str,
    predictor_channels: Sequence[int] = (16, 32, 64, 96),
    segmenter_channels: Sequence[int] = (16, 32, 64),
    predictor_epochs: int = 40,
    segmenter_epochs: int = 30,
    batch_size: int = 16,
    spacing: Sequence[float] | float = 3.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train predictor and segmenter on `training`, score them on `validation`, write weights and the JSON report."""
    if predictor_epochs < 1 or segmenter_epochs < 1:
        raise ValueError("predictor_epochs and segmenter_epochs must be at least 1.")
    folder = Path(output_dir)
    started = time.perf_counter()
    train = load_cohort_split(datalist, "training", encoder, transform, image_size)
    held_out = load_cohort_split(datalist, "validation", encoder, transform, image_size)
    torch.manual_seed(seed)
    predictor = build_predictor(spatial_dims, encoder, predictor_channels)
    predictor_loss = fit_predictor(
        predictor, encoder, train["images"], train["targets"], predictor_epochs, batch_size, seed=seed, device=device
    )
    predictor_time = time.perf_counter() - started
    predictor_held_out = predictor_scores(encoder, held_out["records"], predict(predictor, held_out["images"]))
    print(f"evaluators: predictor held-out {predictor_held_out} ({predictor_time:.0f} s); training the segmenter")
    num_labels = max(cohort_labels(spatial_dims).values()) + 1
    segmenter = build_segmenter(spatial_dims, num_labels, segmenter_channels)
    segmenter_loss = fit_segmenter(
        segmenter, train["images"], train["labels"], segmenter_epochs, max(2, batch_size // 2), seed=seed, device=device
    )
    report = {
        "datalist": str(datalist),
        "num_training": len(train["records"]),
        "num_held_out": len(held_out["records"]),
        "held_out_subjects": sorted({str(r.get("subject")) for r in held_out["records"]}),
        "predictor": {
            "channels": list(predictor_channels),
            "epochs": predictor_epochs,
            "final_loss": predictor_loss[-1],
            "held_out": predictor_held_out,
            "seconds": round(predictor_time, 1),
        },
        "segmenter": {
            "channels": list(segmenter_channels),
            "epochs": segmenter_epochs,
            "final_loss": segmenter_loss[-1],
            "held_out": segmenter_scores(
                segment(segmenter, held_out["images"]), held_out["labels"], spatial_dims, spacing
            ),
            "seconds": round(time.perf_counter() - started - predictor_time, 1),
        },
        "covariate_schema": encoder.schema,
        "image_size": list(image_size),
    }
    atomic_write(folder / "predictor.pt", lambda tmp: torch.save(predictor.state_dict(), tmp), ".pt")
    atomic_write(folder / "segmenter.pt", lambda tmp: torch.save(segmenter.state_dict(), tmp), ".pt")
    atomic_write_json(report, folder / "evaluators.json")
    print(f"evaluators: predictor {report['predictor']['held_out']}, segmenter mean Dice "
          f"{report['segmenter']['held_out']['mean_dice']:.3f} (held-out subjects), written to {folder}")  # fmt: skip
    return report


def load_evaluators(
    folder: str, encoder: CovariateEncoder, spatial_dims: int, predictor_channels, segmenter_channels, device="cpu"
) -> tuple[CovariatePredictor, nn.Module, dict[str, Any]]:
    """The trained predictor and segmenter of `folder` (as written by `train_evaluators`) and their report."""
    folder_path = Path(folder)
    missing = [n for n in ("predictor.pt", "segmenter.pt", "evaluators.json") if not (folder_path / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"evaluator folder '{folder}' lacks {missing}: train them first with configs/train_evaluators.json "
            "(same presets and overrides), or set evaluator_dir."
        )
    report = json.loads((folder_path / "evaluators.json").read_text())
    if report.get("covariate_schema") != encoder.schema:
        raise ValueError(f"{folder}/evaluators.json was trained for another covariate_schema; retrain the evaluators.")
    predictor = build_predictor(spatial_dims, encoder, predictor_channels)
    segmenter = build_segmenter(spatial_dims, max(cohort_labels(spatial_dims).values()) + 1, segmenter_channels)
    for network, name in ((predictor, "predictor.pt"), (segmenter, "segmenter.pt")):
        state = torch.load(folder_path / name, map_location="cpu", weights_only=True)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{folder}/{name} does not fit the configured evaluator channels: {error}") from None
        network.to(device).eval()
    return predictor, segmenter, report
