"""SD2.x (2.0/2.1 and their fine-tunes, 512 px ε and 768 px v-prediction): SD1.x's UNet layout with linear
transformer projections and 64-wide heads, cross-attention on OpenCLIP ViT-H/14 (1024 wide), read at its penultimate
layer through the final layer norm.

Single files hold the whole OpenCLIP text tower under ``cond_stage_model.model.*`` (fused ``in_proj``, see
``openclip``). diffusers' text encoder is a ``CLIPTextModel`` that stops before the last layer (whose output the
conditioning never reads), so its last-layer output *is* the conditioning; the file's last layer, text projection and
logit scale are kept aside and written back on export. v-prediction files carry no marker: ComfyUI tells them by a
probe of one bias (see ``noise_scheduler``), as does this module, besides the ``v_pred`` key its own files carry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from ..components import Components, fingerprint_state_dict
from . import openclip
from .base import TextEncoderSlot, shipped_config
from .clip import openclip_tokenizer
from .ldm import UNET_PREFIX, VAE_PREFIX, count_indices, heads_for, split_by_prefix
from .sd15 import SD15, flat_text_state_dict

TEXT_PREFIX = "cond_stage_model.model."
# ComfyUI's SD2 v-prediction test (supported_models.SD20.model_type): the spread of this bias, > 0.09 in v models.
V_PROBE = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PROBE_STD = 0.09


class SD2(SD15):
    name = "sd2"
    title = "SD2.x"
    modelspec_architecture = "stable-diffusion-v2-512"
    kohya_base_version = "sd_v2"
    kohya_v2 = True
    comfy_tokenizer = "sd1_tokenizer"
    text_encoder_slots = (TextEncoderSlot("text_encoder", "tokenizer", "lora_te", "emb_params"),)

    def modelspec(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else self.modelspec_architecture

    # ------------------------------------------------------------------------------------------------ detection

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith(TEXT_PREFIX) for k in keys)

    def claims_folder(self, model_index: dict, folder: Path) -> bool:
        # SD2.x pipelines share SD1.x's class; OpenCLIP's text encoder uses exact GELU, OpenAI CLIP's quick GELU.
        return super().claims_folder(model_index, folder) and _text_activation(folder) == "gelu"

    # ------------------------------------------------------------------------------------------------ loading

    def from_original(self, state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                      dtype: torch.dtype = torch.float32, owned: bool = False) -> Components:
        parts, extras = split_original(state_dict)
        with torch.inference_mode(False):
            unet, vae = self.unet_and_vae(parts, dtype, owned)
            text_weights, text_extras = split_text(parts["openclip"])
            config = openclip.infer_config(text_weights, shipped_config("sd2_text_encoder"))
            config["num_attention_heads"] = heads_for(config["hidden_size"])
            text_encoder = self.text_model(CLIPTextModel, CLIPTextConfig(**config),
                                           openclip.to_transformers(text_weights), dtype, owned)
        extras.update({TEXT_PREFIX + k: v.clone() for k, v in text_extras.items()})
        components = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder,
                                tokenizer=openclip_tokenizer(text_encoder, tokenizer_dir),
                                noise_scheduler=self.noise_scheduler(state_dict), name=name,
                                tokenizer_dir=str(tokenizer_dir), original_extras=extras)
        components.fingerprint = fingerprint_state_dict(state_dict)
        return components

    def unet_config(self, unet_sd: dict, parts: dict) -> dict:
        config = super().unet_config(unet_sd, parts)
        config["attention_head_dim"] = [heads_for(c) for c in config["block_out_channels"]]
        return config

    def noise_scheduler(self, state_dict: dict) -> DDPMScheduler:
        scheduler = super().noise_scheduler(state_dict)
        probe = state_dict.get(V_PROBE)
        if probe is not None and torch.std(probe.float(), unbiased=False) > V_PROBE_STD:
            scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
        return scheduler

    def from_diffusers(self, folder: Path, dtype: torch.dtype = torch.float32) -> Components:
        components = super().from_diffusers(folder, dtype)
        components.tokenizer = openclip_tokenizer(components.text_encoder, folder / "tokenizer")
        return components

    # ------------------------------------------------------------------------------------------------ export

    def to_original(self, components: Components) -> dict[str, torch.Tensor]:
        out = self.unet_and_vae_original(components)
        text = openclip.to_original(flat_text_state_dict(components.text_encoder))
        out.update({TEXT_PREFIX + k: v for k, v in text.items()})
        return out


def _text_activation(folder: Path) -> str | None:
    import json

    config = folder / "text_encoder" / "config.json"
    return json.loads(config.read_text()).get("hidden_act") if config.is_file() else None


def split_text(original: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OpenCLIP text weights (prefix removed) → (what diffusers' encoder holds: every layer but the last, no
    projection), (the rest: last layer, text projection, logit scale)."""
    last = f"transformer.resblocks.{count_indices(original, 'transformer.resblocks.') - 1}."
    aside = [k for k in original if k.startswith(last) or k in (openclip.PROJECTION, "logit_scale")]
    return ({k: v for k, v in original.items() if k not in aside}, {k: original[k] for k in aside})


def split_original(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """An SD2.x single file's components (prefixes removed), and the keys none of them holds."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "openclip": TEXT_PREFIX}
    return split_by_prefix(state_dict, prefixes)


FAMILY = SD2()
