"""Personalise the pretrained toy model on 4 photos of one toy with each of the pack's trainers, sample, and score.

For each training seed: DreamBooth (full fine-tune) and LoRA, each with and without prior preservation, and Textual
Inversion, all through ``run.personalize`` (the pack's Python API, artifact written and all). Each trained model
samples the instance prompt and the class prompt with ``sampling.sample_images``; the pack's metrics module scores
them with the toy feature network (see ``features.py``):

* fidelity: ``metrics.dino_score`` of instance-prompt samples against the 4 instance photos (higher is closer);
* PRES: ``metrics.pres_score`` of class-prompt samples against the instance photos (lower: less class collapse);
* DIV: ``metrics.div_score`` of class-prompt samples (1 - mean pairwise cosine; higher is more diverse).

Also per run: the pack's learning check (``loop.fixed_denoising_loss`` on the instance photos and on other toys in
other scenes, after/before).
"""

from __future__ import annotations

import json
import platform
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import assets, world
from .pack import REPO, trainer

loop = trainer("loop")
models = trainer("models")
run = trainer("run")
sampling = trainer("sampling")
metrics = trainer("metrics")
data = trainer("data")
dreambooth = trainer("methods.dreambooth")
lora = trainer("methods.lora")
embedding = trainer("methods.embedding")

INSTANCE_PROMPT = "a photo of sks toy"
TOKEN = "<sks-toy>"
TI_PROMPT = f"a photo of a {TOKEN}"
CPU = torch.device("cpu")
# The reported subject, and the one the hyper-parameters are tuned on (so that the reported numbers are not
# tuned to their own test): a different shape, colour and accent colour, with the same hard accent (dots).
SUBJECTS = {"reported": world.INSTANCE, "tuning": world.Toy("heart", "green", "dotted", "pink")}


@dataclass
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200  # DreamBooth and LoRA
    batch_size: int = 4  # all 4 photos each step (+ 4 class images with prior preservation)
    samples: int = 8  # per prompt, per run
    sampler_steps: int = 25
    guidance: float = 5.0
    class_images: int = 48
    prior_weight: float = 1.0  # the paper's lambda
    # The toy model was pretrained at lr 1e-3 for 1200 steps: fine-tuning rates are scaled to it (the paper's 5e-6
    # for SD barely moves it in 200 steps).
    dreambooth_lr: float = 5e-4
    train_text_encoder: bool = False  # DreamBooth and LoRA
    text_encoder_lr: float = 5e-5
    lora_lr: float = 3e-3
    lora_rank: int = 16
    lora_targets: str = "attention+projections+feedforward"  # the toy UNet has attention only at 8 and 4 px
    # Its token vectors are ~1 long (SD1.5's ~0.4) and capped at 2x that: a larger step than SD's 5e-3.
    embedding_lr: float = 0.2
    embedding_steps: int = 200
    instance_images: int = 4
    resolution: int = 32
    methods: tuple[str, ...] = ("dreambooth", "dreambooth_no_prior", "lora", "lora_no_prior", "embedding")
    subject: str = "reported"  # a key of SUBJECTS


RUNS = {  # name -> (table label, method key in the JSON, prior setting)
    "dreambooth": ("DreamBooth (full fine-tune)", "dreambooth", "with_prior"),
    "dreambooth_no_prior": ("DreamBooth (full fine-tune)", "dreambooth", "without_prior"),
    "lora": ("LoRA", "lora", "with_prior"),
    "lora_no_prior": ("LoRA", "lora", "without_prior"),
    "embedding": ("Textual Inversion", "textual_inversion", "without_prior"),
}


