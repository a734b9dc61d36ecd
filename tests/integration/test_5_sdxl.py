"""SDXL (and SD2.x's text encoder) in the real ComfyUI.

ComfyUI's own SDXL and SD2.x text-encoder conversion (what the trainer nodes receive from a MODEL/CLIP) gives back
the pack's layout. The full-size random SDXL checkpoint the pack writes (the original layout its DreamBooth export
also writes) loads through CheckpointLoaderSimple as SDXL; a LoRA with UNet, CLIP-L (lora_te1) and bigG (lora_te2)
adapters and an embedding with clip_l + clip_g vectors, both trained by the CLI on that checkpoint in separate
processes (a full SDXL in fp32 is ~14 GB), load in LoraLoader and ``embedding:<name>`` with every key used.

The full-size checks need ``PERSONALIZE_IT_SDXL_MIN_GIB`` (default 16) GiB of available memory; they skip with the
reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .harness import full_checkpoint, record, record_run, saved_images, unit_conftest
from .test_3_more_nodes import free_gib

pytestmark = pytest.mark.integration

MIN_FREE_GIB = float(os.environ.get("PERSONALIZE_IT_SDXL_MIN_GIB", "16"))
CHECKPOINT = "personalize_sdxl_full.safetensors"
LORA = "it_sdxl_lora"
EMBEDDING = "it_sdxl_tok"


# ComfyUI's model config renames a checkpoint's text encoders into its own modules (SDXL: clip_l.*, clip_g.*; SD2.x:
# clip_h.*; fused in_proj split, projection transposed) and back for saving: the path comfy_state_dict takes for the
# trainer nodes.
_COMFY_CLIP_ROUND_TRIP = """
import sys
source, target, comfy_dir, model_config, prefix = sys.argv[1:6]
sys.path.insert(0, comfy_dir)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
from safetensors.torch import load_file, save_file
import comfy.supported_models as supported
state_dict = load_file(source)
config_class = getattr(supported, model_config)
config = config_class(dict(config_class.unet_config))
clip = config.process_clip_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)})
assert clip and all(k.startswith(("clip_l.", "clip_g.", "clip_h.")) for k in clip), sorted(clip)[:5]
saved = config.process_clip_state_dict_for_saving(clip)
save_file({k: v.contiguous() for k, v in saved.items()}, target)
"""


@pytest.mark.parametrize("arch, model_config, prefix, added", [
    ("sdxl", "SDXL", "conditioner.", {"conditioner.embedders.0.transformer.text_model.embeddings.position_ids"}),
    ("sd2", "SD20", "cond_stage_model.", set()),
])
def test_comfyuis_text_encoder_layout_is_the_one_the_pack_reads_and_writes(comfy_setup, tmp_path, arch, model_config,
                                                                           prefix, added):
    pack = unit_conftest().pack
    model = pack("trainers.testing.tiny").make_tiny_model(tmp_path / "tiny", arch=arch)
    original = load_file(model["single_file"])
    proc = subprocess.run([comfy_setup.python, "-c", _COMFY_CLIP_ROUND_TRIP, model["single_file"],
                           str(tmp_path / "clip.safetensors"), str(comfy_setup.comfy_dir), model_config, prefix],
                          capture_output=True, text=True, timeout=600, cwd=comfy_setup.comfy_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_comfy = {k: v for k, v in original.items() if not k.startswith(prefix)}
    from_comfy.update(load_file(tmp_path / "clip.safetensors"))
    # The same tensors (SDXL: plus the CLIP-L position ids ComfyUI adds, which the pack keeps and writes back).
    assert set(from_comfy) - set(original) == added and set(original) <= set(from_comfy)
    assert all(torch.equal(from_comfy[k], v) for k, v in original.items())
    components = pack("trainers.models").components_from_original(from_comfy, model["tokenizer"])
    assert components.family.name == arch
    exported = pack("trainers.models").original_state_dict(components)
    assert exported.keys() == from_comfy.keys() and all(torch.equal(exported[k], v) for k, v in from_comfy.items())


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "comfyui_personalize", *args, "--device", "cpu", "--json"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sdxl(base_dir, tmp_path_factory):
    if free_gib() < MIN_FREE_GIB:
        pytest.skip(f"{free_gib():.1f} GiB of memory available, full-size SDXL needs {MIN_FREE_GIB:g} "
                    "(PERSONALIZE_IT_SDXL_MIN_GIB)")
    checkpoint, seconds = full_checkpoint("sdxl")
    record(f"full-size SDXL checkpoint ({'made' if seconds else 'cached'}: {checkpoint})", seconds)
    (base_dir.checkpoints / CHECKPOINT).symlink_to(checkpoint)
    tokenizer = tmp_path_factory.mktemp("sdxl-tokenizer")
    unit_conftest().pack("trainers.testing.tokenizer").write_tokenizer(tokenizer, vocab_size=49408)
    common = ["--base", str(checkpoint), "--tokenizer", str(tokenizer), "--images", str(base_dir.input / "subject"),
              "--steps", "2", "--resolution", "64"]
    lora = cli("train-lora", *common, "--out", str(base_dir.loras / f"{LORA}.safetensors"), "--rank", "4",
               "--train-text-encoder")
    record(f"CLI train-lora on full SDXL (2 steps @64px, {lora['seconds_per_step']} s/step, "
           f"peak {lora['peak_rss_mb']} MB)", lora["seconds_per_step"] * 2)
    embedding = cli("train-embedding", *common, "--out", str(base_dir.embeddings / f"{EMBEDDING}.safetensors"),
                    "--token", EMBEDDING, "--init-word", "toy")
    return {"lora": lora, "embedding": embedding}


def sdxl_graph(prefix: str) -> dict:
    prompt = f"a photo of sks toy, embedding:{EMBEDDING}"
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                      "lora_name": f"{LORA}.safetensors", "strength_model": 1.0,
                                                      "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def test_sdxl_checkpoint_lora_and_embedding_load_in_comfyui_with_every_key(sdxl, client, base_dir):
    with safe_open(str(base_dir.loras / f"{LORA}.safetensors"), "pt") as f:
        prefixes = {k.split("_")[1] for k in f.keys()}
    assert prefixes == {"unet", "te1", "te2"}, prefixes
    with safe_open(str(base_dir.embeddings / f"{EMBEDDING}.safetensors"), "pt") as f:
        assert {k: f.get_slice(k).get_shape() for k in f.keys()} == {"clip_l": [1, 768], "clip_g": [1, 1280]}

    result = client.run(sdxl_graph("it_sdxl"), timeout=1800)
    record_run("SDXL graph (CheckpointLoaderSimple + LoraLoader + embedding + KSampler 1 step @64px)", result)
    assert result.status == "success", result.error_text()
    assert saved_images(result, base_dir.output)
    log = result.log
    # ComfyUI detected the file as SDXL (model_base.SDXL, SDXL's two-encoder CLIP).
    assert "Requested to load SDXL" in log, log[-3000:]
    assert "lora key not loaded" not in log, [line for line in log.splitlines() if "lora key" in line][:5]
    for warning in ("shape mismatch when trying to apply embedding", "does not exist, ignoring",
                    "error loading embedding"):
        assert warning not in log, [line for line in log.splitlines() if "embedding" in line][:5]
