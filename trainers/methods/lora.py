"""LoRA: low-rank adapters on the UNet's attention projections (optionally more, and the text encoder), the base
frozen. Saved in kohya's layout, which ComfyUI's LoraLoader, A1111/Forge and diffusers all load with every key
matched (modern diffusers/PEFT key names are silently ignored by ComfyUI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from ..components import Components
from ..config import TrainConfig
from ..export import IMPLEMENTATION_DIFFUSERS, SAVE_DTYPES, addnet_hashes, iso_date, modelspec_metadata, \
    provenance_metadata, save_safetensors
from ..families.clip import kohya_module_path
from ..loop import TrainResult
from ..options import option
from .base import Method

UNET_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+projections": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
    "attention+projections+feedforward": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                          "ff.net.0.proj", "ff.net.2"],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoRAConfig(TrainConfig):
    steps: int = option(500, "optimizer steps (400-1000 is typical at 512 px)", min=1, max=100_000)
    lr: float = option(1e-4, "learning rate of the UNet adapters", min=0.0, max=1.0, step=1e-6)
    rank: int = option(8, "LoRA rank: 4-16 for one subject; the file grows linearly with it", min=1, max=256)
    alpha: float = option(8.0, "LoRA alpha; adapters are scaled by alpha/rank", min=0.0, max=1024.0, step=0.5)
    unet_targets: str = option("attention", "UNet layers that get adapters", choices=tuple(UNET_TARGETS))
    save_precision: str = option("fp16", "precision of the saved weights", choices=tuple(SAVE_DTYPES),
                                 advanced=True)


def _adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


class LoRAMethod(Method):
    name = "lora"

    def __init__(self, config: LoRAConfig):
        self.trains_conditioning = config.train_text_encoder

    def prepare(self, components: Components, config: LoRAConfig) -> list[dict]:
        encoders = [encoder for _, encoder in components.family.text_encoders(components)]
        for module in (components.unet, components.vae, *encoders):
            module.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                           target_modules=UNET_TARGETS[config.unet_targets]), components.unet)
        groups = [{"params": _adapter_parameters(components.unet), "lr": config.lr}]
        if config.train_text_encoder:
            for slot, encoder in components.family.text_encoders(components):
                layers = encoder.config.num_hidden_layers - slot.unused_last_layers
                inject_adapter_in_model(LoraConfig(r=config.rank, lora_alpha=config.alpha,
                                                   init_lora_weights="gaussian", target_modules=TEXT_ENCODER_TARGETS,
                                                   layers_to_transform=list(range(layers)), layers_pattern="layers"),
                                        encoder)
                groups.append({"params": _adapter_parameters(encoder), "lr": config.text_encoder_lr})
        for group in groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
                parameter.data = parameter.data.float()
        return groups

    def export(self, components: Components, config: LoRAConfig, result: TrainResult,
               path: Path) -> tuple[Path, dict[str, str]]:
        tensors = kohya_state_dict(components, config.alpha, SAVE_DTYPES[config.save_precision],
                                   text_encoder=config.train_text_encoder)
        metadata = lora_metadata(components, config, result, path)
        metadata.update(addnet_hashes(tensors, metadata))
        return save_safetensors(tensors, path, metadata), metadata


def kohya_state_dict(components: Components, alpha: float, dtype: torch.dtype,
                     text_encoder: bool) -> dict[str, torch.Tensor]:
    """``lora_unet_down_blocks_0_…_to_q.lora_down.weight`` / ``lora_te_text_model_encoder_layers_0_…``: the family's
    kohya prefixes, module paths with '.' → '_'."""
    family = components.family
    modules = [(family.lora_unet_prefix, components.unet, lambda path: path)]
    if text_encoder:
        modules += [(slot.lora_prefix, encoder, kohya_module_path)
                    for slot, encoder in family.text_encoders(components)]
    out: dict[str, torch.Tensor] = {}
    for prefix, module, kohya_path in modules:
        for key, value in get_peft_model_state_dict(module).items():
            module_path, part = key.rsplit(".lora_", 1)
            name = f"{prefix}_{kohya_path(module_path).replace('.', '_')}"
            out[f"{name}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = value.to(dtype)
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def lora_metadata(components: Components, config: LoRAConfig, result: TrainResult, path: Path) -> dict[str, str]:
    title = path.stem
    return {
        **provenance_metadata("lora", components.name, components.fingerprint, config, result),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_args": json.dumps({"unet_targets": config.unet_targets}),
        "ss_learning_rate": f"{config.lr:g}",
        "ss_unet_lr": f"{config.lr:g}",
        "ss_text_encoder_lr": f"{config.text_encoder_lr:g}" if config.train_text_encoder else "0",
        "ss_network_train_unet_only": str(not config.train_text_encoder),
        "ss_max_train_steps": str(config.steps),
        "ss_steps": str(result.steps),
        "ss_train_batch_size": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_mixed_precision": config.mixed_precision,
        "ss_min_snr_gamma": f"{config.min_snr_gamma:g}",
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_prior_loss_weight": f"{config.prior_weight:g}" if config.prior_preservation else "0",
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_seed": str(config.seed),
        "ss_sd_model_name": components.name,
        "ss_new_sd_model_hash": components.fingerprint,
        "ss_base_model_version": components.family.kohya_base_version,
        "ss_v2": str(components.family.kohya_v2),
        "ss_output_name": title,
        "ss_training_comment": f"trigger: {config.prompt}",
        "ss_training_finished_at": iso_date(),
        **modelspec_metadata(f"{components.family.modelspec(components.prediction_type)}/lora",
                             IMPLEMENTATION_DIFFUSERS, title, config.resolution, config.prompt,
                             components.prediction_type),
    }


def apply_lora(pipeline, path: str | Path, scale: float = 1.0, adapter_name: str = "personalize"):
    """Load a kohya-layout LoRA file into a diffusers pipeline (outside ComfyUI: tests, demo, benchmarks)."""
    pipeline.load_lora_weights(str(path), adapter_name=adapter_name)
    pipeline.set_adapters([adapter_name], adapter_weights=[scale])
    return pipeline
