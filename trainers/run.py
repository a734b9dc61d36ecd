"""One personalization run, the same for every method and every caller (CLI, node, tests, benchmarks).

``train_or_reuse`` is the entry both faces use: fingerprint every training input once, hand back an earlier artifact
made from exactly those inputs, or else train and export. ``personalize`` is the run itself: images → training pixels,
class images when prior preservation is on, the shared loop, the method's export.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .buckets import prepare_images
from .checkpoints import read_metadata
from .components import Components
from .config import TrainConfig
from .data import as_image_list, as_square_batch
from .device import resolve_device
from .distributed import is_main_process, main_process_first, on_main_process, refuse_state_under_launcher
from .errors import PersonalizeError
from .files import exclusive_output, output_path, sanitize_name
from .loop import Callbacks, TrainResult, move_to, train
from .methods.base import Method
from .optim import check_optimizer
from .preflight import check_base, check_free_space, check_output
from .prior import class_images
from .state import TrainingSession, check_resume, resumable, reuse_view, run_inputs
from .validation import Validator


@dataclass
class Artifact:
    path: Path
    method: str
    metadata: dict[str, str]
    losses: list[float]
    result: TrainResult | None = None  # None when reused
    reused: bool = False
    class_image_dir: Path | None = None
    class_images_generated: int = 0
    resumed_from: int = 0  # the step a resumed run continued after
    report: dict = field(default_factory=dict)  # validation: the table and grid files, and the grid image


@dataclass
class BaseModel:
    """A base model as ``train_or_reuse`` needs it: its fingerprint now, its components only if training runs."""
    fingerprint: str
    load: Callable[[], Components]

    @classmethod
    def loaded(cls, components: Components) -> "BaseModel":
        return cls(components.fingerprint, lambda: components)


@dataclass(frozen=True)
class Output:
    """Where an artifact goes, and what happens when a file of that name exists and was trained from other inputs:
    ``rename`` (write ``stem_1``, ``stem_2``, …), ``refuse`` or ``overwrite``."""
    folder: Path
    stem: str
    suffix: str = ".safetensors"
    on_collision: str = "refuse"

    @classmethod
    def file(cls, path: str | Path, overwrite: bool = False) -> "Output":
        path = Path(path)
        return cls(path.parent, path.stem, path.suffix, "overwrite" if overwrite else "refuse")

    @classmethod
    def named(cls, folder: str | Path, name: str, suffix: str = ".safetensors", on_collision: str = "rename"):
        stem = sanitize_name(name, suffix)
        if stem.lower().endswith(suffix.lower()):
            stem = stem[: -len(suffix)]
        return cls(Path(folder), stem, suffix, on_collision)

    @property
    def path(self) -> Path:
        return self.folder / f"{self.stem}{self.suffix}"

    @property
    def names(self) -> str:
        """A regex of the file names this output may write (``stem[_N]`` when renaming, else exactly ``path``)."""
        counter = r"(_\d+)?" if self.on_collision == "rename" else ""
        return f"{re.escape(self.stem)}{counter}{re.escape(self.suffix)}"

    def find(self, fingerprint: str) -> Path | None:
        """A file this output could have written (see ``names``) whose metadata carries ``fingerprint``."""
        if self.on_collision == "rename":
            pattern = re.compile(rf"^{self.names}$")
            candidates = [p for p in sorted(self.folder.glob(f"*{self.suffix}")) if pattern.match(p.name)] \
                if self.folder.is_dir() else []
        else:
            candidates = [self.path] if self.path.is_file() else []
        for path in candidates:
            try:
                if read_metadata(path).get("personalize.fingerprint") == fingerprint:
                    return path
            except Exception:  # noqa: BLE001 - an unreadable file is simply not a match
                continue
        return None

    def resumable(self, inputs: dict) -> Path | None:
        """A path this output could write whose training state was saved by a run of exactly ``inputs``."""
        if self.on_collision == "rename":
            pattern = re.compile(rf"^{re.escape(self.stem)}(_\d+)?\.state$")
            folders = sorted(p for p in self.folder.glob("*.state") if pattern.match(p.name)) \
                if self.folder.is_dir() else []
            candidates = [self.folder / f"{p.name[:-len('.state')]}{self.suffix}" for p in folders]
        else:
            candidates = [self.path]
        return next((path for path in candidates if resumable(path, inputs)), None)

    def resolve(self) -> Path:
        """The path to write, or a PersonalizeError when a different file of that name must not be replaced."""
        if self.on_collision == "rename":
            return output_path(self.folder, self.stem, self.suffix)
        if self.path.exists() and self.on_collision == "refuse":
            raise PersonalizeError(f"{self.path} already exists and was trained from other inputs; choose another "
                                   "name, or overwrite it (--overwrite, or the node's overwrite toggle)")
        return self.path


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "comfyui-personalize"


def training_fingerprint(method: Method, config: TrainConfig, images, captions: list[str],
                         base_fingerprint: str, masks=None) -> str:
    """A hash of every input that shapes the result: the method, every option, the image contents (and masks), the
    captions and the base model. Equal fingerprints mean a rerun would train the same thing."""
    digest = hashlib.sha256()
    if torch.is_tensor(images):  # a batch: hashed as before lists of images existed (earlier files stay reusable)
        digest.update(f"{method.name}|{reuse_view(config)!r}|{base_fingerprint}|{captions!r}|{tuple(images.shape)}".encode())
        tensors = [images]
    else:
        tensors = as_image_list(images)
        shapes = [tuple(t.shape) for t in tensors]
        digest.update(f"{method.name}|{reuse_view(config)!r}|{base_fingerprint}|{captions!r}|{shapes}".encode())
    for tensor in tensors + list(masks if masks is not None else []):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if masks is not None:
        digest.update(repr([tuple(m.shape) for m in masks]).encode())
    return digest.hexdigest()[:20]


def _captions(images, captions: list[str] | None, masks=None) -> list[str]:
    count = len(as_image_list(images))
    captions = list(captions or [""] * count)
    if len(captions) != count:
        raise PersonalizeError(f"got {count} images but {len(captions)} captions; give one caption per "
                               "image (an empty one is fine)")
    if masks is not None and len(masks) != count:
        raise PersonalizeError(f"got {count} images but {len(masks)} masks; give one mask per image")
    return captions


def train_or_reuse(base: BaseModel, method: Method, images, captions: list[str] | None,
                   config: TrainConfig, output: Output, *, resume: bool = False, **run_options) -> Artifact:
    """The artifact of training ``method`` on ``images``: an earlier one made from exactly these inputs (same
    fingerprint), else a new one (``run_options`` as for ``personalize``). The base is loaded only to train.

    With ``resume``, a training state saved beside the output by a run of the same inputs (``steps`` aside) is
    continued, and that run's artifact replaced; a state of other inputs at the path to write is refused."""
    masks = run_options.get("masks")
    captions = _captions(images, captions, masks)
    fingerprint = training_fingerprint(method, config, images, captions, base.fingerprint, masks)
    check_output(output.path)  # before loading or training: a doomed run fails in seconds
    # Held until the file is written: a second run on the same output is refused, not silently replacing it.
    # Under the launcher the main process holds it for all (they write nothing themselves).
    with exclusive_output(output.path, output.names) if is_main_process() else nullcontext():
        existing = output.find(fingerprint)
        if existing is not None:
            metadata = read_metadata(existing)
            return Artifact(path=existing, method=method.name, metadata=metadata, reused=True,
                            losses=json.loads(metadata.get("personalize.losses", "[]")))
        inputs = run_inputs(method.name, config, images, captions, base.fingerprint, masks)
        # Before loading or training: a refused name or resume fails in seconds.
        path = (resume and output.resumable(inputs)) or output.resolve()
        if resume:
            check_resume(path, inputs, config.steps)
        components = base.load()
        check_base(components)
        check_free_space(path, method.artifact_bytes(components, config))
        return personalize(components, method, images, captions, config, path, fingerprint=fingerprint,
                           resume=resume, inputs=inputs, **run_options)


