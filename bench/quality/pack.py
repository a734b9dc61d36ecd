"""The pack's modules, however this package was imported.

Inside the pack (tests import it as ``<pack>.bench.quality``, like ComfyUI imports the pack by its folder name) the
trainers are the sibling package; run as ``python -m bench.quality`` from the repository root, ``bench`` is a
top-level package and the pack is ``comfyui_personalize`` (installed by ``make`` with ``pip install -e .``), or,
failing that, the repository root loaded under that name.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_FALLBACK = "comfyui_personalize"


def _root() -> str:
    parts = __name__.split(".")
    if len(parts) > 3:  # <pack>.bench.quality.pack
        return ".".join(parts[:-3])
    if _FALLBACK not in sys.modules:
        try:
            importlib.import_module(_FALLBACK)
        except ImportError:
            spec = importlib.util.spec_from_file_location(_FALLBACK, REPO / "__init__.py",
                                                          submodule_search_locations=[str(REPO)])
            module = importlib.util.module_from_spec(spec)
            sys.modules[_FALLBACK] = module
            spec.loader.exec_module(module)
    return _FALLBACK


def trainer(name: str):
    """``trainers.<name>`` of the pack."""
    return importlib.import_module(f"{_root()}.trainers.{name}")
