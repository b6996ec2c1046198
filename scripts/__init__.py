"""Latent Drift bundle code, imported by the configs (`"$import scripts..."`).

Importing the package also makes a failed bundle run end with one plain line naming the root cause: MONAI's config
parser wraps every error raised while evaluating a config expression in "RuntimeError: Failed to evaluate ...", so
the useful message (which file, which field, what to do) would otherwise sit in the middle of the traceback.
"""

from __future__ import annotations

import sys
from types import TracebackType

WRAPPER_MESSAGES = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def root_cause(error: BaseException) -> BaseException:
    """
    The first exception in the chain that is not one of MONAI's wrappers ("Failed to evaluate ...", "Failed to
    instantiate ...", "applying transform ..."): the error raised by the code they called, with its own message.
    """
    seen = {id(error)}
    while str(error).startswith(WRAPPER_MESSAGES):
        inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        error = inner
    return error


def _excepthook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    _previous_excepthook(kind, error, traceback)
    cause = root_cause(error)
    if cause is not error:  # the traceback ended on a wrapper: repeat the real message last
        print(f"\nError: {type(cause).__name__}: {cause}", file=sys.stderr)


if getattr(sys.excepthook, "__module__", None) != __name__:
    _previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
