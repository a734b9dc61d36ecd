"""Prompts from the instance prompt and the per-image captions: where the trigger goes, tag shuffling, dropout.

The rule: the instance prompt (the trigger and the class noun, "a photo of sks dog") comes first, then the image's
caption ("a photo of sks dog, on a beach, red collar"). Training and the previews use this one rule
(``compose``). Shuffling reorders the comma-separated tags after the first ``keep_tags`` (1 = the instance prompt,
if it has no comma of its own), so the trigger always leads. Caption dropout trains a step on the prompt without
its caption, so that the trigger alone carries the subject.
"""

from __future__ import annotations

import torch

# Shuffled orders made per image (each one's text-encoder output is cached): enough variety for a short run.
SHUFFLED_VARIANTS = 8


def compose(prompt: str, caption: str) -> str:
    return f"{prompt}, {caption}" if caption.strip() else prompt


def shuffled(text: str, keep_tags: int, generator: torch.Generator) -> list[str]:
    """``text`` and up to SHUFFLED_VARIANTS - 1 orders of its tags after the first ``keep_tags``."""
    tags = [tag.strip() for tag in text.split(",") if tag.strip()]
    head, tail = tags[:keep_tags], tags[keep_tags:]
    variants = [text]
    if len(tail) < 2:
        return variants
    for _ in range(SHUFFLED_VARIANTS - 1):
        order = torch.randperm(len(tail), generator=generator).tolist()
        variant = ", ".join(head + [tail[i] for i in order])
        if variant not in variants:
            variants.append(variant)
    return variants


def with_shuffling(options: list[list[str]], config) -> list[list[str]]:
    """Each image's prompt options, each widened by its shuffled orders when ``config.shuffle_tags`` is on (seeded
    by ``config.seed``, apart from the loop's generator)."""
    if not config.shuffle_tags:
        return options
    generator = torch.Generator().manual_seed(config.seed)
    return [[v for text in texts for v in shuffled(text, config.keep_tags, generator)] for texts in options]


def choose(options: list[str], uncaptioned: list[str] | None, dropout: float, generator: torch.Generator) -> str:
    """One prompt for a step: from the image's options, or with probability ``dropout`` from its uncaptioned ones."""
    if dropout and float(torch.rand(1, generator=generator)) < dropout:
        options = uncaptioned
    return options[int(torch.randint(0, len(options), (1,), generator=generator))]
