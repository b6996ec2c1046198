"""The drift search of the paper (Sec. 3.4): delta* = argmin_delta L1(D_theta(. | delta), D_real), on a grid.

For each delta on the grid, the model samples one image per real record, under that record's covariates and from
the same seeded noise for every delta (common random numbers: the curve's differences come from delta, not from
sampling luck). The Monte Carlo distance between generated and real images is reported three ways:

- `paired_l1`: mean |G_i - x_i| between the sample drawn under record i's covariates and record i's image (the
  default criterion: generated and real images with the same covariates);
- `nearest_l1`: mean over samples of the L1 distance to the closest real image (how real each sample looks);
- `mean_image_l1`: |mean(G) - mean(x)| averaged over voxels (the population's average appearance).

Outputs (written all-or-nothing into `output_dir`): `delta_search.json` (curve, chosen delta, settings),
`delta_search.png` (the curves) and `delta_search_samples.png` (record 0's sample at each delta).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from scripts.core.covariates import CovariateEncoder
from scripts.core.drift import LatentDrift
from scripts.core.sampling import sample_latents
from scripts.io.datalist import load_datalist
from scripts.io.files import staged_folder
from scripts.io.pictures import mid_slices

CRITERIA = ("paired_l1", "nearest_l1", "mean_image_l1")


def check_grid(deltas: Sequence[float]) -> list[float]:
    values = [float(d) for d in deltas]
    if not values or not all(math.isfinite(d) for d in values):
        raise ValueError(f"delta_grid must be a non-empty list of finite numbers, got {list(deltas)!r}.")
    return values


def load_real_records(
    datalist: str, key: str, encoder: CovariateEncoder, transform: Callable[[dict], dict], num_records: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first `num_records` images of `datalist[key]` (preprocessed to the network grid) and their conditions."""
    if num_records < 1:
        raise ValueError(f"num_records must be at least 1, got {num_records}.")
    records = load_datalist(datalist, key)[:num_records]
    for index, record in enumerate(records):
        if not Path(record["image"]).is_file():
            raise FileNotFoundError(f"{datalist}: record {index} of '{key}': no image file at {record['image']!r}.")
        encoder.encode(record, source=f"{datalist}, record {index} of '{key}' ({record['image']})")
    items = [transform(dict(record)) for record in records]
    images = torch.stack([torch.as_tensor(item["image"]).float() for item in items])
    conditions = torch.stack([encoder.encode(record).reshape(1, -1) for record in records]).float()
    return images, conditions, [str(record["image"]) for record in records]


