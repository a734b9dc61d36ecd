"""The demo, the pack's main job on a machine with nothing but the pack — train LoRA, Textual Inversion and
DreamBooth on the embedded tiny model and made-up subject photos, sample with each result, and write a report.

The tiny model has random weights, so its samples are noise: the report shows that each trainer runs end to end,
writes a file that loads the way users load it, and lowers the denoising loss at fixed (timestep, noise) draws
(next to the same loss on photos of another object).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from .data import images_to_training_pixels
from .loop import fixed_denoising_loss
from .methods.dreambooth import DreamBoothConfig, DreamBoothMethod
from .methods.embedding import EmbeddingConfig, EmbeddingMethod, load_embedding
from .methods.lora import LoRAConfig, LoRAMethod, apply_lora
from .models import load_base
from .preflight import check_output_folder
from .report import loss_curve_image
from .run import personalize
from .sampling import sample_images
from .testing.synthetic import other_photos, subject_photos
from .testing.tiny import make_tiny_model

RESOLUTION = 64
PROMPT = "a photo of sks toy"
TOKEN = "<demo-toy>"


def demo_configs(steps_scale: float = 1.0) -> dict:
    steps = lambda n: max(1, round(n * steps_scale))  # noqa: E731
    common = dict(resolution=RESOLUTION, seed=0)
    return {
        # Random-weight models need higher learning rates than the literature's pretrained ones to move visibly.
        "lora": LoRAConfig(prompt=PROMPT, steps=steps(80), lr=1e-2, rank=8, alpha=8.0, **common),
        "embedding": EmbeddingConfig(token=TOKEN, init_word="toy", steps=steps(80), lr=5e-2, **common),
        "dreambooth": DreamBoothConfig(prompt=PROMPT, class_prompt="a photo of a toy", class_images=8,
                                       class_sampler_steps=4, steps=steps(60), lr=1e-4, gradient_checkpointing=False,
                                       **common),
    }


def _save_grid(rows: list[list[Image.Image]], path: Path, cell: int = 96) -> Path:
    columns = max(len(r) for r in rows)
    grid = Image.new("RGB", (columns * cell, len(rows) * cell), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (x * cell, y * cell))
    grid.save(path)
    return path


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.numpy() * 255).round().astype("uint8")) for im in images]


def run_demo(out: str | Path, steps_scale: float = 1.0) -> dict:
    out = Path(out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the tiny model's operators are too small to gain from a second thread
    model = make_tiny_model(out / "model", size="tiny", seed=0)
    photos, others = subject_photos(4, RESOLUTION), other_photos(4, RESOLUTION)
    (out / "subject").mkdir(exist_ok=True)
    for i, image in enumerate(_to_pil(photos)):
        image.save(out / "subject" / f"{i:02d}.png")
    subject_pixels = images_to_training_pixels(photos, RESOLUTION)
    other_pixels = images_to_training_pixels(others, RESOLUTION)
    seeds = [11, 12, 13, 14]
    base = load_base(model["single_file"])
    base_samples = sample_images(base, [PROMPT] * 4, seeds, resolution=RESOLUTION, steps=10)

    methods = {"lora": LoRAMethod, "embedding": EmbeddingMethod, "dreambooth": DreamBoothMethod}
    rows, results = [], {}
    for name, config in demo_configs(steps_scale).items():
        components = load_base(model["single_file"])
        method = methods[name](config)
        prompt = method.preview_prompt(config)
        started = time.perf_counter()
        before = (fixed_denoising_loss(components, subject_pixels, PROMPT),
                  fixed_denoising_loss(components, other_pixels, PROMPT))
        artifact = personalize(components, method, photos, None, config, out / f"{name}.safetensors",
                               class_cache_dir=out / "class_images", device=torch.device("cpu"))
        trained_prompt = prompt if name != "embedding" else f"a photo of {config.token}"
        after = (fixed_denoising_loss(components, subject_pixels, trained_prompt),
                 fixed_denoising_loss(components, other_pixels, trained_prompt))
        loss_curve_image(artifact.result.losses, f"{name} loss").save(out / f"{name}_loss.png")
        samples = _samples_from_file(name, artifact.path, model, trained_prompt, seeds)
        rows.append(samples)
        results[name] = {
            "file": artifact.path.name, "bytes": artifact.path.stat().st_size, "steps": artifact.result.steps,
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_per_step": round(artifact.result.seconds_per_step, 4),
            "final_loss": round(artifact.result.final_loss, 4),
            "subject_loss_ratio": round(after[0] / before[0], 3), "other_loss_ratio": round(after[1] / before[1], 3),
            "class_images_generated": artifact.class_images_generated,
        }
    _save_grid([_to_pil(photos), base_samples] + rows, out / "samples.png")
    (out / "report.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(_report_markdown(results))
    return {"output": str(out), "report": str(out / "report.md"), "methods": results}


def _samples_from_file(method: str, path: Path, model: dict, prompt: str, seeds: list[int]) -> list[Image.Image]:
    """Sample from the written artifact as a user would load it (not from the in-memory trained model)."""
    if method == "dreambooth":
        components = load_base(path, tokenizer_dir=model["tokenizer"])
        return sample_images(components, [prompt] * len(seeds), seeds, resolution=RESOLUTION, steps=10)
    components = load_base(model["single_file"])
    pipeline = components.pipeline()
    if method == "lora":
        apply_lora(pipeline, path)
    else:
        load_embedding(pipeline, path)
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipeline([prompt] * len(seeds), height=RESOLUTION, width=RESOLUTION, num_inference_steps=10,
                    generator=generators).images


def _report_markdown(results: dict) -> str:
    lines = ["# ComfyUI-Personalize demo", "",
             "Each method trained on 4 made-up photos of one subject with the embedded tiny random-weight SD1.x "
             f"model ({RESOLUTION} px, CPU). Loss ratios are the denoising loss at fixed (timestep, noise) draws "
             "after / before training: below 1 means the trainer changed the model in the direction of its data. "
             "The tiny model's VAE is random too, so its latents of any photo look alike and the other object's "
             "loss drops as much as the subject's; `tests/test_learning.py` and `python -m bench.quality` show "
             "subject-specific learning on models pretrained for it.", "",
             "| method | file | size | steps | s/step | final loss | subject loss after/before | "
             "other loss after/before |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['file']} | {r['bytes'] / 1024:.1f} KB | {r['steps']} | {r['seconds_per_step']} "
                     f"| {r['final_loss']} | {r['subject_loss_ratio']} | {r['other_loss_ratio']} |")
    lines += ["", "Samples (`samples.png`): row 1 the subject photos, row 2 the base model, then "
              f"{', '.join(results)} (random weights: the pictures are noise).",
              "", "Loss curves: " + ", ".join(f"`{name}_loss.png`" for name in results), ""]
    return "\n".join(lines)
