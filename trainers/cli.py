"""``python -m comfyui_personalize <command>``: the trainers, headless.

Each command lives beside the code it drives, as ``COMMAND = Command(...)`` in the modules listed below. A command
with a config dataclass gets one ``--flag`` per option field; ``run`` returns a dict that ``--json`` prints as the
last stdout line (with ``seconds`` and ``peak_rss_mb`` added). A PersonalizeError prints its message and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import PersonalizeError, TrainingCancelled
from .options import default_of, options_of, validate

_COMMAND_MODULES = ("tiny", "data", "lora", "dreambooth", "metrics", "embedding", "demo")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace, Any], dict]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config: type | None = None


def peak_rss_mb() -> float:
    """Peak resident memory of this process (0 where the platform cannot tell, e.g. Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, config_type) -> None:
    for f, spec in options_of(config_type):
        if not spec.cli:
            continue
        default = default_of(f)
        if isinstance(default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=spec.help.replace("%", "%%"))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, choices=spec.choices,
                                metavar=None if spec.choices else f.name.upper(), help=spec.help.replace("%", "%%"))


def config_from_args(config_type, args: argparse.Namespace):
    values = {f.name: getattr(args, f.name) for f, spec in options_of(config_type) if spec.cli}
    config = config_type(**values)
    validate(config)
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comfyui_personalize",
        description="Personalize Stable Diffusion from a few photos: DreamBooth, Textual Inversion and LoRA "
                    "trainers, and the DreamBooth paper's metrics.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        command: Command = importlib.import_module(f".{module_name}", __package__).COMMAND
        p = sub.add_parser(command.name, help=command.help, description=command.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command.add_arguments:
            command.add_arguments(p)
        if command.config:
            add_config_arguments(p, command.config)
        p.add_argument("--json", action="store_true", help="print a JSON object as the last stdout line")
        p.set_defaults(_command=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: Command = args._command
    started = time.perf_counter()
    try:
        config = config_from_args(command.config, args) if command.config else None
        result = command.run(args, config)
    except PersonalizeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, TrainingCancelled):
        print("cancelled: nothing was written", file=sys.stderr)
        return 130
    result = dict(result, seconds=round(time.perf_counter() - started, 3), peak_rss_mb=round(peak_rss_mb(), 1))
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
