"""Random DINO ViT-S/16 weights in both layouts the metrics load (the Hub folder and the original ``.pth``), so the
metric tests need no download."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..metrics import dino_hub_state, dino_vits16_config


def random_dino_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ViT-S/16 weights in the original DINO layout. Norms and biases are random too (not 1 and 0), so a
    swapped or mis-split key changes the embeddings."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {f"blocks.{i}.{name}": shape for i in range(12) for name, shape in {
        "norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
        "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "norm2.weight": (384,), "norm2.bias": (384,),
        "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,), "mlp.fc2.weight": (384, 1536),
        "mlp.fc2.bias": (384,)}.items()}
    shapes.update({"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
                   "patch_embed.proj.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)})
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        state[key] = 1.0 + 0.1 * noise if "norm" in key and key.endswith("weight") else 0.02 * noise
    return state


def make_random_dino(folder: str | Path, seed: int = 0) -> Path:
    """Write random ViT-S/16 weights as facebook/dino-vits16 lays them out (config.json + model.safetensors with
    the Hub's key names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dino_vits16_config().to_json_file(folder / "config.json")
    state = dino_hub_state(random_dino_state(seed), "random weights")
    save_file(state, folder / "model.safetensors")
    return folder


def make_random_dino_original(path: str | Path, seed: int = 0) -> Path:
    """Write the weights :func:`make_random_dino` writes for ``seed`` as the original ``.pth`` checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_dino_state(seed), path)
    return path
