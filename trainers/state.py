"""Checkpoints, the training state and resume: a run stopped at any step boundary continues exactly where it was
(bit for bit on CPU), and writes loadable artifacts on the way.

Beside the output ``<folder>/<stem>.safetensors``:

* checkpoints ``<stem>-step<N>.safetensors`` every ``save_every`` steps, written by the method like the result
  (same format and metadata, ``ss_steps`` = N); ``keep_last`` deletes this run's older ones.
* the training state ``<stem>.state/step-<N>/``, saved every ``save_every`` steps, at the end of a run that saves
  checkpoints, and on Cancel / Ctrl-C / SIGTERM: the trained weights, the state of every optimizer (DreamBooth's
  fused backward has one per weight), of the lr schedule and of a loss scaler, the step, the data generator's and
  torch's RNG states (the data order, views, prompts, noise and timesteps are all drawn from that generator, so
  its state is the data order too), the loss history, the validation table, and the run's inputs with their
  fingerprint. Each save is a new folder written under a temporary name and renamed once complete; older saves
  are deleted after that, so a kill at any moment leaves the last complete one.

A resume refuses a state made from other inputs (anything but ``steps`` and the options that only checkpoint,
validate or preview), naming what differs. Files inside the state folder have suffixes ComfyUI's model lists do
not show (they list every ``.safetensors`` under a model folder, subfolders included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .data import as_image_list
from .errors import PersonalizeError
from .export import iso_date, save_safetensors
from .files import atomic_path
from .loop import LiveRun, StepHooks, TrainResult
from .validation import choose_step, step_score, validation_grid

# Options that change neither what a step computes nor the data order: a resume may change them. (select_best is
# not one: the weights kept of the best step so far were chosen by it.)
NOT_TRAINING_INPUTS = frozenset({"steps", "save_every", "keep_last", "preview_every", "validate_every",
                                 "validation_prompts", "validation_images", "validation_sampler_steps"})
# Options that only write files beside the result: a rerun that changes them reuses the result.
SIDE_FILES_ONLY = {"save_every": 0, "keep_last": 0}

STATE_FORMAT = 1
_SAVE = re.compile(r"^step-(\d+)$")
WEIGHTS_FILE, TORCH_FILE, INFO_FILE, BEST_FILE = "trainable.tensors", "state.torch", "state.json", "best.tensors"


def reuse_view(config: TrainConfig) -> TrainConfig:
    """The config as the reuse fingerprint sees it: without the options that only write side files."""
    return dataclasses.replace(config, **{k: v for k, v in SIDE_FILES_ONLY.items() if hasattr(config, k)})


def state_folder(out_path: Path) -> Path:
    return out_path.with_name(f"{out_path.stem}.state")


def checkpoint_path(out_path: Path, step: int) -> Path:
    return out_path.with_name(f"{out_path.stem}-step{step}{out_path.suffix}")


def run_inputs(method_name: str, config: TrainConfig, images, captions: list[str], base_fingerprint: str,
               masks=None) -> dict:
    """Everything a step depends on, as plain JSON: stored with each save and compared field by field. ``images``:
    a batch, or a list of images at their own sizes; ``masks``: the masked loss's, or None."""
    tensors = [images] if torch.is_tensor(images) else as_image_list(images)
    shapes = tuple(images.shape) if torch.is_tensor(images) else [tuple(t.shape) for t in tensors]
    digest = hashlib.sha256(f"{shapes}".encode())
    for tensor in tensors + list(masks if masks is not None else []):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"method": method_name,
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_TRAINING_INPUTS},
            "base model": base_fingerprint, "subject images": digest.hexdigest()[:20], "captions": list(captions)}


