"""Deterministic random-weight models of every family, the fixture of every test and the demo's default.

``tiny`` keeps a family's component structure (SD1.x: UNet with cross-attention and a block without it, 8× VAE,
CLIP text encoder; SDXL: the same with two text encoders, text-time conditioning and per-level transformer depths)
at sizes where a training step takes milliseconds. ``full`` has the family's real sizes everywhere, which ComfyUI's
model detection needs. Both are written as a diffusers folder and as an original-layout single file with a
tokenizer folder beside it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..components import Components
from ..errors import PersonalizeError
from ..families import family_named, shipped_config
from ..families.clip import load_tokenizer, openclip_tokenizer
from ..families import openclip, sd2
from ..families.ldm import heads_for
from ..families.sd15 import flat_text_state_dict
from ..models import save_diffusers, save_single_file
from ..preflight import check_output_folder
from .tokenizer import write_tokenizer

ARCHS = ("sd15", "sd2", "sdxl")

# Sizes chosen so the shipped configs' group-norm and head counts still divide them: the single file then loads
# through the same inference of sizes as a real checkpoint.
TINY_UNET = {
    "sd15": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=48, sample_size=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
    # SD2.x's: SD1.x's blocks with linear projections, on a 64-wide OpenCLIP encoder.
    "sd2": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64, sample_size=8,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[heads_for(32), heads_for(64)]),
    # SDXL's shape in small: a first level without attention, deeper transformers further down, 48 (CLIP-L) +
    # 64 (bigG) wide context, text-time embedding of the 64-wide pooled bigG output + 6 × 8 size ids.
    "sdxl": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=112, sample_size=8,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
                 attention_head_dim=[heads_for(32), heads_for(64)], addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=64 + 6 * 8),
}
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
TINY_TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, projection_dim=48)
TINY_OPENCLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, projection_dim=64,
                     num_attention_heads=heads_for(64))


def _text_config(name: str, overrides: dict, eos_token_id: int) -> CLIPTextConfig:
    values = shipped_config(name) | overrides
    values["eos_token_id"] = eos_token_id  # pool at the end token (see families.sdxl)
    return CLIPTextConfig(**{k: v for k, v in values.items() if k not in ("architectures", "model_type")})


def random_components(size: str = "tiny", seed: int = 0, prediction_type: str = "epsilon",
                      tokenizer_dir: str | Path | None = None, arch: str = "sd15") -> Components:
    if size not in ("tiny", "full"):
        raise PersonalizeError(f"--size must be 'tiny' or 'full', got {size!r}")
    if arch not in ARCHS:
        raise PersonalizeError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if tokenizer_dir is None:
        raise PersonalizeError("random_components needs a tokenizer folder (write one with write_tokenizer)")
    tiny = size == "tiny"
    family = family_named(arch)
    clip_values = shipped_config("sd15_text_encoder")
    # The full model's tokenizer fills the real 49408-row token table, as the real CLIP tokenizer does.
    vocab_size = write_tokenizer(tokenizer_dir, vocab_size=None if tiny else clip_values["vocab_size"])
    tokenizer = load_tokenizer(tokenizer_dir)

    def tiny_sizes(sizes: dict) -> dict:
        return sizes | {"vocab_size": vocab_size} if tiny else {}

    unet_config = shipped_config(f"{arch}_unet") | (TINY_UNET[arch] if tiny else {})
    vae_config = shipped_config(f"{arch}_vae") | (TINY_VAE if tiny else {})
    scheduler_config = shipped_config(f"{arch}_scheduler") | {"prediction_type": prediction_type}
    if arch == "sd2" and not tiny and prediction_type == "v_prediction":
        unet_config["sample_size"] = 96  # SD2.x's v models are the 768 px ones
    with torch.inference_mode(False), _default_dtype(torch.float16 if arch == "sdxl" and not tiny else None):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_config)
        torch.manual_seed(seed + 2)
        extra = {}
        if arch == "sd2":
            text_encoder, extra = _sd2_text_encoder(tiny_sizes(TINY_OPENCLIP), tokenizer, tokenizer_dir)
            if not tiny and prediction_type == "v_prediction":
                # What ComfyUI's probe reads as a v-prediction SD2 (families.sd2.V_PROBE); random init leaves it 0.
                torch.manual_seed(seed + 4)
                probe = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].norm1.bias
                probe.data = torch.randn(probe.shape) * 2 * sd2.V_PROBE_STD
        else:
            text_encoder = CLIPTextModel(_text_config("sd15_text_encoder", tiny_sizes(TINY_TEXT),
                                                      tokenizer.eos_token_id))
        if arch == "sdxl":
            torch.manual_seed(seed + 3)
            extra = dict(text_encoder_2=CLIPTextModelWithProjection(_text_config(
                "sdxl_text_encoder_2", tiny_sizes(TINY_OPENCLIP), tokenizer.eos_token_id)).eval(),
                tokenizer_2=openclip_tokenizer(text_encoder, tokenizer_dir))
    return Components(family=family, unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=extra.pop("tokenizer", tokenizer),
                      noise_scheduler=DDPMScheduler.from_config(scheduler_config),
                      name=f"{size}-{arch}", tokenizer_dir=str(tokenizer_dir), **extra)


@contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """Build in ``dtype``: the full SDXL's 3.5 B parameters would take 14 GB in fp32 before the fp16 file is written
    (built in fp16, the dtype it is stored in, they take 7). The full SD1.x model keeps its fp32-built weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or previous)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _sd2_text_encoder(sizes: dict, tokenizer, tokenizer_dir) -> tuple[CLIPTextModel, dict]:
    """A random OpenCLIP text tower of SD2.x's shape: diffusers' encoder (every layer but the last) and what the
    single file holds besides (that last layer, the text projection, the logit scale)."""
    config = _text_config("sd2_text_encoder", sizes, tokenizer.eos_token_id)
    tower = CLIPTextModelWithProjection(_text_config("sd2_text_encoder", sizes | {
        "num_hidden_layers": config.num_hidden_layers + 1, "projection_dim": config.hidden_size},
        tokenizer.eos_token_id))
    original = openclip.to_original(flat_text_state_dict(tower))
    original["logit_scale"] = torch.tensor(4.6052)  # ln(100), OpenCLIP's trained value
    weights, aside = sd2.split_text(original)
    text_encoder = sd2.FAMILY.text_model(CLIPTextModel, config, openclip.to_transformers(weights), torch.float32,
                                         owned=False)
    extras = {sd2.TEXT_PREFIX + k: v for k, v in aside.items()}
    return text_encoder, dict(tokenizer=openclip_tokenizer(text_encoder, tokenizer_dir), original_extras=extras)


