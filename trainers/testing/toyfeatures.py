"""The toy world's feature extractor (the demo's and the quality benchmark's): a small CNN that tells toys apart.

DINO's job in the DreamBooth paper is "are these the same subject?", which a self-supervised ViT-S/16 does on real
photos. Its real weights cannot be downloaded here, and the ViT-S/16 *architecture with fixed random weights* mostly
sees colour layout (the scene), not which toy it is (``nearest_neighbour_accuracy`` measures it; the benchmark
reports both). So the fidelity/PRES/DIV scores use this network instead: trained to name a toy's shape, colour,
accent and accent colour from photos in random scenes and poses (blurred and noised a little, like samples), with a
cosine classifier so that cosine similarity of its embeddings is what separates identities. It plugs into the
pack's metrics module as an ``ImageEmbedder``; the scores are computed by ``metrics.dino_score`` / ``pres_score`` /
``div_score`` exactly as for DINO.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .. import metrics
from . import dino as random_dino
from . import toyworld as world

TOY_PREPROCESS = metrics.Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
HEADS = {"shape": world.SHAPES, "colour": tuple(world.COLOURS), "accent": world.ACCENTS,
         "accent_colour": tuple(world.COLOURS)}


class ToyNet(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        layers, channels = [], 3
        for out, stride in ((32, 1), (64, 2), (96, 2), (128, 2)):
            layers += [nn.Conv2d(channels, out, 3, stride, 1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(channels, dim)
        self.heads = nn.ParameterDict({k: nn.Parameter(torch.randn(len(v), dim) * 0.1) for k, v in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(pixels).mean(dim=(2, 3)))

    def logits(self, embedding: torch.Tensor, head: str, scale: float = 12.0) -> torch.Tensor:
        return scale * F.normalize(embedding, dim=-1) @ F.normalize(self.heads[head], dim=-1).T


class ToyEmbedder(metrics.ImageEmbedder):
    preprocess = TOY_PREPROCESS

    def __init__(self, net: ToyNet):
        self.net = net.eval()
        self.device = torch.device("cpu")

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)


def _labels(photos: list[world.Photo]) -> dict[str, torch.Tensor]:
    return {"shape": torch.tensor([world.SHAPES.index(p.toy.shape) for p in photos]),
            "colour": torch.tensor([list(world.COLOURS).index(p.toy.colour) for p in photos]),
            "accent": torch.tensor([world.ACCENTS.index(p.toy.accent) for p in photos]),
            "accent_colour": torch.tensor([list(world.COLOURS).index(p.toy.accent_colour) for p in photos])}


def _blur(pixels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (pixels), 7x7 kernel."""
    offsets = torch.arange(-3, 4, dtype=torch.float32)
    weights = torch.exp(-offsets[None, :] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    weights = weights / weights.sum(dim=1, keepdim=True)  # [B,7]
    batch, channels, height, width = pixels.shape
    x = F.pad(pixels, (3, 3, 3, 3), mode="replicate").reshape(1, batch * channels, height + 6, width + 6)
    k = weights.repeat_interleave(channels, dim=0)
    x = F.conv2d(x, k[:, None, None, :], groups=batch * channels)
    x = F.conv2d(x, k[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Samples of a briefly trained model are soft and noisy: blur most images (sigma up to 1.8 px), shift
    brightness and contrast a little, add noise."""
    count = len(pixels)
    sigma = torch.where(torch.rand(count, generator=generator) < 0.75,
                        0.3 + 1.5 * torch.rand(count, generator=generator), torch.zeros(count))
    pixels = torch.where((sigma > 0)[:, None, None, None], _blur(pixels, sigma), pixels)
    contrast = 1 + 0.2 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5)
    brightness = 0.1 * (torch.rand(count, 1, 1, 1, generator=generator) - 0.5)
    return pixels * contrast + brightness + 0.05 * torch.randn(pixels.shape, generator=generator)


def train_toy_net(steps: int = 900, batch_size: int = 64, images: int = 6000, seed: int = 0, log=print) -> ToyNet:
    torch.manual_seed(seed)
    net = ToyNet()
    pictures, photos = world.dataset(images, 32, seed=seed + 17)
    pixels = pictures.permute(0, 3, 1, 2) * 2 - 1  # as TOY_PREPROCESS normalises
    labels = _labels(photos)
    plain = labels["accent"] == world.ACCENTS.index("plain")  # accent colour invisible
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        net.train()
        for step in range(1, steps + 1):
            index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
            embedding = net(_augment(pixels[index], generator))
            loss = sum(F.cross_entropy(net.logits(embedding, head), labels[head][index],
                                       reduction="none")[~plain[index] if head == "accent_colour" else slice(None)]
                       .mean() for head in HEADS)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 100 == 0 or step == steps:
                log(f"  feature net step {step}/{steps}: loss {loss.item():.3f} "
                    f"({time.perf_counter() - started:.0f}s)")
    return net.eval().requires_grad_(False)


def save_toy_net(net: ToyNet, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def load_toy_embedder(path: str | Path) -> ToyEmbedder:
    net = ToyNet()
    net.load_state_dict(load_file(str(path)))
    return ToyEmbedder(net.requires_grad_(False))


# ---------------------------------------------------------------------------------------------------- checks

def identity(toy: world.Toy) -> tuple:
    """What can be seen of a toy: a plain toy's accent colour is invisible."""
    return (toy.shape, toy.colour, toy.accent, None if toy.accent == "plain" else toy.accent_colour)


def identity_gallery(identities: int = 12, photos_per: int = 4, seed: int = 0, blur: float = 0.0):
    """Photos of ``identities`` distinct toys (the benchmark's instance first), each in several scenes/poses."""
    rng = random.Random(f"gallery-{seed}")
    toys = [world.INSTANCE]
    while len(toys) < identities:
        toy = world.random_toy(rng)
        if identity(toy) not in {identity(t) for t in toys}:
            toys.append(toy)
    photos = [world.random_photo(rng, toy) for toy in toys for _ in range(photos_per)]
    images = world.render_batch(photos)
    if blur:
        pixels = _blur(images.permute(0, 3, 1, 2), torch.full((len(images),), blur))
        images = pixels.permute(0, 2, 3, 1).clamp(0, 1).contiguous()
    return images, [identity(p.toy) for p in photos]


def nearest_neighbour_accuracy(embedder, images: torch.Tensor, labels: list) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy (cosine) of identity over the gallery."""
    embeddings = embedder.embed(images)
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(dim=1).tolist()
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / len(labels)


def similarity_spread(embedder, images: torch.Tensor, labels: list) -> dict[str, float]:
    """Mean cosine between photos of the same toy and of different toys."""
    embeddings = embedder.embed(images)
    similarity = embeddings @ embeddings.T
    same = torch.tensor([[a == b for b in labels] for a in labels])
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return {"same_toy": round(similarity[same & off].mean().item(), 4),
            "different_toys": round(similarity[~same].mean().item(), 4)}


def random_vit(folder: str | Path, seed: int = 0):
    """The ViT-S/16 architecture of the DINO metric with fixed random weights, through the pack's own loader."""
    return metrics.load_dino(random_dino.make_random_dino(folder, seed), "cpu")
