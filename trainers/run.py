"""One personalization run, the same for every method and every caller (CLI, node, tests, benchmarks):
images → training pixels, class images when prior preservation is on, the shared loop, the method's export.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig
from .data import images_to_training_pixels, load_subject_folder
from .errors import PersonalizeError
from .loop import Callbacks, Method, TrainResult, pick_device, train
from .models import Components, load_base
from .prior import class_images


@dataclass
class Artifact:
    path: Path
    method: str
    metadata: dict[str, str]
    result: TrainResult
    class_image_dir: Path | None = None
    class_images_generated: int = 0


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "comfyui-personalize"


def training_fingerprint(method: Method, config: TrainConfig, images: torch.Tensor, captions: list[str],
                         base_fingerprint: str) -> str:
    """A hash of every input that shapes the result: the method, every option, the image contents, the captions
    and the base model. Equal fingerprints mean a rerun would train the same thing."""
    digest = hashlib.sha256()
    digest.update(f"{method.name}|{config!r}|{base_fingerprint}|{captions!r}|{tuple(images.shape)}".encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:20]


def find_trained(folder: str | Path, stem: str, suffix: str, fingerprint: str) -> Path | None:
    """An artifact in ``folder`` named ``stem[_N]suffix`` whose metadata carries ``fingerprint``."""
    from .models import read_metadata

    folder = Path(folder)
    pattern = re.compile(rf"^{re.escape(stem)}(_\d+)?{re.escape(suffix)}$")
    for path in sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []:
        if pattern.match(path.name):
            try:
                if read_metadata(path).get("personalize.fingerprint") == fingerprint:
                    return path
            except Exception:  # an unreadable file is simply not a match
                continue
    return None


def personalize(components: Components, method: Method, images: torch.Tensor, captions: list[str] | None,
                config: TrainConfig, out_path: str | Path, *, class_cache_dir: str | Path | None = None,
                device: torch.device | None = None, callbacks: Callbacks | None = None,
                release_frozen: bool = False) -> Artifact:
    """Train ``method`` on ``images`` (a ComfyUI IMAGE batch [B,H,W,3] in 0..1) and write its artifact.
    ``release_frozen``: the caller discards ``components`` afterwards (see ``loop.train``)."""
    callbacks = callbacks or Callbacks()
    device = device or pick_device()
    captions = list(captions or [""] * images.shape[0])
    if len(captions) != images.shape[0]:
        raise PersonalizeError(f"got {images.shape[0]} images but {len(captions)} captions; give one caption per "
                               "image (an empty one is fine)")
    pixels = images_to_training_pixels(images, config.resolution)
    fingerprint = training_fingerprint(method, config, images, captions, components.fingerprint)
    class_pixels, class_dir, generated = None, None, 0
    if config.prior_preservation:
        components.unet.to(device), components.vae.to(device), components.text_encoder.to(device)

        def progress(done: int, total: int) -> None:
            if callbacks.on_prepare:
                callbacks.on_prepare(done, total, "generating class images")

        class_pixels, class_dir, generated = class_images(
            components, config, class_cache_dir or default_cache_dir() / "class_images",
            on_progress=progress, should_stop=callbacks.should_stop)
    result = train(components, method, pixels, captions, config, class_pixels=class_pixels, device=device,
                   callbacks=callbacks, release_frozen=release_frozen)
    result.input_fingerprint = fingerprint
    path, metadata = method.export(components, config, result, Path(out_path))
    return Artifact(path=path, method=method.name, metadata=metadata, result=result, class_image_dir=class_dir,
                    class_images_generated=generated)


# ---------------------------------------------------------------------------------------------------- CLI

def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every training command shares besides its config's options."""
    parser.add_argument("--base", required=True, help="base model: a diffusers folder or an SD1.x single-file "
                        "checkpoint (.safetensors, or .ckpt loaded with weights_only)")
    parser.add_argument("--images", required=True, help="folder of subject photos (JPEG/PNG/WebP, optional "
                        "<image>.txt captions)")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (vocab.json + merges.txt) for a "
                        "single-file --base; default: a 'tokenizer' folder beside it")
    parser.add_argument("--class-cache", default=None, help="folder for generated class images "
                        f"(default: {default_cache_dir() / 'class_images'})")


def run_training_command(args: argparse.Namespace, config: TrainConfig, method: Method) -> dict:
    out = Path(args.out)
    if out.resolve() == Path(args.base).expanduser().resolve():
        raise PersonalizeError(f"--out {out} is the base model itself; write the result to another file")
    if out.exists() and not args.overwrite:
        raise PersonalizeError(f"--out {out} already exists; choose another path or pass --overwrite")
    device = pick_device(args.device)
    subject = load_subject_folder(args.images, resolution=config.resolution)
    components = load_base(args.base, tokenizer_dir=args.tokenizer)
    artifact = personalize(components, method, subject.images, subject.captions, config, out,
                           class_cache_dir=args.class_cache, device=device, callbacks=terminal_callbacks(),
                           release_frozen=True)
    result = artifact.result
    return {"output": str(artifact.path), "method": artifact.method, "steps": result.steps,
            "final_loss": round(result.final_loss, 6), "seconds_per_step": round(result.seconds_per_step, 4),
            "startup_seconds": round(result.startup_seconds, 3), "bytes": artifact.path.stat().st_size
            if artifact.path.is_file() else None, "images": len(subject.files),
            "class_images_generated": artifact.class_images_generated, "warnings": subject.warnings}


def terminal_callbacks() -> Callbacks:
    """A tqdm bar on stderr; Ctrl-C ends the run through KeyboardInterrupt (nothing is written)."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on_step(info) -> None:
        bar = bars.get("train") or bars.setdefault("train", tqdm(total=info.total, desc="training", unit="step"))
        bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}", refresh=False)
        bar.update(1)
        if info.step == info.total:
            bar.close()

    def on_prepare(done: int, total: int, what: str) -> None:
        bar = bars.get(what) or bars.setdefault(what, tqdm(total=total, desc=what, unit="img"))
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return Callbacks(on_step=on_step, on_prepare=on_prepare)