def personalize(components: Components, method: Method, images, captions: list[str] | None,
                config: TrainConfig, out_path: str | Path, *, fingerprint: str | None = None,
                class_cache_dir: str | Path | None = None, device: torch.device | None = None,
                callbacks: Callbacks | None = None, release_frozen: bool = False, resume: bool = False,
                dino=None, clip=None, inputs: dict | None = None, masks=None) -> Artifact:
    """Train ``method`` on ``images`` (a ComfyUI IMAGE batch [B,H,W,3] in 0..1, or a list of images at their own
    sizes) and write its artifact. ``masks``: one [H,W] mask in 0..1 per image (masked loss), or None.
    ``release_frozen``: the caller discards ``components`` afterwards (see ``loop.train``). ``resume`` continues
    the training state beside ``out_path`` (see ``state``); ``dino`` / ``clip`` (``metrics`` embedders) score
    the validation samples when ``validate_every`` is set."""
    refuse_state_under_launcher(config, resume)
    callbacks = callbacks or Callbacks()
    device = device or resolve_device()
    check_optimizer(config)
    captions = _captions(images, captions, masks)
    out_path = Path(out_path)
    prepared = prepare_images(images, config.resolution, config.bucketing, masks)
    if fingerprint is None:
        fingerprint = training_fingerprint(method, config, images, captions, components.fingerprint, masks)
    inputs = inputs or run_inputs(method.name, config, images, captions, components.fingerprint, masks)
    references = as_square_batch(images, config.resolution)
    session = TrainingSession(out_path, inputs, resume=resume,
                              validator=Validator.for_run(config, method.preview_prompt(config), references, dino,
                                                          clip))
    if resume:
        check_resume(out_path, inputs, config.steps)
    class_pixels, class_dir, generated = None, None, 0
    if config.prior_preservation:
        move_to(components, device)

        def progress(done: int, total: int) -> None:
            if callbacks.on_prepare:
                callbacks.on_prepare(done, total, "generating class images")

        with main_process_first():  # under the launcher the others then find the cache filled
            class_pixels, class_dir, generated = class_images(
                components, config, class_cache_dir or default_cache_dir() / "class_images",
                on_progress=progress, should_stop=callbacks.should_stop)
    result = train(components, method, prepared, captions, config, class_pixels=class_pixels, device=device,
                   callbacks=callbacks, release_frozen=release_frozen, session=session)
    result.buckets = prepared.report()
    result.input_fingerprint = fingerprint
    session.choose(result)
    exported = on_main_process(lambda: method.export(components, config, result, out_path))
    path, metadata = exported or (out_path, read_metadata(out_path))  # the others read what it wrote
    return Artifact(path=path, method=method.name, metadata=metadata, losses=result.losses, result=result,
                    class_image_dir=class_dir, class_images_generated=generated, resumed_from=session.resumed_from,
                    report=session.write_report(path))
