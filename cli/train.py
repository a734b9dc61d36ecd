"""``train-lora``, ``train-embedding``, ``train-dreambooth``: the trainers on files, through ``run.train_or_reuse``
(an ``--out`` already trained from the same inputs is reported as reused, not trained again)."""

from __future__ import annotations

import argparse
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from ..trainers.config import TrainConfig
from ..trainers.data import load_subject_folder
from ..trainers.device import resolve_device
from ..trainers.distributed import is_main_process, launcher_config
from ..trainers import metrics
from ..trainers.errors import PersonalizeError, TrainingCancelled
from ..trainers.loop import Callbacks
from ..trainers.methods.base import Method
from ..trainers.methods.dreambooth import DreamBoothConfig, DreamBoothMethod, check_device
from ..trainers.methods.embedding import EmbeddingConfig, EmbeddingMethod
from ..trainers.methods.lora import LoRAConfig, LoRAMethod
from ..trainers.models import load_base
from ..trainers.preflight import check_output
from ..trainers.run import BaseModel, Output, default_cache_dir, train_or_reuse
from ..trainers.state import state_folder
from .command import Command


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every training command shares besides its config's options."""
    parser.add_argument("--base", required=True, help="base model: a diffusers folder or a single-file checkpoint "
                        "(.safetensors, or .ckpt loaded with weights_only)")
    parser.add_argument("--images", required=True, help="folder of subject photos (JPEG/PNG/WebP, optional "
                        "<image>.txt captions)")
    parser.add_argument("--masks", default=None, help="masked loss: a folder of masks named like the photos (white = "
                        "subject, black = background, weighted by --mask-floor), or 'alpha' for the photos' "
                        "transparency")
    parser.add_argument("--out", required=True, help="output file; one already trained from the same inputs is "
                        "reused")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it was trained from other inputs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (vocab.json + merges.txt) for a "
                        "single-file --base; default: a 'tokenizer' folder beside it")
    parser.add_argument("--class-cache", default=None, help="folder for generated class images "
                        f"(default: {default_cache_dir() / 'class_images'})")
    parser.add_argument("--resume", action="store_true", help="continue the training state saved beside --out "
                        "(<out>.state/, written every --save-every steps and on Ctrl-C/SIGTERM) by a run of the same "
                        "inputs; --steps stays the total, so a larger one continues a finished run")
    parser.add_argument("--dino-model", default=None, help="DINO ViT-S/16 (facebook/dino-vits16 folder, or "
                        f"{metrics.DINO_PTH_NAME}) that scores the validation samples (--validate-every)")
    parser.add_argument("--clip-model", default=None, help="Hugging Face CLIP folder for CLIP-I and CLIP-T of the "
                        "validation samples")


def run_training(args: argparse.Namespace, config: TrainConfig, method: Method) -> dict:
    out = Path(args.out)
    if out.resolve() == Path(args.base).expanduser().resolve():
        raise PersonalizeError(f"--out {out} is the base model itself; write the result to another file")
    check_output(out, "--out")  # before the base model and the photos are loaded
    device = resolve_device(args.device)
    subject = load_subject_folder(args.images, resolution=config.resolution,
                                  fit="keep" if config.bucketing else "crop", masks=args.masks)
    dino = metrics.load_dino(args.dino_model, device) if args.dino_model else None
    clip = metrics.load_clip(args.clip_model, device) if args.clip_model else None
    base = BaseModel.loaded(load_base(args.base, tokenizer_dir=args.tokenizer))
    stop = {"requested": False}
    try:
        with stop_on_signals(stop):
            artifact = train_or_reuse(base, method, subject.images, subject.captions, config,
                                      Output.file(out, overwrite=args.overwrite), class_cache_dir=args.class_cache,
                                      device=device, callbacks=terminal_callbacks(lambda: stop["requested"])
                                      if is_main_process() else Callbacks(should_stop=lambda: stop["requested"]),
                                      release_frozen=True, resume=args.resume, dino=dino, clip=clip,
                                      masks=subject.masks)
    except (TrainingCancelled, KeyboardInterrupt):
        folder = state_folder(out)
        if folder.is_dir():
            print(f"the training state is in {folder}: the same command with --resume continues it", file=sys.stderr)
        raise
    result = artifact.result
    validation = result.validation if result else _stored_validation(artifact.metadata)
    if validation:
        print_validation_table(validation, artifact.metadata.get("personalize.selection", ""))
    return {"output": str(artifact.path), "method": artifact.method, "reused": artifact.reused,
            "resumed_from": artifact.resumed_from, "validation": validation,
            "best_step": int(artifact.metadata["personalize.best_step"]) if validation else None,
            "selection": artifact.metadata.get("personalize.selection"),
            "training_seconds": round(result.training_seconds, 3) if result else None,
            "validation_seconds": round(result.validation_seconds, 3) if result else None,
            "validation_grid": str(artifact.report["grid_path"]) if artifact.report else None,
            "steps": len(artifact.losses),
            "final_loss": final_loss(artifact.losses),
            "seconds_per_step": round(result.seconds_per_step, 4) if result else None,
            "startup_seconds": round(result.startup_seconds, 3) if result else None,
            "bytes": artifact.path.stat().st_size if artifact.path.is_file() else None, "images": len(subject.files),
            "buckets": result.buckets if result else None,
            "class_images_generated": artifact.class_images_generated, "warnings": subject.warnings}


