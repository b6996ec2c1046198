"""MONAI Label infer task: the bundle's counterfactual (configs/inference.json) through monailabel's BundleInferTask."""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from monai.bundle import ConfigParser
from monai.transforms import DeleteItemsd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask
from monailabel.utils.others.generic import device_map

KEEP = "source"  # a target covariate option with this value keeps the source value
TARGET_PREFIX = "target_"  # scripts.core.covariates.TARGET_PREFIX: the app reads it before loading the bundle
# Bundle parameters (configs/inference.json) exposed as MONAI Label options; the request may override each.
OPTIONS = ("strength", "inference_delta", "guidance_scale", "num_inference_steps", "seed", "num_samples")


class CounterfactualRequestError(HTTPException, ValueError):
    """A request refused before any compute (bad covariate, option or image); the server answers 422 with it."""

    def __init__(self, message: str) -> None:
        super().__init__(422, message)
        self.args = (message,)

    def __str__(self) -> str:
        return self.detail

    def __reduce__(self) -> tuple:  # pickles (and copies) as the one message it was made from
        return type(self), (self.detail,)


class CounterfactualBundleConstants(BundleConstants):
    """Where BundleInferTask finds this bundle's parts: inference.json's transforms include the target encoder."""

    def __init__(self) -> None:
        self.model_file = "model.pt"  # relative to models/; set from the config's model_path once it is read

    def configs(self) -> Sequence[str]:
        return ["inference.json"]

    def model_pytorch(self) -> str:
        return self.model_file

    def key_preprocessing(self) -> Sequence[str]:
        return ["inference#transforms"]


