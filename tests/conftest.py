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
        if name.startswith("__"):  # hasattr(module, "__file__") probes from inspect.getmodule (torch, diffusers)
            raise AttributeError(name)
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

# The test models are tiny: a second intra-op thread buys nothing, and on a busy 2-core machine its spin-waits make
# every operator ~100x slower.
import torch  # noqa: E402

torch.set_num_threads(1)


def pack(submodule: str = ""):
    """The pack's module ``submodule`` ('' for the package, 'trainers.lora' for a trainer)."""
    return importlib.import_module(PACK_NAME + ("." + submodule if submodule else ""))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> dict:
    """The tiny random SD1.x model, written once per session: diffusers folder, single file and tokenizer."""
    return pack("trainers.testing.tiny").make_tiny_model(tmp_path_factory.mktemp("tiny-model"), size="tiny", seed=0)


@pytest.fixture
def components(tiny_model):
    """A fresh copy of the tiny model's components (tests may train them in place)."""
    return pack("trainers.models").load_base(tiny_model["single_file"])


def make_subject_images(count: int = 4, size: int = 64, seed: int = 0):
    """A small IMAGE batch ([B,H,W,3] in 0..1) of one made-up subject (the pack's own synthetic photos)."""
    return pack("trainers.testing.synthetic").subject_photos(count, size, seed)


@pytest.fixture
def subject_images():
    return make_subject_images()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> dict:
    """The tiny random SDXL model (two text encoders, text-time conditioning), written once per session."""
    return pack("trainers.testing.tiny").make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), arch="sdxl")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> dict:
    """The tiny random SD2.x model (OpenCLIP text tower, ε-prediction), written once per session."""
    return pack("trainers.testing.tiny").make_tiny_model(tmp_path_factory.mktemp("tiny-sd2"), arch="sd2")
