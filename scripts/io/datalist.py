"""Datalist utilities: turn a cohort CSV into a MONAI datalist, load datalists, and build longitudinal visit pairs.

A cohort CSV has one row per scan (image path, subject id, visit and covariates). ``csv_to_datalist`` maps its
columns to datalist keys, checks every cell and image path, and splits subjects into training and validation.
``load_datalist`` reads one section of such a datalist with paths resolved, and ``longitudinal_pairs`` turns the
scans of each subject into (baseline -> follow-up) pairs for paired counterfactual training.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.core.covariates import SOURCE_PREFIX, TARGET_PREFIX, CovariateEncoder
from scripts.io.files import atomic_write_json

# Keys whose values are paths to files, resolved against a base folder.
PATH_KEYS = ("image", "label")
# Keys that identify rather than measure: kept as strings even when they look numeric ("0001" must not become 1).
IDENTIFIER_KEYS = ("image", "label", "subject")
# Visit codes that mean "first scan" in common cohorts (ADNI: bl, sc, scmri; OASIS: init).
BASELINE_VISIT_CODES = ("bl", "sc", "scmri", "init", "baseline")

_INT_PATTERN = re.compile(r"^[+-]?\d+$")
_FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def as_flag(value: Any, name: str) -> bool:
    """
    A yes/no config value as a bool. The bundle CLI passes `--resume false` through as the *string* "false" (which
    Python counts as true), so the usual spellings are accepted; anything else is an error naming the field.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAGS:
        return _FLAGS[value.strip().lower()]
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def csv_to_datalist(
    csv_path: str | os.PathLike | None,
    columns: Mapping[str, str] | str | None,
    output_path: str | os.PathLike | None,
    val_fraction: float = 0.2,
    seed: int = 0,
    base_dir: str | os.PathLike | None = None,
) -> str:
    """Convert a cohort CSV into a MONAI datalist JSON with a subject-level training/validation split.

    Args:
        csv_path: CSV file with a header row and one row per image.
        columns: maps datalist keys to CSV column names, e.g. ``{"image": "path", "subject": "PTID", "age": "AGE"}``.
            ``image`` is required. Without ``subject`` every row counts as its own subject. A string holding a
            Python or JSON dict literal is accepted (as given on the command line).
        output_path: where to write the datalist JSON; parent folders are created.
        val_fraction: fraction of subjects (not rows) put in ``validation``, in [0, 1).
        seed: seed of the subject shuffle; the same CSV and seed always give the same split.
        base_dir: folder that relative image paths in the CSV are relative to; defaults to the CSV's folder.

    Returns:
        the path of the written datalist, ``{"training": [...], "validation": [...]}``. Image paths are written
        relative to the datalist's folder (absolute when no relative path exists, e.g. another drive).

    Raises:
        ValueError: a required argument is missing, a mapped column is absent, a cell is empty, or no rows.
        FileNotFoundError: the CSV or an image file does not exist.
    """
    if csv_path is None or output_path is None or columns is None:
        raise ValueError("csv_to_datalist needs csv_path, columns and output_path, e.g. --csv_path cohort.csv ...")
    columns = _parse_columns(columns)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    csv_path = os.fspath(csv_path)
    output_path = os.fspath(output_path)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: '{csv_path}'.")
    image_root = os.path.abspath(base_dir if base_dir is not None else os.path.dirname(os.path.abspath(csv_path)))
    output_dir = os.path.dirname(os.path.abspath(output_path))

    records = []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        available = [name for name in (reader.fieldnames or []) if name is not None]
        missing = [name for name in columns.values() if name not in available]
        if missing:
            raise ValueError(
                f"{csv_path}: column(s) {', '.join(repr(m) for m in missing)} not found in the CSV header; "
                f"available columns: {', '.join(repr(a) for a in available)}."
            )
        for row in reader:
            line = reader.line_num  # 1-based physical line of the row's end; the header is line 1
            record: dict[str, Any] = {}
            for key, column in columns.items():
                cell = (row.get(column) or "").strip()
                if not cell:
                    raise ValueError(
                        f"{csv_path}: row {line}, column '{column}' (datalist key '{key}') is empty; "
                        "fill it in or remove the row."
                    )
                record[key] = cell if key in IDENTIFIER_KEYS else _parse_cell(cell)
            for key in PATH_KEYS:
                if key in record:
                    record[key] = _checked_relative_path(record[key], image_root, output_dir, csv_path, line, key)
            records.append(record)
    if not records:
        raise ValueError(f"{csv_path}: the CSV has a header but no rows.")

    validation_subjects = _validation_subjects([r.get("subject", i) for i, r in enumerate(records)], val_fraction, seed)
    datalist: dict[str, list[dict]] = {"training": [], "validation": []}
    for i, record in enumerate(records):
        split = "validation" if record.get("subject", i) in validation_subjects else "training"
        datalist[split].append(record)

    _write_json_atomically(datalist, output_path)
    return output_path


