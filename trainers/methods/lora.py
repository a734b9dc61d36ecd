"""LoRA: low-rank adapters on the UNet's attention projections (optionally more, its 3x3 convolutions, and the text
encoder), the base frozen; plain LoRA or one of its variants (DoRA, LoHa, LoKr: ``adapters.py``). Saved in kohya's
(LyCORIS's) layout, which ComfyUI's LoraLoader loads with every key matched, as do A1111/Forge and diffusers for
plain LoRA (modern diffusers/PEFT key names are silently ignored by ComfyUI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..components import Components
from ..config import TrainConfig
from ..export import IMPLEMENTATION_DIFFUSERS, SAVE_DTYPES, addnet_hashes, iso_date, modelspec_metadata, \
    provenance_metadata, save_safetensors
from ..families.clip import kohya_module_path
from ..loop import TrainResult
from ..options import option
from .adapters import LORA_TYPES, AdapterSpec, inject, kohya_tensors
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
    alpha: float = option(8.0, "LoRA alpha; adapters are scaled by alpha/rank", min=0.0, max=1024.0, step=0.5,
                          advanced=True)
    unet_targets: str = option("attention", "UNet layers that get adapters", choices=tuple(UNET_TARGETS),
                               advanced=True)
    lora_type: str = option("lora", "lora: plain low-rank; dora: LoRA with a trained magnitude per output (DoRA); "
                            "loha: Hadamard product of two low-rank pairs; lokr: Kronecker product (smallest "
                            "files). All load in ComfyUI's LoraLoader", choices=LORA_TYPES, advanced=True)
    conv_rank: int = option(0, "rank of adapters on the UNet's 3x3 convolutions (ResNet blocks, down/up-samplers: "
                            "LoCon, kohya's conv_dim); 0 = none", min=0, max=256, advanced=True)
    conv_alpha: float = option(1.0, "alpha of the convolution adapters (scaled by conv_alpha/conv_rank)", min=0.0,
                               max=1024.0, step=0.5, advanced=True)
    save_precision: str = option("fp16", "precision of the saved weights", choices=tuple(SAVE_DTYPES),
                                 advanced=True)


def unet_adapters(config: LoRAConfig) -> AdapterSpec:
    return AdapterSpec(config.lora_type, config.rank, config.alpha, tuple(UNET_TARGETS[config.unet_targets]),
                       config.conv_rank, config.conv_alpha)


def text_encoder_adapters(config: LoRAConfig, layers: int) -> AdapterSpec:
    return AdapterSpec(config.lora_type, config.rank, config.alpha, tuple(TEXT_ENCODER_TARGETS), layers=layers)


class LoRAMethod(Method):
    name = "lora"

    def __init__(self, config: LoRAConfig):
        self.trains_conditioning = config.train_text_encoder

    def prepare(self, components: Components, config: LoRAConfig) -> list[dict]:
        encoders = [encoder for _, encoder in components.family.text_encoders(components)]
        for module in (components.unet, components.vae, *encoders):
            module.requires_grad_(False)
        groups = [{"params": inject(components.unet, unet_adapters(config)), "lr": config.lr}]
        if config.train_text_encoder:
            for slot, encoder in components.family.text_encoders(components):
                layers = encoder.config.num_hidden_layers - slot.unused_last_layers
                groups.append({"params": inject(encoder, text_encoder_adapters(config, layers)),
                               "lr": config.text_encoder_lr})
        for group in groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
                parameter.data = parameter.data.float()
        return groups

    def artifact_bytes(self, components: Components, config: LoRAConfig) -> int:
        """Each targeted layer gets a down (rank x in) and an up (out x rank) matrix; peft matches targets as
        name suffixes."""
        targets = [(components.unet, UNET_TARGETS[config.unet_targets])]
        if config.train_text_encoder:
            targets += [(encoder, TEXT_ENCODER_TARGETS) for _, encoder in components.family.text_encoders(components)]
        values = sum(config.rank * (layer.weight.shape[0] + layer.weight.shape[1])
                     for model, names in targets for name, layer in model.named_modules()
                     if any(name == n or name.endswith("." + n) for n in names) and hasattr(layer, "weight"))
        return values * SAVE_DTYPES[config.save_precision].itemsize

    def export(self, components: Components, config: LoRAConfig, result: TrainResult,
               path: Path) -> tuple[Path, dict[str, str]]:
        tensors = kohya_state_dict(components, SAVE_DTYPES[config.save_precision],
                                   text_encoder=config.train_text_encoder)
        metadata = lora_metadata(components, config, result, path)
        metadata.update(addnet_hashes(tensors, metadata))
        return save_safetensors(tensors, path, metadata), metadata


def kohya_state_dict(components: Components, dtype: torch.dtype, text_encoder: bool) -> dict[str, torch.Tensor]:
    """``lora_unet_down_blocks_0_…_to_q.lora_down.weight`` / ``lora_te_text_model_encoder_layers_0_…``: the family's
    kohya prefixes, module paths with '.' → '_'."""
    family = components.family
    modules = [(family.lora_unet_prefix, components.unet, lambda path: path)]
    if text_encoder:
        modules += [(slot.lora_prefix, encoder, kohya_module_path)
                    for slot, encoder in family.text_encoders(components)]
    out: dict[str, torch.Tensor] = {}
    for prefix, module, kohya_path in modules:
        out.update(kohya_tensors(module, prefix, kohya_path, dtype))
    return out


def network_args(config: LoRAConfig) -> dict[str, str]:
    """kohya's ss_network_args, with LyCORIS's names for the variant (algo, conv_dim, conv_alpha, dora_wd)."""
    args = {"unet_targets": config.unet_targets}
    if config.lora_type != "lora" or config.conv_rank:
        args["algo"] = "lora" if config.lora_type == "dora" else config.lora_type
        if config.lora_type == "dora":
            args["dora_wd"] = "True"
        if config.conv_rank:
            args.update(conv_dim=str(config.conv_rank), conv_alpha=f"{config.conv_alpha:g}")
    return args


def lora_metadata(components: Components, config: LoRAConfig, result: TrainResult, path: Path) -> dict[str, str]:
    title = path.stem
    return {
        **provenance_metadata("lora", components.name, components.fingerprint, config, result),
        "ss_network_module": "networks.lora" if config.lora_type == "lora" and not config.conv_rank
        else "lycoris.kohya",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": f"{config.alpha:g}",
        "ss_network_args": json.dumps(network_args(config)),
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
        "ss_enable_bucket": str(config.bucketing),
        # kohya's bucket report: the size and image count of each bucket used.
        "ss_bucket_info": json.dumps({"buckets": {
            str(i): {"resolution": [b["width"], b["height"]], "count": b["images"]}
            for i, b in enumerate(result.buckets)}}),
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
