"""Files the pack writes: portable names inside their folder, no silent overwrite, and one way to write anything
atomically (a temporary name in the same folder, renamed when complete), so a reader never sees half a file."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside ``path`` to write; renamed to ``path`` when the block completes, removed
    when it fails. A folder target must not exist yet (a rename cannot replace a non-empty folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            os.rename(tmp, path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts should read like any other file
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