def make_method(name: str, settings: Settings, seed: int):
    common = dict(resolution=settings.resolution, seed=seed, mixed_precision="no", batch_size=settings.batch_size)
    prior = dict(class_prompt=world.CLASS_PROMPT, class_images=settings.class_images,
                 class_sampler_steps=settings.sampler_steps, class_guidance=settings.guidance,
                 prior_weight=settings.prior_weight)
    no_prior = dict(class_prompt="")
    if name.startswith("dreambooth"):
        config = dreambooth.DreamBoothConfig(
            prompt=INSTANCE_PROMPT, steps=settings.steps, lr=settings.dreambooth_lr, gradient_checkpointing=False,
            train_text_encoder=settings.train_text_encoder, text_encoder_lr=settings.text_encoder_lr,
            save_precision="fp16", **(no_prior if name.endswith("no_prior") else prior), **common)
        return dreambooth.DreamBoothMethod(config), config, INSTANCE_PROMPT, ".safetensors"
    if name.startswith("lora"):
        config = lora.LoRAConfig(prompt=INSTANCE_PROMPT, steps=settings.steps, lr=settings.lora_lr,
                                 rank=settings.lora_rank, alpha=float(settings.lora_rank),
                                 unet_targets=settings.lora_targets,
                                 train_text_encoder=settings.train_text_encoder,
                                 text_encoder_lr=settings.text_encoder_lr,
                                 **(no_prior if name.endswith("no_prior") else prior), **common)
        return lora.LoRAMethod(config), config, INSTANCE_PROMPT, ".safetensors"
    if name == "embedding":
        config = embedding.EmbeddingConfig(token=TOKEN, init_word=world.CLASS_NOUN, steps=settings.embedding_steps,
                                           lr=settings.embedding_lr, **common)
        return embedding.EmbeddingMethod(config), config, TI_PROMPT, ".safetensors"
    raise ValueError(name)


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "values": [round(v, 4) for v in values]}


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.numpy() * 255).round().astype("uint8")) for im in images]


def score(embedder, instance_samples, class_samples, references) -> dict[str, float]:
    return {"fidelity": metrics.dino_score(embedder, instance_samples, references).score,
            "pres": metrics.pres_score(embedder, class_samples, references).score,
            "div": metrics.div_score(embedder, class_samples).score}


def sample_pair(components, instance_prompt: str, settings: Settings, seed: int):
    seeds = [10_000 * (seed + 1) + i for i in range(settings.samples)]
    kwargs = dict(resolution=settings.resolution, steps=settings.sampler_steps, guidance=settings.guidance)
    return (sampling.sample_images(components, [instance_prompt] * settings.samples, seeds, **kwargs),
            sampling.sample_images(components, [world.CLASS_PROMPT] * settings.samples, seeds, **kwargs))


SAMPLE_PROMPTS = ("a photo of a toy", "a photo of a red star toy", "a photo of a blue cube toy",
                  "a photo of a green striped ball toy", "a photo of a purple dotted star toy",
                  "a photo of a yellow heart toy on the beach", "a photo of a orange striped cone toy in the snow",
                  "a photo of a white dotted cube toy at night")


def toy_samples_grid(components, path: Path, samples: int = 8, settings: Settings | None = None) -> Path:
    """Samples of a base model for prompts naming shape, colour, accent and scene: a look at what it learned."""
    settings = settings or Settings()
    kwargs = dict(resolution=settings.resolution, steps=settings.sampler_steps, guidance=settings.guidance)
    rows = [(prompt.removeprefix("a photo of ").replace(" toy ", " toy\n"),
             sampling.sample_images(components, [prompt] * samples, list(range(samples)), **kwargs))
            for prompt in SAMPLE_PROMPTS]
    return save_grid(rows, path)


def prompt_following(components, embedder, prompts: int = 30, per_prompt: int = 2,
                     settings: Settings | None = None) -> dict:
    """Share of samples for "a photo of a <colour> <accent> <shape> toy" (random attributes) whose shape, colour
    and accent the toy feature network's classifier heads name as prompted; the same on rendered photos of such
    toys is the ceiling."""
    settings = settings or Settings()
    rng = random.Random("prompt-following")
    photos = [world.random_photo(rng) for _ in range(prompts) for _ in range(per_prompt)]
    texts = [f"a photo of a {p.toy.colour} {p.toy.accent} {p.toy.shape} toy" for p in photos]
    samples = sampling.sample_images(components, texts, list(range(len(texts))), resolution=settings.resolution,
                                     steps=settings.sampler_steps, guidance=settings.guidance)
    truth = {"shape": [world.SHAPES.index(p.toy.shape) for p in photos],
             "colour": [list(world.COLOURS).index(p.toy.colour) for p in photos],
             "accent": [world.ACCENTS.index(p.toy.accent) for p in photos]}

    def accuracy(images) -> dict[str, float]:
        embeddings = embedder.embed(images).float()
        hits = {head: embedder.net.logits(embeddings, head).argmax(dim=1) == torch.tensor(truth[head])
                for head in truth}
        every = torch.stack(list(hits.values())).all(dim=0)
        return {k: round(v.float().mean().item(), 3) for k, v in (hits | {"all_three": every}).items()}

    return {"samples": accuracy(samples), "real_photos": accuracy(world.render_batch(photos, settings.resolution)),
            "prompts": prompts, "per_prompt": per_prompt}


