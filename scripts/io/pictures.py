"""Pictures for people: mid slices, the diverging difference map, the counterfactual montage and the cohort montage."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def diverging(values: np.ndarray, scale: float) -> np.ndarray:
    """Signed values -> RGB: blue for negative, white for zero, red for positive (saturating at ±scale)."""
    t = np.clip(values / max(scale, 1e-8), -1, 1)
    red = np.where(t < 0, 1 + t, 1.0)
    blue = np.where(t > 0, 1 - t, 1.0)
    green = 1 - np.abs(t)
    return (np.stack([red, green, blue], -1) * 255).astype(np.uint8)


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Mid axial, coronal and sagittal slices of a RAS (X, Y, Z) volume, oriented for display; a 2D image as is."""
    if volume.ndim == 2:
        return [volume.T]
    x, y, z = (s // 2 for s in volume.shape)
    return [np.flipud(volume[:, :, z].T), np.flipud(volume[:, y, :].T), np.flipud(volume[x, :, :].T)]


def views_row(volume: np.ndarray) -> np.ndarray:
    """`mid_slices` side by side with 2-pixel gaps, each padded at the bottom to the tallest (64x80x64: two heights)."""
    views = mid_slices(volume)
    height = max(view.shape[0] for view in views)
    return np.concatenate([np.pad(view, ((0, height - view.shape[0]), (0, 2))) for view in views], 1)


def centred(panel: np.ndarray, height: int, width: int, fill: int) -> np.ndarray:
    """``panel`` (H, W, 3) in the middle of a ``height`` x ``width`` cell of ``fill``, so slices of unequal shape align."""
    top, left = (height - panel.shape[0]) // 2, (width - panel.shape[1]) // 2
    cell = np.full((height, width, 3), fill, dtype=np.uint8)
    cell[top : top + panel.shape[0], left : left + panel.shape[1]] = panel
    return cell


def counterfactual_montage(
    path: Path,
    original: torch.Tensor,
    counterfactual: torch.Tensor,
    difference: torch.Tensor,
    window: Sequence[float],
    mask: torch.Tensor | None = None,
) -> str:
    """
    A PNG for people: rows = views (3 mid slices in 3D), columns = input | counterfactual | difference (blue darker,
    red brighter, saturating at a quarter of the intensity window) | edit mask (if given). Every slice sits centred in
    a cell of the largest slice's size, filled with its panel's background (black, white for the difference), so the
    columns line up when the views differ in shape.
    """
    low, high = window
    volumes = [original, counterfactual, difference] + ([mask] if mask is not None else [])
    views = list(zip(*(mid_slices(volume[0].numpy()) for volume in volumes)))
    height = max(v.shape[0] for slices in views for v in slices)
    width = max(v.shape[1] for slices in views for v in slices)
    rows = []
    for slices in views:
        gray = [np.clip((v - low) / (high - low), 0, 1) for v in slices[:2]] + [np.clip(v, 0, 1) for v in slices[3:]]
        panels = [centred(np.repeat((g * 255).astype(np.uint8)[..., None], 3, -1), height, width, 0) for g in gray]
        panels.insert(2, centred(diverging(slices[2], 0.25 * (high - low)), height, width, 255))
        rows.append(np.concatenate([np.pad(p, ((0, 2), (0, 2), (0, 0))) for p in panels], 1))
    picture = np.concatenate(rows, 0)
    scale = max(1, -(-384 // picture.shape[0]))  # at least 384 px tall
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)
    return str(path)


def tile(volume: np.ndarray, scale: int, height: int) -> np.ndarray:
    """The three mid slices side by side, intensity-scaled to uint8 by the 99.5th percentile, ``scale``x enlarged."""
    top = float(np.percentile(volume, 99.5)) or 1.0
    tiles = []
    for image in mid_slices(volume):
        image = np.clip(image / top, 0.0, 1.0)
        image = np.pad(image, ((0, height - image.shape[0]), (0, 2)))
        tiles.append(np.kron(image, np.ones((scale, scale))))
    return np.round(np.concatenate(tiles, axis=1) * 255.0).astype(np.uint8)


def captioned(row: np.ndarray, text: str, caption: int = 14):
    from PIL import Image, ImageDraw

    tile = Image.new("L", (row.shape[1], row.shape[0] + caption), 0)
    ImageDraw.Draw(tile).text((4, 1), text, fill=255)
    tile.paste(Image.fromarray(row), (0, caption))
    return tile


def cohort_montage(
    cohort_dir: str | os.PathLike,
    output_path: str | os.PathLike,
    max_subjects: int = 8,
    scale: int = 2,
    columns: int = 2,
) -> str:
    """Subjects (the first ``max_subjects`` of ``datalist.json``, visit 0) in ``columns`` columns, each the three mid
    slices under a caption of its covariates. Returns ``output_path``."""
    import nibabel as nib
    from PIL import Image

    cohort_dir = Path(cohort_dir)
    datalist = json.loads((cohort_dir / "datalist.json").read_text())
    records = [r for section in datalist.values() for r in section if r.get("visit", 0) == 0]
    records = sorted(records, key=lambda r: r["subject"])[:max_subjects]
    if not records:
        raise ValueError(f"{cohort_dir / 'datalist.json'} lists no visit-0 scans to show.")
    volumes = [np.asarray(nib.load(str(cohort_dir / r["image"])).dataobj, dtype=np.float32) for r in records]
    height = max(max(s.shape[0] for s in mid_slices(v)) for v in volumes)
    tiles = [
        captioned(tile(v, scale, height), f"{r['subject']}  age {r['age']:.0f}  {r['sex']}  {r['diagnosis']}")
        for v, r in zip(volumes, records)
    ]
    width, tile_height = max(t.width for t in tiles), tiles[0].height
    rows = -(-len(tiles) // columns)
    canvas = Image.new("L", (columns * width, rows * tile_height), 0)
    for index, tile in enumerate(tiles):
        canvas.paste(tile, ((index % columns) * width, (index // columns) * tile_height))
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(str(output_path))
    return str(output_path)
