"""Made-up subject photos, so the demo and the tests need no photos from anywhere: a red blob with a blue cap on a
pale gradient, moved a little in each "photo" (the subject), and the same scene with other colours (other images)."""

from __future__ import annotations

import torch

SUBJECT_COLOURS = ((0.8, 0.15, 0.15), (0.1, 0.15, 0.7))


def subject_photos(count: int = 4, size: int = 64, seed: int = 0,
                   colours: tuple[tuple[float, float, float], ...] = SUBJECT_COLOURS) -> torch.Tensor:
    """An IMAGE batch [count, size, size, 3] in 0..1."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body_colour, cap_colour = (torch.tensor(c) for c in colours)
    images = []
    for _ in range(count):
        dx, dy = ((torch.rand(2, generator=generator) - 0.5) * 0.3).tolist()
        image = torch.stack([0.85 - 0.1 * ys, 0.9 - 0.05 * ys, 0.95 + 0 * ys], dim=-1)
        image[((xs - dx) ** 2 + (ys - dy - 0.15) ** 2) < 0.25] = body_colour
        image[((xs - dx).abs() < 0.15) & ((ys - dy + 0.45).abs() < 0.12)] = cap_colour
        images.append(image)
    return torch.stack(images).clamp(0, 1)


def other_photos(count: int = 4, size: int = 64, seed: int = 100) -> torch.Tensor:
    """The same kind of scene with a differently coloured object: images that are not the subject."""
    return subject_photos(count, size, seed, colours=((0.15, 0.6, 0.2), (0.9, 0.8, 0.1)))
