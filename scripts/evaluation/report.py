"""Evaluation reports: markdown tables, the montage and the bar plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from scripts.io.pictures import diverging, mid_slices, views_row

# ----------------------------------------------------------------------------------------------------------------
# Human views
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def markdown_report(report: Mapping[str, Any]) -> str:
    """The evaluation's tables in markdown."""
    lines = ["# Counterfactual evaluation", ""]
    s = report["settings"]
    lines += [f"{s['num_records']} scans of `{s['datalist']}` ['{s['datalist_key']}'], {report['seconds']} s.", ""]
    lines += ["## Gain over doing nothing and share of the true change", "",
              "Pooled over the scans; in brackets, per scan: median [quartiles].", "",
              "| intervention | gain over doing nothing | share of the true change | MAE where unchanged |",
              "| --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        if "gain_and_share" not in entry:
            continue
        v = entry["gain_and_share"]
        gain, share = _per_scan_cell(v["per_scan"], "gain"), _per_scan_cell(v["per_scan"], "share")
        lines.append(f"| {tag} | {v['gain_over_doing_nothing']:+.3f}{gain} | {v['share_of_true_change']:.3f}{share} | "
                     f"{v['mae_where_unchanged']:.4f} |")  # fmt: skip
    lines += ["", "## Against the oracle (image similarity to the true counterfactual)", "",
              "| intervention | compared | MAE | PSNR | SSIM | MS-SSIM |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for name, values in entry["oracle"].items():
            lines.append(
                f"| {tag} | {name} | " + " | ".join(_fmt(values[k]) for k in ("mae", "psnr", "ssim", "ms_ssim")) + " |"
            )
    lines += ["", "## Volumes (segmenter on the image vs the truth's exact label map)", "",
              "| intervention | quantity | true change | cf change | cf error | input error | "
              "segmenter error on truth |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for key, v in entry["volumes"].items():
            lines.append(f"| {tag} | {key} | {_fmt(v['true_change'])} | {_fmt(v['counterfactual_change'])} | "
                         f"{_fmt(v['counterfactual_abs_error'])} | {_fmt(v['input_abs_error'])} | "
                         f"{_fmt(v['truth_image_abs_error'])} |")  # fmt: skip
    lines += ["", "## Effectiveness (anti-causal predictor on counterfactual / truth / input)", "",
              "| intervention | score | counterfactual | truth | input | reconstruction |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, entry in report["interventions"].items():
        for key, v in entry["effectiveness"].items():
            values = " | ".join(_fmt(v[k]) for k in ("counterfactual", "truth", "input", "reconstruction"))
            lines.append(f"| {tag} | {key} | {values} |")
    lines += [
        "",
        "## Minimality, reversibility, realism",
        "",
        "| intervention | score | value |",
        "| --- | --- | --- |",
    ]
    for tag, entry in report["interventions"].items():
        for key, value in entry["minimality"].items():
            lines.append(f"| {tag} | minimality: {key} | {_fmt(value)} |")
        for key, value in entry.get("reversibility", {}).get("counterfactual_vs_input", {}).items():
            lines.append(f"| {tag} | reversibility: {key} | {_fmt(value)} |")
        for who, values in entry["realism"].items():
            lines.append(f"| {tag} | realism of {who}: FID / KID | {_fmt(values['fid'])} / {_fmt(values['kid'])} |")
    r = report["realism_of_inputs"]
    lines.append(f"| (all) | realism of the real inputs: FID / KID | {_fmt(r['fid'])} / {_fmt(r['kid'])} |")
    if "composition" in report:
        for name, values in report["composition"].items():
            lines.append(
                f"| (null intervention) | composition: {name} MAE / SSIM | "
                f"{_fmt(values['mae'])} / {_fmt(values['ssim'])} |"
            )
    if "utility" in report:
        u = report["utility"]
        lines += ["", f"## Utility ({u['num_training_images']} training images, scored on the real scans above)", "",
                  "| trained on | " + " | ".join(u["trained_on_real"]) + " |",
                  "| --- | " + " | ".join("---" for _ in u["trained_on_real"]) + " |"]  # fmt: skip
        for name in ("trained_on_synthetic", "trained_on_real"):
            lines.append(
                f"| {name} | " + " | ".join(_fmt(u[name].get(k, float("nan"))) for k in u["trained_on_real"]) + " |"
            )
    lines += ["", "Evaluators (held-out subjects): " + json.dumps(report["evaluators"]["held_out"]["predictor"]), ""]
    return "\n".join(lines)


def compositions_markdown(report: Mapping[str, Any]) -> str:
    """The composition table as markdown: one row per variant and intervention."""
    lines = ["# Compositions against the oracle", "",
             f"{report['settings']['num_records']} scans of `{report['settings']['datalist_key']}`; "
             f"recommended: **{report['recommended']['variant']}** (highest mean gain over doing nothing among the "
             f"variants keeping >= {report['settings']['min_share_kept']:g}x the share of the true change of "
             f"`{report['settings'].get('share_floor_variant', 'none')}`). "
             "`autoencoder_ceiling` is not a choice: it adds the autoencoder's rendering of the true change "
             "to the input (x + D(E(x*)) - D(E(x))), the most any model on these autoencoder weights can show. "
             "Nor is `identifiable_ceiling`: the oracle's per-voxel median over the factors the input does not show "
             "(where an added finding would lie), the most any model can infer from the input alone. "
             "Nor is `autoencoder_alone`: the input through the autoencoder, D(E(x)), with no model; the raw decode "
             "(`none`) carries the same reconstruction error, so its share above this row's is the model's.", "",
             "Volumes (with trained evaluators): the segmenter's reading of each output against the oracle's exact "
             "label map of the truth, as median relative error (the untouched input's in brackets) and the share of "
             "the true change made. Gain and share are pooled over the scans; in brackets, per scan: median "
             "[lower, upper quartile].", "",
             "| intervention | variant | MAE to truth | gain over doing nothing | MAE where unchanged | share of true "
             "change | mask Dice | mask fraction | effectiveness | volumes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for tag, table in report["interventions"].items():
        for name, v in table.items():
            scan = v.get("per_scan") or {}
            gain, share = _per_scan_cell(scan, "gain"), _per_scan_cell(scan, "share")
            lines.append(f"| {tag} | {name} | {v['mae_to_truth']:.4f} | {v['gain_over_doing_nothing']:+.3f}{gain} | "
                         f"{v['mae_where_unchanged']:.4f} | {v['share_of_true_change']:.3f}{share} | "
                         f"{_fmt(v.get('mask_dice', '-'))} | {_fmt(v.get('mask_fraction', '-'))} | "
                         f"{', '.join(f'{k} {x:.2f}' for k, x in v.get('effectiveness', {}).items())} | "
                         f"{_volumes_cell(v.get('volumes', {}))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _per_scan_cell(scan: Mapping[str, Any], key: str) -> str:
    """` (median +0.04 [-0.01, +0.08])` for a per-scan score of the composition table; empty without one."""
    if not scan:
        return ""
    low, high = scan[f"{key}_quartiles"]
    return f" (median {scan[f'{key}_median']:+.3f} [{low:+.3f}, {high:+.3f}])"


def _volumes_cell(volumes: Mapping[str, Mapping[str, float]]) -> str:
    """`ventricle_ml err 9% (21%), share 0.45; ...` for the composition table."""
    return "; ".join(f"{key} err {v['median_relative_error']:.0%} ({v['input_median_relative_error']:.0%}), "
                     f"share {v['share_of_true_change']:.2f}" for key, v in volumes.items())  # fmt: skip


def write_montage(path: Path, rows: Sequence[tuple]) -> None:
    """One block per intervention (first scan): input | counterfactual | truth | cf - input | truth - input."""
    blocks = []
    for _, image, cf, truth in rows:
        for views in zip(*(mid_slices(t[0].numpy()) for t in (image, cf, truth))):
            gray = [np.repeat((np.clip(v, 0, 1) * 255).astype(np.uint8)[..., None], 3, -1) for v in views]
            panels = gray + [diverging(views[1] - views[0], 0.25), diverging(views[2] - views[0], 0.25)]
            blocks.append(np.concatenate([np.pad(p, ((0, 2), (0, 2), (0, 0))) for p in panels], 1))
    width = max(b.shape[1] for b in blocks)
    picture = np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0))) for b in blocks], 0)
    scale = max(1, -(-384 // picture.shape[1]))
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)


def reconstruction_montage(path: Path, images, reconstructions, scale: int = 3) -> None:
    """Top: up to 3 inputs, bottom: the autoencoder's reconstructions of them (mid slices, intensities 0..1)."""
    rows = [np.pad(np.concatenate([views_row(item[0].clamp(0, 1).numpy()) for item in batch[:3]], 1), ((0, 2), (0, 0)))
            for batch in (images, reconstructions)]  # fmt: skip
    picture = np.kron(np.concatenate(rows, 0), np.ones((scale, scale)))
    Image.fromarray(np.round(picture * 255).astype(np.uint8)).save(path)


def bar_plot(bars: Sequence[tuple[str, Mapping]], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """MAE to the true counterfactual per intervention: input (grey), counterfactual (blue), reconstruction (green)."""
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    keys = (("input_vs_truth", (150, 150, 150)), ("counterfactual_vs_truth", (40, 90, 200)),
            ("reconstruction_vs_truth", (60, 160, 80)))  # fmt: skip
    top = max(v[k]["mae"] for _, v in bars for k, _ in keys) or 1.0
    left, bottom, height = 50, size[1] - 60, size[1] - 100
    group = (size[0] - left - 20) / max(1, len(bars))
    draw.line([(left, bottom), (size[0] - 10, bottom)], fill="black")
    draw.text((5, 10), f"MAE to the true counterfactual (max {top:.4f})", fill="black")
    for i, (tag, values) in enumerate(bars):
        for j, (key, colour) in enumerate(keys):
            x0 = left + i * group + 10 + j * (group - 20) / 3
            x1 = x0 + (group - 20) / 3 - 4
            y0 = bottom - height * values[key]["mae"] / top
            draw.rectangle([x0, y0, x1, bottom], fill=colour)
        draw.text((left + i * group + 10, bottom + 8), tag[:40], fill="black")
    draw.text(
        (left, size[1] - 25), "grey: input   blue: counterfactual   green: autoencoder reconstruction", fill="black"
    )
    return picture
