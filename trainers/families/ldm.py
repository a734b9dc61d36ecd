"""The original (LDM / A1111 / ComfyUI) single-file layout of UNets and VAEs, shared by the Stable Diffusion
families: key-name conversion to and from diffusers, and the sizes a state dict reveals.

One table of ``(original prefix, diffusers prefix)`` pairs per component, built from the component's config, serves
both directions, so a round trip is exact by construction: keys are renamed and the VAE's mid-block attention
weights are reshaped (1×1 convs in the original layout, linear layers in diffusers); values are never touched.
"""

from __future__ import annotations

import torch

from ..errors import PersonalizeError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

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


# The attention heads of SD2.x's and SDXL's UNets and of OpenCLIP's text encoders are 64 wide (ComfyUI's
# num_head_channels 64; bigG: 20 heads, ViT-H: 16): head counts follow from the widths the weights reveal.
HEAD_WIDTH = 64


def heads_for(width: int) -> int:
    return max(1, width // HEAD_WIDTH)


def count_indices(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_unet_config(unet_sd: dict, base: dict) -> dict:
    """``base`` (a family's shipped UNet config) with every size the original-layout weights reveal."""
    keys = list(unet_sd)
    config = dict(base)
    blocks = count_indices(keys, "input_blocks.")
    downsample_at = sorted(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.") and ".op." in k)
    per_level = (downsample_at[0] - 1) if downsample_at else blocks - 1
    levels = blocks // (per_level + 1)
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(unet_sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attention = f"input_blocks.{first}.1."
        depth = count_indices(keys, attention + "transformer_blocks.")
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(max(depth, 1))
    context = next((v.shape[1] for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in unet_sd.items() if k.endswith(".proj_in.weight")), None)
    config.update(
        in_channels=unet_sd["input_blocks.0.0.weight"].shape[1],
        out_channels=unet_sd["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per_level,
        down_block_types=down_types,
        up_block_types=["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
                        for t in reversed(down_types)],
        transformer_layers_per_block=depths if len(set(depths)) > 1 else depths[0],
        cross_attention_dim=context or config["cross_attention_dim"],
        use_linear_projection=proj_in is not None and proj_in.ndim == 2,
    )
    return config


def infer_vae_config(vae_sd: dict, base: dict) -> dict:
    keys = list(vae_sd)
    config = dict(base)
    levels = count_indices(keys, "encoder.down.")
    per_level = count_indices(keys, "encoder.down.0.block.")
    config.update(
        in_channels=vae_sd["encoder.conv_in.weight"].shape[1],
        out_channels=vae_sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=[vae_sd[f"encoder.down.{i}.block.{per_level - 1}.conv2.weight"].shape[0]
                            for i in range(levels)],
        layers_per_block=per_level,
        latent_channels=vae_sd["post_quant_conv.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return config


def split_by_prefix(state_dict: dict, prefixes: dict[str, str], passed_through: frozenset = frozenset()
                    ) -> tuple[dict[str, dict], dict]:
    """A single file's components by key prefix (prefixes removed), and the keys none of them holds (or that are
    ``passed_through``: in the file but in no model) as they are; the ``v_pred`` marker is neither, since it is
    written from the prediction type."""
    parts = {name: {} for name in prefixes}
    extras = {}
    for key, value in state_dict.items():
        part = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
        if part is None or key in passed_through:
            if key != "v_pred":
                extras[key] = value.clone()
        else:
            parts[part][key[len(prefixes[part]):]] = value
    for name, part in parts.items():
        if not part:
            raise PersonalizeError(f"the checkpoint has no {name} weights (no keys starting with '{prefixes[name]}')")
    return parts, extras
