"""CLIP text encoders and tokenizers, as the Stable Diffusion families use them (SD1.x's CLIP ViT-L/14 text model;
SDXL's first encoder is the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..errors import PersonalizeError
from .ldm import count_indices


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """A CLIP tokenizer from a folder with vocab.json + merges.txt (the pack's, ComfyUI's sd1_tokenizer, or SD's own).

    Returns a fresh copy each time, since Textual Inversion adds tokens to it.
    """
    return CLIPTokenizer.from_pretrained(str(folder))


def tokenizer_for(text_encoder: CLIPTextModel | CLIPTextConfig, folder: str | Path) -> CLIPTokenizer:
    """The tokenizer in ``folder``, padding and truncating to the text encoder's positions (ComfyUI's bundled SD1
    tokenizer files declare a longer maximum, since ComfyUI chunks long prompts itself)."""
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as error:  # noqa: BLE001 - whatever damaged tokenizer files make transformers raise
        raise PersonalizeError(f"could not read the CLIP tokenizer in {folder} ({type(error).__name__}: "
                               f"{str(error)[:200]}); give a folder with a complete vocab.json and merges.txt "
                               "(or tokenizer.json)") from None
    tokenizer.model_max_length = getattr(text_encoder, "config", text_encoder).max_position_embeddings
    return tokenizer


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def text_encoder_key_map(model_keys) -> Callable[[str], str]:
    """CLIPTextModel keys carry ``text_model.`` in transformers < 5.6 and not after; the original layout always."""
    nested = any(k.startswith("text_model.") for k in model_keys)
    return (lambda key: "text_model." + key) if nested else (lambda key: key)


def infer_text_config(text_sd: dict, base: dict) -> CLIPTextConfig:
    """``base`` (a family's shipped text-encoder config) with every size the weights reveal."""
    config = dict(base)
    token_table = text_sd["embeddings.token_embedding.weight"]
    config.update(
        vocab_size=token_table.shape[0],
        hidden_size=token_table.shape[1],
        intermediate_size=text_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_indices(text_sd, "encoder.layers."),
        max_position_embeddings=text_sd["embeddings.position_embedding.weight"].shape[0],
    )
    return CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})


def openclip_tokenizer(text_encoder: CLIPTextModel | CLIPTextConfig, folder: str | Path) -> CLIPTokenizer:
    """The same vocabulary padding with id 0 (``!`` in CLIP's), as OpenCLIP's tokenizer and ComfyUI's SDXL/SD2
    tokenizers pad, where CLIP's pads with its end token."""
    tokenizer = tokenizer_for(text_encoder, folder)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def kohya_module_path(module_path: str) -> str:
    """A CLIPTextModel module path as kohya's LoRA keys spell it: transformers ≥ 5.6 dropped ``text_model.`` from
    its names; the kohya layout keeps it."""
    return "text_model." + module_path.removeprefix("text_model.")
