"""A PNG montage of a brain cohort: mid axial, coronal and sagittal slices of the first visit of each subject.

python -c "from scripts.cohort_montage import write_montage; write_montage('data/cohort_brain_mni152',
    'docs/cohort_mni152_montage.png')"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["mid_slices", "write_montage"]


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through the centre of a RAS volume, as images (anterior/superior up)."""
    x, y, z = (n // 2 for n in volume.shape)
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def _tile(volume: np.ndarray, scale: int, height: int) -> np.ndarray:
    """The three mid slices side by side, intensity-scaled to uint8 by the 99.5th percentile, ``scale``x enlarged."""
    top = float(np.percentile(volume, 99.5)) or 1.0
    tiles = []
    for image in mid_slices(volume):
        image = np.clip(image / top, 0.0, 1.0)
        image = np.pad(image, ((0, height - image.shape[0]), (0, 2)))
        tiles.append(np.kron(image, np.ones((scale, scale))))
    return np.round(np.concatenate(tiles, axis=1) * 255.0).astype(np.uint8)


def _captioned(row: np.ndarray, text: str, caption: int = 14):
    from PIL import Image, ImageDraw

    tile = Image.new("L", (row.shape[1], row.shape[0] + caption), 0)
    ImageDraw.Draw(tile).text((4, 1), text, fill=255)
    tile.paste(Image.fromarray(row), (0, caption))
    return tile


def write_montage(
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
        _captioned(_tile(v, scale, height), f"{r['subject']}  age {r['age']:.0f}  {r['sex']}  {r['diagnosis']}")
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
