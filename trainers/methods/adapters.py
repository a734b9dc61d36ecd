"""The LoRA family of adapters through peft (LoRA, DoRA, LoHa, LoKr, on linear and conv layers) and their export in
the kohya/LyCORIS key layout that ComfyUI's weight adapters (comfy/weight_adapter/) load.

Per adapted module ``<prefix>_<path with '.' → '_'>`` the file holds:

========  ===========================================================================  =========================
type      tensors                                                                      ComfyUI's scale
========  ===========================================================================  =========================
lora      ``lora_down.weight`` [r, in, (k, k)], ``lora_up.weight`` [out, r, (1, 1)]    alpha / r
dora      the same, plus ``dora_scale`` [out, 1, (1, 1)] (the magnitude, output axis)  alpha / r
loha      ``hada_w1_a`` ``hada_w1_b`` ``hada_w2_a`` ``hada_w2_b`` (+ ``hada_t1/t2``)    alpha / r
lokr      ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (+ ``lokr_t2``)  alpha / r if factored, else 1
========  ===========================================================================  =========================

plus ``alpha`` (a scalar) wherever ComfyUI reads it. peft's parameter names and shapes for LoHa and LoKr are
LyCORIS's (peft ported them), so those tensors are written as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

LORA_TYPES = ("lora", "dora", "loha", "lokr")
# The parameter-name prefix of each peft tuner: what marks a parameter as an adapter's.
_PREFIX = {"lora": "lora_", "dora": "lora_", "loha": "hada_", "lokr": "lokr_"}
# The 3x3 convolutions LoCon adapts (kohya's conv_dim): the ResNet blocks' and the down/up-samplers'.
UNET_CONV_TARGETS = ["conv1", "conv2", "conv"]
ADAPTER_NAME = "default"


@dataclass(frozen=True)
class AdapterSpec:
    lora_type: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    conv_rank: int = 0
    conv_alpha: float = 1.0
    layers: int | None = None  # only the first ``layers`` transformer layers (a text encoder's unread last ones)

    def peft_config(self):
        targets = list(self.targets) + (UNET_CONV_TARGETS if self.conv_rank else [])
        # peft matches these names against the last part(s) of a module's path.
        ranks = {name: self.conv_rank for name in UNET_CONV_TARGETS} if self.conv_rank else {}
        alphas = {name: self.conv_alpha for name in UNET_CONV_TARGETS} if self.conv_rank else {}
        common = dict(r=self.rank, target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas)
        if self.layers is not None:
            common.update(layers_to_transform=list(range(self.layers)), layers_pattern="layers")
        if self.lora_type in ("lora", "dora"):
            return LoraConfig(lora_alpha=self.alpha, init_lora_weights="gaussian", use_dora=self.lora_type == "dora",
                              **common)
        if self.lora_type == "loha":
            return LoHaConfig(alpha=self.alpha, **common)
        return LoKrConfig(alpha=self.alpha, **common)


def inject(module: torch.nn.Module, spec: AdapterSpec) -> list[torch.nn.Parameter]:
    """Add ``spec``'s adapters to ``module`` in place; return their parameters."""
    inject_adapter_in_model(spec.peft_config(), module)
    prefix = _PREFIX[spec.lora_type]
    return [p for name, p in module.named_parameters() if prefix in name]


def is_adapter_parameter(name: str) -> bool:
    return any(prefix in name for prefix in set(_PREFIX.values()))


def kohya_tensors(module: torch.nn.Module, prefix: str, kohya_path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``module``'s adapters as kohya/LyCORIS keys under ``prefix``; ``kohya_path`` maps a module path to the one
    the kohya name is built from."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in get_peft_model_state_dict(module).items():
        path, part = _split(key)
        grouped.setdefault(path, {})[part] = value.detach().float()
    out: dict[str, torch.Tensor] = {}
    for path, parts in grouped.items():
        layer = module.get_submodule(path)
        name = f"{prefix}_{kohya_path(path).replace('.', '_')}"
        # Per layer: rank_pattern / alpha_pattern may set them (the conv layers).
        rank = layer.r[ADAPTER_NAME]
        alpha = (layer.lora_alpha if hasattr(layer, "lora_alpha") else layer.alpha)[ADAPTER_NAME]
        tensors, write_alpha = _kohya_parts(layer, parts, rank, alpha)
        for part, value in tensors.items():
            out[f"{name}.{part}"] = value.to(dtype).contiguous()
        if write_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def _split(key: str) -> tuple[str, str]:
    """'a.b.to_q.lora_A.weight' → ('a.b.to_q', 'lora_A.weight'); 'a.b.to_q.hada_w1_a' → ('a.b.to_q', 'hada_w1_a')."""
    for marker in (".lora_", ".hada_", ".lokr_"):
        if marker in key:
            path, part = key.rsplit(marker, 1)
            return path, marker[1:] + part
    raise ValueError(f"not an adapter parameter: {key}")


def _kohya_parts(layer, parts: dict[str, torch.Tensor], rank: int, alpha: float):
    """The file's tensors for one layer, and whether its ``alpha`` is written."""
    if "lora_A.weight" in parts:
        tensors = {"lora_down.weight": parts["lora_A.weight"], "lora_up.weight": parts["lora_B.weight"]}
        if "lora_magnitude_vector" in parts:
            tensors["dora_scale"] = _comfy_dora_scale(layer, parts, alpha / rank)
        return tensors, True
    if "lokr_w1" in parts and "lokr_w2" in parts:
        # Both Kronecker factors full: ComfyUI (and LyCORIS) then ignore alpha (scale 1), so peft's alpha/r goes
        # into w1 and no alpha is written.
        return dict(parts, lokr_w1=parts["lokr_w1"] * (alpha / rank)), False
    return parts, True


def _comfy_dora_scale(layer, parts: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """peft's DoRA weight is m·(W + s·BA)/‖W + s·BA‖ per output row. ComfyUI's output-axis DoRA
    (weight_decompose) divides by the norm of the base weight W instead, so the magnitude is written as
    m·‖W‖/‖W + s·BA‖: ComfyUI then builds exactly the trained weight."""
    base = layer.get_base_layer().weight.detach().float()
    down, up = parts["lora_A.weight"], parts["lora_B.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * scale
    rows = base.shape[0]
    magnitude = parts["lora_magnitude_vector"].reshape(rows)
    base_norm = base.reshape(rows, -1).norm(dim=1)
    merged_norm = (base + delta).reshape(rows, -1).norm(dim=1)
    return (magnitude * base_norm / merged_norm).reshape(rows, *[1] * (base.dim() - 1))
