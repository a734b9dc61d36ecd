"""The toy world: procedural photos of the class "toy" that the project generates itself.

A toy is a shape (ball, cube, cone, star, heart) with a body colour and an accent (plain, striped, dotted) in a
second colour; a photo puts it, moved, scaled and turned a little, in a scene (beach, grass, snow, night, table,
city) with a soft shadow. Captions name a random subset of what is visible, always with the class noun:
"a photo of a toy", "a photo of a blue toy", "a photo of a striped red cube toy on the beach". The accent colour is
never named, so the base model learns it as free variation; an *instance* (one particular toy) fixes it.

Pure torch, no import of the pack: tests, the pretraining script and the benchmark all draw from here. Images are a
ComfyUI IMAGE batch, [B,H,W,3] float32 in 0..1, rendered at 4x and box-filtered (anti-aliased edges).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = ("ball", "cube", "cone", "star", "heart")
COLOURS = {
    "red": (0.86, 0.12, 0.12), "green": (0.12, 0.62, 0.18), "blue": (0.12, 0.28, 0.88),
    "yellow": (0.98, 0.86, 0.10), "purple": (0.52, 0.16, 0.70), "orange": (0.98, 0.50, 0.06),
    "pink": (0.98, 0.52, 0.74), "white": (0.96, 0.96, 0.96), "black": (0.08, 0.08, 0.08),
}
ACCENTS = ("plain", "striped", "dotted")
# Scene: (top colour, bottom colour, caption phrase). The horizon height varies per photo.
SCENES = {
    "beach": ((0.52, 0.74, 0.96), (0.92, 0.82, 0.56), "on the beach"),
    "grass": ((0.62, 0.80, 0.96), (0.30, 0.62, 0.24), "on the grass"),
    "snow": ((0.72, 0.76, 0.82), (0.97, 0.97, 0.99), "in the snow"),
    "night": ((0.04, 0.05, 0.18), (0.14, 0.14, 0.26), "at night"),
    "table": ((0.86, 0.80, 0.70), (0.52, 0.33, 0.18), "on the table"),
    "city": ((0.66, 0.70, 0.76), (0.38, 0.38, 0.42), "in the city"),
}
CLASS_NOUN = "toy"
CLASS_PROMPT = "a photo of a toy"


@dataclass(frozen=True)
class Toy:
    """What makes one toy that toy (its identity); pose and scene vary between photos of it."""
    shape: str
    colour: str
    accent: str
    accent_colour: str

    def describe(self) -> str:
        return f"{self.colour} {self.accent} {self.shape} {CLASS_NOUN} ({self.accent_colour} accents)"


# The benchmark's subject: a specific, distinctive toy (its yellow dots are never named in any caption).
INSTANCE = Toy("star", "purple", "dotted", "yellow")
INSTANCE_SCENES = ("table", "beach", "table", "grass")


@dataclass(frozen=True)
class Photo:
    toy: Toy
    scene: str
    x: float  # centre, -1..1
    y: float
    size: float  # radius, in units of half the image
    angle: float  # radians
    horizon: float  # -1..1 (image y of the horizon)
    light: float  # brightness multiplier


def random_toy(rng: random.Random) -> Toy:
    colour = rng.choice(list(COLOURS))
    accent = rng.choice(ACCENTS)
    accent_colour = rng.choice([c for c in COLOURS if c != colour])
    return Toy(rng.choice(SHAPES), colour, accent, accent_colour)


def random_photo(rng: random.Random, toy: Toy | None = None, scene: str | None = None) -> Photo:
    return Photo(toy=toy or random_toy(rng), scene=scene or rng.choice(list(SCENES)),
                 x=rng.uniform(-0.18, 0.18), y=rng.uniform(-0.08, 0.18), size=rng.uniform(0.46, 0.62),
                 angle=rng.uniform(-0.3, 0.3), horizon=rng.uniform(-0.15, 0.25), light=rng.uniform(0.9, 1.08))


def caption(photo: Photo, rng: random.Random, keep: float = 0.5) -> str:
    """A caption naming a random subset of the visible attributes (each with probability ``keep``)."""
    toy = photo.toy
    words = [w for w, kept in ((toy.colour, rng.random() < keep), (toy.accent, rng.random() < keep),
                               (toy.shape, rng.random() < keep)) if kept]
    text = "a photo of a " + " ".join(words + [CLASS_NOUN])
    if rng.random() < keep:
        text += " " + SCENES[photo.scene][2]
    return text


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Soft-free boolean mask in the toy's own frame (unit radius, v pointing down)."""
    if shape == "ball":
        return u * u + v * v < 1.0
    if shape == "cube":
        return (u.abs() < 0.82) & (v.abs() < 0.82)
    if shape == "cone":
        return (v > -0.95) & (v < 0.85) & (u.abs() < (v + 0.95) / 1.8 * 0.95)
    if shape == "star":
        radius = torch.sqrt(u * u + v * v)
        theta = torch.atan2(u, -v)
        wave = torch.abs(torch.remainder(theta * 5 / (2 * math.pi), 1.0) - 0.5) * 2  # 1 at points, 0 between
        return radius < 0.42 + 0.62 * wave ** 1.6
    if shape == "heart":
        x, y = u * 1.15, -(v * 1.15) + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
    raise ValueError(f"unknown shape {shape!r}")


