"""``python -m bench.quality``: the personalization quality benchmark (see ``benchmark.py``).

    python -m bench.quality              # benchmark the shipped toy model (pretrained, cached, if it is stale)
    python -m bench.quality pretrain     # rebuild the toy model and feature network, compare with the shipped ones
    python -m bench.quality pretrain --ship   # ... and write them to trainers/testing/toy_model/
    python -m bench.quality --seeds 0    # a quicker single-seed run
    python -m bench.quality merge /tmp/seed0 /tmp/seed1 /tmp/seed2   # one report from one process per seed
    python -m bench.quality --subject tuning --seeds 0 --methods lora --set lora_lr=1e-3 --out /tmp/sweep
                                         # one point of a hyper-parameter sweep, on the tuning subject
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=("run", "pretrain", "merge"))
    parser.add_argument("folders", nargs="*", help="merge: the results folders of runs on different seeds")
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    parser.add_argument("--cache", default=None, help="cache folder for the toy model, the feature network and "
                        "class images (default: $PERSONALIZE_QUALITY_CACHE or .cache/quality)")
    parser.add_argument("--ship", action="store_true", help="pretrain: write the rebuilt model, tokenizer, feature "
                        "network and recipe.json to trainers/testing/toy_model/ (the shipped files)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps for DreamBooth and LoRA")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: dreambooth, "
                        "dreambooth_no_prior, lora, lora_no_prior, embedding")
    parser.add_argument("--subject", default="reported", choices=("reported", "tuning"), help="the toy to "
                        "personalize: the reported one, or the one hyper-parameters are tuned on")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one numeric or boolean field of benchmark.Settings (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small, "
                        "and on a busy 2-core machine a second thread slows every operator down)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from . import assets
    from .benchmark import Settings, merge_reports, override, run_benchmark

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.command == "pretrain":
        recipe = assets.pretrain(args.cache, ship=args.ship, log=log)
        print(json.dumps(recipe, indent=2))
        return 0
    kwargs = {"out": args.out} if args.out else {}
    if args.command == "merge":
        report = merge_reports(args.folders, **kwargs)
        print(json.dumps({"results": report["results"], "timing": report["timing"]}, indent=2))
        return 0
    settings = Settings(seeds=tuple(int(s) for s in args.seeds.split(",")), subject=args.subject)
    for assignment in args.set:
        override(settings, assignment)
    if args.steps:
        settings.steps = args.steps
    if args.methods:
        settings.methods = tuple(m.strip() for m in args.methods.split(","))
    report = run_benchmark(settings=settings, cache=args.cache, log=log, **kwargs)
    print(json.dumps({"results": report["results"], "timing": report["timing"], "grid": report["grid"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
