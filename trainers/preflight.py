"""Checks that run before a model is loaded or a step is trained, so that a doomed run fails in seconds with a
message naming the input and the fix, instead of after an hour (or, worse, succeeding with a useless result).

``check_output``: the output is a portable file name in a location this process can write. ``check_base``: the
loaded model has a tokenizer that really tokenizes and only finite weights. ``check_free_space``: the artifact's known
size fits on its disk. Options are checked where they are parsed (``options.validate``, NaN and infinity included).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from .components import Components
from .errors import PersonalizeError
from .files import name_problem

# A word every CLIP vocabulary holds as one token: a tokenizer that cannot spell it has no vocabulary at all.
_PROBE_WORD = "photo"
# CLIP's byte-level BPE holds the 256 byte symbols and their end-of-word forms before any merge.
_MIN_VOCABULARY = 512
_HEADROOM_BYTES = 16 * 2**20  # metadata, the safetensors header, file-system slack


def check_output(path: str | Path, what: str = "the output") -> None:
    """``path`` is a portable file name, not a folder, in a folder that exists (or can be made) and is writable."""
    path = Path(path).expanduser()
    problem = name_problem(path.name)
    if problem:
        raise PersonalizeError(f"{what} {path}: {path.name!r} is not a portable file name ({problem}); choose a "
                               "plain name such as 'my_dog.safetensors'")
    if path.is_dir():
        raise PersonalizeError(f"{what} {path} is a folder; give a file name inside it, e.g. {path / 'my_dog'}"
                               f"{path.suffix or '.safetensors'}")
    folder = path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise PersonalizeError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    _check_writable(existing, what, path)


def _check_writable(folder: Path, what: str, path: Path) -> None:
    try:  # os.access says yes to root on a read-only mount: only writing tells
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PersonalizeError(f"{what} {path} cannot be written: {folder} is not writable ({error.strerror}); "
                               "choose a folder you can write to") from None


def check_output_folder(path: str | Path, what: str = "the output folder") -> None:
    """``path`` is a folder, or can be made one, that this process can write."""
    path = Path(path).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise PersonalizeError(f"{what} {path} cannot be a folder: {existing} is a file. Give a folder path")
    _check_writable(existing, what, path)


def check_free_space(path: str | Path, needed_bytes: int, what: str = "the output") -> None:
    """Refuse a run whose artifact (``needed_bytes``) would not fit on the disk of ``path``."""
    path = Path(path)
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needed = needed_bytes + _HEADROOM_BYTES
    if free < needed:
        raise PersonalizeError(f"{what} {path} needs about {_mb(needed)} but its disk has {_mb(free)} free; free "
                               "some space or write it elsewhere")


def check_base(components: Components) -> None:
    """The base model can train something meaningful: usable tokenizers, finite weights."""
    family = components.family
    for slot, encoder in family.text_encoders(components):
        _check_tokenizer(getattr(components, slot.tokenizer), encoder, components)
    modules = {"UNet": components.unet, "VAE": components.vae,
               **{slot.encoder.replace("_", " "): encoder for slot, encoder in family.text_encoders(components)}}
    for what, module in modules.items():
        if module is None:
            continue
        bad = next((name for name, tensor in module.state_dict().items()
                    if tensor.is_floating_point() and not _finite(tensor)), None)
        if bad is not None:
            raise PersonalizeError(f"the base model {components.name} has NaN or infinite weights in its {what} "
                                   f"({bad}); the file is damaged or was saved from a diverged run. Use another "
                                   "checkpoint")


def _check_tokenizer(tokenizer, encoder, components: Components) -> None:
    where = components.tokenizer_dir or "the model's tokenizer"
    try:
        ids = tokenizer(_PROBE_WORD, add_special_tokens=False).input_ids
        vocabulary = len(tokenizer)
    except Exception as error:  # noqa: BLE001 - any failure here means the tokenizer files are broken
        raise PersonalizeError(f"the tokenizer in {where} does not work ({error}); give a complete CLIP tokenizer "
                               "folder (vocab.json and merges.txt)") from None
    unknown = getattr(tokenizer, "unk_token_id", None)
    if not ids or all(i == unknown for i in ids) or vocabulary < _MIN_VOCABULARY:
        raise PersonalizeError(f"the tokenizer in {where} has no usable vocabulary ({vocabulary} tokens; "
                               f"{_PROBE_WORD!r} becomes {ids}): training would see only padding. Give a complete "
                               "CLIP tokenizer folder (vocab.json and merges.txt)")
    table = encoder.get_input_embeddings().num_embeddings
    if vocabulary > table:
        raise PersonalizeError(f"the tokenizer in {where} has {vocabulary} tokens but the text encoder only "
                               f"{table}: they are from different models. Give the tokenizer of this model")


def _finite(tensor: torch.Tensor) -> bool:
    # NaN and infinity propagate through a sum: one vectorised pass, no full-size mask (SD1.5 in fp32: ~0.5 s, 25x
    # faster than isfinite().all() or a float64 sum). fp16 could overflow the sum of finite values: fp32 for it.
    return bool(torch.isfinite(tensor.detach().sum(dtype=torch.float32 if tensor.dtype == torch.float16 else None)))


def _mb(count: int) -> str:
    return f"{count / 2**20:,.0f} MB"


def model_bytes(modules, dtype: torch.dtype | None = None) -> int:
    """Bytes of the modules' weights, stored in ``dtype`` where floating (None: as they are)."""
    total = 0
    for module in modules:
        for tensor in module.state_dict().values():
            itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * itemsize
    return total

