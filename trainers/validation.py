"""Validation during training: every ``validate_every`` steps, sample the validation prompts at fixed seeds with the
pack's sampler and score the samples against the subject photos with the DreamBooth paper's metrics (DINO; CLIP-I
and CLIP-T with a CLIP model; PRES from class-prompt samples when a class prompt is set; DIV between the
instance-prompt samples); then pick the step the result is made from (``select_best``).

Sampling runs under ``torch.random.fork_rng`` and in eval mode, so validating changes nothing about training: the
same run with and without validation trains the same weights.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from . import metrics
from .components import Components
from .config import TrainConfig
from .errors import PersonalizeError
from .sampling import sample_images

# The paper's recontextualisation prompts, appended to the instance prompt ("a photo of sks dog on the beach").
CONTEXTS = ("on the beach", "in the jungle")
CRITERIA = ("dino", "clip_t", "balanced", "last")
CRITERION_NAMES = {"dino": "DINO", "clip_t": "CLIP-T", "balanced": "DINO x CLIP-T"}
CELL = 128  # px of one sample in the grid


def prompts_for(config: TrainConfig, instance_prompt: str) -> list[str]:
    given = [line.strip() for line in config.validation_prompts.splitlines() if line.strip()]
    return given or [instance_prompt] + [f"{instance_prompt} {context}" for context in CONTEXTS]


def criterion_for(select_best: str, dino, clip) -> tuple[str, str]:
    """The criterion validation selects by, and a note when it is not the one asked for."""
    if select_best in ("clip_t", "balanced") and clip is None:
        raise PersonalizeError(f"select_best {select_best} needs a CLIP model (--clip-model; the node's clip_model "
                               "input); give one, or choose dino or last")
    if select_best == "balanced" and dino is None:
        raise PersonalizeError("select_best balanced needs a DINO model (--dino-model; the node's dino_model input); "
                               "give one, or choose clip_t or last")
    if select_best == "dino" and dino is None:
        return "last", "no DINO model was given, so the last step is kept"
    return select_best, ""


def step_score(record: dict, criterion: str) -> float:
    if criterion == "dino":
        return record["dino"]
    if criterion == "clip_t":
        return record["clip_t"]
    if criterion == "balanced":
        return record["dino"] * record["clip_t"]
    return float(record["step"])


def choose_step(records: Sequence[dict], criterion: str, note: str = "") -> tuple[int, str]:
    """The validated step with the best score (the earliest of equals: it has overfit least), and why."""
    last = records[-1]
    if criterion == "last":
        return last["step"], f"the last step ({last['step']}): " + (note or "select_best is last")
    best = max(records, key=lambda r: (step_score(r, criterion), -r["step"]))
    name = CRITERION_NAMES[criterion]
    reason = f"step {best['step']} has the highest {name}, {step_score(best, criterion):.4f}"
    if best is not last:
        reason += f" (last step {last['step']}: {step_score(last, criterion):.4f})"
    return best["step"], reason


@dataclass
class Validator:
    """What one validation samples and how it scores it."""
    prompts: list[str]
    references: torch.Tensor  # the subject photos, an IMAGE batch
    seeds: list[int]
    resolution: int
    sampler_steps: int
    criterion: str
    note: str = ""
    class_prompt: str = ""
    dino: metrics.ImageEmbedder | None = None
    clip: metrics.ClipModel | None = None

    @classmethod
    def for_run(cls, config: TrainConfig, instance_prompt: str, references: torch.Tensor, dino=None,
                clip=None) -> "Validator | None":
        if not config.validate_every:
            return None
        criterion, note = criterion_for(config.select_best, dino, clip)
        return cls(prompts=prompts_for(config, instance_prompt), references=references,
                   seeds=[config.seed + i for i in range(config.validation_images)], resolution=config.resolution,
                   sampler_steps=config.validation_sampler_steps, criterion=criterion, note=note,
                   class_prompt=config.class_prompt.strip() if config.prior_preservation else "", dino=dino,
                   clip=clip)

    def run(self, components: Components, step: int, amp_dtype, callbacks) -> tuple[dict, Image.Image]:
        """Sample and score at ``step``: the table row and the samples side by side."""
        started = time.perf_counter()
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        if self.class_prompt and self.dino is not None:
            prompts += [self.class_prompt] * len(self.seeds)
            seeds += self.seeds
        what = f"validating step {step}"

        def progress(start: int, batch: list) -> None:
            if callbacks.on_prepare:
                callbacks.on_prepare(min(start + len(batch), len(prompts)), len(prompts), what)

        unet = components.unet
        was_training = unet.training
        unet.eval()
        devices = [unet.device] if unet.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), \
                    (torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext()):
                images = sample_images(components, prompts, seeds, resolution=self.resolution,
                                       steps=self.sampler_steps, on_batch=progress,
                                       should_stop=callbacks.should_stop)
        finally:
            unet.train(was_training)
        instance = images[:len(self.prompts) * len(self.seeds)]
        record = {"step": step, **self.score(instance, prompts[:len(instance)], images[len(instance):])}
        record["seconds"] = round(time.perf_counter() - started, 3)
        return record, _row(images)

    def score(self, instance: list[Image.Image], prompts: list[str], class_images: list[Image.Image]) -> dict:
        scores = {}
        if self.dino is not None:
            scores["dino"] = metrics.dino_score(self.dino, instance, self.references).score
            if class_images:
                scores["pres"] = metrics.pres_score(self.dino, class_images, self.references).score
            if len(self.seeds) > 1:  # between the samples of one prompt, as the paper measures it
                scores["div"] = metrics.div_score(self.dino, instance[:len(self.seeds)]).score
        if self.clip is not None:
            scores["clip_i"] = metrics.clip_i_score(self.clip, instance, self.references).score
            scores["clip_t"] = metrics.clip_t_score(self.clip, instance, prompts).score
        return {k: round(v, 6) for k, v in scores.items()}


def _row(images: Sequence[Image.Image]) -> Image.Image:
    row = Image.new("RGB", (CELL * len(images), CELL), (255, 255, 255))
    for i, image in enumerate(images):
        row.paste(image.convert("RGB").resize((CELL, CELL), Image.Resampling.LANCZOS), (i * CELL, 0))
    return row


def validation_grid(rows: Sequence[tuple[int, Image.Image]], best_step: int | None,
                    label_width: int = 96) -> Image.Image:
    """One row of samples per validated step, labelled, the chosen step marked."""
    width = label_width + max(image.width for _, image in rows)
    height = sum(image.height for _, image in rows)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    top = 0
    for step, image in rows:
        grid.paste(image, (label_width, top))
        chosen = step == best_step
        if chosen:
            draw.rectangle((0, top, label_width - 1, top + image.height - 1), fill=(255, 236, 170))
        draw.text((6, top + image.height // 2 - 12), f"step {step}", fill=(30, 30, 30))
        if chosen:
            draw.text((6, top + image.height // 2 + 2), "chosen", fill=(150, 80, 0))
        top += image.height
    return grid
