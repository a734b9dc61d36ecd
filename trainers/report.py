"""Pictures of a run: the loss curve (drawn with PIL: no plotting library in a ComfyUI install)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def loss_curve_image(losses: Sequence[float], title: str = "loss", width: int = 512, height: int = 288) -> Image.Image:
    """Raw loss (light) and its smoothed trend (dark) against the step, with the value range labelled."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.rectangle((left, top, right, bottom), outline=(180, 180, 180))
    draw.text((left, 6), f"{title} ({len(losses)} steps)", fill=(40, 40, 40))
    if not losses:
        draw.text((left + 8, top + 8), "no steps yet", fill=(120, 120, 120))
        return image
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def points(values: Sequence[float]) -> list[tuple[float, float]]:
        steps = max(len(values) - 1, 1)
        return [(left + (right - left) * i / steps, bottom - (bottom - top) * (v - low) / span)
                for i, v in enumerate(values)]

    draw.line(points(losses), fill=(160, 190, 235), width=1)
    draw.line(points(smooth(losses)), fill=(20, 70, 170), width=2)
    draw.text((4, top - 4), f"{high:.4g}", fill=(60, 60, 60))
    draw.text((4, bottom - 8), f"{low:.4g}", fill=(60, 60, 60))
    draw.text((left, bottom + 8), "1", fill=(60, 60, 60))
    draw.text((right - 30, bottom + 8), str(len(losses)), fill=(60, 60, 60))
    return image


def pil_to_image_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (same size) → ComfyUI IMAGE [B,H,W,3] float32 in 0..1."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))
