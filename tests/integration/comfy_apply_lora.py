"""Run by ComfyUI's Python (cwd = the ComfyUI checkout): apply LoRA files to an SD1.x checkpoint with ComfyUI's own
key mapping (comfy.lora.model_lora_keys_unet / _clip), loader (comfy.lora.load_lora: every weight adapter, LoHa,
LoKr and DoRA included) and patch maths (comfy.lora.calculate_weight), without a server.

    python comfy_apply_lora.py CHECKPOINT OUT_DIR LORA...

For each LORA writes OUT_DIR/<stem>.safetensors (every patched weight, under the checkpoint's key) and
OUT_DIR/<stem>.json: {"warnings": [what ComfyUI logged: keys not loaded, adapters that failed], "patched": n}.
"""

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

ARGUMENTS = sys.argv[1:]
sys.path.insert(0, ".")
sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI reads its own flags at import: no GPU here
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

UNET = "model.diffusion_model."
TEXT = "cond_stage_model."


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def key_map(checkpoint: dict) -> dict[str, str]:
    """LoRA module name → checkpoint key, built by ComfyUI's own functions from stand-ins that expose what they read:
    the SD1 model's state-dict keys and UNet config, and SD1 CLIP's ('clip_l.transformer.…')."""
    unet_keys = {k[len("model."):]: None for k in checkpoint if k.startswith(UNET)}
    unet_config = comfy.model_detection.detect_unet_config(checkpoint, UNET)
    model = SimpleNamespace(state_dict=lambda: unet_keys, model_config=SimpleNamespace(unet_config=unet_config))
    mapping = {k: "model." + v for k, v in comfy.lora.model_lora_keys_unet(model, {}).items()}
    clip_keys = {"clip_l." + k[len(TEXT):]: None for k in checkpoint if k.startswith(TEXT)}
    clip = SimpleNamespace(state_dict=lambda: clip_keys)
    mapping.update({k: TEXT + v[len("clip_l."):] for k, v in comfy.lora.model_lora_keys_clip(clip, {}).items()})
    return mapping


def main(checkpoint_path: str, out_dir: str, *loras: str) -> None:
    checkpoint = comfy.utils.load_torch_file(checkpoint_path)
    mapping = key_map(checkpoint)
    recorder = Recorder()
    logging.getLogger().addHandler(recorder)
    for lora_path in loras:
        recorder.messages.clear()
        patches = comfy.lora.load_lora(comfy.utils.load_torch_file(lora_path), mapping)
        patched = {}
        for key, adapter in patches.items():
            weight = checkpoint[key].float().clone()
            patched[key] = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight, key)
        stem = Path(lora_path).stem
        save_file({k: v.contiguous() for k, v in patched.items()}, str(Path(out_dir) / f"{stem}.safetensors"))
        report = {"warnings": list(recorder.messages), "patched": len(patched)}
        (Path(out_dir) / f"{stem}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*ARGUMENTS)
