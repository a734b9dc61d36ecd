"""Data-parallel training when the engine runs under ``accelerate launch`` (or ``torchrun``): one process per device,
each with a full copy of the model, gradients averaged across processes after every backward pass.

Outside a launcher every hook here is the identity and nothing is initialised: a plain run trains exactly as
before, bit for bit. Under one, accelerate's ``PartialState`` sets up the process group (NCCL on CUDA, gloo on
CPU), names this process's device and provides the barriers; the trainable modules are wrapped in torch's
``DistributedDataParallel``. Not ``Accelerator.prepare``: it wraps the forward pass in its own autocast and keeps a
reference to every model it prepared for the accelerator's lifetime, while the loop keeps its own precision and
gradient accumulation (so that one and several processes compute the same thing) and rewraps when the trainable
set changes mid-run.

Each step every process draws the *global* batch (``batch_size`` × processes) from the same seeded generator and
keeps its own rows, so N processes × batch b see the same images, noise and timesteps as one process × batch N·b.
The loss is a per-sample mean on each process, and DDP averages gradients over processes, so the two give the same
gradient (prior preservation included: instance and class terms are each means over their rows).
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Callable, TypeVar

import torch
from torch import nn

from .errors import PersonalizeError

T = TypeVar("T")


def process_count() -> int:
    """How many processes the launcher started (1 without one); reads the environment, initialises nothing."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def _state(cpu: bool = False):
    """accelerate's process state; the first call joins the process group (``cpu``: gloo, even beside a GPU)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def process_device(device: torch.device) -> torch.device:
    """Under the launcher, this process's own GPU (``cuda:<local rank>``) for a CUDA ``device``; else ``device``."""
    if process_count() == 1:
        return device
    state = _state(cpu=device.type == "cpu")
    return torch.device("cpu") if state.device.type == "cpu" else state.device


def is_main_process() -> bool:
    return process_count() == 1 or _state().is_main_process


def main_process_first():
    """A context in which the main process runs first and the others wait for it (then find its cache filled)."""
    return nullcontext() if process_count() == 1 else _state().main_process_first()


def on_main_process(write: Callable[[], T]) -> T | None:
    """``write()`` on the main process only, the others waiting until it is done; None on the others."""
    if process_count() == 1:
        return write()
    state = _state()
    written = write() if state.is_main_process else None
    state.wait_for_everyone()
    return written


def launcher_config(config):
    """``config`` with what cannot work under several processes turned off: DreamBooth's fused backward updates a
    weight as soon as its local gradient is complete, before DDP has averaged it with the other processes'."""
    import dataclasses

    if process_count() > 1 and getattr(config, "fused_backward", False):
        return dataclasses.replace(config, fused_backward=False)
    return config


def refuse_state_under_launcher(config, resume: bool) -> None:
    """Checkpoints, the training state and validation (``state.TrainingSession``) are not made process-aware yet:
    under the launcher every process would write them."""
    if process_count() > 1 and (resume or config.save_every or config.validate_every):
        raise PersonalizeError("checkpoints, resume and validation (save_every, --resume, validate_every) are not "
                               "supported under accelerate launch yet; set them to 0/off, or train in one process")


class _Trained(nn.Module):
    """The trained modules under one module, so that one DDP wrapper covers all their parameters (a Textual
    Inversion's new token vectors inside the text encoder included); its forward is the loop's prediction."""

    def __init__(self, modules: list[nn.Module], predict: Callable):
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.predict = predict

    def forward(self, *args):
        return self.predict(*args)


class DataParallel:
    """The loop's hooks for one run. With one process each is the identity."""

    def __init__(self, device: torch.device):
        self.processes = process_count()
        self.rank = 0
        self.device = device
        self._wrapped: nn.parallel.DistributedDataParallel | None = None
        self._modules: list[nn.Module] = []
        self._predict: Callable | None = None
        self._trained: list[nn.Parameter] = []
        if self.processes > 1:
            self.rank = _state(cpu=device.type == "cpu").process_index

    @property
    def enabled(self) -> bool:
        return self.processes > 1

    def global_batch(self, batch_size: int) -> int:
        """Rows drawn per micro-batch: every process's batch, so that all processes draw the same numbers."""
        return batch_size * self.processes

    def local_rows(self, parts: int, *batches):
        """This process's rows of each global batch, which holds ``parts`` equal parts (instance rows, then class
        rows): its share of every part, in the same order. ``batches`` are tensors or lists."""
        if not self.enabled:
            return batches
        count = len(batches[0]) // parts
        share = count // self.processes
        rows = [part * count + self.rank * share + i for part in range(parts) for i in range(share)]
        index = torch.tensor(rows)
        return tuple(b[index.to(b.device)] if torch.is_tensor(b) else [b[r] for r in rows] for b in batches)

    def wrap(self, predict: Callable, modules: list[nn.Module]) -> Callable:
        """``predict`` itself with one process; else ``predict`` through DDP over the modules that train."""
        if not self.enabled:
            return predict
        self._modules, self._predict = modules, predict
        self._rewrap()
        return lambda *args: self._wrapped(*args)

    def _rewrap(self) -> None:
        trained = [m for m in self._modules if any(p.requires_grad for p in m.parameters())]
        self._trained = [p for m in trained for p in m.parameters() if p.requires_grad]
        # The old wrapper's gradient buckets and backward hooks go before the new wrapper's are made.
        self._wrapped = None
        gc.collect()
        device_ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        self._wrapped = nn.parallel.DistributedDataParallel(_Trained(trained, self._predict), device_ids=device_ids)

    def sync_gradients(self, last_micro_batch: bool) -> None:
        """Average gradients only in the backward pass of an optimizer step's last micro-batch (what DDP's
        ``no_sync`` does): the earlier ones accumulate locally."""
        if self._wrapped is not None:
            self._wrapped.require_backward_grad_sync = last_micro_batch

    def after_step(self) -> None:
        """A method may stop training some parameters mid-run (DreamBooth's text_encoder_steps); DDP would wait for
        their gradients forever, so wrap again around what still trains."""
        if self._wrapped is not None:
            still = [p for p in self._trained if p.requires_grad]
            if len(still) != len(self._trained):
                self._rewrap()

    def refuse_fused_backward(self, attached: list) -> None:
        if self.enabled and attached:
            raise PersonalizeError("fused_backward updates each weight before DDP has averaged its gradient across "
                                   "processes: turn fused_backward off to train under accelerate launch")

    def average(self, *values: torch.Tensor | float) -> tuple:
        """The mean of each value over processes (the global batch's loss), so that every process logs and checks
        the same number."""
        if not self.enabled:
            return values
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                               for v in values])
        torch.distributed.all_reduce(stacked)
        return tuple(stacked / self.processes)
