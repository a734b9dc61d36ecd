"""Node inputs from the trainers' config dataclasses: the CLI flags, the node widgets and the config fields are one
set of names, limits and help texts."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainers.options import default_of, options_of, validate


def option_inputs(config_type) -> list[io.Input]:
    inputs = []
    for f, spec in options_of(config_type):
        if not spec.node:
            continue
        default = default_of(f)
        common = dict(tooltip=spec.help, advanced=spec.advanced or None)
        if spec.choices is not None:
            inputs.append(io.Combo.Input(f.name, options=list(spec.choices), default=default, **common))
        elif isinstance(default, bool):
            inputs.append(io.Boolean.Input(f.name, default=default, **common))
        elif isinstance(default, int):
            # The frontend gives every widget named "seed" a control-after-generate menu that defaults to
            # "randomize": a trainer would then retrain on every queue. Pin it to "fixed".
            control = io.ControlAfterGenerate.fixed if f.name == "seed" else None
            inputs.append(io.Int.Input(f.name, default=default, min=int(spec.min), max=int(spec.max),
                                       step=int(spec.step or 1), control_after_generate=control, **common))
        elif isinstance(default, float):
            inputs.append(io.Float.Input(f.name, default=default, min=spec.min, max=spec.max,
                                         step=spec.step or 0.01, **common))
        else:
            inputs.append(io.String.Input(f.name, default=default, multiline=spec.multiline, **common))
    return inputs


def config_from_inputs(config_type, inputs: dict):
    """The config for a node's input values (widgets not on the node keep their defaults); validated."""
    names = {f.name for f, spec in options_of(config_type) if spec.node}
    config = config_type(**{k: v for k, v in inputs.items() if k in names})
    validate(config)
    return config
