"""What a personalization method is: the few things LoRA, DreamBooth and Textual Inversion do differently inside the
one training loop (``loop.train``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..captions import compose, with_shuffling
from ..components import Components
from ..config import TrainConfig
from ..optim import make_optimizer

if TYPE_CHECKING:
    from ..loop import TrainResult


class Method:
    """Subclasses set ``name`` and override the hooks they need."""

    name = "method"
    # Whether training changes what prompts encode to (text-encoder weights, new token vectors): then the loop runs
    # the text encoders every step instead of caching their outputs once.
    trains_conditioning = False

    def prepare(self, components: Components, config: TrainConfig) -> list[dict]:
        """Freeze what must stay fixed, add what is trained; return optimizer parameter groups."""
        raise NotImplementedError

    def encode(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return components.family.encode(components, input_ids)

    def prompts(self, config: TrainConfig, captions: list[str]) -> list[list[str]]:
        """For each instance image, the prompts a step may pick from (one, unless the method varies them or tags are
        shuffled): the instance prompt, then the caption (``captions.compose``)."""
        return with_shuffling([[compose(config.prompt, c)] for c in captions], config)

    def preview_prompt(self, config: TrainConfig) -> str:
        return compose(config.prompt, "")

    def make_optimizer(self, groups: list[dict], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
        return make_optimizer(groups, config, device)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, config: TrainConfig, device: torch.device,
                         loss_scaled: bool) -> list:
        """Hook the optimizer into the backward pass if the method wants that; return the hook handles."""
        return []

    def release_frozen(self, components: Components, text_encoders: bool) -> None:
        """Training no longer needs the VAE (latents are cached) nor, when ``text_encoders``, the frozen text
        encoders (their outputs are cached): drop them. A method whose export writes them keeps them elsewhere."""
        components.vae = None
        if text_encoders:
            for slot in components.family.text_encoder_slots:
                setattr(components, slot.encoder, None)

    def after_step(self, components: Components, step: int, config: TrainConfig) -> None:
        """Called after each optimizer step (e.g. to stop text-encoder training, or to clamp a norm)."""

    def resumed(self, components: Components, step: int, config: TrainConfig) -> None:
        """A resume restored the trained weights after ``step``: redo what ``after_step`` changed besides them."""

    def artifact_bytes(self, components: Components, config: TrainConfig) -> int:
        """About how large the artifact will be (checked against free disk space before training)."""
        return 0

    def export(self, components: Components, config: TrainConfig, result: "TrainResult",
               path: Path) -> tuple[Path, dict[str, str]]:
        """Write the artifact atomically to ``path``; return the path and its metadata."""
        raise NotImplementedError

    def checkpoint(self, components: Components, config: TrainConfig, result: "TrainResult",
                   path: Path) -> tuple[Path, dict[str, str]]:
        """Write the artifact of the weights as they are mid-run, leaving training as it was (``export``, unless
        that changes the components or writes more than the one file)."""
        return self.export(components, config, result, path)
