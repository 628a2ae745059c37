"""One exception family for everything the user can get wrong.

The CLI prints ``str(error)`` as a single line and exits with ``error.exit_code``; no traceback unless
``--debug``. Always name the file and the problem: ``"ckpt.zip: not a zip file"``.
"""

from __future__ import annotations

from pathlib import Path


PACKAGE_DIR = Path(__file__).resolve().parent


def own_warning(filename: str) -> bool:
    """Whether a warning raised from ``filename`` is mbexport's own note to the user (a seeded head, no
    calibration text), as opposed to a library's (torch's pickle-protocol warning)."""
    try:
        return Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def first_line(error: BaseException, limit: int = 300) -> str:
    """A caught exception's first message line (its type name when it has no message), for one-line reports."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


class MbexportError(Exception):
    """A problem the user can act on (bad input, missing dependency), reported in one line."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        text = " ".join(str(message).split())  # one line, always
        super().__init__(f"{path}: {text}" if path is not None else text)


class CheckpointError(MbexportError):
    """The checkpoint cannot be read or does not describe a Megatron-BERT."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks to run code (a pickle global outside the allowlist)."""


class MissingDependencyError(MbexportError):
    """An optional library (TensorRT, Model Optimizer, ...) is needed for this step."""


class ValidationFailed(MbexportError):
    """Artifacts were compared and at least one check failed."""

    exit_code = 1