def inputs_fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between two ``run_inputs``, for a person: option by option, else the input by name."""
    found = []
    for key in now:
        if key == "config":
            before, after = saved.get("config", {}), now["config"]
            found += [f"{name} was {before.get(name)!r}, now {after.get(name)!r}"
                      for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
        elif saved.get(key) != now[key]:
            found.append(f"the {key} differ" if key.endswith("s") else f"the {key} differs")
    return found


def latest_save(folder: Path) -> Path | None:
    """The newest complete save (a ``step-N`` folder exists only once complete)."""
    saves = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := _SAVE.match(p.name)) and p.is_dir()] \
        if folder.is_dir() else []
    return max(saves)[1] if saves else None


def read_info(save: Path) -> dict:
    try:
        return json.loads((save / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PersonalizeError(f"the training state {save} is unreadable ({error}); delete that folder to start "
                               "over") from error


def resumable(out_path: Path, inputs: dict) -> bool:
    """Whether the state beside ``out_path`` was saved by a run of exactly ``inputs``."""
    save = latest_save(state_folder(out_path))
    return save is not None and read_info(save).get("fingerprint") == inputs_fingerprint(inputs)


def check_resume(out_path: Path, inputs: dict, steps: int) -> int:
    """The step a resume of ``inputs`` into ``out_path`` continues after (0: no saved state); a PersonalizeError
    when the saved state belongs to other inputs or is past ``steps``. Cheap: call it before loading a model."""
    save = latest_save(state_folder(out_path))
    if save is None:
        return 0
    info = read_info(save)
    if info.get("format") != STATE_FORMAT:
        raise PersonalizeError(f"the training state {save} was written by another version of the pack; delete it, "
                               "or turn resume off to start over")
    if info.get("fingerprint") != inputs_fingerprint(inputs):
        what = "; ".join(differences(info.get("inputs", {}), inputs)) or "the inputs differ"
        raise PersonalizeError(f"cannot resume from {save}: it was trained from other inputs ({what}). Give the "
                               "same inputs again, or turn resume off (no --resume; the node's resume toggle) to "
                               "start over")
    if info["step"] > steps:
        raise PersonalizeError(f"the training state {save} is at step {info['step']}, past steps={steps}; set steps "
                               f"to at least {info['step']}, or turn resume off to start over")
    return int(info["step"])


def check_disk(folder: Path, needed: int, what: str) -> None:
    """A clear error instead of a full disk halfway through a file."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise PersonalizeError(f"not enough free disk space in {existing} for {what}: it needs about "
                               f"{needed / 2**30:.2f} GB, {free / 2**30:.2f} GB are free. Free some space, or write "
                               "fewer files: a larger save_every, a smaller keep_last, or save_every 0")


