"""Model families: everything that depends on the architecture lives in one module per family, behind ``Family``.

A family knows its component classes and shipped configs, how to recognise its single files and diffusers folders,
the single-file ↔ diffusers conversion both ways, its text encoders and tokenizers, how prompts become the UNet's
conditioning, its LoRA and embedding key layouts, and what ComfyUI, kohya and the model spec call it. Nothing outside
``families/`` branches on the family: a new one (SD2.x, SDXL) is a new module listed in ``FAMILIES``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PersonalizeError
from . import sd2, sd15, sdxl
from .base import Family, TextEncoderSlot, shipped_config

__all__ = ["Family", "TextEncoderSlot", "shipped_config", "FAMILIES", "detect_checkpoint", "detect_folder",
           "family_named"]

# The first family that claims a file or folder takes it: SD2.x before SD1.x, whose pipelines share a class.
FAMILIES: tuple[Family, ...] = (sdxl.FAMILY, sd2.FAMILY, sd15.FAMILY)


# Layouts people may try that no family claims yet: named in the error instead of a generic "unknown".
_RECOGNISED_ELSEWHERE = [
    (lambda keys: any(k.startswith("conditioner.embedders.0.model.") for k in keys),
     "an SDXL refiner (OpenCLIP only, conditioner.embedders.0.model.* keys)"),
    (lambda keys: any(k.startswith("conditioner.embedders.") for k in keys),
     "a model with conditioner.embedders.* keys but not SDXL base's two text encoders"),
    (lambda keys: any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys),
     "SD3 (MMDiT joint_blocks.* keys)"),
    (lambda keys: any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys),
     "Flux (double_blocks.* keys)"),
    (lambda keys: any(k.startswith(("lora_unet_", "lora_te")) for k in keys),
     "a LoRA (lora_unet_*/lora_te_* keys), not a model: load it with ApplyLoRA or LoraLoader"),
]


def _supported() -> str:
    return ", ".join(f.title for f in FAMILIES)


def detect_checkpoint(state_dict) -> Family:
    """The family of an original-layout state dict; a PersonalizeError naming what was found for anything else."""
    keys = set(state_dict.keys())
    for family in FAMILIES:
        if family.claims_checkpoint(keys):
            return family
    found = next((what for test, what in _RECOGNISED_ELSEWHERE if test(keys)), None)
    if found is None:
        prefixes = sorted({k.split(".")[0] for k in keys})[:8]
        found = f"an unknown layout (top-level key prefixes: {', '.join(prefixes) or 'none'})"
    raise PersonalizeError(f"this checkpoint is {found}; the pack trains {_supported()} models. Pick a checkpoint "
                           "of a supported family.")


def detect_folder(folder: Path) -> Family:
    """The family of a diffusers folder, from its ``model_index.json``."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PersonalizeError(f"{folder} is not a diffusers model folder (no model_index.json)")
    model_index = json.loads(index_path.read_text())
    for family in FAMILIES:
        if family.claims_folder(model_index, folder):
            return family
    raise PersonalizeError(f"{folder} holds a {model_index.get('_class_name', 'pipeline of unknown class')}; the "
                           f"pack trains {_supported()} models.")


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise PersonalizeError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
