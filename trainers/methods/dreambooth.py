"""DreamBooth (Ruiz et al. 2023): fine-tune every UNet layer (and optionally the text encoder) on 3-5 photos of a
subject named by a rare identifier, with the prior-preservation loss on the base model's own class images keeping the
class noun from collapsing onto the subject. The result is a complete SD1.x checkpoint in the original single-file
layout (what ComfyUI's CheckpointLoader, A1111/Forge and diffusers' ``from_single_file`` load), optionally also as a
diffusers folder.

Callers: the CLI (``train-dreambooth``), and a node that builds ``Components`` from ComfyUI's MODEL/CLIP/VAE; both
through ``run.train_or_reuse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..components import Components
from ..config import TrainConfig
from ..errors import PersonalizeError
from ..export import IMPLEMENTATION_ORIGINAL, SAVE_DTYPES, modelspec_metadata, provenance_metadata
from ..files import atomic_path
from ..loop import TrainResult
from ..models import save_diffusers, save_single_file
from ..optim import StochasticAdamW, fuse_optimizer_into_backward
from ..options import option
from ..preflight import model_bytes
from .base import Method

WEIGHTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class DreamBoothConfig(TrainConfig):
    steps: int = option(1000, "optimizer steps: the paper's recipe is ~1000 (800-1200) for 3-5 photos",
                        min=1, max=100_000)
    lr: float = option(5e-6, "learning rate of the UNet (the paper's 5e-6; every weight moves, so it is ~20x "
                       "lower than LoRA's)", min=0.0, max=1.0, step=1e-7)
    class_prompt: str = option("a photo of a dog", "class prompt for prior preservation: the identifier-free "
                               "instance prompt, e.g. 'a photo of a dog' (empty = no prior preservation)")
    class_images: int = option(200, "class images generated with the base model for prior preservation (the "
                               "paper used about 1000; 200 is the diffusers example's default)", min=1, max=10_000,
                               advanced=True)
    text_encoder_lr: float = option(5e-6, "learning rate of the text encoder when train_text_encoder is on",
                                    min=0.0, max=1.0, step=1e-7, advanced=True)
    text_encoder_steps: int = option(0, "stop training the text encoder after this many steps (0 = the whole run); "
                                     "it overfits sooner than the UNet, so it is often trained for part of the run",
                                     min=0, max=100_000, advanced=True)
    gradient_checkpointing: bool = option(True, "recompute activations in the backward pass: much less memory "
                                          "(with it and 8-bit AdamW, SD1.5 DreamBooth fits 12-16 GB), about 15-30% "
                                          "slower", advanced=True)
    weights_dtype: str = option("fp32", "precision of the trained weights: bf16 halves the memory of weights, "
                                "gradients and optimizer state (CUDA with bf16 support only; updates are rounded "
                                "stochastically)", choices=tuple(WEIGHTS_DTYPES), advanced=True)
    save_precision: str = option("fp16", "precision of the saved checkpoint (fp16: ~2 GB for SD1.5)",
                                 choices=tuple(SAVE_DTYPES), advanced=True)
    fused_backward: bool = option(True, "update each weight as soon as its gradient is complete and free that "
                                  "gradient, so no full set of gradients is held (SD1.5 in fp32: 3.4 GB less); "
                                  "max_grad_norm then clips each weight's gradient. Needs gradient_accumulation "
                                  "1; fp16 mixed precision uses the usual step", advanced=True)


def check_device(config: DreamBoothConfig, device: torch.device) -> None:
    """Refuse bf16 weights where they cannot work; call it early (before class images are generated) to fail fast."""
    if config.weights_dtype != "bf16":
        return
    if config.optimizer != "adamw":
        raise PersonalizeError(f"optimizer {config.optimizer} rounds bf16 weights to nearest, which loses "
                               "DreamBooth's small updates; use weights_dtype fp32 with it, or optimizer adamw with "
                               "bf16")
    if device.type != "cuda" or not torch.cuda.is_bf16_supported():
        raise PersonalizeError("weights_dtype bf16 needs a CUDA GPU with bf16 support (RTX 30xx/A100 or newer); "
                               f"training runs on {device.type}. Use weights_dtype fp32.")
    if config.mixed_precision == "fp16":
        raise PersonalizeError("weights_dtype bf16 cannot be combined with mixed_precision fp16; use auto or bf16")


class DreamBoothMethod(Method):
    name = "dreambooth"

    def __init__(self, config: DreamBoothConfig, diffusers_out: str | Path | None = None):
        self.trains_conditioning = config.train_text_encoder
        self.diffusers_out = Path(diffusers_out) if diffusers_out else None

    def prepare(self, components: Components, config: DreamBoothConfig) -> list[dict]:
        check_device(config, components.unet.device)
        dtype = WEIGHTS_DTYPES[config.weights_dtype]
        encoders = [encoder for _, encoder in components.family.text_encoders(components)]
        # All in the training dtype: ComfyUI hands over fp16 weights, and an fp16 VAE on CPU is slow.
        for module in (components.unet, components.vae, *encoders):
            if module.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
                module.to(dtype)
        components.vae.requires_grad_(False)
        components.unet.requires_grad_(True)
        groups = [{"params": list(components.unet.parameters()), "lr": config.lr}]
        for encoder in encoders:
            encoder.requires_grad_(self.trains_conditioning)
            if self.trains_conditioning:
                groups.append({"params": list(encoder.parameters()), "lr": config.text_encoder_lr})
        return groups

    def make_optimizer(self, groups: list[dict], config: DreamBoothConfig,
                       device: torch.device) -> torch.optim.Optimizer:
        if any(p.dtype == torch.bfloat16 for g in groups for p in g["params"]):
            if config.optimizer != "adamw":
                raise PersonalizeError(f"weights_dtype bf16 trains with its own stochastic-rounding AdamW, not "
                                       f"{config.optimizer}; set optimizer to adamw or weights_dtype to fp32")
            # Weights trained in bf16: torch's AdamW rounds each update to nearest, which loses most at DreamBooth's lr.
            return StochasticAdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        return super().make_optimizer(groups, config, device)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer, config: DreamBoothConfig, device: torch.device,
                         loss_scaled: bool) -> list:
        # fp16's loss scaling needs every gradient before any update: that run keeps the usual step.
        if not config.fused_backward or loss_scaled:
            return []
        if config.gradient_accumulation > 1:
            raise PersonalizeError("fused_backward updates each weight during the backward pass, so it cannot "
                                   "accumulate gradients: set gradient_accumulation to 1 or turn fused_backward off")
        return fuse_optimizer_into_backward(optimizer, config.max_grad_norm,
                                            lambda groups: self.make_optimizer(groups, config, device))

    def release_frozen(self, components: Components, text_encoders: bool) -> None:
        # The export still writes them, but not from the training device.
        components.vae.to("cpu")
        if text_encoders:
            for _, encoder in components.family.text_encoders(components):
                encoder.to("cpu")

    def after_step(self, components: Components, step: int, config: DreamBoothConfig) -> None:
        if self.trains_conditioning and step == config.text_encoder_steps:
            self._stop_text_encoder_training(components)

    def resumed(self, components: Components, step: int, config: DreamBoothConfig) -> None:
        if self.trains_conditioning and 0 < config.text_encoder_steps <= step:
            self._stop_text_encoder_training(components)

    @staticmethod
    def _stop_text_encoder_training(components: Components) -> None:
        # Grads are already None (zero_grad(set_to_none)); without requires_grad none are made again, and AdamW
        # skips parameters without a grad, weight decay included. eval() also ends its gradient checkpointing.
        for _, encoder in components.family.text_encoders(components):
            encoder.requires_grad_(False)
            encoder.eval()

    def artifact_bytes(self, components: Components, config: DreamBoothConfig) -> int:
        modules = [components.unet, components.vae] + [e for _, e in components.family.text_encoders(components)]
        single_file = model_bytes(modules, SAVE_DTYPES[config.save_precision])
        return single_file + (model_bytes(modules) if self.diffusers_out else 0)

    def export(self, components: Components, config: DreamBoothConfig, result: TrainResult,
               path: Path) -> tuple[Path, dict[str, str]]:
        if self.diffusers_out:
            save_diffusers_atomic(components, self.diffusers_out)
        return self.checkpoint(components, config, result, path)

    def checkpoint(self, components: Components, config: DreamBoothConfig, result: TrainResult,
                   path: Path) -> tuple[Path, dict[str, str]]:
        metadata = dreambooth_metadata(components, config, result, path)
        return save_single_file(components, path, SAVE_DTYPES[config.save_precision], metadata), metadata


def dreambooth_metadata(components: Components, config: DreamBoothConfig, result: TrainResult,
                        path: Path) -> dict[str, str]:
    text_encoder_steps = (min(config.text_encoder_steps or result.steps, result.steps)
                          if config.train_text_encoder else 0)
    return {
        **provenance_metadata("dreambooth", components.name, components.fingerprint, config, result),
        **modelspec_metadata(components.family.modelspec(components.prediction_type), IMPLEMENTATION_ORIGINAL,
                             path.stem, config.resolution, config.prompt, components.prediction_type),
        "personalize.steps": str(result.steps),
        "personalize.text_encoder_steps": str(text_encoder_steps),
        "personalize.prior_weight": f"{config.prior_weight:g}" if config.prior_preservation else "0",
    }


def save_diffusers_atomic(components: Components, folder: Path) -> Path:
    """Write a diffusers folder under a temporary name and rename it: a reader never sees half a model."""
    if folder.exists():
        raise PersonalizeError(f"{folder} already exists; choose another diffusers output folder")
    with atomic_path(folder, directory=True) as tmp:
        save_diffusers(components, tmp)
    return folder
