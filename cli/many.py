"""``train-many MANIFEST --base MODEL --out DIR``: one artifact per subject of a manifest, trained one after another.

A manifest is a JSON list of objects or a CSV file with a header, one row per subject: ``name`` (the artifact's file
name in DIR), ``method`` (lora, embedding or dreambooth), ``images`` (the photo folder; relative paths are relative
to the manifest), optionally ``base`` (a row's own base model), and any option of that method under its config name
(``prompt``, ``token``, ``init_word``, ``class_prompt``, ``steps``, ...; an empty CSV cell keeps the default).

Shared work is done once: the base model's fingerprint is computed once per base (see ``BaseCache``), and class
images are cached per class prompt and base (``--class-cache``). Each row goes through ``train_or_reuse``, so a row
whose file was already trained from the same inputs is reused. A row that fails (a ``PersonalizeError``: a missing
folder, an option out of range) is reported and the others still run; the command then exits non-zero. Under
accelerate launch all processes train each row together, one row after another (the simplest correct split: every
row gets all devices). The summary (time, file, final loss) is printed and written to DIR/summary.json and
DIR/summary.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..trainers.components import Components
from ..trainers.data import load_subject_folder
from ..trainers.device import free_memory, resolve_device
from ..trainers.distributed import is_main_process, launcher_config, on_main_process
from ..trainers.errors import PersonalizeError
from ..trainers.files import atomic_path, sanitize_name
from ..trainers.loop import Callbacks
from ..trainers.methods.dreambooth import DreamBoothConfig, DreamBoothMethod, check_device
from ..trainers.methods.embedding import EmbeddingConfig, EmbeddingMethod
from ..trainers.methods.lora import LoRAConfig, LoRAMethod
from ..trainers.models import load_base
from ..trainers.options import default_of, options_of, validate
from ..trainers.run import BaseModel, Output, default_cache_dir, train_or_reuse
from .command import Command
from .train import final_loss, terminal_callbacks

METHODS = {"lora": (LoRAConfig, LoRAMethod), "embedding": (EmbeddingConfig, EmbeddingMethod),
           "dreambooth": (DreamBoothConfig, DreamBoothMethod)}
ROW_KEYS = ("name", "method", "images", "base")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON list or a CSV file; CSV cells left empty are dropped (the option keeps its default)."""
    if not path.is_file():
        raise PersonalizeError(f"manifest {path} does not exist; give a .json list of rows or a .csv file")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise PersonalizeError(f"manifest {path} is not valid JSON ({error})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PersonalizeError(f"manifest {path} must hold a JSON list of objects, one per subject")
    elif path.suffix.lower() == ".csv":
        rows = [{k.strip(): v.strip() for k, v in row.items() if k and v is not None and v.strip()}
                for row in csv.DictReader(text.splitlines())]
    else:
        raise PersonalizeError(f"manifest {path.name}: expected a .json or .csv file")
    if not rows:
        raise PersonalizeError(f"manifest {path} has no rows")
    return rows


def _value(config_type, name: str, value: Any) -> Any:
    """A manifest value (a CSV string, or a JSON number/string/bool) as the option's type."""
    kind = type(default_of(next(f for f, _ in options_of(config_type) if f.name == name)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE + FALSE:
            return value.lower() in TRUE
    elif kind is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool) and not (kind is int and isinstance(value, float)):
        try:
            return kind(value)  # "800" → 800, 1 → 1.0 for a float option
        except (TypeError, ValueError):
            pass
    raise PersonalizeError(f"{name} must be of type {kind.__name__}; got {value!r}")


@dataclass
class Row:
    name: str
    method: str
    images: Path
    base: Path
    config: Any


def parse_row(row: dict[str, Any], folder: Path, default_base: str) -> Row:
    """Check one row before anything is loaded for it: its keys, method, option values and limits."""
    name = str(row.get("name", "")).strip()
    if not name:
        raise PersonalizeError("the row has no name; give each row a name (its artifact's file name)")
    method = str(row.get("method", "")).strip()
    if method not in METHODS:
        raise PersonalizeError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not str(row.get("images", "")).strip():
        raise PersonalizeError("the row has no images; give the folder of the subject's photos")
    config_type, _ = METHODS[method]
    options = {f.name for f, spec in options_of(config_type) if spec.cli}
    unknown = sorted(set(row) - options - set(ROW_KEYS))
    if unknown:
        raise PersonalizeError(f"{', '.join(unknown)}: not an option of {method} (its options: "
                               f"{', '.join(sorted(options))})")
    config = config_type(**{k: _value(config_type, k, v) for k, v in row.items() if k in options})
    validate(config)
    base = folder / Path(str(row["base"])).expanduser() if row.get("base") else Path(default_base).expanduser()
    return Row(name, method, folder / Path(str(row["images"])).expanduser(), base, launcher_config(config))


class BaseCache:
    """The base model of the current rows. Training changes the model it is given, so each row that trains needs a
    fresh one: the one loaded to read the fingerprint (which every row's reuse check needs) goes to the first such
    row, and later rows load it again. Measured for SD1.5 in fp32 on a busy 2-core CPU: a deep copy of a kept
    pristine model takes 8-14 s and holds two models (8.7 GB resident), loading again 13.5-14.6 s and holds one
    (5.0 GB); about the same time for half the memory. One base at a time: a row with another base drops the
    previous one first."""

    def __init__(self, tokenizer: str | None):
        self.tokenizer = tokenizer
        self.path: Path | None = None
        self.fingerprint = ""
        self.loaded: Components | None = None

    def get(self, path: Path) -> BaseModel:
        if self.path != path.resolve():
            self.loaded = None  # before the next one loads
            free_memory()
            self.loaded = load_base(path, tokenizer_dir=self.tokenizer)
            self.path, self.fingerprint = path.resolve(), self.loaded.fingerprint
        return BaseModel(self.fingerprint, self._take)

    def _take(self) -> Components:
        components, self.loaded = self.loaded, None
        return components if components is not None else load_base(self.path, tokenizer_dir=self.tokenizer)


def train_row(row: Row, bases: BaseCache, args: argparse.Namespace, device, seen: set[str]) -> dict:
    stem = sanitize_name(row.name)
    if stem in seen:
        raise PersonalizeError(f"name {row.name!r} is used by an earlier row; give each row its own name")
    seen.add(stem)
    if row.method == "dreambooth":
        check_device(row.config, device)
    subject = load_subject_folder(row.images, resolution=row.config.resolution)
    _, method_type = METHODS[row.method]
    artifact = train_or_reuse(bases.get(row.base), method_type(row.config), subject.images, subject.captions,
                              row.config, Output.file(Path(args.out) / f"{stem}.safetensors", overwrite=args.overwrite),
                              class_cache_dir=args.class_cache, device=device, release_frozen=True,
                              callbacks=terminal_callbacks() if is_main_process() else Callbacks())
    return {"status": "reused" if artifact.reused else "trained", "file": str(artifact.path),
            "final_loss": final_loss(artifact.losses), "steps": len(artifact.losses),
            "class_images_generated": artifact.class_images_generated}


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| name | method | status | seconds | final loss | file |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        loss = "" if r.get("final_loss") is None else f"{r['final_loss']:.4f}"
        where = r.get("file") or f"error: {r['error']}"
        lines.append(f"| {r['name']} | {r['method']} | {r['status']} | {r['seconds']:.1f} | {loss} | {where} |")
    return "\n".join(lines) + "\n"


def _write_summary(out: Path, summary: list[dict]) -> None:
    table = summary_markdown(summary)
    for name, text in (("summary.json", json.dumps(summary, indent=2)), ("summary.md", table)):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    print(table, end="")


def run_many(args: argparse.Namespace, _config) -> dict:
    manifest = Path(args.manifest).expanduser()
    rows = read_manifest(manifest)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    bases, seen, summary = BaseCache(args.tokenizer), set(), []
    for number, raw in enumerate(rows, 1):
        started = time.perf_counter()
        entry = {"row": number, "name": str(raw.get("name", "")), "method": str(raw.get("method", ""))}
        try:
            entry.update(train_row(parse_row(raw, manifest.parent, args.base), bases, args, device, seen))
        except PersonalizeError as error:
            entry.update(status="failed", error=str(error))
        entry["seconds"] = round(time.perf_counter() - started, 2)
        summary.append(entry)
        free_memory()
    failed = [r for r in summary if r["status"] == "failed"]
    # The others wait for it: one that exited first would have the launcher stop the main process mid-write.
    on_main_process(lambda: _write_summary(out, summary))
    if failed:
        raise PersonalizeError(f"{len(failed)} of {len(summary)} rows failed (row "
                               f"{', '.join(str(r['row']) for r in failed)}); the others were written. See "
                               f"{out / 'summary.md'}")
    return {"rows": len(summary), "trained": sum(r["status"] == "trained" for r in summary),
            "reused": sum(r["status"] == "reused" for r in summary), "summary": str(out / "summary.json")}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", metavar="MANIFEST", help="JSON list or CSV file, one row per subject: name, "
                        "method, images, optional base, and any option of the method under its config name")
    parser.add_argument("--base", required=True, help="base model of rows without their own 'base': a diffusers "
                        "folder or a single-file checkpoint")
    parser.add_argument("--out", required=True, help="folder for the artifacts (<name>.safetensors) and the summary")
    parser.add_argument("--overwrite", action="store_true", help="replace a row's file if it was trained from other "
                        "inputs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    parser.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder for single-file bases; default: a "
                        "'tokenizer' folder beside each")
    parser.add_argument("--class-cache", default=None, help="folder for generated class images, shared by all rows "
                        f"(default: {default_cache_dir() / 'class_images'})")


TRAIN_MANY = Command(name="train-many", help="train one artifact per subject of a manifest (JSON or CSV), reusing the "
                     "loaded base and the class images; a failed row is reported and the others still run",
                     add_arguments=_arguments, run=run_many)
