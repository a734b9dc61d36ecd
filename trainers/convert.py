"""Key-name conversions between the original (LDM / A1111 / ComfyUI) single-file layout and diffusers.

One table of ``(original prefix, diffusers prefix)`` pairs per component, built from the component's config, serves
both directions, so a round trip is exact by construction: keys are renamed and the VAE's mid-block attention
weights are reshaped (1×1 convs in the original layout, linear layers in diffusers); values are never touched.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import PersonalizeError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
_OLD_TEXT_PREFIX = "cond_stage_model.transformer."  # early SD1 files lack "text_model."

_UNET_RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
                ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
_VAE_RESNET = [("nin_shortcut.", "conv_shortcut.")]
_VAE_ATTENTION = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                  ("proj_out.", "to_out.0.")]


class KeyMap:
    """Renames keys by their longest matching prefix, in either direction."""

    def __init__(self, pairs: list[tuple[str, str]], reshape_prefixes: tuple[str, ...] = ()):
        self.to_diffusers_table = dict(pairs)
        self.to_original_table = {d: o for o, d in pairs}
        # Diffusers prefixes of linear layers stored as 1×1 convs in the original layout.
        self.reshape_prefixes = reshape_prefixes

    @staticmethod
    def _rename(key: str, table: dict[str, str]) -> str:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut]) + "."
            if prefix in table:
                return table[prefix] + key[len(prefix):]
        return key

    def _needs_reshape(self, diffusers_key: str) -> bool:
        return diffusers_key.endswith(".weight") and any(diffusers_key.startswith(p) for p in self.reshape_prefixes)

    def to_diffusers(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            new_key = self._rename(key, self.to_diffusers_table)
            if self._needs_reshape(new_key) and value.ndim == 4:
                value = value.reshape(value.shape[0], value.shape[1])
            out[new_key] = value
        return out

    def to_original(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in state_dict.items():
            if self._needs_reshape(key) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
            out[self._rename(key, self.to_original_table)] = value
        return out


def _resnet_pairs(original: str, diffusers: str, inner: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(original, diffusers)] + [(original + o, diffusers + d) for o, d in inner]


def unet_key_map(config) -> KeyMap:
    """Original ↔ diffusers names for a UNet2DConditionModel config (SD1.x, SD2.x and SDXL block structures)."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    down_attention = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]
    pairs += _resnet_pairs("middle_block.0.", "mid_block.resnets.0.", _UNET_RESNET)
    pairs += _resnet_pairs("middle_block.2.", "mid_block.resnets.1.", _UNET_RESNET)
    for level in range(levels):
        for layer in range(per_level):
            block = 1 + level * (per_level + 1) + layer
            pairs += _resnet_pairs(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{layer}.", _UNET_RESNET)
            if down_attention[level]:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{layer}."))
        if level < levels - 1:
            pairs.append((f"input_blocks.{(level + 1) * (per_level + 1)}.0.op.",
                          f"down_blocks.{level}.downsamplers.0.conv."))
        for layer in range(per_level + 1):
            block = level * (per_level + 1) + layer
            pairs += _resnet_pairs(f"output_blocks.{block}.0.", f"up_blocks.{level}.resnets.{layer}.", _UNET_RESNET)
            if up_attention[level]:
                pairs.append((f"output_blocks.{block}.1.", f"up_blocks.{level}.attentions.{layer}."))
        if level < levels - 1:
            slot = 2 if up_attention[level] else 1
            pairs.append((f"output_blocks.{level * (per_level + 1) + per_level}.{slot}.conv.",
                          f"up_blocks.{level}.upsamplers.0.conv."))
    return KeyMap(pairs)


def vae_key_map(config) -> KeyMap:
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    pairs, attention = [], []
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.norm_out.", f"{part}.conv_norm_out."))
        for i in (1, 2):
            pairs += _resnet_pairs(f"{part}.mid.block_{i}.", f"{part}.mid_block.resnets.{i - 1}.", _VAE_RESNET)
        pairs += _resnet_pairs(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION)
        attention.append(f"{part}.mid_block.attentions.0.")
    for level in range(levels):
        for layer in range(per_level):
            pairs += _resnet_pairs(f"encoder.down.{level}.block.{layer}.",
                                   f"encoder.down_blocks.{level}.resnets.{layer}.", _VAE_RESNET)
        if level < levels - 1:
            pairs.append((f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv."))
        # The original decoder numbers its levels from the lowest resolution up; diffusers from the top down.
        original_level = levels - 1 - level
        for layer in range(per_level + 1):
            pairs += _resnet_pairs(f"decoder.up.{original_level}.block.{layer}.",
                                   f"decoder.up_blocks.{level}.resnets.{layer}.", _VAE_RESNET)
        if level < levels - 1:
            pairs.append((f"decoder.up.{original_level}.upsample.conv.", f"decoder.up_blocks.{level}.upsamplers.0.conv."))
    return KeyMap(pairs, reshape_prefixes=tuple(attention))


def text_encoder_key_map(model_keys) -> Callable[[str], str]:
    """CLIPTextModel keys carry ``text_model.`` in transformers < 5.6 and not after; the original layout always."""
    nested = any(k.startswith("text_model.") for k in model_keys)
    return (lambda key: "text_model." + key) if nested else (lambda key: key)


def split_original(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SD1.x single-file state dict into its three components, prefixes removed."""
    parts = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(_OLD_TEXT_PREFIX):
            name = key[len(TEXT_PREFIX if key.startswith(TEXT_PREFIX) else _OLD_TEXT_PREFIX):]
            if name != "embeddings.position_ids":
                parts["text_encoder"][name] = value
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
    for name, part in parts.items():
        if not part:
            raise PersonalizeError(f"the checkpoint has no {name} weights (no keys starting with '{prefixes[name]}')")
    return parts
