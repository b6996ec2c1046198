"""The bundle's weights file: one versioned format holding the state dict and what the weights were trained with.

A weights file (`models/model.pt`, `models/autoencoder.pt`, a training run's final weights) is a dict that
`torch.load(path, weights_only=True)` reads:

    {"format": "latent_drift_weights", "format_version": 1,
     "metadata": {"drift": {"delta": ..., "schedule": ...},   # the δ the weights were trained with: their owner
                  "covariate_schema": {...},                   # the schema the denoiser's condition was encoded by
                  "network": {...},                            # the config keys that shape the network
                  "reconstruction_error": {...},               # autoencoder error over the validation scans (OOD check)
                  ...},                                        # room for what later work adds
     "state_dict": {...}}

Files of the earlier format (a bare state dict) and training checkpoints (`checkpoint_last.pt`, the state dict under
"model") still load; they carry no metadata, so δ and the schedule then come from the config, as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from scripts.core.drift import LatentDrift
from scripts.io.files import atomic_write

WEIGHTS_FORMAT = "latent_drift_weights"
FORMAT_VERSION = 1
NETWORK_KEYS = (
    "spatial_dims", "image_size", "pixdim", "latent_channels", "autoencoder_channels", "unet_channels",
    "cross_attention_dim", "conditioning", "norm_num_groups", "intensity_percentiles",
)  # fmt: skip

logger = logging.getLogger(__name__)


def weights_metadata(
    drift: LatentDrift | None = None,
    covariate_schema: Mapping[str, Any] | None = None,
    network: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata block of a weights file: the drift, the covariate schema, the network's config keys, `extra`."""
    metadata: dict[str, Any] = {}
    if drift is not None:
        metadata["drift"] = {"delta": drift.values, "schedule": drift.schedule}
    if covariate_schema is not None:
        metadata["covariate_schema"] = _plain(covariate_schema)
    if network is not None:
        metadata["network"] = {key: _plain(value) for key, value in network.items() if key in NETWORK_KEYS}
    metadata.update({key: _plain(value) for key, value in extra.items() if value is not None})
    return metadata


def save_weights(path: str | Path, module: nn.Module, metadata: Mapping[str, Any] | None = None) -> None:
    """Write `module`'s state dict and `metadata` atomically in the bundle's weights format."""
    content = {
        "format": WEIGHTS_FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": dict(metadata or {}),
        "state_dict": module.state_dict(),
    }
    atomic_write(path, lambda temporary: torch.save(content, temporary), ".pt")


def read_weights(path: str | Path, checkpoint_key: str = "model") -> tuple[dict[str, torch.Tensor], dict | None]:
    """
    (state dict, metadata) of a weights file of this format, of the earlier bare-state-dict format (metadata None),
    or of a training checkpoint (its `checkpoint_key` entry; metadata None). Errors name the file.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds; the user needs the file and what to do
        if "weights_only" in str(error):  # a pickle of arbitrary objects: loading it could run code
            raise ValueError(
                f"{path}: holds Python objects besides tensors and plain values, which are not loaded (unpickling "
                "them could run code); save only the state dict, e.g. with scripts.io.weights.save_weights."
            ) from None
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"{path}: not a readable weights file ({type(error).__name__}: {reason}); it may be truncated or not "
            "saved by this bundle: download or train it again."
        ) from None
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: holds a {type(content).__name__}, not a weights dict; point model_path to weights.")
    if content.get("format") == WEIGHTS_FORMAT:
        if int(content.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"{path}: weights format version {content['format_version']} is newer than this bundle reads "
                f"({FORMAT_VERSION}); update the bundle."
            )
        return dict(content["state_dict"]), dict(content.get("metadata") or {})
    if isinstance(content.get(checkpoint_key), Mapping):  # a training checkpoint rather than a weights file
        content = content[checkpoint_key]
    if not all(isinstance(value, torch.Tensor) for value in content.values()):
        raise ValueError(f"{path}: not a state dict of tensors; point model_path to weights saved by this bundle.")
    return dict(content), None


def load_weights(
    module: nn.Module,
    path: str,
    hint: str = "",
    bundle_root: str | None = None,
    checkpoint_key: str = "model",
    adopt_drift: bool = True,
) -> nn.Module:
    """
    Load the weights at `path` into `module` with strict keys; a missing file says what to run first. When
    `bundle_root` is given and `path` is one of the bundle's shipped files listed in its `large_files.yml`, the
    file's sha256 must match before anything is loaded.

    The weights own what they were trained with: a module with a `drift` gets the weights' δ and schedule (a
    differing config value is reported and ignored), and `module.weights_info` records the file, its sha256 and
    its metadata (None for files of the earlier format, which load with a note). `adopt_drift` False (fine-tuning:
    the new training owns its δ, configs/finetune.json) keeps the module's drift and says so when the weights' differs.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no weights file at {path!r}. {hint}".strip())
    sha256 = file_sha256(path)
    expected = shipped_sha256(bundle_root, path) if bundle_root else None
    if expected is not None and sha256 != expected:
        raise ValueError(
            f"{path}: sha256 {sha256} does not match {expected} in large_files.yml; the file is damaged or was "
            "replaced: download the bundle again, or point model_path to your own weights."
        )
    state, metadata = read_weights(path, checkpoint_key)
    if (metadata or {}).get("paired") and not is_paired(module):
        hint = "The file holds a paired (longitudinal) model: add configs/paired.json to the config files. " + hint
    if "residual_scale" in state and not hasattr(module, "residual_scale"):
        hint = "The file holds a residual paired model: add configs/paired_residual.json after paired.json. " + hint
    if "denoiser.interval_gain" in state and not hasattr(getattr(module, "denoiser", None), "interval_gain"):
        hint = "The file holds an interval paired model: add configs/paired_interval.json after paired.json. " + hint
    trained_with = trained_conditioning(metadata)
    built_with = list(getattr(getattr(module, "denoiser", None), "conditioning", trained_with))
    if trained_with != built_with:
        hint = (
            f'The weights were trained with conditioning {trained_with}: set --conditioning "{trained_with}". ' + hint
        )
    _check_keys(module, state, path, _trained_shape(metadata) + hint)
    module.load_state_dict(state, strict=True)
    if metadata is None:
        logger.info(
            f"{path}: weights of the earlier format (no metadata): delta and drift_schedule come from the config"
        )
    elif isinstance(getattr(module, "drift", None), LatentDrift) and "drift" in metadata:
        trained = LatentDrift(metadata["drift"]["delta"], metadata["drift"]["schedule"])
        if adopt_drift:
            module.drift = _weights_drift(module.drift, metadata["drift"], path)
        elif trained.delta.tolist() != module.drift.delta.tolist():
            logger.info(
                f"{path}: trained at delta {metadata['drift']['delta']}; fine-tuning at the config's delta "
                f"{module.drift.delta.tolist()} ({module.drift.schedule!r})"
            )
    module.weights_info = {"path": str(path), "sha256": sha256, "metadata": metadata}
    return module


