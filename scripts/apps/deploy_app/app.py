"""
MONAI Deploy application: the Latent Drift counterfactual of a NIfTI volume or a DICOM series, run by the bundle.

    python scripts/apps/deploy_app/app.py -i <NIfTI file | folder with one NIfTI | DICOM series folder> -o <output folder> \\
        -m <bundle folder> --target "{'age': 85, 'diagnosis': 'AD'}" [--source "{...}"] [--steps 10]

The graph: loader (a NIfTI passes through; a DICOM folder goes DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator
-> DICOMSeriesToVolumeOperator -> NIfTI with the series' geometry) -> CounterfactualOperator (the bundle's
configs/inference.json workflow) -> CounterfactualWriterOperator. Settings (source, target, strength, delta, steps,
preset) come from, highest first: command-line flags, COUNTERFACTUAL_* environment variables, a `counterfactual.json`
beside the input (inside the input folder, or next to an input file), then the bundle's config defaults. Source
covariates not given are read from DICOM PatientAge / PatientSex where present. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from counterfactual_operators import (
    NIFTI_SUFFIXES,
    CounterfactualOperator,
    CounterfactualWriterOperator,
    DicomSeriesToNiftiOperator,
    ImageFileInputOperator,
)
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

SETTINGS_FILE = "counterfactual.json"
ENV_PREFIX = "COUNTERFACTUAL_"
PRESETS = ("brain_mri_3d", "chest_xray_2d")
DEFAULT_PRESET = "brain_mri_3d"


def _covariates(value: Any, name: str) -> dict[str, Any]:
    """The bundle's own covariate parser (`compose` puts the bundle on sys.path before the settings are read)."""
    from scripts.core.covariates import parse_covariates

    covariates = parse_covariates(value, name)
    if not covariates:
        raise ValueError(f"{name} must be a dict such as \"{{'age': 85}}\", got {value!r}.")
    return covariates


def _number(value: Any, name: str, kind: type, low: float, high: float | None = None) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if number < low or (high is not None and number > high) or (kind is int and number != float(value)):
        limits = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'an integer ' if kind is int else ''}{limits}, got {value!r}.")
    return number


def _delta(value: Any, name: str) -> float | list[float]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{name} must be a number or a list of numbers, got {value!r}.") from None
    if isinstance(value, (list, tuple)):
        return [_number(v, name, float, float("-inf")) for v in value]
    return _number(value, name, float, float("-inf"))


def _preset(value: Any, name: str) -> str:
    if value not in PRESETS:
        raise ValueError(f"{name} must be one of {list(PRESETS)}, got {value!r}.")
    return str(value)


SETTINGS = {
    "source": _covariates,
    "target": _covariates,
    "strength": lambda value, name: _number(value, name, float, 1e-6, 1.0),
    "delta": _delta,
    "steps": lambda value, name: _number(value, name, int, 1),
    "preset": _preset,
}


def settings_file_for(input_path: Path) -> Path:
    """`counterfactual.json` inside an input folder, or next to an input file."""
    return (input_path if input_path.is_dir() else input_path.parent) / SETTINGS_FILE


def resolve_settings(
    command_line: Mapping[str, Any], environment: Mapping[str, str], settings_file: Path | None
) -> dict[str, Any]:
    """
    The run's settings, each checked: command-line flags over COUNTERFACTUAL_<NAME> environment variables over the
    JSON settings file. `target` is required (a counterfactual needs a change); `source` may be completed from DICOM.
    """
    layers = []
    if settings_file is not None and settings_file.is_file():
        try:
            from_file = json.loads(settings_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{settings_file}: not valid JSON ({error}).") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{settings_file}: expected a JSON object with keys {sorted(SETTINGS)}.")
        unknown = sorted(set(from_file) - set(SETTINGS))
        if unknown:
            raise ValueError(f"{settings_file}: unknown setting(s) {unknown}; known: {sorted(SETTINGS)}.")
        layers.append((str(settings_file), from_file))
    names = {key: ENV_PREFIX + key.upper() for key in SETTINGS}
    layers.append(("environment", {key: environment[name] for key, name in names.items() if environment.get(name)}))
    layers.append(("command line", {key: value for key, value in command_line.items() if value is not None}))
    settings: dict[str, Any] = {}
    for origin, values in layers:
        for key, value in values.items():
            settings[key] = SETTINGS[key](value, f"{key} (from {origin})")
    if not settings.get("target"):
        raise ValueError(
            "no target covariates: give --target \"{'age': 85, 'diagnosis': 'AD'}\", COUNTERFACTUAL_TARGET, or "
            f"'target' in {SETTINGS_FILE} beside the input."
        )
    return settings


def find_bundle(model_path: Path) -> Path:
    """The bundle folder: the model path itself, or the one bundle folder inside it (as in a MAP's models folder)."""

    def is_bundle(path: Path) -> bool:
        return (path / "configs" / "inference.json").is_file()

    if is_bundle(model_path):
        return model_path.resolve()
    bundles = sorted(p for p in model_path.iterdir() if is_bundle(p)) if model_path.is_dir() else []
    if len(bundles) != 1:
        found = f"{len(bundles)} bundles ({', '.join(p.name for p in bundles)})" if bundles else "no bundle"
        raise ValueError(
            f"model path {str(model_path)!r} holds {found} (a bundle has configs/inference.json): pass the bundle "
            "folder with -m, or a folder holding one bundle folder."
        )
    return bundles[0].resolve()


