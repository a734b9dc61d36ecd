"""Reading weight files: safetensors (memory-mapped where that is free), pickles only with ``weights_only``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import safe_open

from .components import layout
from .errors import PersonalizeError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None,
                     channels_last_prefix: str | None = "") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, floating ones in ``dtype``, 4-D ones whose name starts with
    ``channels_last_prefix`` (None: none) laid out channels_last.

    A tensor already stored that way is a view of a private memory map of the file, as diffusers loads: it is read
    when first used, so weights a run never touches cost no memory (and no start-up time), and training's changes
    stay in this process. Any other tensor is read on its own and converted as it arrives: a whole-file map would
    keep every page it touched resident beside the converted copies (an fp16 SD1.5 file turned into fp32 would
    peak at file + model); one tensor at a time peaks at the model.
    """
    path = Path(path)
    file_size = path.stat().st_size
    file_map = None
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        data_start = 8 + header_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise PersonalizeError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which the pack "
                                       "cannot train; use an fp32/fp16/bf16 checkpoint")
            stored, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            if data_start + end > file_size:
                raise PersonalizeError(f"{path.name} is truncated (tensor {name}); download it again")
            wanted = (dtype or stored) if stored.is_floating_point else stored
            tensor_layout = layout(len(shape), stored.is_floating_point and channels_last_prefix is not None
                             and name.startswith(channels_last_prefix))
            offset, itemsize = data_start + begin, stored.itemsize
            if wanted == stored and tensor_layout == torch.contiguous_format and offset % itemsize == 0:
                if file_map is None:
                    file_map = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=file_size)
                tensors[name] = torch.empty(0, dtype=stored).set_(file_map, offset // itemsize, shape)
                continue
            tensor = torch.empty(shape, dtype=stored)
            f.seek(offset)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise PersonalizeError(f"{path.name} is truncated (tensor {name}); download it again")
            tensors[name] = tensor.to(dtype=wanted, memory_format=tensor_layout)
    return tensors


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None,
                    channels_last_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's state dict: safetensors, or a pickle loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise PersonalizeError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path, dtype, channels_last_prefix)
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure of a user file is a bad input, not a bug
        raise PersonalizeError(f"could not read {path} as a model checkpoint ({describe_load_error(error)}); "
                               "is the file complete and a .safetensors or .ckpt model?") from None
    return checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint


def describe_load_error(error: BaseException) -> str:
    """A one-line account of why a weight file did not load. Never torch's advice to retry with
    ``weights_only=False``: that would let the file run code."""
    text = str(error).strip()
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text or "Weights only load failed" in text:
        return ("it is a pickle holding more than plain tensors, which the pack never unpickles since that could run "
                "code from the file; use a .safetensors version of it")
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
