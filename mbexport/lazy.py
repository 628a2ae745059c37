"""A function a registry entry names instead of importing it, so the registries stay import-light.

``mbexport.tasks`` and ``mbexport.precisions`` are read by every stage, the CLI and ``mbexport recipes``; an
entry that imported its transform or forward would pull torch and ONNX into all of them, and the registry
into the middle of the stage order. ``Ref("mbexport.export.fp16:convert_fp16")`` imports on first call.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Ref:
    """``"package.module:function"``, imported when first called; calling it calls the function."""

    target: str

    def __call__(self, *args, **kwargs):
        return self.load()(*args, **kwargs)

    def load(self):
        return _load(self.target)


@functools.cache
def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
