"""A stand-in for ComfyUI's V3 node API (comfy_api.latest) for the unit tests, which run without ComfyUI.

It keeps the constructor signatures the pack uses and records what the nodes declare, so the tests can check the
schemas (ids, categories, widget limits). The integration suite checks the same schemas in a real ComfyUI.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any


class _Input:
    io_type = "*"

    def __init__(self, id: str, display_name: str = None, optional: bool = False, tooltip: str = None,
                 default: Any = None, min: Any = None, max: Any = None, step: Any = None, options=None,
                 multiline: bool = None, force_input: bool = None, advanced: bool = None, **extra):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.default, self.min, self.max, self.step, self.options = default, min, max, step, options
        self.multiline, self.force_input, self.advanced, self.extra = multiline, force_input, advanced, extra


class _Output:
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list: bool = False):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list


def _type(name: str):
    input_class = type("Input", (_Input,), {"io_type": name})
    output_class = type("Output", (_Output,), {"io_type": name})
    return type(name, (), {"Input": input_class, "Output": output_class, "io_type": name})


class _IO(SimpleNamespace):
    pass


class ControlAfterGenerate(str, enum.Enum):
    fixed = "fixed"
    increment = "increment"
    decrement = "decrement"
    randomize = "randomize"


class Hidden(str, enum.Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_output_node: bool = False
    is_input_list: bool = False
    not_idempotent: bool = False


class NodeOutput:
    def __init__(self, *outputs, ui=None, expand=None, block_execution=None):
        self.outputs, self.ui = outputs, ui


class ComfyNode:
    hidden = SimpleNamespace(unique_id=None)

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        return cls.define_schema()


class ComfyExtension:
    async def on_load(self) -> None:
        pass


def Custom(io_type: str):
    return _type(io_type)


io = _IO(Schema=Schema, NodeOutput=NodeOutput, ComfyNode=ComfyNode, Hidden=Hidden, Custom=Custom,
         ControlAfterGenerate=ControlAfterGenerate,
         **{name: _type(io_type) for name, io_type in [
             ("Int", "INT"), ("Float", "FLOAT"), ("String", "STRING"), ("Boolean", "BOOLEAN"), ("Combo", "COMBO"),
             ("Image", "IMAGE"), ("Mask", "MASK"), ("Latent", "LATENT"), ("Conditioning", "CONDITIONING"),
             ("Model", "MODEL"), ("Clip", "CLIP"), ("Vae", "VAE")]})
ui = _IO(PreviewText=lambda value: {"text": [value]},
         PreviewImage=lambda image, animated=False, cls=None: {"images": [image]})