def trained_conditioning(metadata: Mapping[str, Any] | None) -> list[str]:
    """The conditioning design the weights' metadata records (files from before it was recorded: cross-attention)."""
    return list(((metadata or {}).get("network") or {}).get("conditioning") or ["cross_attention"])


def _trained_shape(metadata: Mapping[str, Any] | None) -> str:
    """`The weights record spatial_dims 3, unet_channels [64, 128, 256], ...: ` (the keys that shape the network)."""
    network = (metadata or {}).get("network") or {}
    keys = ("spatial_dims", "latent_channels", "autoencoder_channels", "unet_channels", "cross_attention_dim")
    recorded = ", ".join(f"{key} {network[key]}" for key in keys if key in network)
    return (
        f"The weights record {recorded}: set those keys (or the overlay they were trained with). " if recorded else ""
    )


def is_paired(module: nn.Module) -> bool:
    """Whether `module` is a LatentDriftModel whose denoiser takes the source latent as extra input channels."""
    denoiser = getattr(module, "denoiser", None)
    unet, autoencoder = getattr(denoiser, "unet", None), getattr(module, "autoencoder", None)
    if unet is None or autoencoder is None:
        return False
    condition_channels = denoiser.condition_size if "input_channels" in denoiser.conditioning else 0
    return unet.in_channels - condition_channels == 2 * autoencoder.latent_channels


def _weights_drift(configured: LatentDrift, saved: Mapping[str, Any], path: str) -> LatentDrift:
    drift = LatentDrift(saved["delta"], saved["schedule"])
    if configured.delta.tolist() != drift.delta.tolist() or configured.schedule != drift.schedule:
        logger.warning(
            f"{path}: the weights were trained with delta {drift.delta.tolist()} ({drift.schedule!r}); the config's "
            f"delta {configured.delta.tolist()} ({configured.schedule!r}) is ignored. Set inference_delta / "
            "inference_drift_schedule to run at another drift."
        )
    return drift


def _check_keys(module: nn.Module, weights: Mapping[str, torch.Tensor], path: str, hint: str) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    reshaped = [k for k in sorted(set(own) & set(weights)) if tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or reshaped:
        examples = [f"missing {k}" for k in missing[:2]] + [f"unexpected {k}" for k in unexpected[:2]]
        examples += [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:2]]
        raise ValueError(
            f"{path} does not fit the network built from the config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(reshaped)} differently shaped tensors, e.g. {'; '.join(examples)}). The weights were "
            "trained with other settings: use the preset they were trained with (spatial_dims, autoencoder_channels, "
            "latent_channels, unet_channels, covariate_schema...), or retrain. " + hint
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shipped_sha256(bundle_root: str, path: str) -> str | None:
    """The sha256 that the bundle's large_files.yml lists for `path`, or None if it lists no such file."""
    listing = Path(bundle_root) / "large_files.yml"
    if not listing.is_file():
        return None
    entries = yaml.safe_load(listing.read_text()).get("large_files", [])
    target = Path(path).resolve()
    for entry in entries:
        if (Path(bundle_root) / entry["path"]).resolve() == target:
            if entry.get("hash_type", "sha256") != "sha256":
                raise ValueError(f"large_files.yml: {entry['path']} must use hash_type sha256.")
            return str(entry["hash_val"]).lower()
    return None


def _plain(value: Any) -> Any:
    """Config values (tensors, tuples, nested dicts) as plain Python that weights_only loading accepts."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
