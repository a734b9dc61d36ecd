"""Loads the pack exactly as ComfyUI does, and builds the shared tiny-model fixtures.

ComfyUI imports a custom-node folder with ``spec_from_file_location(<folder path with '.' -> '_x_'>, __init__.py)``
and owns a top-level ``nodes`` module. We do the same, and plant decoy ``nodes``/``trainers`` modules so that an
absolute import inside the pack fails here as it would in ComfyUI.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = str(REPO).replace(".", "_x_")


class _Decoy(types.ModuleType):
    def __getattr__(self, name):
        raise ImportError(f"the pack imported the top-level module '{self.__name__}' (absolute import); "
                          "use a relative import")


def _load_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    for decoy in ("nodes", "trainers"):
        sys.modules.setdefault(decoy, _Decoy(decoy))
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


_load_pack()


def pack(submodule: str = ""):
    """The pack's module ``submodule`` ('' for the package, 'trainers.lora' for a trainer)."""
    return importlib.import_module(PACK_NAME + ("." + submodule if submodule else ""))
