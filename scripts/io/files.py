"""Atomic file writing: every file (and every set of files) the bundle writes appears whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str = ".tmp") -> None:
    """Call `write(temporary_path)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(content: Any, path: str | os.PathLike) -> None:
    """JSON, 4-space indented, written atomically."""
    atomic_write(path, lambda temporary: Path(temporary).write_text(json.dumps(content, indent=4) + "\n"), ".json")


@contextmanager
def staged_folder(folder: str | os.PathLike, prefix: str = ".staged.") -> Iterator[Path]:
    """
    A hidden temporary folder inside `folder` to write a set of files into; when the block ends without error its
    entries are renamed into `folder` (each appears whole), and the temporary folder is removed either way.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    try:
        yield staged
        for entry in staged.iterdir():
            os.replace(entry, folder / entry.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
