"""Deterministic random-weight SD1.x models, the fixture of every test and the demo's default.

``tiny`` keeps SD1.x's component structure (UNet with cross-attention and a block without it, 8× VAE, CLIP text
encoder, DDPM schedule) at sizes where a training step takes milliseconds. ``full`` has SD1.5's real sizes
everywhere, which ComfyUI's model detection needs. Both are written as a diffusers folder and as an original-layout
single file with a tokenizer folder beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..components import Components
from ..errors import PersonalizeError
from ..families import shipped_config
from ..families.clip import load_tokenizer
from ..families.sd15 import FAMILY as SD15
from ..models import save_diffusers, save_single_file
from .tokenizer import write_tokenizer

# Sizes chosen so the shipped SD1.5 configs' group-norm and head counts still divide them: the single file then
# loads through the same inference of sizes as a real checkpoint.
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=48, sample_size=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
TINY_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, projection_dim=48)


def random_components(size: str = "tiny", seed: int = 0, prediction_type: str = "epsilon",
                      tokenizer_dir: str | Path | None = None) -> Components:
    if size not in ("tiny", "full"):
        raise PersonalizeError(f"--size must be 'tiny' or 'full', got {size!r}")
    if tokenizer_dir is None:
        raise PersonalizeError("random_components needs a tokenizer folder (write one with write_tokenizer)")
    tiny = size == "tiny"
    sd15_text = shipped_config("sd15_text_encoder")
    # The full model's tokenizer fills SD1.5's 49408-row token table, as the real CLIP tokenizer does.
    vocab_size = write_tokenizer(tokenizer_dir, vocab_size=None if tiny else sd15_text["vocab_size"])
    unet_config = shipped_config("sd15_unet") | (TINY_UNET if tiny else {})
    vae_config = shipped_config("sd15_vae") | (TINY_VAE if tiny else {})
    text_values = sd15_text | (TINY_TEXT | {"vocab_size": vocab_size} if tiny else {})
    text_config = CLIPTextConfig(**{k: v for k, v in text_values.items() if k not in ("architectures", "model_type")})
    scheduler_config = shipped_config("sd15_scheduler") | {"prediction_type": prediction_type}
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_config)
    return Components(family=SD15, unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=load_tokenizer(tokenizer_dir),
                      noise_scheduler=DDPMScheduler.from_config(scheduler_config), name=f"{size}-sd15",
                      tokenizer_dir=str(tokenizer_dir))


def make_tiny_model(out: str | Path, size: str = "tiny", seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """Write ``out/diffusers/`` and ``out/model.safetensors`` (+ ``out/tokenizer/``); return their paths."""
    out = Path(out)
    components = random_components(size, seed, prediction_type, tokenizer_dir=out / "tokenizer")
    # The full model is stored in fp16 like the checkpoints users have; the tiny one in fp32 for exact tests.
    dtype = torch.float16 if size == "full" else None
    if dtype is not None:
        components.unet.to(dtype), components.vae.to(dtype), components.text_encoder.to(dtype)
    single_file = save_single_file(components, out / "model.safetensors", dtype=dtype,
                                   metadata={"modelspec.architecture": SD15.modelspec_architecture,
                                             "modelspec.title": f"personalize random {size} SD1.x (seed {seed})",
                                             "modelspec.prediction_type": prediction_type})
    diffusers_dir = save_diffusers(components, out / "diffusers")
    parameters = sum(p.numel() for m in (components.unet, components.vae, components.text_encoder)
                     for p in m.parameters())
    return {"diffusers": str(diffusers_dir), "single_file": str(single_file), "tokenizer": str(out / "tokenizer"),
            "size": size, "parameters": parameters,
            "single_file_mb": round(single_file.stat().st_size / 2**20, 2)}