def save_grid(rows: list[tuple[str, list[Image.Image]]], path: Path, cell: int = 64, label_width: int = 190) -> Path:
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for y, (label, images) in enumerate(rows):
        for line, text in enumerate(label.split("\n")):
            draw.text((6, y * cell + 8 + 14 * line), text, fill=(0, 0, 0))
        for x, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + x * cell, y * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def run_benchmark(out: str | Path = REPO / "bench" / "results", settings: Settings | None = None,
                  cache: str | Path | None = None, log=print) -> dict:
    settings = settings or Settings()
    out = Path(out)
    started = time.perf_counter()
    toy = assets.toy_model(cache, log=log)
    pretrain_seconds = toy["info"].get("seconds")
    embedder, feature_info = assets.toy_embedder(cache, log=log)
    bench_started = time.perf_counter()

    subject = SUBJECTS[settings.subject]
    references, _ = world.instance_photos(settings.instance_images, settings.resolution, seed=0, toy=subject)
    held_out, _ = world.instance_photos(8, settings.resolution, seed=1, toy=subject)
    others, _ = world.other_photos(4, settings.resolution, seed=0, exclude=subject)
    instance_pixels = data.images_to_training_pixels(references, settings.resolution)
    other_pixels = data.images_to_training_pixels(others, settings.resolution)

    results: dict[str, list[dict]] = {name: [] for name in settings.methods}
    base_runs, grid_rows = [], {}
    real = {"fidelity": metrics.dino_score(embedder, held_out, references).score,
            "div": metrics.div_score(embedder, held_out).score}
    base = models.load_base(toy["single_file"])
    base_loss = {}
    for prompt in (INSTANCE_PROMPT, world.CLASS_PROMPT):
        base_loss[prompt] = (loop.fixed_denoising_loss(base, instance_pixels, prompt),
                             loop.fixed_denoising_loss(base, other_pixels, prompt))
    class_cache = assets.cache_root(cache) / f"class-images-{toy['info']['fingerprint']}"
    work = Path(tempfile.mkdtemp(prefix="quality-"))
    try:
        for seed in settings.seeds:
            instance_samples, class_samples = sample_pair(base, INSTANCE_PROMPT, settings, seed)
            base_runs.append(score(embedder, instance_samples, class_samples, references))
            if seed == settings.seeds[0]:
                grid_rows["base"] = (instance_samples, class_samples)
            for name in settings.methods:
                t0 = time.perf_counter()
                method, config, prompt, suffix = make_method(name, settings, seed)
                components = models.load_base(toy["single_file"])
                artifact = run.personalize(components, method, references, None, config,
                                           work / f"{name}-{seed}{suffix}", class_cache_dir=class_cache, device=CPU)
                trained = time.perf_counter() - t0
                before_prompt = INSTANCE_PROMPT if prompt == INSTANCE_PROMPT else world.CLASS_PROMPT
                before_subject, before_other = base_loss[before_prompt]
                learning = {"subject": loop.fixed_denoising_loss(components, instance_pixels, prompt) / before_subject,
                            "other": loop.fixed_denoising_loss(components, other_pixels, prompt) / before_other}
                instance_samples, class_samples = sample_pair(components, prompt, settings, seed)
                row = score(embedder, instance_samples, class_samples, references)
                row |= {"learning_ratio_subject": learning["subject"], "learning_ratio_other": learning["other"],
                        "train_seconds": trained, "total_seconds": time.perf_counter() - t0,
                        "final_loss": artifact.result.final_loss,
                        "class_images_generated": artifact.class_images_generated}
                results[name].append(row)
                log(f"seed {seed} {name}: fidelity {row['fidelity']:.3f} PRES {row['pres']:.3f} "
                    f"DIV {row['div']:.3f} | loss ratio subject {learning['subject']:.3f} other "
                    f"{learning['other']:.3f} | {row['total_seconds']:.0f}s")
                if seed == settings.seeds[0]:
                    grid_rows[name] = (instance_samples, class_samples)
                del components, method
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = _summaries(results, base_runs, real) | {
        "settings": asdict(settings) | {"instance": subject.describe(), "instance_prompt": INSTANCE_PROMPT,
                                        "textual_inversion_prompt": TI_PROMPT, "class_prompt": world.CLASS_PROMPT},
        "feature_extractor": {"name": "toy-world CNN (features.py), cosine of its embeddings"} | feature_info,
        "model": {k: v for k, v in toy["info"].items() if k != "spec"} | {"spec": toy["info"].get("spec")},
        "timing": {"pretraining_seconds": pretrain_seconds,
                   "feature_net_seconds": feature_info.get("train_seconds"),
                   "benchmark_seconds": round(time.perf_counter() - bench_started, 1),
                   "total_seconds_this_run": round(time.perf_counter() - started, 1),
                   "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), CPU"},
    }
    out.mkdir(parents=True, exist_ok=True)
    grid = _grids(grid_rows, references, out / "quality.png")
    report["grid"] = str(grid.relative_to(REPO)) if grid.is_relative_to(REPO) else str(grid)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(report))
    return report