def _stored_validation(metadata: dict) -> list[dict]:
    import json

    return json.loads(metadata.get("personalize.validation", "[]"))


def print_validation_table(rows: list[dict], selection: str) -> None:
    columns = [c for c in ("dino", "clip_i", "clip_t", "pres", "div", "seconds") if any(c in r for r in rows)]
    print("validation:", file=sys.stderr)
    print("  " + "".join(f"{c:>10}" for c in ["step", *columns]), file=sys.stderr)
    for row in rows:
        cells = "".join(f"{row[c]:>10.4f}" if c in row else f"{'-':>10}" for c in columns)
        print(f"  {row['step']:>10}{cells}", file=sys.stderr)
    if selection:
        print(f"result: {selection}", file=sys.stderr)


@contextmanager
def stop_on_signals(stop: dict):
    """Ctrl-C and SIGTERM ask the loop to stop at its next check (it then saves the training state); a second
    Ctrl-C interrupts at once."""
    def request(signum, _frame) -> None:
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping: saving the training state (Ctrl-C again to quit at once)", file=sys.stderr)

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def final_loss(losses: list[float]) -> float | None:
    """The mean of the last 10 steps' losses (one step's is noisy)."""
    tail = losses[-10:]
    return round(sum(tail) / len(tail), 6) if tail else None


def terminal_callbacks(should_stop=None) -> Callbacks:
    """A tqdm bar on stderr, and a line per validation."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on_step(info) -> None:
        bar = bars.get("train") or bars.setdefault("train", tqdm(total=info.total, initial=info.step - 1,
                                                                 desc="training", unit="step"))
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

    def on_validation(row: dict, _samples) -> None:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "best_step", "seconds"))
        tqdm.write(f"validation at step {row['step']}: {scores or 'samples only (no DINO/CLIP model)'}",
                   file=sys.stderr)

    return Callbacks(on_step=on_step, on_prepare=on_prepare, on_validation=on_validation, should_stop=should_stop)


def _add_dreambooth_arguments(parser) -> None:
    add_training_arguments(parser)
    parser.add_argument("--diffusers-out", default=None, help="also write the trained model as a diffusers folder "
                        "here (must not exist yet)")


def _run_dreambooth(args, config: DreamBoothConfig) -> dict:
    config = launcher_config(config)
    check_device(config, resolve_device(args.device))
    diffusers_out = Path(args.diffusers_out) if args.diffusers_out else None
    if diffusers_out and diffusers_out.exists():  # before training, not after it
        raise PersonalizeError(f"--diffusers-out {diffusers_out} already exists; choose another folder")
    result = run_training(args, config, DreamBoothMethod(config, diffusers_out))
    return dict(result, diffusers=str(diffusers_out) if diffusers_out else None)


COMMANDS = (
    Command(name="train-lora",
            help="train a LoRA on a subject and save it in kohya layout (loads in ComfyUI, A1111/Forge and diffusers)",
            add_arguments=add_training_arguments, config=LoRAConfig,
            run=lambda args, config: run_training(args, config, LoRAMethod(config))),
    Command(name="train-embedding",
            help="train a Textual Inversion embedding of a subject or style (ComfyUI: embedding:<file name>)",
            add_arguments=add_training_arguments, config=EmbeddingConfig,
            run=lambda args, config: run_training(args, config, EmbeddingMethod(config))),
    Command(name="train-dreambooth",
            help="DreamBooth: fine-tune the whole model on a subject (prior preservation on by default) and save a "
                 "single-file checkpoint (loads in ComfyUI, A1111/Forge and diffusers)",
            add_arguments=_add_dreambooth_arguments, config=DreamBoothConfig, run=_run_dreambooth),
)