def _rng_states(generator: torch.Generator) -> dict:
    states = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    return [optimizer, *getattr(optimizer, "per_weight_optimizers", [])]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TrainingSession(StepHooks):
    """Checkpoints, the training state and validation of one run (the loop's ``StepHooks``)."""

    def __init__(self, out_path: Path, inputs: dict, *, resume: bool = False, validator=None):
        self.out = Path(out_path)
        self.folder = state_folder(self.out)
        self.inputs = inputs
        self.fingerprint = inputs_fingerprint(inputs)
        self.resume = resume
        self.validator = validator
        self.samples = validator is not None
        self.live: LiveRun | None = None
        self.done = 0  # steps completed (after a resume, counted from the start of the run)
        self.resumed_from = 0
        self.records: list[dict] = []  # the validation table
        self.best: dict | None = None  # {"step", "score"} of the best validated step so far
        self.checkpoints: list[str] = []  # this run's checkpoint files, oldest first
        self.validation_seconds = 0.0
        self._rng_at_step_start: dict | None = None
        self._updating = False

    # ---------------------------------------------------------------------------------------------- the loop's hooks

    def attach(self, live: LiveRun) -> int:
        self.live = live
        config = live.config
        if config.save_every:  # one checkpoint and one state must fit before the first step
            check_disk(self.folder, self._checkpoint_bytes() + self._state_bytes(), "a checkpoint and the state")
        if self.resume and check_resume(self.out, self.inputs, config.steps):
            self._restore(latest_save(self.folder))
            self._catch_up()
        return self.done

    def step_started(self) -> None:
        self._rng_at_step_start = _rng_states(self.live.generator)
        self._updating = False

    def updating(self) -> None:
        self._updating = True

    def step_finished(self, step: int) -> None:
        self.done, self._rng_at_step_start, self._updating = step, None, False
        config = self.live.config
        if self.validator is not None and config.validate_every and step % config.validate_every == 0:
            self._validate(step)
        if config.save_every and step % config.save_every == 0:
            self._checkpoint(step)
            self._save(step)

    def finished(self) -> None:
        config = self.live.config
        if self.validator is not None and config.validate_every and self.done and \
                not any(r["step"] == self.done for r in self.records):
            self._validate(self.done)  # the last step is always scored: "last" is a candidate like any other
        if config.save_every and self.done:
            self._save(self.done)  # kept beside the result, so that the run can be continued to more steps

    def interrupted(self) -> None:
        if self.live is None or self.done == 0:
            return
        if self._updating:
            warnings.warn(f"stopped while the weights were being updated (step {self.done + 1}): no new training "
                          "state was saved; a resume continues from the last saved one", stacklevel=2)
            return
        try:
            self._save(self.done, rng=self._rng_at_step_start)
        except PersonalizeError as error:  # a full disk must not hide the cancel
            warnings.warn(f"the training state was not saved: {error}", stacklevel=2)

    # ---------------------------------------------------------------------------------------------- after the loop

    def choose(self, result: TrainResult) -> None:
        """Load the weights of the step ``select_best`` picks, and record the table and the choice in ``result``."""
        result.validation_seconds = self.validation_seconds
        if not self.records:
            return
        best, reason = choose_step(self.records, self.validator.criterion, self.validator.note)
        if best != self.done:
            path = self.folder / BEST_FILE
            with safe_open(str(path), "pt") as f:
                saved_step = int((f.metadata() or {}).get("step", -1))
            if saved_step != best:
                raise PersonalizeError(f"{path} holds the weights of step {saved_step}, not of the chosen step "
                                       f"{best}; train again with resume off")
            self._load_trainable(load_file(path))
        result.validation = [dict(r) for r in self.records]
        result.best_step, result.selection, result.steps = best, reason, best

    def write_report(self, artifact_path: Path) -> dict:
        """``<stem>.validation.json`` (the table and the choice) and ``<stem>.validation.png`` (the samples, one row
        per validated step) beside the artifact; returns their paths and the grid."""
        if not self.records:
            return {}
        best, reason = choose_step(self.records, self.validator.criterion, self.validator.note)
        table = {"best_step": best, "selection": reason, "select_best": self.validator.criterion,
                 "prompts": self.validator.prompts, "validation": self.records}
        json_path = artifact_path.with_name(f"{artifact_path.stem}.validation.json")
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
        rows = [(r["step"], Image.open(self.folder / "validation" / f"step-{r['step']:06d}.png")) for r in
                self.records]
        grid = validation_grid(rows, best)
        grid_path = artifact_path.with_name(f"{artifact_path.stem}.validation.png")
        with atomic_path(grid_path) as tmp:
            grid.save(tmp, format="PNG")
        return {"table": json_path, "grid_path": grid_path, "grid": grid}

    # ---------------------------------------------------------------------------------------------- internals

    def _validate(self, step: int) -> None:
        live = self.live
        record, row = self.validator.run(live.components, step, live.amp_dtype, live.callbacks)
        self.validation_seconds += record["seconds"]
        rows = self.folder / "validation"
        rows.mkdir(parents=True, exist_ok=True)
        with atomic_path(rows / f"step-{step:06d}.png") as tmp:
            row.save(tmp, format="PNG")
        self.records.append(record)
        score = step_score(record, self.validator.criterion)
        if self.validator.criterion != "last" and (self.best is None or score > self.best["score"]):
            self.best = {"step": step, "score": score}
            # The weights of the best step so far, in case a later step is worse: the result is then made from
            # these (and the state holds them, so a resume still can).
            check_disk(self.folder, self._trainable_bytes(), "the weights of the best step")
            save_safetensors(self._trainable_tensors(), self.folder / BEST_FILE, {"step": str(step)})
        if live.callbacks.on_validation:
            live.callbacks.on_validation(dict(record, best_step=self.best and self.best["step"]), row)

    def _checkpoint(self, step: int) -> None:
        live = self.live
        path = checkpoint_path(self.out, step)
        check_disk(path.parent, self._checkpoint_bytes(), f"the checkpoint {path.name}")
        history = live.history
        result = TrainResult(losses=list(history["losses"]), lrs=list(history["lrs"]), steps=step,
                             seconds_per_step=0.0, startup_seconds=0.0,
                             instance_losses=list(history["instance_losses"]),
                             prior_losses=list(history["prior_losses"]))
        live.method.checkpoint(live.components, live.config, result, path)
        if path.name not in self.checkpoints:
            self.checkpoints.append(path.name)
        keep = live.config.keep_last
        if keep:
            for name in self.checkpoints[:-keep]:
                (self.out.parent / name).unlink(missing_ok=True)
            self.checkpoints = self.checkpoints[-keep:]

    def _save(self, step: int, rng: dict | None = None) -> None:
        live = self.live
        target = self.folder / f"step-{step:06d}"
        if target.exists():
            return  # saved at this step already (e.g. every save_every steps, then again at the end)
        check_disk(self.folder, self._state_bytes(), "the training state")
        info = {"format": STATE_FORMAT, "step": step, "fingerprint": self.fingerprint, "inputs": self.inputs,
                "history": live.history, "validation": self.records, "best": self.best,
                "checkpoints": self.checkpoints, "saved_at": iso_date()}
        with atomic_path(target, directory=True) as tmp:
            save_file(self._trainable_tensors(), tmp / WEIGHTS_FILE)
            torch.save({"optimizers": [o.state_dict() for o in _optimizers(live.optimizer)],
                        "lr_schedule": live.lr_schedule.state_dict(),
                        "scaler": live.scaler.state_dict() if live.scaler else None,
                        "rng": rng or _rng_states(live.generator)}, tmp / TORCH_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
        for leftover in self.folder.glob(".step-*.removing"):  # a killed run's, see below
            shutil.rmtree(leftover, ignore_errors=True)
        for old in self.folder.glob("step-*"):  # only once the new save is complete
            if old != target and _SAVE.match(old.name):
                # Hidden first: a kill half-way through removing it must not leave a visible, incomplete save.
                doomed = old.with_name(f".{old.name}.removing")
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)

    def _restore(self, save: Path) -> None:
        live = self.live
        info = read_info(save)
        self._load_trainable(load_file(save / WEIGHTS_FILE))
        saved = torch.load(save / TORCH_FILE, map_location="cpu", weights_only=True)
        optimizers = _optimizers(live.optimizer)
        if len(saved["optimizers"]) != len(optimizers):
            raise PersonalizeError(f"the training state {save} holds {len(saved['optimizers'])} optimizer states, "
                                   f"this run has {len(optimizers)} (fused_backward changed?); resume off starts over")
        for optimizer, state in zip(optimizers, saved["optimizers"]):
            optimizer.load_state_dict(state)
        live.lr_schedule.load_state_dict(saved["lr_schedule"])
        if live.scaler is not None and saved["scaler"] is not None:
            live.scaler.load_state_dict(saved["scaler"])
        rng = saved["rng"]
        live.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        for key, values in info["history"].items():
            live.history[key].extend(values)
        self.records, self.best, self.checkpoints = info["validation"], info["best"], info["checkpoints"]
        self.done = self.resumed_from = int(info["step"])
        live.method.resumed(live.components, self.done, live.config)

    def _catch_up(self) -> None:
        """What a cancel during the last step's validation or checkpoint left undone."""
        config, step = self.live.config, self.done
        if self.validator is not None and config.validate_every and step % config.validate_every == 0 and \
                not any(r["step"] == step for r in self.records):
            self._validate(step)
        if config.save_every and step % config.save_every == 0 and \
                not checkpoint_path(self.out, step).is_file():
            self._checkpoint(step)

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        return {str(i): p.detach().cpu().contiguous() for i, p in enumerate(self.live.trainable)}

    def _load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        trainable = self.live.trainable
        shapes = [tuple(p.shape) for p in trainable]
        if [tuple(tensors[str(i)].shape) if str(i) in tensors else None for i in range(len(trainable))] != shapes \
                or len(tensors) != len(trainable):
            raise PersonalizeError(f"the saved weights in {self.folder} do not fit this run's trainable weights; "
                                   "turn resume off to start over")
        with torch.no_grad():
            for i, parameter in enumerate(trainable):
                parameter.copy_(tensors[str(i)])

    def _trainable_bytes(self) -> int:
        return _tensor_bytes(self.live.trainable)

    def _state_bytes(self) -> int:
        # Adam keeps two moments per weight; before the first step they do not exist yet.
        moments = sum(_tensor_bytes(v for v in s.values() if torch.is_tensor(v))
                      for o in _optimizers(self.live.optimizer) for s in o.state.values())
        return self._trainable_bytes() + max(moments, 2 * self._trainable_bytes())

    def _checkpoint_bytes(self) -> int:
        written = [self.out.parent / name for name in self.checkpoints]
        sizes = [p.stat().st_size for p in written if p.is_file()]
        return sizes[-1] if sizes else self._trainable_bytes()
