"""Class images for prior preservation: the base model's own samples of the class prompt, cached on disk.

The cache folder is keyed by everything that changes the images (model fingerprint, prompt, resolution, sampler
settings, seed); image ``i`` always comes from seed ``seed + i``, so a run asking for more images than a previous one
(or one resumed after a cancel) reuses what exists and generates only the rest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .components import Components
from .config import TrainConfig
from .data import decode_image
from .files import atomic_path
from .sampling import pil_to_pixels, sample_images


def cache_key(components: Components, config: TrainConfig) -> str:
    settings = {"model": components.fingerprint, "prompt": config.class_prompt.strip(),
                "resolution": config.resolution, "steps": config.class_sampler_steps,
                "guidance": config.class_guidance, "seed": config.seed, "sampler": "ddim"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def class_images(components: Components, config: TrainConfig, cache_root: str | Path,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, Path, int]:
    """``config.class_images`` class images as [N,3,R,R] in -1..1; also the cache folder and how many were new."""
    folder = Path(cache_root) / cache_key(components, config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(
        {"prompt": config.class_prompt, "resolution": config.resolution, "steps": config.class_sampler_steps,
         "guidance": config.class_guidance, "seed": config.seed, "model": components.name}, indent=2))
    paths = [folder / f"{i:05d}.png" for i in range(config.class_images)]
    # A cached image that does not decode (a disk fault, a copy cut short) is generated again, not fatal forever.
    images: list[Image.Image | None] = [decode_image(p)[0] for p in paths]
    missing = [i for i, image in enumerate(images) if image is None]
    total = len(missing)

    def save_batch(start: int, batch: list[Image.Image]) -> None:
        for offset, image in enumerate(batch):
            index = missing[start + offset]
            _save_png(image, paths[index])
            images[index] = image
        if on_progress:
            on_progress(min(start + len(batch), total), total)

    if missing:
        sample_images(components, [config.class_prompt] * total, [config.seed + i for i in missing],
                      resolution=config.resolution, steps=config.class_sampler_steps, guidance=config.class_guidance,
                      on_batch=save_batch, should_stop=should_stop)
    pixels = pil_to_pixels(images)
    return pixels, folder, total
