"""The covariate schema and its encoder: covariates as the conditioning vector the network reads."""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Transform

COVARIATE_TYPES = ("continuous", "binary", "categorical")

# Keys of a record that hold the source / target covariates of a counterfactual or a longitudinal pair.
SOURCE_PREFIX, TARGET_PREFIX = "source_", "target_"


def parse_covariates(value: Any, name: str) -> dict[str, Any]:
    """
    Covariates given as a dict or as its text, the one parser of the CLI, MONAI Label and the Deploy app: a Python
    literal such as "{'age': 85}" or JSON such as '{"age": 85}'; None or "" is no covariates. Errors name the field.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{name} must be a dict such as \"{{'age': 85}}\", got {value!r}.") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict of covariates, got {value!r}.")
    return dict(value)


class CovariateError(ValueError):
    """A covariate record or schema that cannot be encoded; the message names the field."""


class CovariateEncoder:
    """
    Turns a record of patient covariates into the normalised conditioning vector of the diffusion model.

    The schema is declared once in config, one entry per covariate, in vector order::

        {"age": {"type": "continuous", "range": [40, 100]},
         "sex": {"type": "binary", "categories": ["F", "M"]},
         "diagnosis": {"type": "categorical", "categories": ["CN", "MCI", "AD"]}}

    Encoding: continuous -> (value - low) / (high - low), one entry; binary -> 0 for the first category, 1 for the
    second (0/1 and booleans are accepted too), one entry; categorical -> one-hot, one entry per category. A last
    entry flags the reserved null condition (all zeros, flag 1) used for classifier-free guidance. A covariate with
    a "default" may be missing from a record; any other missing, unknown or out-of-range value is an error.
    """

    def __init__(self, schema: Mapping[str, Mapping[str, Any]]) -> None:
        if not isinstance(schema, Mapping) or not schema:
            raise CovariateError("covariate_schema must be a non-empty mapping of covariate name -> definition.")
        self.schema = {str(name): dict(spec) for name, spec in schema.items()}
        for name, spec in self.schema.items():
            _check_spec(name, spec)
        self.size = sum(_width(spec) for spec in self.schema.values()) + 1

    def encode(self, record: Mapping[str, Any], source: str = "record") -> torch.Tensor:
        """The conditioning vector (size,) of `record`; errors name `source` and the field."""
        values: list[float] = []
        for name, spec in self.schema.items():
            value = record.get(name)
            value = spec.get("default") if value is None else value
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise CovariateError(f"{source}: covariate '{name}' is missing; add it ({_expected(spec)}).")
            values.extend(_encode_value(name, spec, value, source))
        return torch.tensor(values + [0.0], dtype=torch.float32)

    def null(self) -> torch.Tensor:
        """The reserved null condition: zeros with the null flag set."""
        vector = torch.zeros(self.size, dtype=torch.float32)
        vector[-1] = 1.0
        return vector

    def path(self, source: torch.Tensor, target: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """`steps` + 1 vectors from `source` to `target` (..., size): continuous covariates (age) in equal steps, the
        others (a diagnosis, the sex) changed at the first step, as a longitudinal pair changes them."""
        continuous = torch.zeros(self.size, dtype=torch.bool, device=source.device)
        for spec in self.describe()["layout"].values():
            continuous[slice(*spec["slice"])] = spec.get("type") == "continuous"
        return [torch.where(continuous, source + k / steps * (target - source), target if k else source)
                for k in range(steps + 1)]  # fmt: skip

    def check_records(self, records: Sequence[Mapping[str, Any]], source: str = "datalist") -> list:
        """Encode every record once, so a bad covariate stops the run before any compute. Returns `records`."""
        for index, record in enumerate(records):
            where = f"{source}, record {index}" + (f" ({record['image']})" if "image" in record else "")
            self.encode(record, source=where)
        return list(records)

    def describe(self) -> dict[str, Any]:
        """How each covariate is encoded, for metadata.json and the docs."""
        layout, start = {}, 0
        for name, spec in self.schema.items():
            width = _width(spec)
            layout[name] = {**spec, "slice": [start, start + width]}
            start += width
        layout["null_flag"] = {"slice": [start, start + 1]}
        return {"size": self.size, "layout": layout}


def _width(spec: Mapping[str, Any]) -> int:
    return len(spec["categories"]) if spec["type"] == "categorical" else 1


def _expected(spec: Mapping[str, Any]) -> str:
    if spec["type"] == "continuous":
        return f"a number in {list(spec['range'])}"
    return f"one of {list(spec.get('categories', [0, 1]))}"


def _check_spec(name: str, spec: dict[str, Any]) -> None:
    kind = spec.get("type")
    if kind not in COVARIATE_TYPES:
        raise CovariateError(f"covariate_schema['{name}']: 'type' must be one of {COVARIATE_TYPES}, got {kind!r}.")
    if kind == "continuous":
        low_high = spec.get("range")
        try:
            low, high = (float(bound) for bound in low_high)
            valid = low < high and not isinstance(low_high, str)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise CovariateError(f"covariate_schema['{name}']: continuous needs 'range': [low, high] with low < high.")
    else:
        categories = spec.setdefault("categories", [0, 1]) if kind == "binary" else spec.get("categories")
        needed = 2 if kind == "binary" else None
        if not isinstance(categories, list) or len(set(map(str, categories))) != len(categories) or len(categories) < 2:
            raise CovariateError(f"covariate_schema['{name}']: {kind} needs a list of distinct 'categories'.")
        if needed and len(categories) != needed:
            raise CovariateError(f"covariate_schema['{name}']: binary needs exactly 2 categories, got {categories}.")


def _encode_value(name: str, spec: Mapping[str, Any], value: Any, source: str) -> list[float]:
    kind = spec["type"]
    if kind == "continuous":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CovariateError(f"{source}: covariate '{name}' must be a number, got {value!r}.") from None
        low, high = float(spec["range"][0]), float(spec["range"][1])
        if not low <= number <= high:
            raise CovariateError(
                f"{source}: covariate '{name}' = {number:g} is outside its range [{low:g}, {high:g}] in "
                "covariate_schema; fix the value or widen the range (and retrain)."
            )
        return [(number - low) / (high - low)]
    categories = [str(c) for c in spec["categories"]]
    integral = isinstance(value, (bool, np.bool_)) or (isinstance(value, float) and value.is_integer())
    text = str(int(value)) if integral else str(value)
    if kind == "binary" and text not in categories and text in ("0", "1"):
        return [float(text)]
    if text not in categories:
        raise CovariateError(f"{source}: covariate '{name}' = {value!r} is unknown; expected {_expected(spec)}.")
    if kind == "binary":
        return [float(categories.index(text))]
    return [1.0 if category == text else 0.0 for category in categories]


class EncodeCovariatesd(Transform):
    """
    Dictionary transform: encodes the covariates of a datalist record into `output_key`, shape (1, size), ready to
    be collated into the (B, 1, size) cross-attention context.
    """

    def __init__(self, encoder: CovariateEncoder, output_key: str = "condition", prefix: str = "") -> None:
        self.encoder, self.output_key, self.prefix = encoder, output_key, prefix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        record = {name: d.get(self.prefix + name) for name in self.encoder.schema if self.prefix + name in d}
        source = source_name(d)
        d[self.output_key] = self.encoder.encode(record, source=source).unsqueeze(0)
        return d


def source_name(data: Mapping[Hashable, Any]) -> str:
    image = data.get("image")
    meta = getattr(image, "meta", None)
    if isinstance(meta, Mapping) and "filename_or_obj" in meta:
        return str(meta["filename_or_obj"])
    return str(image) if isinstance(image, str) else "record"
