"""SDXL 1.0 base and its fine-tunes: a UNet with cross-attention on two text encoders at once (CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14, penultimate hidden states concatenated to 2048 wide) and text-time conditioning (bigG's pooled,
projected prompt embedding plus six Fourier-embedded size/crop numbers, 2816 wide at full size); SD's 8× VAE with
SDXL's scaling; the DDPM schedule of SD1.x.

Single files: ``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.0.transformer.
text_model.*`` (CLIP-L, transformers' names) and ``conditioner.embedders.1.model.*`` (bigG, OpenCLIP's names, see
``openclip``). Both text encoders use CLIP's BPE vocabulary; bigG's tokenizer pads with ``!`` (id 0), as the
original and ComfyUI do, so one tokenizer folder (ComfyUI's ``sd1_tokenizer``) serves both.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..components import Components, fingerprint_state_dict
from . import openclip
from .base import TextEncoderSlot, shipped_config
from .clip import infer_text_config, openclip_tokenizer, tokenize, tokenizer_for
from .ldm import UNET_PREFIX, VAE_PREFIX, heads_for, split_by_prefix
from .sd15 import SD15, flat_text_state_dict

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
BIGG_PREFIX = "conditioner.embedders.1.model."
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
# The VAE's downsampling: the UNet sees latents of 1/8 the image size.
LATENT_SCALE = 8
def size_ids(height: int, width: int, batch: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop top-left, target size. Training crops squares out of images
    scaled to the resolution, so the original and target sizes are the training size and the crop is at 0, 0 —
    what the SDXL pipeline also uses when sampling at that size. The one place these numbers are made."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=like.dtype, device=like.device).expand(batch, 6)


class SDXL(SD15):
    name = "sdxl"
    title = "SDXL"
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    kohya_base_version = "sdxl_base_v1-0"
    comfy_tokenizer = "sd1_tokenizer"
    # SDXL was trained at 1024 px and is poor below ~768; LoRA rank 16-32 is what kohya's and diffusers' SDXL
    # guides use (alpha stays 8: alpha = rank/2 is kohya's common SDXL setting).
    defaults = {"resolution": 1024, "rank": 16}
    text_encoder_slots = (TextEncoderSlot("text_encoder", "tokenizer", "lora_te1", "clip_l", unused_last_layers=1),
                          TextEncoderSlot("text_encoder_2", "tokenizer_2", "lora_te2", "clip_g"))

    # ------------------------------------------------------------------------------------------------ detection

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return (any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith(CLIP_L_PREFIX) for k in keys)
                and any(k.startswith(BIGG_PREFIX) for k in keys))

    def claims_folder(self, model_index: dict, folder: Path) -> bool:
        return model_index.get("_class_name") == "StableDiffusionXLPipeline"

    # ------------------------------------------------------------------------------------------------ loading

    def from_original(self, state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                      dtype: torch.dtype = torch.float32, owned: bool = False) -> Components:
        parts, extras = split_original(state_dict)
        with torch.inference_mode(False):
            unet, vae = self.unet_and_vae(parts, dtype, owned)
            clip_config = infer_text_config(parts["text_encoder"], shipped_config("sd15_text_encoder"))
            bigg_config = openclip.infer_config(parts["openclip"], shipped_config("sdxl_text_encoder_2"))
            bigg_config["num_attention_heads"] = heads_for(bigg_config["hidden_size"])
            tokenizer = tokenizer_for(clip_config, tokenizer_dir)
            tokenizer_2 = openclip_tokenizer(clip_config, tokenizer_dir)
            # Pool at the first end token, not at the highest id (transformers' legacy rule for eos_token_id 2),
            # which would pick a token that Textual Inversion added.
            clip_config.eos_token_id = tokenizer.eos_token_id
            bigg_config["eos_token_id"] = tokenizer_2.eos_token_id
            text_encoder = self.text_model(CLIPTextModel, clip_config, parts["text_encoder"], dtype, owned)
            text_encoder_2 = self.text_model(CLIPTextModelWithProjection, CLIPTextConfig(**bigg_config),
                                             openclip.to_transformers(parts["openclip"]), dtype, owned)
        components = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                noise_scheduler=self.noise_scheduler(state_dict), name=name,
                                tokenizer_dir=str(tokenizer_dir), original_extras=extras)
        components.fingerprint = fingerprint_state_dict(state_dict)
        return components

    def unet_config(self, unet_sd: dict, parts: dict) -> dict:
        config = super().unet_config(unet_sd, parts)
        adm_width = unet_sd["label_emb.0.0.weight"].shape[1]
        pooled_width = parts["openclip"][openclip.PROJECTION].shape[1]
        config.update(attention_head_dim=[heads_for(c) for c in config["block_out_channels"]],
                      projection_class_embeddings_input_dim=adm_width,
                      addition_time_embed_dim=(adm_width - pooled_width) // 6)
        return config

    pipeline_parts = _PIPELINE_PARTS

    def from_diffusers(self, folder: Path, dtype: torch.dtype = torch.float32) -> Components:
        self._check_folder(folder)
        with torch.inference_mode(False):
            unet, vae, text_encoder = self._diffusers_unet_vae_clip(folder, dtype)
            tokenizer = tokenizer_for(text_encoder.config, folder / "tokenizer")
            tokenizer_2 = tokenizer_for(text_encoder.config, folder / "tokenizer_2")
            # As in from_original: pool at the end token, also with added tokens.
            text_encoder_2 = self._diffusers_text_encoder(CLIPTextModelWithProjection, folder, "text_encoder_2", dtype,
                                                          eos_token_id=tokenizer_2.eos_token_id)
        components = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                                name=folder.name, tokenizer_dir=str(folder / "tokenizer"))
        components.fingerprint = fingerprint_state_dict(self.to_original(components))
        return components

    # ------------------------------------------------------------------------------------------------ export

    def to_original(self, components: Components) -> dict[str, torch.Tensor]:
        out = self.unet_and_vae_original(components)
        out.update({CLIP_L_PREFIX + k: v for k, v in flat_text_state_dict(components.text_encoder).items()})
        bigg = openclip.to_original(flat_text_state_dict(components.text_encoder_2))
        out.update({BIGG_PREFIX + k: v for k, v in bigg.items()})
        return out

    # ------------------------------------------------------------------------------------------------ conditioning

    def tokenize(self, components: Components, prompts: list[str]) -> torch.Tensor:
        """[prompts, 2, 77]: each prompt through both tokenizers (they differ in padding)."""
        return torch.stack([tokenize(components.tokenizer, prompts), tokenize(components.tokenizer_2, prompts)], 1)

    def encode(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # Penultimate layers without the final layer norm, as the SDXL pipeline and ComfyUI take them.
        clip_ids, bigg_ids = input_ids.unbind(1)
        clip = components.text_encoder(clip_ids, output_hidden_states=True)
        bigg = components.text_encoder_2(bigg_ids, output_hidden_states=True)
        return {"encoder_hidden_states": torch.cat([clip.hidden_states[-2], bigg.hidden_states[-2]], dim=-1),
                "text_embeds": bigg.text_embeds}

    def denoise(self, unet, noisy, timesteps, conditioning):
        height, width = (side * LATENT_SCALE for side in noisy.shape[-2:])
        text_embeds = conditioning["text_embeds"]
        added = {"text_embeds": text_embeds, "time_ids": size_ids(height, width, noisy.shape[0], text_embeds)}
        return unet(noisy, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added).sample

    def pipeline(self, components: Components, scheduler=None) -> StableDiffusionXLPipeline:
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=scheduler or DDIMScheduler.from_config(components.noise_scheduler.config),
            add_watermarker=False)


def split_original(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """An SDXL single file's components (prefixes removed), and the keys none of them holds."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CLIP_L_PREFIX, "openclip": BIGG_PREFIX}
    # Kept as they are in the file but not in the models (transformers' position-id buffer, OpenCLIP's logit scale).
    passed_through = {CLIP_L_PREFIX + "embeddings.position_ids", BIGG_PREFIX + "logit_scale"}
    return split_by_prefix(state_dict, prefixes, frozenset(passed_through))


FAMILY = SDXL()
