"""Writes large_files.yml (MONAI Model Zoo format) with the sha256 of every shipped weights file."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from scripts.io.weights import file_sha256

SHIPPED = ("models/model.pt", "models/autoencoder.pt", "models/chest/model.pt", "models/chest/autoencoder.pt")


def write_large_files(bundle_root: str = ".") -> str:
    """List each shipped file that exists with its size and sha256; files are shipped in the repository itself."""
    root = Path(bundle_root)
    entries = [
        {"path": name, "url": "", "hash_val": file_sha256(root / name), "hash_type": "sha256"}
        for name in SHIPPED
        if (root / name).is_file()
    ]
    target = root / "large_files.yml"
    target.write_text(yaml.safe_dump({"large_files": entries}, sort_keys=False))
    return str(target)


if __name__ == "__main__":
    print(write_large_files(sys.argv[1] if len(sys.argv) > 1 else "."))
