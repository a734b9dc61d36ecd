"""Files the pack writes: portable names inside their folder, no silent overwrite, one way to write anything
atomically (a temporary name in the same folder, renamed when complete), so a reader never sees half a file, and an
exclusive lock per output, so two runs never write the same file and a killed run's temporary files are cleaned up."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from .errors import PersonalizeError

# Names Windows refuses for a file whatever its extension ("CON.safetensors" too).
WINDOWS_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                              *(f"LPT{i}" for i in range(1, 10))})
# Most file systems allow 255 bytes per name; atomic_path's temporary name adds ".", ".XXXXXXXX.tmp" around it.
MAX_NAME_BYTES = 255 - len("..XXXXXXXX.tmp")
_RENAME_ROOM = len("_9999")  # what output_path may append
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


def name_problem(name: str) -> str | None:
    """Why ``name`` (one path component) is not a portable file name, or None."""
    if not name or name in (".", ".."):
        return "it is empty"
    if _WINDOWS_FORBIDDEN.search(name):
        return 'it contains a character Windows forbids in file names (< > : " / \\ | ? * or a control character)'
    if name[-1] in " .":
        return "it ends with a space or a dot, which Windows drops"
    if name.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        return f"{name.split('.')[0]} is a reserved device name on Windows"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"it is {len(name.encode())} bytes long; file names can have at most {MAX_NAME_BYTES}"
    return None


def sanitize_name(name: str, suffix: str = "") -> str:
    """A file stem safe on every OS: letters, digits, '-', '_', '.' and spaces; no path parts, no Windows device
    name, short enough that ``stem + suffix`` (with a rename counter) fits a file name."""
    stem = re.sub(r"[^\w\-. ]+", "_", Path(str(name).strip()).name).strip(" .")
    if not stem:
        raise PersonalizeError(f"the output name {name!r} is empty once path characters are removed; "
                               "give a plain name such as 'my_dog'")
    if stem.split(".")[0].strip().upper() in WINDOWS_RESERVED:
        stem = "_" + stem
    budget = MAX_NAME_BYTES - len(suffix.encode()) - _RENAME_ROOM
    return stem.encode()[:budget].decode(errors="ignore").rstrip(" .")


def output_path(folder: str | Path, name: str, suffix: str, overwrite: bool = False) -> Path:
    """``folder/name.suffix``; with ``overwrite`` off, ``name_1.suffix``, ``name_2.suffix``, … if taken."""
    folder = Path(folder)
    stem = sanitize_name(name, suffix)
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as error:
        raise _write_error(path, error) from None
    try:
        yield tmp
        if directory:
            os.rename(tmp, path)
        else:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts should read like any other file
            os.replace(tmp, path)
    except (OSError, SafetensorError) as error:  # disk full, a read-only or vanished folder: say so, keep nothing
        raise _write_error(path, error) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _write_error(path: Path, error: Exception) -> PersonalizeError:
    return PersonalizeError(f"could not write {path}: {getattr(error, 'strerror', None) or error}; nothing was "
                            "written. Free some space or choose another location")


def temporary_name_pattern(names: str) -> re.Pattern:
    """The temporary files ``atomic_path`` makes for targets whose names match the regex ``names``."""
    return re.compile(rf"^\.(?:{names})\.[A-Za-z0-9_]{{8}}\.tmp$")


@contextmanager
def exclusive_output(path: str | Path, names: str | None = None) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path`` for the block; a PersonalizeError if another run holds it.

    While the lock is held no other run of the pack writes this output, so temporary files of it (names matching the
    regex ``names``, default ``path``'s own name) that are older than the lock were left by a killed run: they are
    removed here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            holder = _read_text(lock)
            raise PersonalizeError(f"{path} is being written by another run{f' (process {holder})' if holder else ''};"
                                   " wait for it to finish, or give this run another output name")
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # else the holder removed the file between our open and our lock: take the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        locked_at = time.time()
        stale = temporary_name_pattern(names or re.escape(path.name))
        for entry in path.parent.iterdir():
            if stale.match(entry.name) and entry.is_file() and entry.stat().st_mtime < locked_at:
                entry.unlink(missing_ok=True)
        yield
    finally:
        try:
            lock.unlink()  # before unlocking: a run waiting on this file then retries on a fresh one
        except OSError:
            pass  # Windows cannot remove an open file; the next run reuses it
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