def _summaries(results: dict[str, list[dict]], base_runs: list[dict], real: dict) -> dict:
    return {"results": _aggregate(results, base_runs, real),
            "learning_ratios": {name: {k: _stats([r[f"learning_ratio_{k}"] for r in runs])
                                       for k in ("subject", "other")} for name, runs in results.items()},
            "per_seed": {name: runs for name, runs in results.items()} | {"base": base_runs}}


def merge_reports(folders: list[str | Path], out: str | Path = REPO / "bench" / "results") -> dict:
    """One report from runs of the same settings on different seeds (e.g. one process per seed, run side by side
    on a machine whose cores are shared); the sample grid is the first run's."""
    reports = [json.loads((Path(folder) / "quality.json").read_text()) for folder in folders]
    first, out = reports[0], Path(out)
    for other in reports[1:]:
        if {k: v for k, v in other["settings"].items() if k != "seeds"} != \
                {k: v for k, v in first["settings"].items() if k != "seeds"}:
            raise SystemExit(f"merge: {folders[0]} and another run differ in settings other than the seeds")
    names = [name for name in first["per_seed"] if name != "base"]
    results = {name: [row for report in reports for row in report["per_seed"][name]] for name in names}
    base_runs = [row for report in reports for row in report["per_seed"]["base"]]
    real = {k: first["results"]["real_images"]["without_prior"][k]["mean"] for k in ("fidelity", "div")}
    seconds = [report["timing"]["benchmark_seconds"] for report in reports]
    report = first | _summaries(results, base_runs, real) | {
        "settings": first["settings"] | {"seeds": [s for report in reports for s in report["settings"]["seeds"]]},
        "timing": first["timing"] | {"benchmark_seconds": max(seconds), "benchmark_seconds_per_process": seconds,
                                     "processes": len(reports)}}
    out.mkdir(parents=True, exist_ok=True)
    grid = out / "quality.png"
    shutil.copyfile(Path(folders[0]) / "quality.png", grid)
    report["grid"] = str(grid.relative_to(REPO)) if grid.is_relative_to(REPO) else str(grid)
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(report))
    return report


def _aggregate(results, base_runs, real) -> dict:
    table: dict = {"real_images": {"without_prior": {"fidelity": _stats([real["fidelity"]]), "pres": None,
                                                     "div": _stats([real["div"]])}},
                   "base_model": {"without_prior": {k: _stats([r[k] for r in base_runs])
                                                    for k in ("fidelity", "pres", "div")}}}
    for name, runs in results.items():
        _, key, prior = RUNS[name]
        table.setdefault(key, {})[prior] = {k: _stats([r[k] for r in runs]) for k in ("fidelity", "pres", "div")}
    return table


def _grids(rows: dict, references: torch.Tensor, path: Path) -> Path:
    labels = {"base": "base model", "dreambooth": "DreamBooth\n+ prior", "dreambooth_no_prior": "DreamBooth\nno prior",
              "lora": "LoRA\n+ prior", "lora_no_prior": "LoRA\nno prior", "embedding": "Textual Inversion"}
    lines = [("instance photos\n(training set)", _pil(references))]
    for name, (instance_samples, class_samples) in rows.items():
        blank = Image.new("RGB", (32, 32), (255, 255, 255))
        lines.append((labels.get(name, name) + "\n\n[V] toy  |  a toy", instance_samples + [blank] + class_samples))
    return save_grid(lines, path)


def _cell(entry: dict | None, key: str) -> str:
    if entry is None or entry.get(key) is None:
        return "–"
    value = entry[key]
    return f"{value['mean']:.3f} ± {value['sd']:.3f}" if value["sd"] else f"{value['mean']:.3f}"


