"""What a subcommand is, and how a config dataclass becomes its flags (one source of names, limits and help)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from ..trainers.options import default_of, options_of, validate


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace, Any], dict]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config: type | None = None


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
