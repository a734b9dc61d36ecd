"""Sampling with the pack's own components: class images for prior preservation, previews, the demo, benchmarks."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from .components import Components
from .errors import TrainingCancelled


def sample_images(components: Components, prompts: Sequence[str], seeds: Sequence[int], *, resolution: int,
                  steps: int = 25, guidance: float = 7.5, negative_prompt: str = "", batch_size: int = 4,
                  on_batch: Callable[[int, list[Image.Image]], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
    """One image per (prompt, seed); each image depends only on its own seed, not on the batching."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    device = components.unet.device
    pipeline = components.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []

    def stop_check(_pipeline, _step, _timestep, outputs: dict) -> dict:
        if should_stop and should_stop():  # every sampler step, not only between batches
            raise TrainingCancelled()
        return outputs

    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            if should_stop and should_stop():
                raise TrainingCancelled()
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
            latents = torch.stack([torch.randn(pipeline.unet.config.in_channels, resolution // pipeline.vae_scale_factor,
                                               resolution // pipeline.vae_scale_factor, generator=g)
                                   for g in generators]).to(device, components.unet.dtype)
            batch = pipeline(list(prompts[chunk]), height=resolution, width=resolution, num_inference_steps=steps,
                             guidance_scale=guidance, negative_prompt=[negative_prompt] * len(generators),
                             latents=latents, output_type="pil", callback_on_step_end=stop_check).images
            images.extend(batch)
            if on_batch:
                on_batch(start, batch)
    return images


def pil_to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → [B,3,H,W] float32 in -1..1."""
    import numpy as np

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
