"""The parts of a loaded model, the same for every family and every source (diffusers folder, single file, the
state dict ComfyUI hands out), and how they are built from weights."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights

from .errors import PersonalizeError

if TYPE_CHECKING:
    from .families import Family


@dataclass
class Components:
    family: "Family"
    unet: torch.nn.Module
    vae: torch.nn.Module | None  # None once training released it (loop.train's release_frozen)
    text_encoder: torch.nn.Module | None
    tokenizer: object
    noise_scheduler: object
    name: str = "model"
    tokenizer_dir: str | None = None
    fingerprint: str = field(default="", repr=False)
    # SDXL's second text encoder (OpenCLIP bigG) and its tokenizer.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    # Original-layout keys that no component holds (position ids, OpenCLIP's logit scale, SD2.x's unused last text
    # layer, ...): written back on export, so a DreamBooth file has exactly its base checkpoint's key set.
    original_extras: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def pipeline(self, scheduler=None):
        """A diffusers sampling pipeline sharing these modules (no copies)."""
        return self.family.pipeline(self, scheduler)


def materialize(model_factory, state_dict: dict, dtype: torch.dtype, what: str, family_title: str,
                owned: bool = False, channels_last: bool = True):
    """Build a model without random init and fill it with ``state_dict``. Tensors the caller hands over
    (``owned``, e.g. just read from a file in the right dtype and layout) are used as they are; anything else is
    copied, so training never modifies a host's live weights and inference-mode tensors become normal ones."""
    with init_empty_weights():
        model = model_factory()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise PersonalizeError(f"the {what} weights do not fit an {family_title} {what}: {len(missing)} missing "
                               f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                               f"(e.g. {sorted(unexpected)[:3]}). Is this a complete {family_title} checkpoint?")
    tensors = {k: v.to(dtype=dtype, memory_format=layout(v.ndim, channels_last), copy=not owned)
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def layout(ndim: int, channels_last: bool = True) -> torch.memory_format:
    # Conv weights in channels_last make CPU convolutions take oneDNN's path (-34% per SD1.5 LoRA step at small
    # resolutions) and suit tensor cores on GPUs; copying straight into that layout costs no extra memory. Only
    # the UNet, which runs every step: the VAE runs once per run (5% slower as stored), and a weight kept as stored
    # can stay a view of the file (see checkpoints.read_safetensors), so its decoder costs no memory while training.
    return torch.channels_last if ndim == 4 and channels_last else torch.contiguous_format


def fingerprint_state_dict(state_dict: dict[str, torch.Tensor], samples: int = 256) -> str:
    """A fast content hash: every key, shape and dtype, and the first values of each tensor.

    Cheap enough for a 2 GB model held in memory (ComfyUI hands us state dicts, not files), touching one small
    block per tensor whatever its memory layout, and sensitive to any fine-tune, merge or LoRA bake, which change
    values throughout every weight they touch.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        while tensor.ndim > 1 and tensor.numel() > samples:
            tensor = tensor[0]
        digest.update(tensor.reshape(-1)[:samples].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