class CounterfactualInferTask(BundleInferTask):
    """
    The bundle's counterfactual (abduction -> action -> prediction) as a MONAI Label infer task.

    BundleInferTask reads the bundle: network_def, weights from models/, the pre-processing, the inferer and the
    post-processing. Four things differ from a segmentation bundle, hence the subclass:

    - the config is inference.json (standalone: the brain preset) with the modality preset layered on top;
    - a counterfactual needs the scan's source covariates and the target covariates, so each request is resolved
      into the bundle's checked record (`counterfactual_records`, before any compute) and the inferer gets the
      encoded source and target conditions (`evaluator#prepare_batch`), not the image alone;
    - the bundle's parameters (strength, δ, guidance, steps, seed, samples) and one target option per covariate are
      MONAI Label options, applied to the bundle config per request;
    - the bundle's post-processing already inverts the pre-processing (Invertd) and writes the counterfactual in
      the input's space and intensities, with its difference map, montage and JSON record, into `results_dir`;
      the task returns a temporary copy of the counterfactual (the server deletes what it sends) and the record.

    Args:
        path: the bundle root (holds configs/, models/, scripts/).
        conf: the app's configuration (MONAI Label `--conf` pairs).
        preset: the modality preset, configs/<preset>.json: "brain_mri_3d" or "chest_xray_2d".
        results_dir: where the bundle writes each request's outputs.
        datalist: optional MONAI datalist whose records give the source covariates of images that the request
            names without them (records are matched by path, then by file name; every section is searched).
    """

    def __init__(
        self,
        path: str,
        conf: Mapping[str, str],
        preset: str = "brain_mri_3d",
        results_dir: str | None = None,
        datalist: str | None = None,
    ) -> None:
        path = os.path.abspath(path)
        self.preset = preset
        self.results_dir = os.path.abspath(results_dir or os.path.join(path, "eval", "monailabel", preset))
        self.datalist = datalist
        self._lock = threading.Lock()  # options are applied to the one bundle config: one request at a time
        if not os.path.isfile(os.path.join(path, "configs", f"{preset}.json")):
            raise FileNotFoundError(f"{path}: no modality preset configs/{preset}.json in this bundle.")
        super().__init__(
            path,
            dict(conf),
            const=CounterfactualBundleConstants(),
            type=InferType.OTHERS,
            add_post_restore=False,  # the bundle's Invertd already puts the result on the input grid
            load_strict=True,
            model_state_dict="state_dict",  # the bundle's weights format (scripts/io/weights.py) nests the state dict
        )
        if not self.valid:
            raise FileNotFoundError(
                f"{path}: no configs/inference.json or no weights at models/{self.const.model_pytorch()}."
            )
        self._config.pop("model_filename", None)  # models/ also holds the autoencoder, which is not a choice
        with self._bundle_on_path():
            # the bundle's own initialize: image size check, seeding, weights (sha256 checked for shipped files)
            self.bundle_config.get_parsed_content("initialize")
            self.schema = self.bundle_config.get_parsed_content("covariate_encoder").schema
            self.dimension = self.bundle_config.get_parsed_content("spatial_dims")
            self._config.update(self._default_options())
        self.bundle_config["results_dir"] = self.results_dir  # the app's option, not the request's
        names = ", ".join(self.schema)
        self.description = f"Latent Drift counterfactual ({preset}): the scan under target covariates ({names})"

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        """inference.json + the preset on top, merged as the bundle CLI does, with bundle_root = `path`."""
        parser = ConfigParser()
        configs = [os.path.join(path, "configs", name) for name in (config, f"{self.preset}.json")]
        parser.read_config(configs)
        parser.config.update({self.const.key_bundle_root(): path})
        model_path = parser.get_parsed_content("model_path")
        self.const.model_file = os.path.relpath(model_path, os.path.join(path, "models"))
        return parser

    def _default_options(self) -> dict[str, Any]:
        """
        The MONAI Label options: `target_<covariate>` for each covariate (a list is a choice whose first entry is the
        default, as MONAI Label clients show it; "source" keeps the source value), then the bundle parameters. The
        defaults come from the bundle config: its `target`; inference_delta None runs at the δ the weights were
        trained with.
        """
        target = self.bundle_config.get_parsed_content("target")
        options: dict[str, Any] = {}
        for name, spec in self.schema.items():
            default = target.get(name, KEEP)
            if spec["type"] == "continuous":
                options[TARGET_PREFIX + name] = default
            else:
                options[TARGET_PREFIX + name] = [default] + [c for c in [KEEP, *spec["categories"]] if c != default]
        for key in OPTIONS:
            options[key] = self.bundle_config.get_parsed_content(key)
        return options

    def __call__(self, request: Mapping[str, Any], callbacks: Any = None) -> tuple[str | None, dict]:
        with self._lock:
            record = self._resolve(request)
            return super().__call__({**request, **record}, callbacks)

    def _resolve(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """
        The request as the bundle's one checked record (`counterfactual_records`, the function behind `records` in
        inference.json: image readable and of the model's dimension, covariates known and in range, results_dir
        writable), with its options applied to the bundle config. Any problem raises CounterfactualRequestError
        before compute, so nothing is written.

        Only numbers reach the config: the config parser evaluates "$..." strings and instantiates "_target_" dicts,
        so the request's covariates and image go to the bundle's function as data, never into the config.
        """
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise CounterfactualRequestError("image: give the path (or datastore id) of one scan.")
        _check_device(request.get("device"))
        named = self._target(request)
        target = named if named is not None else self._target(self._config)
        source = request.get("source")
        if source is None:
            source = self._source_from_datalist(image)
        if source is None:
            listed = f"it is not in the datalist {self.datalist}" if self.datalist else "the app has no datalist"
            raise CounterfactualRequestError(
                f"source: the covariates of {image} are missing ({listed}): pass them in the request, e.g. "
                f"'source': {{{', '.join(repr(name) + ': ...' for name in self.schema)}}}."
            )
        settings = {key: _option(key, request.get(key, self._config[key])) for key in OPTIONS}
        for key, value in settings.items():
            self.bundle_config[key] = value
        with self._bundle_on_path():
            counterfactual_records = importlib.import_module("scripts.io.inputs").counterfactual_records
            try:
                encoder = self.bundle_config.get_parsed_content("covariate_encoder")
                (record,) = counterfactual_records(
                    encoder, image, source, target, None, results_dir=self.results_dir, spatial_dims=self.dimension
                )
                self.bundle_config.get_parsed_content("inferer")  # checks strength, steps, samples...
            except (ValueError, OSError, RuntimeError) as error:  # MONAI wraps config errors: report the cause
                cause = importlib.import_module("scripts").root_cause(error)
                raise CounterfactualRequestError(str(cause)) from error
        return {**record, **settings}

    def _target(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        """
        The target covariates a request names: a `target` dict and/or `target_<covariate>` options (a list counts
        as its first entry, "source" or an empty value keeps the source value); None when it names none.
        """
        target = request.get("target")
        if target is not None:
            with self._bundle_on_path():
                parse_covariates = importlib.import_module("scripts.core.covariates").parse_covariates
            try:
                target = parse_covariates(target, "target")
            except ValueError as error:
                raise CounterfactualRequestError(str(error)) from None
        flat = {k[len(TARGET_PREFIX) :]: v for k, v in request.items() if str(k).startswith(TARGET_PREFIX)}
        unknown = sorted(set(flat) - set(self.schema))
        if unknown:
            raise CounterfactualRequestError(
                f"unknown option(s) {[TARGET_PREFIX + u for u in unknown]}; the covariates are {list(self.schema)}."
            )
        if target is None and not flat:
            return None
        named = {**(target or {}), **flat}
        named = {k: v[0] if isinstance(v, (list, tuple)) and v else v for k, v in named.items()}
        return {k: self._typed(k, v) for k, v in named.items() if v not in (KEEP, "", None)}

    def _typed(self, name: str, value: Any) -> Any:
        """A covariate value sent as text, as the schema has it ("85" -> 85.0, "1" -> 1); others are left as given
        for the encoder to refuse by name."""
        spec = self.schema.get(name)
        if spec is None or not isinstance(value, str):
            return value
        if spec["type"] == "continuous":
            try:
                return float(value)
            except ValueError:
                return value
        return next((c for c in spec["categories"] if str(c) == value.strip()), value)

    def _source_from_datalist(self, image: str) -> dict[str, Any] | None:
        if not self.datalist:
            return None
        with self._bundle_on_path():
            load_datalist = importlib.import_module("scripts.io.datalist").load_datalist
            try:
                sections = [
                    key for key, value in json.loads(Path(self.datalist).read_text()).items() if isinstance(value, list)
                ]
                records = [record for key in sections for record in load_datalist(self.datalist, key)]
            except (OSError, ValueError) as error:
                raise CounterfactualRequestError(f"datalist {self.datalist}: {error}") from None
        wanted = os.path.realpath(image)
        match = [r for r in records if os.path.realpath(str(r["image"])) == wanted]
        match = match or [r for r in records if Path(str(r["image"])).name == Path(image).name]
        if len({str(r["image"]) for r in match}) > 1:
            raise CounterfactualRequestError(
                f"source: {len(match)} records of {self.datalist} are named {Path(image).name}; pass 'source'."
            )
        return {name: match[0][name] for name in self.schema if name in match[0]} if match else None

    def pre_transforms(self, data: Mapping[str, Any] | None = None) -> Sequence[Callable]:
        # MONAI >= 1.5 Spacingd updates every "image_*" entry as the image's metadata dict; BasicInferTask's
        # "image_path" (a str read only by the default writer, replaced here) would make it fail on NIfTI inputs.
        return [DeleteItemsd(keys="image_path"), *super().pre_transforms(data)]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict[str, Any]:
        """The bundle's inferer on the encoded source and target conditions (its evaluator's prepare_batch)."""
        inferer = self.inferer(data)
        network = self._get_network(device, data)
        with self._bundle_on_path():
            prepare_batch: Callable = self.bundle_config.get_parsed_content("evaluator#prepare_batch")
        batch = {key: data[key][None] for key in (self.input_key, "condition", "target_condition")}
        image, _, _, conditions = prepare_batch(batch, torch.device(device))
        with torch.no_grad():
            result = inferer(image, network, **conditions)  # a dict of batched outputs (see CounterfactualInferer)
            data[self.output_label_key] = {key: value[0] for key, value in result.items()}
        return data

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[str, dict]:
        """A temporary copy of the counterfactual (the server deletes the file it sends) and the bundle's record."""
        record = json.loads(Path(data["output_record"]).read_text())
        written = record["outputs"]["counterfactual"]
        suffix = ".nii.gz" if written.endswith(".nii.gz") else Path(written).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as result:
            shutil.copyfile(written, result.name)
        return result.name, record

    @contextmanager
    def _bundle_on_path(self):
        """The bundle's `scripts` package importable while the config is evaluated (as BundleInferTask does)."""
        sys.path.insert(0, self.bundle_path)
        try:
            yield
        finally:
            sys.path.remove(self.bundle_path)


def _check_device(device: Any) -> None:
    """The request's device (BundleInferTask writes it into the bundle config) must name a device of this machine."""
    if device is None:
        return
    allowed = {"cpu", "cuda", *device_map(), *device_map().values()}
    allowed |= {f"cuda:{index}" for index in range(torch.cuda.device_count())}
    names = device if isinstance(device, (list, tuple)) else [device]
    if not names or not all(isinstance(name, str) and name in allowed for name in names):
        raise CounterfactualRequestError(f"device must be one of {sorted(allowed)}, got {device!r}.")


def _option(key: str, value: Any) -> Any:
    """A request's option value as the bundle takes it (clients send text): a number, or a δ list per channel."""
    whole = key in ("num_inference_steps", "seed", "num_samples")
    if key == "inference_delta" and value in (None, "", "None", "null"):
        return None  # the δ the weights were trained with
    if isinstance(value, (list, tuple)) and key != "inference_delta":
        value = value[0] if value else None  # a MONAI Label choice: its first entry
    try:
        if isinstance(value, str):
            value = ast.literal_eval(value.strip())
        if key == "inference_delta" and isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        if isinstance(value, bool) or float(value) != float(value) or (whole and float(value) != int(value)):
            raise ValueError
        return int(value) if whole else float(value)
    except (TypeError, ValueError, SyntaxError, OverflowError):
        what = (
            "a whole number"
            if whole
            else "a number" + (" or a list, one per latent channel" if key == "inference_delta" else "")
        )
        raise CounterfactualRequestError(f"option '{key}' must be {what}, got {value!r}.") from None
