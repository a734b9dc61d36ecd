"""Writing artifacts safely: sanitised names inside their folder, no silent overwrite, temp file + rename."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from .errors import PersonalizeError


def sanitize_name(name: str) -> str:
    """A file stem safe on every OS: letters, digits, '-', '_', '.' and spaces; no path parts."""
    stem = re.sub(r"[^\w\-. ]+", "_", Path(str(name).strip()).name).strip(" .")
    if not stem:
        raise PersonalizeError(f"the output name {name!r} is empty once path characters are removed; "
                               "give a plain name such as 'my_dog'")
    return stem


def output_path(folder: str | Path, name: str, suffix: str, overwrite: bool = False) -> Path:
    """``folder/name.suffix``; with ``overwrite`` off, ``name_1.suffix``, ``name_2.suffix``, … if taken."""
    folder = Path(folder)
    stem = sanitize_name(name)
    if stem.lower().endswith(suffix.lower()):
        stem = stem[: -len(suffix)]
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while not overwrite and candidate.exists():
        candidate = folder / f"{stem}_{counter}{suffix}"
        counter += 1
    return candidate


def refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise PersonalizeError(f"{path} already exists; choose another --out or pass --overwrite")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file so that readers only ever see a complete file (temp file in the same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def provenance_metadata(method: str, base_name: str, base_hash: str, config) -> dict[str, str]:
    """Keys every artifact carries, whatever its format."""
    return {
        "personalize.method": method,
        "personalize.version": __version__,
        "personalize.base_model": base_name,
        "personalize.base_model_hash": base_hash,
        "personalize.config": repr(config),
    }


def iso_date() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
