"""ComfyUI's own LoRA code (key maps, comfy.lora.load_lora with every weight adapter, calculate_weight) applies every
key of a LoRA, DoRA, LoHa and LoKr file with conv adapters and text-encoder adapters, and rebuilds exactly the weights
the pack trained. Runs ComfyUI's Python on the tiny SD1.x model in a subprocess: no server, no GPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from .harness import unit_conftest

pytestmark = pytest.mark.integration
TYPES = ("lora", "dora", "loha", "lokr")


def merged_original_weights(components) -> dict[str, torch.Tensor]:
    """The trained model's weights in the checkpoint layout: every adapter merged into its layer, then removed."""
    for module in (components.unet, components.text_encoder):
        for name, layer in list(module.named_modules()):
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                parent, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    return components.family.to_original(components)


@pytest.fixture(scope="module")
def variants(comfy_setup, tiny_model, tmp_path_factory):
    pack = unit_conftest().pack
    lora, run, models = pack("trainers.methods.lora"), pack("trainers.run"), pack("trainers.models")
    out = tmp_path_factory.mktemp("variants")
    trained = {}
    for lora_type in TYPES:
        components = models.load_base(tiny_model["single_file"])
        # rank 2 factors LoKr's larger layers and leaves the smaller ones full: both forms are in the file.
        config = lora.LoRAConfig(prompt="a photo of sks toy", steps=6, lr=3e-2, resolution=64, rank=2, alpha=3.0,
                                 conv_rank=2, conv_alpha=1.5, train_text_encoder=True, lora_type=lora_type,
                                 save_precision="fp32")
        artifact = run.personalize(components, lora.LoRAMethod(config), unit_conftest().make_subject_images(),
                                   None, config, out / f"{lora_type}.safetensors", device=torch.device("cpu"))
        trained[lora_type] = (artifact.path, merged_original_weights(components))
    applied = out / "applied"
    applied.mkdir()
    script = Path(__file__).with_name("comfy_apply_lora.py")
    process = subprocess.run([comfy_setup.python, str(script), tiny_model["single_file"], str(applied),
                              *(str(path) for path, _ in trained.values())], cwd=comfy_setup.comfy_dir,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return trained, applied


@pytest.mark.parametrize("lora_type", TYPES)
def test_comfyui_applies_every_key_and_rebuilds_the_trained_weights(variants, lora_type, tiny_model):
    trained, applied = variants
    path, expected = trained[lora_type]
    report = json.loads((applied / f"{lora_type}.json").read_text())
    assert report["warnings"] == [], report["warnings"][:5]
    modules = {key.split(".", 1)[0] for key in load_file(path)}
    assert report["patched"] == len(modules), "every module in the file patches one weight"
    base = load_file(tiny_model["single_file"])
    patched = load_file(applied / f"{lora_type}.safetensors")
    assert any(".in_layers.2." in k for k in patched) and any("cond_stage_model." in k for k in patched)
    for key, weight in patched.items():
        assert not torch.equal(weight, base[key].float()), f"{key} was not changed"
        assert torch.allclose(weight, expected[key].float(), rtol=1e-4, atol=1e-6), \
            (key, (weight - expected[key]).abs().max().item())
    # And nothing else changed in the trained model.
    untouched = [k for k in expected if k not in patched and not torch.equal(expected[k].float(), base[k].float())]
    assert untouched == [], untouched[:5]