def make_tiny_model(out: str | Path, size: str = "tiny", seed: int = 0, prediction_type: str = "epsilon",
                    arch: str = "sd15") -> dict:
    """Write ``out/diffusers/`` and ``out/model.safetensors`` (+ ``out/tokenizer/``); return their paths."""
    out = Path(out)
    check_output_folder(out, "--out")
    components = random_components(size, seed, prediction_type, tokenizer_dir=out / "tokenizer", arch=arch)
    family = components.family
    modules = [components.unet, components.vae] + [encoder for _, encoder in family.text_encoders(components)]
    # The full model is stored in fp16 like the checkpoints users have; the tiny one in fp32 for exact tests.
    dtype = torch.float16 if size == "full" else None
    if dtype is not None:
        for module in modules:
            module.to(dtype)
    single_file = save_single_file(components, out / "model.safetensors", dtype=dtype,
                                   metadata={"modelspec.architecture": family.modelspec(prediction_type),
                                             "modelspec.title": f"personalize random {size} {family.title} "
                                                                f"(seed {seed})",
                                             "modelspec.prediction_type": prediction_type})
    diffusers_dir = save_diffusers(components, out / "diffusers")
    parameters = sum(p.numel() for m in modules for p in m.parameters())
    return {"diffusers": str(diffusers_dir), "single_file": str(single_file), "tokenizer": str(out / "tokenizer"),
            "arch": arch, "size": size, "parameters": parameters,
            "single_file_mb": round(single_file.stat().st_size / 2**20, 2)}
