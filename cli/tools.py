"""The commands besides training: test models, what the trainers see of a photo folder, the DINO score, the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..trainers.data import LoadSubjectConfig, load_subject_folder
from ..trainers.demo import run_demo
from ..trainers.metrics import DINO_HF_REPO, DINO_PTH_NAME, dino_score, find_dino_model, load_dino, \
    read_image_folder
from ..trainers.testing.tiny import ARCHS, make_tiny_model
from .command import Command


def _tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write diffusers/, model.safetensors and tokenizer/")
    parser.add_argument("--arch", default="sd15", choices=list(ARCHS),
                        help="model family: sd15 (SD1.x), sdxl (SDXL 1.0 base)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"],
                        help="tiny for tests and the demo; full for the family's real sizes (fp16: SD1.5 ~2 GB, "
                             "SDXL ~7 GB)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                        help="what the model predicts; v_prediction also writes the 'v_pred' marker key")


MAKE_TINY_MODEL = Command(
    name="make-tiny-model",
    help="write a deterministic random-weight model (diffusers folder + single-file checkpoint)",
    add_arguments=_tiny_model_arguments,
    run=lambda args, _config: make_tiny_model(args.out, args.size, args.seed, args.prediction_type,
                                                 args.arch),
)


def _subject_arguments(parser) -> None:
    parser.add_argument("folder", metavar="DIR",
                        help="folder of JPEG/PNG/WebP photos, each with an optional <name>.txt caption")


def _load_subject(args, config: LoadSubjectConfig) -> dict:
    subject = load_subject_folder(args.folder, config.resolution, config.fit)
    for warning in subject.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return {"count": len(subject.files), "files": subject.files, "sizes": subject.sizes,
            "captions": subject.captions, "warnings": subject.warnings}


LOAD_SUBJECT = Command(name="load-subject", help="Load a folder of subject photos as the trainers will see them.",
                       run=_load_subject, add_arguments=_subject_arguments, config=LoadSubjectConfig)


def _dino_arguments(parser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help=f"{DINO_PTH_NAME}, a {DINO_HF_REPO} folder, or a folder holding either")
    parser.add_argument("--generated", required=True, type=Path, help="folder of generated images")
    parser.add_argument("--reference", required=True, type=Path, help="folder of real subject photos")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _dino_score(args, _config) -> dict:
    model_path = args.model if args.model.is_file() else find_dino_model([args.model])
    dino = load_dino(model_path, args.device)
    generated_names, generated = read_image_folder(args.generated)
    _, reference = read_image_folder(args.reference)
    result = dino_score(dino, generated, reference, args.batch_size)
    print(result.report(generated_names), file=sys.stderr if args.json else sys.stdout)
    per_image = dict(zip(generated_names, (round(v, 6) for v in result.per_image)))
    return {"dino": round(result.score, 6), "pairs": result.pairs, "min": round(result.min, 6),
            "max": round(result.max, 6), "per_image": per_image, "model": str(model_path), "device": str(dino.device)}


DINO_SCORE = Command(name="dino-score", run=_dino_score, add_arguments=_dino_arguments,
                     help="DreamBooth's DINO score: mean DINO ViT-S/16 cosine similarity between generated and real "
                          "subject images.")


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the model, artifacts, samples and report")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every method's steps (quick "
                        "check: 0.1)")


DEMO = Command(name="demo", help="personalise the shipped toy model on photos of a toy with every method; write "
               "the artifacts, a sample grid, loss curves and a scored report", add_arguments=_demo_arguments,
               run=lambda args, _config: run_demo(args.out, args.steps_scale))
