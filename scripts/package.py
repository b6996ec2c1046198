"""Model Zoo packaging: a reproducible `<name>_v<version>.zip` of the bundle (same files -> same bytes).

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

from scripts.files import atomic_write
from scripts.weights import file_sha256

INCLUDED_FOLDERS = {"configs": (".json", ".conf"), "scripts": (".py", ".sh"), "docs": None}
INCLUDED_FILES = ("LICENSE", "README.md", "large_files.yml", "requirements.txt")
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


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
            raise ValueError(f"{entry['path']}: sha256 differs from large_files.yml; run scripts/large_files.py.")
        files.append(Path(entry["path"]))
    return sorted(set(files), key=str)


def build_zip(bundle_root: str | Path = ".", output_dir: str | Path = "dist") -> str:
    """Write `<output_dir>/<name>_v<version>.zip` (atomically) and return its path."""
    root = Path(bundle_root)
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    name, version = metadata["name"], metadata["version"]
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