def load_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """Load one section of a MONAI datalist JSON, with relative ``image``/``label`` paths made absolute.

    Relative paths are resolved against the datalist file's folder, so a datalist written by ``csv_to_datalist``
    loads from any working directory.

    Raises:
        FileNotFoundError: the datalist file does not exist.
        ValueError: the file is not valid JSON, lacks ``key``, or a record is not a dict with an ``image``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Datalist file not found: '{path}'.")
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            raise ValueError(f"Datalist '{path}' is not valid JSON ({where}): {e.msg}.") from e
    if not isinstance(content, dict):
        raise ValueError(f"Datalist '{path}' must hold a JSON object such as {{\"training\": [...]}}.")
    if key not in content:
        raise ValueError(f"Datalist '{path}' has no key '{key}'; keys present: {sorted(content)}.")
    section = content[key]
    if not isinstance(section, list):
        raise ValueError(f"Datalist '{path}': '{key}' must be a list of records, got {type(section).__name__}.")

    root = os.path.dirname(os.path.abspath(path))
    records = []
    for index, record in enumerate(section):
        if not isinstance(record, dict) or "image" not in record:
            raise ValueError(f"Datalist '{path}': record {index} of '{key}' has no 'image' entry: {record!r}.")
        record = dict(record)
        for path_key in PATH_KEYS:
            if path_key in record:
                record[path_key] = _resolve(record[path_key], root)
        records.append(record)
    return records


def longitudinal_pairs(records: Sequence[Mapping[str, Any]], consecutive_only: bool = False) -> list[dict]:
    """Pair each subject's scans in time order: every earlier visit (source) with every later one (target).

    Scans are ordered by ``visit`` (numbers, or codes such as ``bl``, ``m06``, ``m12``) and then ``age``; a record
    needs at least one of the two. Scans at the same time point are not paired with each other.

    Args:
        records: datalist records with ``subject`` and ``image`` plus covariates.
        consecutive_only: pair only neighbouring visits instead of all earlier -> later combinations.

    Returns:
        one dict per pair with ``subject``, ``image_source``, ``image_target`` (and ``label_*`` if present), and
        every other key of the records as ``source_<key>`` and ``target_<key>``. Subjects keep their first-seen
        order; pairs within a subject go from the earliest source onwards.
    """
    by_subject: dict[Any, list[Mapping[str, Any]]] = {}
    for index, record in enumerate(records):
        if "subject" not in record:
            raise ValueError(f"Record {index} has no 'subject'; longitudinal pairs need a subject id per scan.")
        by_subject.setdefault(record["subject"], []).append(record)

    pairs = []
    for subject, visits in by_subject.items():
        ordered = sorted(visits, key=lambda r: _time_key(r, subject))
        for i, source in enumerate(ordered):
            later = ordered[i + 1 : i + 2] if consecutive_only else ordered[i + 1 :]
            for target in later:
                if _time_key(source, subject) == _time_key(target, subject):
                    continue
                pairs.append(_pair(subject, source, target))
    return pairs


def _parse_columns(columns: Mapping[str, str] | str) -> dict[str, str]:
    if isinstance(columns, str):
        try:
            columns = ast.literal_eval(columns)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"columns must be a dict such as {{'image': 'path'}}, got {columns!r}.") from e
    if not isinstance(columns, Mapping) or not all(isinstance(v, str) for v in columns.values()):
        raise ValueError(f"columns must map datalist keys to CSV column names, got {columns!r}.")
    if "image" not in columns:
        raise ValueError(f"columns must map the key 'image' to the CSV column with image paths, got {dict(columns)}.")
    return dict(columns)


def _parse_cell(cell: str) -> int | float | str:
    """Numbers become int or float; everything else (codes such as 'M', 'CN', 'bl') stays a string."""
    if _INT_PATTERN.match(cell):
        return int(cell)
    try:
        value = float(cell)
    except ValueError:
        return cell
    return value if math.isfinite(value) else cell  # 'nan'/'inf' stay text so a covariate encoder rejects them


def _checked_relative_path(value: str, image_root: str, output_dir: str, csv_path: str, line: int, key: str) -> str:
    absolute = os.path.normpath(os.path.join(image_root, os.path.expanduser(value)))
    if not os.path.exists(absolute):
        raise FileNotFoundError(f"{csv_path}: row {line}, {key} file not found: '{value}' (looked for '{absolute}').")
    try:
        return os.path.relpath(absolute, output_dir)
    except ValueError:  # no relative path between drives on Windows
        return absolute


def _validation_subjects(subjects: Sequence[Any], val_fraction: float, seed: int) -> set:
    unique = sorted(set(subjects), key=str)
    random.Random(seed).shuffle(unique)
    n_val = round(len(unique) * val_fraction)
    if val_fraction > 0 and len(unique) > 1:
        n_val = min(max(n_val, 1), len(unique) - 1)  # keep both splits non-empty
    return set(unique[:n_val])


def _write_json_atomically(content: Any, output_path: str) -> None:
    atomic_write_json(content, output_path)


def _resolve(value: Any, root: str) -> Any:
    if isinstance(value, str):
        return value if os.path.isabs(value) else os.path.normpath(os.path.join(root, value))
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    return value


def _visit_number(visit: Any, subject: Any) -> float:
    if isinstance(visit, (int, float)) and not isinstance(visit, bool):
        return float(visit)
    text = str(visit).strip().lower()
    if text in BASELINE_VISIT_CODES:
        return 0.0
    match = re.search(r"\d+(\.\d+)?", text)
    if match is None:
        raise ValueError(
            f"Subject {subject!r}: cannot order visit {visit!r}; use numbers or codes such as 'bl', 'm06'."
        )
    return float(match.group())


def _time_key(record: Mapping[str, Any], subject: Any) -> tuple[float, float]:
    has_visit, has_age = "visit" in record, isinstance(record.get("age"), (int, float))
    if not has_visit and not has_age:
        raise ValueError(f"Subject {subject!r}: a record has neither 'visit' nor numeric 'age' to order scans by.")
    visit = _visit_number(record["visit"], subject) if has_visit else 0.0
    age = float(record["age"]) if has_age else 0.0
    return visit, age


def _pair(subject: Any, source: Mapping[str, Any], target: Mapping[str, Any]) -> dict:
    pair: dict[str, Any] = {"subject": subject}
    for key in PATH_KEYS:
        if key in source:
            pair[f"{key}_source"] = source[key]
            pair[f"{key}_target"] = target.get(key)
    for key in dict.fromkeys([*source, *target]):
        if key not in PATH_KEYS and key != "subject":
            pair[f"source_{key}"] = source.get(key)
            pair[f"target_{key}"] = target.get(key)
    return pair


def paired_datalist(path: str, key: str, encoder: CovariateEncoder) -> list[dict]:
    """
    The (earlier -> later visit) pairs of each subject in section `key` of the datalist at `path`, with the
    covariates of both scans checked by `encoder`, so a bad value stops the run before any compute.

    Each pair holds `image_source`, `image_target` and the covariates as `source_<name>` / `target_<name>`
    (see `scripts.io.datalist.longitudinal_pairs`).
    """
    records = load_datalist(path, key)
    pairs = longitudinal_pairs(records)
    if not pairs:
        subjects = {record.get("subject") for record in records}
        raise ValueError(
            f"{path}: '{key}' holds no longitudinal pair ({len(records)} scans of {len(subjects)} subjects). Paired "
            "training needs subjects scanned at two or more time points: give every record a 'subject' id and a "
            "'visit' (or 'age'), or use the unpaired inversion mode (configs/train_diffusion.json) instead."
        )
    for index, pair in enumerate(pairs):
        where = f"{path}, '{key}' pair {index} ({pair['image_source']} -> {pair['image_target']})"
        for prefix, side in ((SOURCE_PREFIX, "source"), (TARGET_PREFIX, "target")):
            record = {name: pair.get(prefix + name) for name in encoder.schema}
            encoder.encode(record, source=f"{where}, {side} covariates")
    return pairs
