"""Config fields that double as CLI flags and node inputs: one set of names, limits and help texts.

A config is a plain dataclass whose fields are declared with :func:`option`. The CLI turns each field into a
``--flag``, the nodes turn it into a ComfyUI input, and :func:`validate` checks limits with user-facing messages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import PersonalizeError


@dataclass(frozen=True)
class OptionSpec:
    help: str
    min: float | None = None
    max: float | None = None
    choices: Sequence[str] | None = None
    step: float | None = None
    multiline: bool = False
    advanced: bool = False
    cli: bool = True
    node: bool = True


def option(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"option": OptionSpec(help=help, **spec)})


def options_of(config_type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(config_type) if "option" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def validate(config) -> None:
    """Raise PersonalizeError naming the first field outside its limits (NaN and infinity are outside every one:
    NaN compares false with any bound, and would e.g. turn gradient clipping off unnoticed)."""
    for f, spec in options_of(type(config)):
        value = getattr(config, f.name)
        if spec.choices is not None and value not in spec.choices:
            raise PersonalizeError(f"{f.name} must be one of {', '.join(map(str, spec.choices))}; got {value!r}.")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise PersonalizeError(f"{f.name} must be a finite number; got {value}.")
            if spec.min is not None and value < spec.min:
                raise PersonalizeError(f"{f.name} must be at least {spec.min:g}; got {value:g}.")
            if spec.max is not None and value > spec.max:
                raise PersonalizeError(f"{f.name} must be at most {spec.max:g}; got {value:g}.")
