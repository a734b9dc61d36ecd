"""The demo, the pack's main job on a machine with nothing but the pack: personalise the shipped toy model
(``testing/toy_model/``, pretrained on the toy world's photos) on 4 photos of one toy with DreamBooth (with prior
preservation), LoRA (with prior preservation) and Textual Inversion, sample each result as a user would load it,
score the samples with the pack's metrics, and write the artifacts, a sample grid, loss curves and a report.

The subject is a purple star with yellow dots (``testing.toyworld.INSTANCE``); its yellow dots are named in no
pretraining caption, so the base model cannot draw them from a prompt. The scores use the toy world's feature
network (``testing.toyfeatures``) in place of DINO, through the same ``metrics.dino_score`` / ``pres_score`` /
``div_score``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import metrics
from .methods.dreambooth import DreamBoothConfig, DreamBoothMethod
from .methods.embedding import EmbeddingConfig, EmbeddingMethod, load_embedding
from .methods.lora import LoRAConfig, LoRAMethod, apply_lora
from .models import load_base
from .preflight import check_output_folder
from .report import loss_curve_image
from .run import personalize
from .sampling import sample_images
from .testing import TOY_MODEL, toyfeatures, toyworld

RESOLUTION = 32
PROMPT = "a photo of sks toy"
TOKEN = "<sks-toy>"
TI_PROMPT = f"a photo of a {TOKEN}"
CONTEXT = " on the beach"
SAMPLES = 4  # per prompt
SAMPLER_STEPS = 15
GUIDANCE = 5.0
SEEDS = [11, 12, 13, 14]
TITLES = {"dreambooth": "DreamBooth", "lora": "LoRA", "embedding": "Textual Inversion"}


def demo_configs(steps_scale: float = 1.0) -> dict:
    """Fewer steps and class images than the quality benchmark's settings (``bench/quality/benchmark.py``), so
    that the demo fits in about 3 minutes of one CPU core; the learning rates are those tuned for the toy model."""
    steps = lambda n: max(1, round(n * steps_scale))  # noqa: E731
    common = dict(resolution=RESOLUTION, seed=0, batch_size=4, mixed_precision="no")
    prior = dict(class_prompt=toyworld.CLASS_PROMPT, class_images=12, class_sampler_steps=SAMPLER_STEPS,
                 class_guidance=GUIDANCE)
    return {
        "dreambooth": DreamBoothConfig(prompt=PROMPT, steps=steps(120), lr=5e-4, gradient_checkpointing=False,
                                       save_precision="fp16", **prior, **common),
        "lora": LoRAConfig(prompt=PROMPT, steps=steps(120), lr=3e-3, rank=16, alpha=16.0,
                           unet_targets="attention+projections+feedforward", **prior, **common),
        "embedding": EmbeddingConfig(token=TOKEN, init_word=toyworld.CLASS_NOUN, steps=steps(150), lr=0.2,
                                     **common),
    }


def _sample(components, prompt: str) -> dict[str, list[Image.Image]]:
    """The trained prompt, it recontextualised, and the bare class prompt (for PRES and DIV), same seeds."""
    kwargs = dict(resolution=RESOLUTION, steps=SAMPLER_STEPS, guidance=GUIDANCE)
    return {name: sample_images(components, [text] * SAMPLES, SEEDS, **kwargs)
            for name, text in (("subject", prompt), ("context", prompt + CONTEXT),
                               ("class", toyworld.CLASS_PROMPT))}


def _load_trained(method: str, path: Path):
    """The written artifact loaded the way a user loads it (not the in-memory trained model)."""
    if method == "dreambooth":
        return load_base(path, tokenizer_dir=TOY_MODEL / "tokenizer")
    components = load_base(TOY_MODEL / "model.safetensors")
    pipeline = components.pipeline()  # shares the components' modules: the file is loaded into them
    (apply_lora if method == "lora" else load_embedding)(pipeline, path)
    return components


def _scores(embedder, samples: dict, references: torch.Tensor) -> dict[str, float]:
    return {"fidelity": round(metrics.dino_score(embedder, samples["subject"], references).score, 4),
            "fidelity_in_context": round(metrics.dino_score(embedder, samples["context"], references).score, 4),
            "pres": round(metrics.pres_score(embedder, samples["class"], references).score, 4),
            "div": round(metrics.div_score(embedder, samples["class"]).score, 4)}


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.numpy() * 255).round().astype("uint8")) for im in images]


def save_grid(rows: list[tuple[str, list[Image.Image]]], headers: list[str], path: Path, cell: int = 96,
              label_width: int = 150, header_height: int = 22) -> Path:
    """Labelled rows of pictures; ``headers`` name equal groups of columns."""
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * cell, header_height + len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    group = columns // len(headers)
    for i, header in enumerate(headers):
        draw.text((label_width + i * group * cell + 6, 5), header, fill=(0, 0, 0))
    for y, (label, images) in enumerate(rows):
        top = header_height + y * cell
        for line, text in enumerate(label.split("\n")):
            draw.text((6, top + cell // 2 - 12 + 14 * line), text, fill=(0, 0, 0))
        for x, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + x * cell, top))
    grid.save(path)
    return path


def run_demo(out: str | Path, steps_scale: float = 1.0, log=print) -> dict:
    out = Path(out)
    check_output_folder(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # the toy model's operators are too small to gain from a second thread
    wall, cpu = time.perf_counter(), time.process_time()
    embedder = toyfeatures.load_toy_embedder(TOY_MODEL / "features.safetensors")
    photos, _ = toyworld.instance_photos(4, RESOLUTION, seed=0)
    held_out, _ = toyworld.instance_photos(SAMPLES * 2, RESOLUTION, seed=1)  # more photos of it, other poses
    (out / "subject").mkdir(exist_ok=True)
    for i, image in enumerate(_to_pil(photos)):
        image.save(out / "subject" / f"{i:02d}.png")

    log("sampling the base model")
    base_samples = _sample(load_base(TOY_MODEL / "model.safetensors"), PROMPT)
    results = {"real photos": {"fidelity": round(metrics.dino_score(embedder, held_out, photos).score, 4),
                               "div": round(metrics.div_score(embedder, held_out).score, 4)},
               "base model": _scores(embedder, base_samples, photos)}
    rows = [("subject photos\n(4 trained on,\n4 more)", _to_pil(photos) + _to_pil(held_out[:SAMPLES])),
            ("base model", base_samples["subject"] + base_samples["context"])]
    for name, config in demo_configs(steps_scale).items():
        log(f"training {TITLES[name]} ({config.steps} steps)")
        started, started_cpu = time.perf_counter(), time.process_time()
        method = {"dreambooth": DreamBoothMethod, "lora": LoRAMethod, "embedding": EmbeddingMethod}[name](config)
        artifact = personalize(load_base(TOY_MODEL / "model.safetensors"), method, photos, None, config,
                               out / f"{name}.safetensors", class_cache_dir=out / "class_images",
                               device=torch.device("cpu"))
        trained = time.perf_counter() - started
        loss_curve_image(artifact.result.losses, f"{TITLES[name]} loss").save(out / f"{name}_loss.png")
        samples = _sample(_load_trained(name, artifact.path), TI_PROMPT if name == "embedding" else PROMPT)
        rows.append((TITLES[name], samples["subject"] + samples["context"]))
        results[name] = _scores(embedder, samples, photos) | {
            "file": artifact.path.name, "bytes": artifact.path.stat().st_size, "steps": artifact.result.steps,
            "final_loss": round(artifact.result.final_loss, 4),
            "class_images_generated": artifact.class_images_generated,
            "train_seconds": round(trained, 1), "seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - started_cpu, 1)}
        log(f"  {name}: fidelity {results[name]['fidelity']}, {results[name]['seconds']} s")
    save_grid(rows, [f'"{PROMPT}"', f'"...{CONTEXT}"'], out / "samples.png")
    report = {"methods": results, "prompts": {"subject": PROMPT, "textual_inversion": TI_PROMPT,
                                              "context": CONTEXT.strip(), "class": toyworld.CLASS_PROMPT},
              "subject": toyworld.INSTANCE.describe(), "samples_per_prompt": SAMPLES, "sampler_steps": SAMPLER_STEPS,
              "guidance": GUIDANCE, "seconds": round(time.perf_counter() - wall, 1),
              "cpu_seconds": round(time.process_time() - cpu, 1)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_report_markdown(report))
    return {"output": str(out), "report": str(out / "report.md"), "grid": str(out / "samples.png")} | report


def _report_markdown(report: dict) -> str:
    results = report["methods"]
    lines = ["# ComfyUI-Personalize demo", "",
             f"The shipped toy model (`trainers/testing/toy_model/`, SD1.x layout, v-prediction, {RESOLUTION} px, "
             "pretrained on captioned photos of procedurally drawn toys) personalised on 4 photos of one toy, "
             f"{report['subject']}, on the CPU. No caption of its pretraining names the accent colour, so the base "
             "model does not draw the yellow dots from a prompt.", "",
             f"Scores ({report['samples_per_prompt']} samples per prompt, {report['sampler_steps']} sampler steps, "
             f"guidance {report['guidance']}) with the toy world's feature network in place of DINO, through the "
             "pack's metrics: fidelity = mean cosine of samples of the subject prompt to the 4 training photos "
             "(DINO score; higher is closer to the subject), in context = the same for the prompt with "
             f"\"{report['prompts']['context']}\", PRES = the same for samples of \"{report['prompts']['class']}\" "
             "(lower: the class did not collapse onto the subject), DIV = 1 - mean pairwise cosine of those class "
             "samples (higher: more diverse). Real photos: 8 other photos of the subject against the 4.", "",
             "| | fidelity | in context | PRES | DIV | steps | file | seconds (CPU) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        title = TITLES.get(name, name)
        trained = (f"{r['steps']} | {r['file']} ({r['bytes'] / 1024:.0f} KB) | {r['seconds']} ({r['cpu_seconds']})"
                   if "steps" in r else " | | ")
        lines.append(f"| {title} | {r['fidelity']} | {r.get('fidelity_in_context', '')} | {r.get('pres', '')} | "
                     f"{r['div']} | {trained} |")
    lines += ["", f"Samples (`samples.png`): the subject photos, then one row per model: left \"{PROMPT}\" "
              f"(Textual Inversion: \"{report['prompts']['textual_inversion']}\"), right the same{CONTEXT}.",
              "", "Loss curves: " + ", ".join(f"`{name}_loss.png`" for name in TITLES if name in results),
              "", f"Total {report['seconds']} s wall, {report['cpu_seconds']} s CPU.", ""]
    return "\n".join(lines)