def markdown(report: dict) -> str:
    results, settings = report["results"], report["settings"]
    seeds = len(settings["seeds"])
    features = report["feature_extractor"]
    lines = [
        "# Personalization quality on the toy world",
        "",
        f"Subject: {settings['instance']}, {settings['instance_images']} photos at {settings['resolution']} px. "
        f"Mean ± sd over {seeds} training seeds; each run samples {settings['samples']} images per prompt "
        f"({settings['sampler_steps']} DDIM steps, guidance {settings['guidance']:g}). Scores: cosine similarity "
        f"of the toy feature network's embeddings through the pack's metrics module (fidelity = `dino_score`, "
        f"PRES = `pres_score`, DIV = `div_score`).",
        "",
        "## Subject fidelity (cf. DreamBooth paper, Table 1)",
        "",
        "| Method | Fidelity ↑ | PRES ↓ | DIV ↑ |",
        "|---|---|---|---|",
        f"| Real images (held-out photos of the toy) | {_cell(results['real_images']['without_prior'], 'fidelity')} "
        f"| – | {_cell(results['real_images']['without_prior'], 'div')} |",
    ]
    for key, label in (("dreambooth", "DreamBooth (full fine-tune, prior preservation)"),
                       ("lora", "LoRA (prior preservation)"), ("textual_inversion", "Textual Inversion"),
                       ("base_model", "Base model, no training")):
        entry = results.get(key, {})
        entry = entry.get("with_prior") or entry.get("without_prior")
        if entry:
            lines.append(f"| {label} | {_cell(entry, 'fidelity')} | {_cell(entry, 'pres')} | {_cell(entry, 'div')} |")
    lines += ["", "## Prior preservation (cf. DreamBooth paper, Table 3)", "",
              "| Method | Prior preservation | PRES ↓ | DIV ↑ | Fidelity ↑ |", "|---|---|---|---|---|"]
    for key, label in (("dreambooth", "DreamBooth"), ("lora", "LoRA")):
        for prior, text in (("with_prior", "yes"), ("without_prior", "no")):
            entry = results.get(key, {}).get(prior)
            if entry:
                lines.append(f"| {label} | {text} | {_cell(entry, 'pres')} | {_cell(entry, 'div')} | "
                             f"{_cell(entry, 'fidelity')} |")
    ratios = report["learning_ratios"]
    lines += ["", "## Learning check (fixed-draw denoising loss after / before training)", "",
              "| Run | Instance photos | Other toys, other scenes |", "|---|---|---|"]
    for name, value in ratios.items():
        lines.append(f"| {name} | {value['subject']['mean']:.3f} ± {value['subject']['sd']:.3f} | "
                     f"{value['other']['mean']:.3f} ± {value['other']['sd']:.3f} |")
    timing = report["timing"]
    lines += [
        "",
        f"Feature extractor: {features['name']}. Nearest-neighbour accuracy on toy identity "
        f"({features['gallery']}): toy network {features['toynet_nn_accuracy']:.2f} "
        f"({features.get('toynet_nn_accuracy_blurred', float('nan')):.2f} with the photos blurred), the DINO "
        f"metric's ViT-S/16 with fixed random weights {features['random_vit_s16_nn_accuracy']:.2f} (mean cosine, "
        f"same toy vs different toys: toy network {features['toynet_cosine']['same_toy']:.2f} vs "
        f"{features['toynet_cosine']['different_toys']:.2f}, random ViT "
        f"{features['random_vit_s16_cosine']['same_toy']:.2f} vs "
        f"{features['random_vit_s16_cosine']['different_toys']:.2f}).",
        "",
        f"Samples: `{report['grid']}` (first seed; per method: instance prompt, then class prompt). "
        f"Benchmark {timing['benchmark_seconds']:.0f} s; once, cached: toy-model pretraining "
        f"{timing['pretraining_seconds']} s, feature network {timing['feature_net_seconds']} s; {timing['machine']}.",
        "",
        "Rerun: `python -m bench.quality` from the repository root (`--help` for options).",
        "",
    ]
    return "\n".join(lines)


def override(settings: Settings, assignment: str) -> None:
    """Set one numeric or boolean field from ``NAME=VALUE`` (the command line's ``--set``)."""
    name, _, value = assignment.partition("=")
    current = getattr(settings, name, None)
    if not value or isinstance(current, (tuple, str)) or current is None:
        raise SystemExit(f"--set {assignment}: expected NAME=VALUE with NAME a numeric or boolean field of Settings")
    if isinstance(current, bool):
        setattr(settings, name, value.lower() in ("1", "true", "yes"))
    else:
        setattr(settings, name, type(current)(float(value)))
