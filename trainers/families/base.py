"""The interface every model family implements, and the configs families ship."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..components import Components

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_config(name: str) -> dict:
    """A config shipped with the pack (``configs/<name>.json``), so that nothing is fetched from a hub."""
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder of a family: where ``Components`` holds it and its tokenizer, and its names in files."""
    encoder: str  # attribute of Components
    tokenizer: str  # attribute of Components
    lora_prefix: str  # kohya LoRA key prefix, e.g. "lora_te"
    embedding_key: str  # key of its vectors in a Textual Inversion file, e.g. "emb_params"
    # Last layers whose output nothing reads (SDXL's CLIP-L: the conditioning is its penultimate layer and its pooled
    # output is unused): LoRA puts no adapters there, since they would never train.
    unused_last_layers: int = 0


class Family:
    """The interface every family module implements (one instance each, ``FAMILY``)."""

    name: str  # the pack's id, e.g. "sd15"
    title: str  # for people, e.g. "SD1.x"
    modelspec_architecture: str  # Stability AI's model spec, e.g. "stable-diffusion-v1"
    kohya_base_version: str  # kohya's ss_base_model_version, e.g. "sd_v1"
    kohya_v2: bool = False  # kohya's ss_v2
    comfy_tokenizer: str  # folder inside ComfyUI's ``comfy`` package with this family's tokenizer files
    lora_unet_prefix = "lora_unet"
    # Option values the literature recommends for this family where they differ from the methods' defaults (which
    # suit SD1.x), e.g. SDXL's 1024 px: ``with_defaults`` applies them to the options a user left at their default.
    defaults: dict[str, object] = {}
    text_encoder_slots: tuple[TextEncoderSlot, ...] = ()

    def claims_checkpoint(self, keys: set[str]) -> bool:
        """Whether an original-layout state dict with these keys is of this family."""
        raise NotImplementedError

    def claims_folder(self, model_index: dict, folder: Path) -> bool:
        """Whether the diffusers ``folder`` with this ``model_index.json`` is of this family."""
        raise NotImplementedError

    def from_original(self, state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                      dtype: torch.dtype = torch.float32, owned: bool = False) -> "Components":
        raise NotImplementedError

    def from_diffusers(self, folder: Path, dtype: torch.dtype = torch.float32) -> "Components":
        raise NotImplementedError

    def to_original(self, components: "Components") -> dict[str, torch.Tensor]:
        """The components in the original single-file layout (exactly the key set of the family's checkpoints)."""
        raise NotImplementedError

    def find_tokenizer(self, checkpoint: Path, explicit: str | Path | None) -> Path:
        """The tokenizer folder for a single file (which carries none)."""
        raise NotImplementedError

    def tokenize(self, components: "Components", prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, components: "Components", input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The UNet's conditioning for tokenized prompts: tensors whose first dimension is the prompt."""
        raise NotImplementedError

    def denoise(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The UNet's prediction for one batch (one conditioning row per sample)."""
        raise NotImplementedError

    def pipeline(self, components: "Components", scheduler=None):
        """A diffusers sampling pipeline sharing the components' modules."""
        raise NotImplementedError

    def with_defaults(self, config):
        """``config`` with this family's ``defaults`` for every option that still has its method's default value.

        The trainer nodes call it once they know the family of the graph's model, so an SDXL model trains at 1024 px
        without the user changing anything, while any value the user set is kept."""
        from ..options import default_of

        changes = {f.name: self.defaults[f.name] for f in dataclasses.fields(config)
                   if f.name in self.defaults and getattr(config, f.name) == default_of(f)}
        return dataclasses.replace(config, **changes) if changes else config

    def modelspec(self, prediction_type: str) -> str:
        """``modelspec.architecture`` of a model of this family (SD2.x names its v-prediction variant apart)."""
        return self.modelspec_architecture

    def text_encoders(self, components: "Components") -> list[tuple[TextEncoderSlot, torch.nn.Module]]:
        """The slots and their encoders, where the components still hold them."""
        return [(slot, getattr(components, slot.encoder)) for slot in self.text_encoder_slots
                if getattr(components, slot.encoder) is not None]

    def __repr__(self) -> str:
        return f"<family {self.name}>"
