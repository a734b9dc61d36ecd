"""Aspect-ratio buckets: subject photos → training pixels that keep each photo's shape.

The buckets are the sizes (width, height), both multiples of 64, with the largest height for each width whose area
is at most the training resolution's square, sides between half and twice the resolution (kohya's defaults at 512:
256-1024), plus the square itself. Each photo goes to the bucket nearest its aspect ratio (in log ratio), is cropped
centrally to exactly that aspect ratio (so only the rounding to the bucket is cut) and resized to it. Without
bucketing every photo is center-cropped to the square, as before.

Each training image also carries its ``SizeConditioning`` (SDXL's micro-conditioning: the photo's original size, the
crop's top-left corner in the resized photo and the size trained at): ``PreparedImages.conditioning``, in input
order, is the one place a family reads it from (the loop hands it on with every drawn batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import as_image_list, images_to_training_pixels
from .errors import PersonalizeError

BUCKET_STEP = 64


@dataclass(frozen=True)
class SizeConditioning:
    original_size: tuple[int, int]  # (height, width) of the photo as given
    crop_top_left: tuple[int, int]  # (top, left) of the crop, in pixels of the photo resized to the bucket's scale
    target_size: tuple[int, int]  # (height, width) trained at


@dataclass
class Bucket:
    size: tuple[int, int]  # (width, height)
    indices: list[int]  # the photos in it, as positions in the input
    pixels: torch.Tensor  # [n, 3, height, width] in -1..1
    masks: torch.Tensor | None  # [n, 1, height, width] in 0..1, cropped and resized like the pixels


@dataclass
class PreparedImages:
    buckets: list[Bucket]
    conditioning: list[SizeConditioning]  # per photo, in input order

    def report(self) -> list[dict]:
        """The buckets used, for --json and the node's text: size and number of photos."""
        return [{"width": b.size[0], "height": b.size[1], "images": len(b.indices)} for b in self.buckets]


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    area = resolution * resolution
    low, high = max(BUCKET_STEP, resolution // 2), 2 * resolution
    sizes = {(resolution, resolution)}
    for width in range(BUCKET_STEP, high + 1, BUCKET_STEP):
        height = min(high, area // width // BUCKET_STEP * BUCKET_STEP)
        if width >= low and height >= low:
            sizes.add((width, height))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - aspect), -size[0] * size[1]))


def prepare_images(images, resolution: int, bucketing: bool, masks=None) -> PreparedImages:
    """``images``: an IMAGE batch [B,H,W,3|4] or a list of them / of [H,W,3|4] images at their own sizes; ``masks``
    (optional): one [H,W] mask in 0..1 per image, at the image's size."""
    photos = as_image_list(images)
    mask_list = None if masks is None else [m.float().reshape(1, 1, *m.shape[-2:]) for m in masks]
    for index, mask in enumerate(mask_list or []):
        if mask.shape[-2:] != photos[index].shape[1:3]:
            raise PersonalizeError(f"mask {index + 1} is {mask.shape[-1]}x{mask.shape[-2]} but image {index + 1} is "
                                   f"{photos[index].shape[2]}x{photos[index].shape[1]}; give each image a mask of "
                                   "its size (white = subject)")
    sizes = bucket_sizes(resolution) if bucketing else [(resolution, resolution)]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, photo in enumerate(photos):
        height, width = photo.shape[1:3]
        groups.setdefault(nearest_bucket(width, height, sizes), []).append(index)
    buckets, conditioning = [], [None] * len(photos)
    for size, indices in sorted(groups.items()):
        pixels, bucket_masks = [], []
        for index in indices:
            photo = photos[index]
            box = _crop_box(photo.shape[2], photo.shape[1], size)
            conditioning[index] = _conditioning(photo.shape[1:3], box, size)
            pixels.append(_crop_resize(photo, box, size))
            if mask_list is not None:
                bucket_masks.append(_resize_mask(mask_list[index], box, size))
        buckets.append(Bucket(size, indices, torch.cat(pixels),
                              torch.cat(bucket_masks) if mask_list is not None else None))
    return PreparedImages(buckets, conditioning)