def _accent_mask(accent: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if accent == "plain":
        return torch.zeros_like(u, dtype=torch.bool)
    if accent == "striped":
        return torch.sin(v * math.pi * 2.2) > 0.25
    if accent == "dotted":
        cu = torch.remainder(u * 1.4 + 0.5, 1.0) - 0.5
        cv = torch.remainder(v * 1.4 + 0.5, 1.0) - 0.5
        return cu * cu + cv * cv < 0.075
    raise ValueError(f"unknown accent {accent!r}")


def render(photo: Photo, size: int = 32, supersample: int = 4) -> torch.Tensor:
    """One photo as [size, size, 3] in 0..1."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    top, bottom, _ = SCENES[photo.scene]
    top, bottom = torch.tensor(top), torch.tensor(bottom)
    ground = (ys > photo.horizon).unsqueeze(-1)
    depth = ((ys - photo.horizon).clamp(min=0) / 2).unsqueeze(-1)
    image = torch.where(ground, bottom * (1.0 - 0.25 * depth), top * (1.0 - 0.15 * (ys.unsqueeze(-1) + 1) / 2))
    # Shadow: a dark ellipse under the toy.
    shadow = ((xs - photo.x) / (photo.size * 1.05)) ** 2 + ((ys - photo.y - photo.size * 0.92) /
                                                            (photo.size * 0.22)) ** 2 < 1
    image = torch.where(shadow.unsqueeze(-1), image * 0.6, image)
    # Toy frame: translate, rotate, scale.
    dx, dy = (xs - photo.x) / photo.size, (ys - photo.y) / photo.size
    c, s = math.cos(photo.angle), math.sin(photo.angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    body = _shape_mask(photo.toy.shape, u, v)
    accent = body & _accent_mask(photo.toy.accent, u, v)
    shade = (1.05 - 0.3 * (v + 1) / 2).clamp(0.6, 1.1).unsqueeze(-1)  # lit from above
    body_rgb = torch.tensor(COLOURS[photo.toy.colour]) * shade
    accent_rgb = torch.tensor(COLOURS[photo.toy.accent_colour]) * shade
    image = torch.where(body.unsqueeze(-1), body_rgb, image)
    image = torch.where(accent.unsqueeze(-1), accent_rgb, image)
    image = (image * photo.light).clamp(0, 1)
    return F.avg_pool2d(image.permute(2, 0, 1).unsqueeze(0), supersample)[0].permute(1, 2, 0).contiguous()


def render_batch(photos: list[Photo], size: int = 32) -> torch.Tensor:
    """[B, size, size, 3] in 0..1."""
    return torch.stack([render(p, size) for p in photos])


def instance_photos(count: int = 4, size: int = 32, seed: int = 0, toy: Toy = INSTANCE,
                    scenes: tuple[str, ...] = INSTANCE_SCENES) -> tuple[torch.Tensor, list[Photo]]:
    """``count`` photos of one toy (the benchmark's subject by default), in the given scenes in turn."""
    rng = random.Random(f"instance-{seed}")
    photos = [random_photo(rng, toy, scenes[i % len(scenes)]) for i in range(count)]
    return render_batch(photos, size), photos


def other_photos(count: int = 4, size: int = 32, seed: int = 0, exclude: Toy = INSTANCE,
                 scenes: tuple[str, ...] = ("night", "snow", "city")) -> tuple[torch.Tensor, list[Photo]]:
    """Photos of *other* toys (none shares the excluded toy's shape or colour) in *other* scenes: images a model
    that learned the subject should not have learned as well."""
    rng = random.Random(f"other-{seed}")
    photos = []
    while len(photos) < count:
        toy = random_toy(rng)
        if toy.shape == exclude.shape or toy.colour == exclude.colour:
            continue
        photos.append(random_photo(rng, toy, scenes[len(photos) % len(scenes)]))
    return render_batch(photos, size), photos


def dataset(count: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[Photo]]:
    """``count`` random photos of random toys: the pretraining distribution of the class."""
    rng = random.Random(f"dataset-{seed}")
    photos = [random_photo(rng) for _ in range(count)]
    return render_batch(photos, size), photos
