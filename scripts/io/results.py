"""A counterfactual run's results folder: locked while a run writes it, published whole, never mixing two runs.

`ResultsFolder(path).write(run)` takes an exclusive lock beside the folder (a second run on the same folder fails at
once with a message naming the folder), lets `run()` write every record into a hidden staging folder beside it
(`staging`), and only when `run()` returns replaces the previous results folder, stale files included, with the
staged one. A failure anywhere leaves the previous results as they were and no partial output. Outside `write`
(MONAI Label writes one request at a time through the same writer) `staging` is the folder itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["OUTPUT_PATTERN", "ResultsFolder", "ResultsFolderBusy", "foreign_entries"]

# What the bundle puts into a results folder: the counterfactual writer's <name>_<kind>.<suffix> and one JSON record
# per input, and configs/oracle_check.json's <name>_oracle.json beside the record it scores.
OUTPUT_PATTERN = re.compile(
    r".+_(counterfactual|difference|mask|std)\.(nii\.gz|png)$|.+_(montage\.png|record\.json|oracle\.json)$"
)


class ResultsFolderBusy(RuntimeError):
    """Another run holds the results folder's lock."""


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """Names in an existing results folder that the bundle does not write there (hidden names count as its own)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder.name] if folder.exists() else []
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if not entry.name.startswith(".") and not (entry.is_file() and OUTPUT_PATTERN.fullmatch(entry.name))
    )


class ResultsFolder:
    """See the module docstring. `path` is the results folder the user asked for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).absolute()
        self._staging = self.path.parent / f".{self.path.name}.partial"
        self.lock_path = self.path.parent / f".{self.path.name}.lock"
        self.active = False

    @property
    def staging(self) -> Path:
        """Where the writer writes now: the staging folder during `write`, the results folder itself otherwise."""
        return self._staging if self.active else self.path

    def write(self, run: Callable[[], Any]) -> Any:
        """Run `run()` with its outputs staged, then publish them in place of the previous results."""
        with self.lock():
            shutil.rmtree(self._staging, ignore_errors=True)  # left by a run that was killed
            self._staging.mkdir(parents=True)
            self.active = True
            try:
                result = run()
                self._publish()
            finally:
                self.active = False
                shutil.rmtree(self._staging, ignore_errors=True)
        return result

    def _publish(self) -> None:
        leftovers = [entry for entry in self._staging.iterdir() if entry.name.startswith(".")]
        for entry in leftovers:  # a writer's own per-record staging, never published
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
        previous = self.path.parent / f".{self.path.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, previous)
        try:
            os.replace(self._staging, self.path)
        except BaseException:
            if previous.exists() and not self.path.exists():
                os.replace(previous, self.path)
            raise
        shutil.rmtree(previous, ignore_errors=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive, non-blocking lock on `.<name>.lock` beside the folder; released (and removed) on exit."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.lock_path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                handle.close()
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ResultsFolderBusy(
                    f"results_dir: {self.path} is being written by another run (lock {self.lock_path}); wait for it "
                    "to finish or choose another --results_dir."
                ) from None
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its previous holder removed after we opened it
                break
            handle.close()
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            self.lock_path.unlink(missing_ok=True)
            handle.close()
