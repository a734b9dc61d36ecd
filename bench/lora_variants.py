"""File size and seconds per step of each LoRA variant, on the tiny model (or the full one), in one process.

    python -m bench.lora_variants                         # tiny model, 64 px, rank 8, 20 steps, 2 rounds
    python -m bench.lora_variants --size full --resolution 512 --steps 6 --device cuda

Variants run round-robin (A/B/C/…, ``--rounds`` times), so a machine that slows down slows all of them; the table
gives the medians and the ratios to plain LoRA measured in the same run. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from comfyui_personalize.trainers.methods.lora import LoRAConfig, LoRAMethod
from comfyui_personalize.trainers.models import load_base
from comfyui_personalize.trainers.run import personalize
from comfyui_personalize.trainers.testing.synthetic import subject_photos
from comfyui_personalize.trainers.testing.tiny import make_tiny_model

VARIANTS = {"lora": {}, "dora": {"lora_type": "dora"}, "loha": {"lora_type": "loha"}, "lokr": {"lora_type": "lokr"},
            "lora+conv": {"conv_rank": 4, "conv_alpha": 4.0}, "loha+conv": {"lora_type": "loha", "conv_rank": 4,
                                                                            "conv_alpha": 4.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1) if args.device == "cpu" else None
    with tempfile.TemporaryDirectory() as work:
        model = make_tiny_model(Path(work) / "model", size=args.size)
        photos = subject_photos(4, args.resolution, 0)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        sizes: dict[str, int] = {}
        for round_ in range(args.rounds):
            for name, overrides in VARIANTS.items():
                config = LoRAConfig(steps=args.steps, resolution=args.resolution, rank=args.rank,
                                    alpha=float(args.rank), **overrides)
                out = Path(work) / f"{name}-{round_}.safetensors"
                artifact = personalize(load_base(model["single_file"]), LoRAMethod(config), photos, None, config,
                                       out, device=torch.device(args.device), release_frozen=True)
                times[name].append(artifact.result.seconds_per_step)
                sizes[name] = out.stat().st_size
    base_time, base_size = statistics.median(times["lora"]), sizes["lora"]
    print(f"{args.size} model, {args.resolution} px, rank {args.rank}, {args.steps} steps x {args.rounds} rounds "
          f"on {args.device}")
    print(f"{'variant':<10} {'file KB':>9} {'x lora':>7} {'s/step':>8} {'x lora':>7}")
    for name in VARIANTS:
        seconds = statistics.median(times[name])
        print(f"{name:<10} {sizes[name] / 1024:9.1f} {sizes[name] / base_size:7.2f} {seconds:8.4f} "
              f"{seconds / base_time:7.2f}")


if __name__ == "__main__":
    main()