def _crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centered crop of a width x height photo with the bucket's aspect ratio."""
    bucket_width, bucket_height = size
    if width * bucket_height > height * bucket_width:  # wider than the bucket: cut the sides
        crop_width, crop_height = max(1, round(height * bucket_width / bucket_height)), height
    else:
        crop_width, crop_height = width, max(1, round(width * bucket_height / bucket_width))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def _conditioning(original: tuple[int, int], box, size: tuple[int, int]) -> SizeConditioning:
    top, left, crop_height, _ = box
    scale = size[1] / crop_height
    return SizeConditioning(original_size=(int(original[0]), int(original[1])),
                            crop_top_left=(round(top * scale), round(left * scale)), target_size=(size[1], size[0]))


def _crop_resize(photo: torch.Tensor, box, size: tuple[int, int]) -> torch.Tensor:
    top, left, crop_height, crop_width = box
    cropped = photo[:, top:top + crop_height, left:left + crop_width]
    if size[0] == size[1]:
        # The square path is exactly images_to_training_pixels (the pre-bucket behaviour, bit for bit).
        return images_to_training_pixels(cropped, size[0])
    pixels = images_to_training_pixels(cropped, None)
    if pixels.shape[-2:] != (size[1], size[0]):
        pixels = F.interpolate((pixels + 1.0) / 2.0, size=(size[1], size[0]), mode="bicubic", antialias=True,
                               align_corners=False).clamp(0.0, 1.0) * 2.0 - 1.0
    return pixels.contiguous()


def _resize_mask(mask: torch.Tensor, box, size: tuple[int, int]) -> torch.Tensor:
    top, left, crop_height, crop_width = box
    cropped = mask[:, :, top:top + crop_height, left:left + crop_width]
    return F.interpolate(cropped, size=(size[1], size[0]), mode="area").clamp(0.0, 1.0)


@dataclass
class Draw:
    """One batch drawn from one bucket: posterior mean/std [b, C, h, w], loss weights [b, 1, h, w] (None when no
    photo has a mask), and for each item its photo's position in the input and its SizeConditioning."""
    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor | None
    indices: list[int]
    conditioning: list[SizeConditioning]


class LatentCache:
    """The frozen VAE's posterior of every photo, per bucket ([views, n, C, h, w]: views are the photo and, with
    flips, its mirror image), with the masks at latent resolution, and batches drawn from one bucket at a time."""

    def __init__(self, prepared: PreparedImages, posterior, flip: bool, mask_floor: float = 0.0):
        self.conditioning = prepared.conditioning
        self.buckets = []
        for bucket in prepared.buckets:
            mean, std = posterior(bucket.pixels)
            weights = None
            if bucket.masks is not None:
                masks = F.interpolate(bucket.masks, size=mean.shape[-2:], mode="area")
                views = torch.stack([masks, masks.flip(-1)]) if flip else masks.unsqueeze(0)
                weights = mask_floor + (1.0 - mask_floor) * views
            self.buckets.append((mean, std, weights, bucket.indices))
        self.count = sum(len(b.indices) for b in prepared.buckets)
        self._bucket_of = [i for i, b in enumerate(prepared.buckets) for _ in b.indices]

    def draw(self, generator: torch.Generator, batch_size: int) -> Draw:
        # With one bucket there is nothing to choose: the draws are then those of the loop before buckets.
        which = 0 if len(self.buckets) == 1 else self._bucket_of[int(torch.randint(0, self.count, (1,),
                                                                                    generator=generator))]
        mean, std, weights, indices = self.buckets[which]
        index = torch.randint(0, mean.shape[1], (batch_size,), generator=generator)
        view = torch.randint(0, mean.shape[0], (batch_size,), generator=generator)
        positions = [indices[i] for i in index.tolist()]
        return Draw(mean[view, index], std[view, index], None if weights is None else weights[view, index],
                    positions, [self.conditioning[p] for p in positions])


def square_images(pixels: torch.Tensor) -> PreparedImages:
    """Training pixels [B,3,R,R] that are already square as one bucket (callers that prepare pixels themselves)."""
    height, width = pixels.shape[-2:]
    return PreparedImages([Bucket((width, height), list(range(pixels.shape[0])), pixels, None)],
                          [SizeConditioning((height, width), (0, 0), (height, width))] * pixels.shape[0])