def classify_input(input_path: Path) -> tuple[str, Path]:
    """("file", path) for an input file (NIfTI, or a 2D PNG / JPEG / DICOM picture for the chest preset: the bundle
    reads it) or a folder holding exactly one NIfTI file; ("dicom", folder) for any other non-empty folder (the DICOM
    loader then reads every file in it)."""

    def is_nifti(path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)

    if input_path.is_file():
        return "file", input_path
    niftis = sorted(p for p in input_path.iterdir() if is_nifti(p))
    if len(niftis) > 1:
        raise ValueError(f"input folder {str(input_path)!r} holds {len(niftis)} NIfTI files; pass one file with -i.")
    if niftis:
        return "file", niftis[0]
    if not any(p.is_file() and p.name != SETTINGS_FILE for p in input_path.rglob("*")):
        raise ValueError(
            f"input folder {str(input_path)!r} is empty: give a NIfTI file, a folder holding one, or a folder holding "
            "one DICOM series."
        )
    return "dicom", input_path


class CounterfactualApp(Application):
    """Counterfactual of one NIfTI volume or DICOM series through the latent_drift_counterfactual bundle."""

    def __init__(self, *args: Any, command_line: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self.command_line = dict(command_line or {})
        self.temporary: list[Path] = []  # work and staging folders, removed by cleanup()
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        input_path, output_dir = Path(context.input_path).resolve(), Path(context.output_path).resolve()
        kind, path = classify_input(input_path)
        bundle_dir = find_bundle(Path(context.model_path))
        if str(bundle_dir) not in sys.path:  # the bundle's code (its covariate parser, then its configs) is imported
            sys.path.insert(0, str(bundle_dir))
        settings_file = self.command_line.pop("settings", None)
        if settings_file is not None and not Path(settings_file).is_file():
            raise ValueError(f"--settings: no file at {settings_file!r}.")
        settings_file = Path(settings_file or settings_file_for(input_path))
        settings = resolve_settings(self.command_line, os.environ, settings_file)
        preset = settings.get("preset", DEFAULT_PRESET)
        logging.info(f"bundle {bundle_dir}, preset {preset}, {kind} input {path}, settings {settings}")

        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".counterfactual-staging-", dir=output_dir))
        workdir = Path(tempfile.mkdtemp(prefix="counterfactual-", dir=context.workdir or None))
        self.temporary += [staging, workdir]
        counterfactual = CounterfactualOperator(
            self, bundle_dir=bundle_dir, preset=preset, settings=settings, results_dir=staging, name="counterfactual"
        )
        writer = CounterfactualWriterOperator(self, output_dir=output_dir, staging_dir=staging, name="writer")
        if kind == "file":
            loader = ImageFileInputOperator(self, CountCondition(self, 1), path=path, name="file_input")
            self.add_flow(loader, counterfactual, {("case", "case")})
        else:
            from monai.deploy.operators import (
                DICOMDataLoaderOperator,
                DICOMSeriesSelectorOperator,
                DICOMSeriesToVolumeOperator,
            )

            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=path, name="dicom_loader")
            selector = DICOMSeriesSelectorOperator(self, name="series_selector")  # no rules: every series
            volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            staged = DicomSeriesToNiftiOperator(self, workdir=workdir, input_folder=path, name="series_to_nifti")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(selector, staged, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(volume, staged, {("image", "image")})
            self.add_flow(staged, counterfactual, {("case", "case")})
        self.add_flow(counterfactual, writer, {("result", "result")})

    def cleanup(self) -> None:
        for folder in self.temporary:
            shutil.rmtree(folder, ignore_errors=True)


def parse_command_line(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The app's own flags; the rest (-i, -o, -m, -w, -l) goes to the SDK's parser."""
    parser = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        allow_abbrev=False,
        epilog="SDK flags: -i/--input PATH, -o/--output DIR, -m/--model BUNDLE_DIR, -w/--workdir DIR, "
        "-l/--log-level LEVEL (or HOLOSCAN_INPUT_PATH, HOLOSCAN_OUTPUT_PATH, HOLOSCAN_MODEL_PATH, HOLOSCAN_WORKDIR).",
    )
    parser.add_argument("--source", help="source covariates, e.g. \"{'age': 65, 'sex': 'F', 'diagnosis': 'CN'}\"")
    parser.add_argument("--target", help="target covariates (the change), e.g. \"{'age': 85, 'diagnosis': 'AD'}\"")
    parser.add_argument("--strength", help="inversion depth t0/T in (0, 1] (config default 0.8)")
    parser.add_argument("--delta", help="inference drift delta, a number or a per-channel list (default: the preset's)")
    parser.add_argument("--steps", help="DDIM steps (config default 50)")
    parser.add_argument("--preset", help=f"bundle preset, one of {list(PRESETS)} (default {DEFAULT_PRESET})")
    parser.add_argument("--settings", help=f"settings JSON file (default: {SETTINGS_FILE} beside the input)")
    options, rest = parser.parse_known_args(list(argv))
    return vars(options), rest


def _output_folder(rest: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-o", "--output", default=os.environ.get("HOLOSCAN_OUTPUT_PATH", "output"))
    return Path(parser.parse_known_args(list(rest))[0].output).absolute()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    command_line, rest = parse_command_line(argv[1:])
    output_dir = _output_folder(rest)
    output_existed = output_dir.exists()
    app = CounterfactualApp([sys.executable, argv[0], *rest], command_line=command_line)
    failure = None
    try:
        app.run()
    except Exception as error:  # any failure: nothing left in the output folder, and one clear last line
        while error.__cause__ is not None or error.__context__ is not None:  # the root cause speaks to the user
            error = error.__cause__ or error.__context__
        failure = f"error: {error}"
    finally:
        app.cleanup()
        if not output_existed and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
    del app  # Holoscan logs its teardown when the app goes: before the error line, not after it
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
