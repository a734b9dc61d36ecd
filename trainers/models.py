"""Loading a base model offline from a diffusers folder or a single-file checkpoint of any supported family, and
writing models back in either layout. Nothing here downloads."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import describe_load_error, read_checkpoint
from .components import Components
from .errors import PersonalizeError
from .export import save_safetensors
from .families import detect_checkpoint, detect_folder
from .families.ldm import UNET_PREFIX

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@contextmanager
def loading_boundary(source: str, fix: str) -> Iterator[None]:
    """The one place where a malformed model becomes a user-facing error: whatever a damaged file or folder makes
    the readers, converters and ``from_pretrained`` raise (KeyError, ZeroDivisionError, JSON and safetensors errors,
    shape mismatches…) is reported as a PersonalizeError naming ``source`` and the ``fix``."""
    try:
        yield
    except PersonalizeError as error:
        if Path(source).name in str(error):
            raise
        raise PersonalizeError(f"the base model {source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - every failure to load a user's model is a bad input, not a bug
        raise PersonalizeError(f"could not load the base model {source}: {describe_load_error(error)}. {fix}") \
            from None


def components_from_original(state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                             dtype: torch.dtype = torch.float32, owned: bool = False) -> Components:
    """Components from an original-layout state dict (a single file, or what ComfyUI's models hand out)."""
    with loading_boundary(name, "Is it a complete, supported checkpoint?"):
        return detect_checkpoint(state_dict).from_original(state_dict, tokenizer_dir, name=name, dtype=dtype,
                                                           owned=owned)


def load_base(path: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype = torch.float32) -> Components:
    """Load a base model from a diffusers folder or a single-file checkpoint, offline."""
    path = Path(path).expanduser()
    if path.is_dir():
        with loading_boundary(str(path), "Re-save the folder with diffusers' save_pretrained (safetensors) or "
                              "download it again."):
            return detect_folder(path).from_diffusers(path, dtype)
    if not path.exists():
        raise PersonalizeError(f"--base {path} does not exist; give a diffusers folder or a .safetensors/.ckpt file")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise PersonalizeError(f"--base {path.name}: expected a diffusers folder or a single file ending in "
                               f"{', '.join(SINGLE_FILE_SUFFIXES)}")
    with loading_boundary(str(path), "Download it again, or pick a complete checkpoint of a supported family."):
        state_dict = read_checkpoint(path, dtype, channels_last_prefix=UNET_PREFIX)
        family = detect_checkpoint(state_dict)  # before the tokenizer: an unsupported file should say so first
        return family.from_original(state_dict, family.find_tokenizer(path, tokenizer_dir), name=path.stem,
                                    dtype=dtype, owned=True)


def original_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """The components in their family's original single-file layout."""
    return components.family.to_original(components)


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    state_dict = original_state_dict(components)
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    return save_safetensors(state_dict, path, metadata)


def save_diffusers(components: Components, folder: str | Path) -> Path:
    """Write the components as a diffusers folder (into ``folder`` as it is: callers that need it atomic wrap it in
    ``files.atomic_path``)."""
    folder = Path(folder)
    components.pipeline(scheduler=components.noise_scheduler).save_pretrained(folder, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; older loaders need vocab.json + merges.txt as well (every family's
    # tokenizers share CLIP's vocabulary; each slot's tokenizer attribute is its pipeline subfolder).
    if components.tokenizer_dir:
        for slot in components.family.text_encoder_slots:
            for name in ("vocab.json", "merges.txt"):
                source = Path(components.tokenizer_dir) / name
                if source.is_file():
                    (folder / slot.tokenizer / name).write_bytes(source.read_bytes())
    return folder
