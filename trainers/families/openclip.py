"""OpenCLIP text encoders in the original single-file layout (SD2.x's ViT-H, SDXL's second encoder bigG) ↔
transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``.

OpenCLIP fuses each layer's query, key and value projections into one ``in_proj`` weight (q|k|v stacked along the
output dimension) and stores the text projection as the matrix the pooled output is multiplied by (the transpose of
a linear layer's weight). One table of renames serves both directions; the only value changes are the exact
split/concatenation of ``in_proj`` and the transpose, so a round trip is bit-exact. diffusers has the
original → diffusers direction (``convert_open_clip_checkpoint``) but not the way back, which the pack needs for
DreamBooth's export; one table for both keeps them from drifting apart.
"""

from __future__ import annotations

import torch

from .ldm import count_indices

_TOP = [("token_embedding.weight", "embeddings.token_embedding.weight"),
        ("positional_embedding", "embeddings.position_embedding.weight"),
        ("ln_final.weight", "final_layer_norm.weight"), ("ln_final.bias", "final_layer_norm.bias")]
_LAYER = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
          ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
_QKV = ("q_proj", "k_proj", "v_proj")
PROJECTION = "text_projection"


def to_transformers(original: dict[str, torch.Tensor], layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP keys (prefix removed) → transformers' flat CLIP text keys (``embeddings.*``, ``encoder.layers.*``,
    ``final_layer_norm.*``, ``text_projection.weight``). ``layers`` keeps only the first ones (diffusers' SD2.x
    text encoder stops before the last layer); keys this does not map are left out."""
    out = {}
    for o, d in _TOP:
        if o in original:
            out[d] = original[o]
    if PROJECTION in original:
        out["text_projection.weight"] = original[PROJECTION].t().contiguous()
    total = count_indices(original, "transformer.resblocks.")
    for i in range(total if layers is None else layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for o, d in _LAYER:
            for part in ("weight", "bias"):
                out[dst + d + part] = original[src + o + part]
        for part in ("weight", "bias"):
            for name, chunk in zip(_QKV, original[f"{src}attn.in_proj_{part}"].chunk(3, dim=0)):
                out[f"{dst}self_attn.{name}.{part}"] = chunk
    return out


def to_original(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``to_transformers`` (flat transformers keys, without ``text_model.``)."""
    out = {}
    for o, d in _TOP:
        out[o] = flat[d]
    if "text_projection.weight" in flat:
        out[PROJECTION] = flat["text_projection.weight"].t().contiguous()
    for i in range(count_indices(flat, "encoder.layers.")):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for o, d in _LAYER:
            for part in ("weight", "bias"):
                out[dst + o + part] = flat[src + d + part]
        for part in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{part}"] = torch.cat([flat[f"{src}self_attn.{n}.{part}"] for n in _QKV])
    return out


def infer_config(original: dict[str, torch.Tensor], base: dict, layers: int | None = None) -> dict:
    """``base`` (a shipped text-encoder config) with the sizes the OpenCLIP weights reveal."""
    token_table = original["token_embedding.weight"]
    config = dict(base)
    config.update(vocab_size=token_table.shape[0], hidden_size=token_table.shape[1],
                  intermediate_size=original["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=layers or count_indices(original, "transformer.resblocks."),
                  max_position_embeddings=original["positional_embedding"].shape[0])
    if PROJECTION in original:
        config["projection_dim"] = original[PROJECTION].shape[1]
    return {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
