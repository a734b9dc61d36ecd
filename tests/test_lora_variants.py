"""LoRA variants (DoRA, LoHa, LoKr) and conv adapters (LoCon): each trains only its adapters and is written in the
kohya/LyCORIS layout, complete per module. That ComfyUI's own code applies every key and rebuilds exactly the trained
weights is checked in tests/integration/test_5_lora_variants.py."""

import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import pack

lora = pack("trainers.methods.lora")
adapters = pack("trainers.methods.adapters")
run = pack("trainers.run")
models = pack("trainers.models")
loop = pack("trainers.loop")
data = pack("trainers.data")

PROMPT = "a photo of sks toy"
# The tensors of one module in the file, per type (alpha aside); LoKr's factors are full or low-rank per layer.
PARTS = {
    "lora": [{"lora_down.weight", "lora_up.weight"}],
    "dora": [{"lora_down.weight", "lora_up.weight", "dora_scale"}],
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}],
    "lokr": [w1 | w2 for w1 in ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
             for w2 in ({"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})],
}


def train(components, images, out, **overrides):
    values = dict(prompt=PROMPT, steps=6, lr=1e-2, resolution=64, seed=0, rank=4, alpha=4.0, save_precision="fp32")
    values.update(overrides)
    config = lora.LoRAConfig(**values)
    return run.personalize(components, lora.LoRAMethod(config), images, None, config, out, device=torch.device("cpu"))


def modules_of(tensors):
    grouped = {}
    for key in tensors:
        name, part = key.split(".", 1)
        grouped.setdefault(name, set()).add(part)
    return grouped


# LoHa's and LoKr's products start slower than LoRA's sum: they get a higher rate (as LyCORIS recommends).
@pytest.mark.parametrize("lora_type,lr", [("dora", 1e-2), ("loha", 3e-2), ("lokr", 3e-2)])
def test_each_variant_trains_only_its_adapters_and_lowers_the_loss(lora_type, lr, components, subject_images,
                                                                  tmp_path):
    pixels = data.images_to_training_pixels(subject_images, 64)
    before = loop.fixed_denoising_loss(components, pixels, PROMPT)
    base = {k: v.clone() for k, v in components.unet.state_dict().items()}
    artifact = train(components, subject_images, tmp_path / "x.safetensors", lora_type=lora_type, steps=30, lr=lr)
    after_weights = {k.replace(".base_layer", ""): v for k, v in components.unet.state_dict().items()
                     if not adapters.is_adapter_parameter(k)}
    assert after_weights.keys() == base.keys()
    assert all(torch.equal(base[k], after_weights[k]) for k in base), "a base weight changed"
    after = loop.fixed_denoising_loss(components, pixels, PROMPT)
    assert after / before < 0.9, (before, after)
    assert artifact.path.is_file()


@pytest.mark.parametrize("lora_type", ["lora", "dora", "loha", "lokr"])
def test_each_variant_is_written_in_the_lycoris_layout_with_conv_layers(lora_type, components, subject_images,
                                                                       tmp_path):
    artifact = train(components, subject_images, tmp_path / "x.safetensors", lora_type=lora_type, conv_rank=2,
                     conv_alpha=1.0, train_text_encoder=True)
    tensors = load_file(artifact.path)
    grouped = modules_of(tensors)
    for name, parts in grouped.items():
        assert parts - {"alpha"} in PARTS[lora_type], (name, parts)
        assert re.match(r"^(lora_unet|lora_te)_[a-z0-9_]+$", name), name
    convs = [n for n in grouped if re.search(r"resnets_\d+_conv[12]$|samplers_0_conv$", n)]
    assert convs and any(n.startswith("lora_te_") for n in grouped)
    assert any(n.endswith("_to_q") for n in grouped)
    conv = convs[0]
    if lora_type in ("lora", "dora"):
        assert tensors[f"{conv}.lora_down.weight"].shape[0] == 2 and tensors[f"{conv}.alpha"].item() == 1.0
        assert tensors[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)
    if lora_type == "dora":
        up = tensors[f"{conv}.lora_up.weight"]
        assert tensors[f"{conv}.dora_scale"].shape == (up.shape[0], 1, 1, 1)
    if lora_type == "loha":
        assert tensors[f"{conv}.hada_w1_b"].shape[0] == 2  # conv_rank
    metadata = pack("trainers.checkpoints").read_metadata(artifact.path)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert '"conv_dim": "2"' in metadata["ss_network_args"]


def test_full_lokr_factors_carry_the_scale_and_no_alpha(components, subject_images, tmp_path):
    """A LoKr layer with both Kronecker factors full is applied with scale 1 by ComfyUI and LyCORIS: peft's alpha/r
    must then be inside the factors."""
    artifact = train(components, subject_images, tmp_path / "x.safetensors", lora_type="lokr", rank=4, alpha=2.0)
    grouped = modules_of(load_file(artifact.path))
    full = [n for n, parts in grouped.items() if {"lokr_w1", "lokr_w2"} <= parts]
    factored = [n for n, parts in grouped.items() if "lokr_w2_a" in parts]
    assert full and all("alpha" not in grouped[n] for n in full)
    assert all("alpha" in grouped[n] for n in factored)