def distances(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """The three Monte Carlo L1 distances between generated and real image batches of the same shape."""
    flat_generated, flat_real = generated.flatten(1), real.flatten(1)
    pairwise = torch.cdist(flat_generated, flat_real, p=1) / flat_real.shape[1]
    return {
        "paired_l1": float((flat_generated - flat_real).abs().mean()),
        "nearest_l1": float(pairwise.min(1).values.mean()),
        "mean_image_l1": float((flat_generated.mean(0) - flat_real.mean(0)).abs().mean()),
    }


@torch.inference_mode()
def find_delta(
    model: Any,
    scheduler: Any,
    encoder: CovariateEncoder,
    datalist: str,
    datalist_key: str,
    transform: Callable[[dict], dict],
    output_dir: str,
    deltas: Sequence[float],
    num_records: int = 8,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    drift_schedule: str = "paper",
    criterion: str = "paired_l1",
    batch_size: int = 8,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Sample at every delta of the grid, score against the real records, write the curve; returns the JSON."""
    deltas = check_grid(deltas)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    Path(output_dir).mkdir(parents=True, exist_ok=True)  # fails here, before any compute, if it cannot
    real, conditions, files = load_real_records(datalist, datalist_key, encoder, transform, num_records)
    device = next(model.parameters()).device
    latent_shape = model.encode(real[:1].to(device)).shape[1:]
    noise = torch.randn((len(real), *latent_shape), generator=torch.Generator().manual_seed(seed))
    curve, pictures = [], []
    for delta in deltas:
        drift = LatentDrift(delta, drift_schedule)
        images = []
        for start in range(0, len(real), batch_size):
            chunk = slice(start, start + batch_size)
            latents = sample_latents(
                model, scheduler, noise[chunk].to(device), conditions[chunk].to(device), drift=drift,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                null_condition=encoder.null().to(device), precision=precision,
            )  # fmt: skip
            images.append(model.decode(latents).float().clamp(0, 1).cpu())
        generated = torch.cat(images)
        curve.append({"delta": delta, **distances(generated, real)})
        pictures.append(generated[0, 0].numpy())
        print(f"delta {delta:+.3f}: " + ", ".join(f"{k} {v:.4f}" for k, v in curve[-1].items() if k != "delta"))
    best = min(curve, key=lambda row: row[criterion])
    result = {
        "chosen_delta": best["delta"], "criterion": criterion, "curve": curve,
        "settings": {"datalist": datalist, "datalist_key": datalist_key, "num_records": len(real), "records": files,
                     "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "drift_schedule": drift_schedule, "seed": seed},
    }  # fmt: skip
    with staged_folder(output_dir, prefix=".delta_search.") as staged:
        (staged / "delta_search.json").write_text(json.dumps(result, indent=4))
        plot_curve(curve, criterion, best["delta"]).save(staged / "delta_search.png")
        sample_strip(pictures, deltas).save(staged / "delta_search_samples.png")
    return result


def plot_curve(curve: list[dict], criterion: str, chosen: float, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """A line plot of every distance against delta (each curve min-max scaled), the chosen delta marked."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    deltas = [row["delta"] for row in curve]
    low, high = min(deltas), max(deltas)
    span = (high - low) or 1.0

    def x_of(delta: float) -> float:
        return left + (delta - low) / span * (width - left - right)

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    colours = {"paired_l1": (200, 30, 30), "nearest_l1": (30, 90, 200), "mean_image_l1": (30, 150, 60)}
    for index, name in enumerate(CRITERIA):
        values = [row[name] for row in curve]
        v_low, v_high = min(values), max(values)
        v_span = (v_high - v_low) or 1.0
        points = [(x_of(d), height - bottom - (v - v_low) / v_span * (height - top - bottom)) for d, v in
                  zip(deltas, values)]  # fmt: skip
        if len(points) > 1:
            draw.line(points, fill=colours[name], width=3 if name == criterion else 1)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[name])
        label = f"{name} [{v_low:.4f}, {v_high:.4f}]" + (" (criterion)" if name == criterion else "")
        draw.text((left + 8, top + 6 + 14 * index), label, fill=colours[name])
    draw.line([(x_of(chosen), top), (x_of(chosen), height - bottom)], fill=(120, 120, 120), width=1)
    for delta in deltas:
        draw.text((x_of(delta) - 14, height - bottom + 6), f"{delta:+.2f}", fill="black")
    draw.text((width // 2 - 90, height - 22), f"delta (chosen {chosen:+.3f})", fill="black")
    draw.text((4, top - 22), "L1 distance to real images (each curve scaled to its range)", fill="black")
    return picture


def sample_strip(pictures: list[np.ndarray], deltas: Sequence[float]) -> Image.Image:
    """Record 0's sample at each delta, side by side (mid axial slice in 3D), labelled with delta."""
    panels = [(np.clip(mid_slices(p)[0], 0, 1) * 255).astype(np.uint8) for p in pictures]
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0))) for p in panels]
    scale = max(1, 128 // height)
    strip = Image.fromarray(np.concatenate(panels, 1)).resize(
        (sum(p.shape[1] for p in panels) * scale, height * scale), Image.NEAREST
    )
    labelled = Image.new("L", (strip.width, strip.height + 16), 255)
    labelled.paste(strip, (0, 16))
    draw = ImageDraw.Draw(labelled)
    offset = 0
    for panel, delta in zip(panels, deltas):
        draw.text((offset + 2, 2), f"{delta:+.2f}", fill=0)
        offset += panel.shape[1] * scale
    return labelled
