"""Model Zoo packaging: the standalone inference config and a reproducible `<name>_v<version>.zip` of the bundle.

`configs/inference.json` is what the Model Zoo runs alone (`python -m monai.bundle run --config_file
configs/inference.json`, the default brain counterfactual). It is generated, never edited: the settings are owned by
`configs/common.json` (shared, the brain preset's values) and `configs/counterfactual.json` (the counterfactual
workflow), merged as the bundle CLI merges a list of config files. Regenerate it after editing either:

    python -m monai.bundle run standalone --config_file configs/package.json

tests/test_package.py fails when the committed file differs from the merge, and `build_zip` refuses a stale one.

The archive holds `<name>/` with configs/, scripts/, models/ (the weights listed in large_files.yml), docs/,
LICENSE, README.md, large_files.yml and requirements.txt; not tests, data, runs or outputs. Entries are sorted and
carry a fixed timestamp and permissions, so rebuilding from the same files gives the same sha256.

    python -m monai.bundle run package --config_file configs/package.json
    python -m monai.bundle download --name latent_drift_counterfactual --version <version> \\
        --url file:///abs/path/latent_drift_counterfactual_v<version>.zip --bundle_dir bundles/
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import yaml

from scripts.io.files import atomic_write
from scripts.io.weights import file_sha256

INCLUDED_FOLDERS = {"configs": (".json", ".conf"), "scripts": (".py", ".sh"), "docs": None}
INCLUDED_FILES = ("LICENSE", "README.md", "large_files.yml", "requirements.txt")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)
# generated config -> the hand-edited configs it merges, in order
STANDALONE_CONFIGS = {"inference.json": ("common.json", "counterfactual.json")}
GENERATED_KEY = "_generated_from_"


def standalone_config(bundle_root: str | Path, name: str = "inference.json") -> dict:
    """The merge of the configs that `name` is generated from, with a key naming them and the command."""
    from monai.bundle import ConfigParser

    sources = STANDALONE_CONFIGS[name]
    merged = ConfigParser.load_config_files([str(Path(bundle_root) / "configs" / source) for source in sources])
    note = " + ".join(f"configs/{source}" for source in sources)
    command = "python -m monai.bundle run standalone --config_file configs/package.json"
    return {GENERATED_KEY: f"{note}; do not edit, regenerate with: {command}", **merged}


def write_standalone_configs(bundle_root: str | Path = ".") -> list[str]:
    """Write every generated standalone config (atomically); returns their paths."""
    written = []
    for name in STANDALONE_CONFIGS:
        path = Path(bundle_root) / "configs" / name
        content = json.dumps(standalone_config(bundle_root, name), indent=4, ensure_ascii=False) + "\n"
        atomic_write(path, lambda temporary, text=content: Path(temporary).write_text(text), ".json")
        written.append(str(path))
        print(f"wrote {path}")
    return written


def check_standalone_configs(bundle_root: str | Path = ".") -> None:
    """Every generated config must equal the merge of its sources (else: one line saying how to regenerate)."""
    for name in STANDALONE_CONFIGS:
        path = Path(bundle_root) / "configs" / name
        if not path.is_file() or json.loads(path.read_text()) != standalone_config(bundle_root, name):
            raise ValueError(
                f"{path} is not the merge of {' + '.join(STANDALONE_CONFIGS[name])}: regenerate it with "
                "python -m monai.bundle run standalone --config_file configs/package.json"
            )


def bundle_files(bundle_root: str | Path) -> list[Path]:
    """The files that go into the archive, relative to the bundle root, sorted."""
    root = Path(bundle_root)
    files = [Path(name) for name in INCLUDED_FILES if (root / name).is_file()]
    for folder, suffixes in INCLUDED_FOLDERS.items():
        for path in (root / folder).rglob("*"):
            hidden = any(part.startswith((".", "__pycache__")) for part in path.relative_to(root).parts)
            if path.is_file() and not hidden and (suffixes is None or path.suffix in suffixes):
                files.append(path.relative_to(root))
    listing = yaml.safe_load((root / "large_files.yml").read_text()) if (root / "large_files.yml").is_file() else {}
    for entry in listing.get("large_files", []):
        path = root / entry["path"]
        if not path.is_file():
            raise FileNotFoundError(f"large_files.yml lists {entry['path']}, which is missing: train or restore it.")
        if file_sha256(path) != str(entry["hash_val"]).lower():
            raise ValueError(f"{entry['path']}: sha256 differs from large_files.yml; run scripts/tools/large_files.py.")
        files.append(Path(entry["path"]))
    return sorted(set(files), key=str)


def build_zip(bundle_root: str | Path = ".", output_dir: str | Path = "dist") -> str:
    """Write `<output_dir>/<name>_v<version>.zip` (atomically) and return its path."""
    root = Path(bundle_root)
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    name, version = metadata["name"], metadata["version"]
    check_standalone_configs(root)
    target = Path(output_dir) / f"{name}_v{version}.zip"
    files = bundle_files(root)

    def write(temporary: str) -> None:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for relative in files:
                info = zipfile.ZipInfo(f"{name}/{relative.as_posix()}", date_time=FIXED_TIME)
                info.external_attr = (0o755 if relative.suffix == ".sh" else 0o644) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, (root / relative).read_bytes())

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write, ".zip")
    print(f"wrote {target} ({len(files)} files, sha256 {file_sha256(target)})")
    return str(target)
