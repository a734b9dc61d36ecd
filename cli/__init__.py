"""``python -m comfyui_personalize <command>``: the engine, headless — the pack's second face beside ``nodes/``.

The subcommands live in ``train`` (the three trainers) and ``tools`` (test models, subject loading, the DINO score,
the demo). A command with a config dataclass gets one ``--flag`` per option field; ``run`` returns a dict that
``--json`` prints as the last stdout line (with ``seconds`` and ``peak_rss_mb`` added). A PersonalizeError prints
its message and exits 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from ..trainers.errors import PersonalizeError, TrainingCancelled
from ..trainers.distributed import is_main_process
from . import many, tools, train
from .command import Command, add_config_arguments, config_from_args

COMMANDS: tuple[Command, ...] = (tools.MAKE_TINY_MODEL, tools.LOAD_SUBJECT, *train.COMMANDS, many.TRAIN_MANY,
                                 tools.DINO_SCORE, tools.DEMO)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (0 where the platform cannot tell, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_personalize",
        description="Personalize Stable Diffusion from a few photos: DreamBooth, Textual Inversion and LoRA "
                    "trainers, and the DreamBooth paper's metrics.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command.add_arguments:
            command.add_arguments(p)
        if command.config:
            add_config_arguments(p, command.config)
        p.add_argument("--json", action="store_true", help="print a JSON object as the last stdout line")
        p.set_defaults(_command=command)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``finally`` (temporary files, the output lock) runs."""


def _raise_terminated(_signum, _frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    started = time.perf_counter()
    # Signal handlers can only be set from the main thread (a test or host may call main from another).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        config = config_from_args(command.config, args) if command.config else None
        result = command.run(args, config)
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingCancelled):
        print("cancelled: no artifact was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    result = dict(result, seconds=round(time.perf_counter() - started, 3), peak_rss_mb=round(peak_rss_mb(), 1))
    if not is_main_process():  # under accelerate launch the main process reports for all
        return 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
