"""The GPU check: speed, peak VRAM and correctness of every trainer on CUDA, in one command (8-minute budget).

    python bench/gpu_check.py                          # from the repo root, on a GPU: writes bench/results/gpu.*
    python bench/gpu_check.py --budget-seconds 420 --out /tmp/gpu
    python bench/gpu_check.py --dry-run --out /tmp/dry # CPU, tiny model, every row a CPU can run (the test suite)
    DIFFUSERS_EXAMPLES_DIR=/path/to/diffusers/examples python bench/gpu_check.py    # + diffusers' scripts, ratios

Needs: a Python whose torch is built for CUDA (the CPU wheel that ``make test`` installs cannot run it) and the
pack's requirements (diffusers, transformers, peft, accelerate, safetensors, Pillow, numpy). Nothing is installed
or downloaded at run time, and the pack need not be installed: the children import this checkout as
``comfyui_personalize`` and drive it only through its command line. bitsandbytes is optional: without it the 8-bit
AdamW row is skipped with the import error as the reason. diffusers' example scripts (optional) also need
torchvision; ``DIFFUSERS_EXAMPLES_PYTHON`` names another Python for them. The models are random-weight models with
the real architectures, built on the machine itself by ``make-tiny-model --size full`` and given an fp32 copy as
``bench.speed`` does (SD1.5: 1-2 minutes and 8.5 GB under ``--work``; reused when already there).

What runs, each in its own process with a time limit (``bench/_child.py``, as for ``bench.speed``), at batch 1, bf16
mixed precision, 20 optimizer steps, LoRA rank 4:

- SD1.5 LoRA at 512 px with gradient checkpointing off and on: it/s, peak VRAM, achieved UNet TFLOP/s and the share
  of the card's peak (model FLOPs, counted on the meta device: recomputation under checkpointing is not counted);
- SD1.5 Textual Inversion; SD1.5 DreamBooth (gradient checkpointing on, prior preservation off) with AdamW, with
  8-bit AdamW and with bf16 weights: it/s, peak VRAM;
- SDXL LoRA at 1024 px, once ``make-tiny-model --arch`` offers sdxl (until then the row says it is not available);
- with ``DIFFUSERS_EXAMPLES_DIR``: diffusers' ``train_dreambooth_lora.py``, ``textual_inversion.py`` and
  ``train_dreambooth.py`` on the same model, photos and settings, for ours/theirs ratios.

Checks, per run of ours:

- the loss falls. A step's loss swings by ±15 % with its random timestep, so 20 raw losses say little; each run is
  compared, step by step, with a frozen run (learning rate 0) that has the same seed and so the same images,
  timesteps and noise at every step (the LoRA row with checkpointing on is LoRA's and DreamBooth's frozen run, as
  both start from the base model and draw alike; Textual Inversion has its own). The per-step losses are the
  artifact's ``personalize.losses``. The loss fell when the ratio over the last 5 steps is below the ratio at step 1
  (taken before any update) by more than that first ratio's distance from 1 (numerical noise, or bf16 weights).
  LoRA and DreamBooth train at 10x their default learning rates here so that 20 steps move a random-weight model's
  loss clearly; the learning rate does not change the time or memory of a step;
- the file loads back in diffusers: the LoRA through ``load_lora_weights`` with one adapter for each module in the
  file (and, at learning rate 0, every up-projection still zero, else some non-zero), the embedding through
  ``load_textual_inversion`` with its vectors in the token table (and different from the frozen run's), the
  DreamBooth checkpoint through ``from_single_file`` with the base checkpoint's keys, the UNet changed and the text
  encoder and VAE equal to the base's at the saved precision;
- memory returns to baseline: ``torch.cuda.memory_allocated`` after the run (garbage collected, caches emptied)
  within 1 % of the model's weights (+64 MiB on CUDA for library workspaces) of its value before the model was
  loaded; on CPU the same for the bytes of the tensors still alive.

``gpu.json`` and ``gpu.md`` are rewritten (atomically) after every row, so a run cut short keeps every finished row;
a row whose expected time (a prior, then the last measured row of its kind) does not fit in what is left of
``--budget-seconds`` is skipped with that reason. ``--dry-run`` runs every row on the CPU with the tiny model at
64 px (rows that need CUDA are skipped with the reason) and never writes ``bench/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__:
    from . import speed
else:  # run as a script: python bench/gpu_check.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import speed

cell = speed.format_cell
RESULTS = speed.REPO / "bench" / "results"
STEPS, WARMUP = 20, 5  # WARMUP step intervals are dropped before the median s/step
LOSS_WINDOW = 5
MAX_REFERENCE_MISMATCH = 0.05  # a step-1 ratio further from 1 means the frozen run drew differently
PRIOR_SECONDS = {"full": {"lora": 50, "embedding": 45, "dreambooth": 80}, "tiny": {"lora": 15, "embedding": 15,
                                                                                  "dreambooth": 20}}
SDXL_EXTRA_SECONDS = 90  # building the random SDXL model
THEIRS_FACTOR = 1.5
CUDA_WORKSPACE_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    what: str
    method: str  # bench.speed's method names: lora, embedding, dreambooth
    lr: float = 0.0
    family: str = "sd15"
    side: str = "ours"
    gradient_checkpointing: bool = False
    extra_argv: tuple[str, ...] = ()
    reference: str | None = None  # the frozen row whose per-step losses this row's are divided by
    needs: str | None = None  # "8bit", "bf16" or "sdxl"
    compare_with: str | None = None  # theirs: the ours row of the ratios

    @property
    def frozen(self) -> bool:
        return self.side == "ours" and self.lr == 0.0


LORA_LR, EMBEDDING_LR, DREAMBOOTH_LR = 1e-3, 5e-3, 5e-5
ROWS = (
    Row("sd15-lora-gc-on", "SD1.5 LoRA, checkpointing on (lr 0: the frozen run)", "lora",
        gradient_checkpointing=True),
    Row("sd15-lora-gc-off", "SD1.5 LoRA, checkpointing off", "lora", LORA_LR, reference="sd15-lora-gc-on"),
    Row("sd15-embedding-frozen", "SD1.5 Textual Inversion (lr 0: the frozen run)", "embedding"),
    Row("sd15-embedding", "SD1.5 Textual Inversion", "embedding", EMBEDDING_LR, reference="sd15-embedding-frozen"),
    Row("sd15-dreambooth-adamw", "SD1.5 DreamBooth, AdamW", "dreambooth", DREAMBOOTH_LR,
        gradient_checkpointing=True, reference="sd15-lora-gc-on"),
    Row("sd15-dreambooth-adamw8bit", "SD1.5 DreamBooth, 8-bit AdamW", "dreambooth", DREAMBOOTH_LR,
        gradient_checkpointing=True, extra_argv=("--use-8bit-adam",), reference="sd15-lora-gc-on", needs="8bit"),
    Row("sd15-dreambooth-bf16-weights", "SD1.5 DreamBooth, bf16 weights", "dreambooth", DREAMBOOTH_LR,
        gradient_checkpointing=True, extra_argv=("--weights-dtype", "bf16"), reference="sd15-lora-gc-on",
        needs="bf16"),
    Row("sdxl-lora", "SDXL LoRA, checkpointing off", "lora", LORA_LR, family="sdxl", needs="sdxl"),
    Row("theirs-sd15-lora-gc-off", "diffusers train_dreambooth_lora.py, checkpointing off", "lora", side="theirs",
        compare_with="sd15-lora-gc-off"),
    Row("theirs-sd15-embedding", "diffusers textual_inversion.py", "embedding", side="theirs",
        compare_with="sd15-embedding"),
    Row("theirs-sd15-dreambooth-adamw", "diffusers train_dreambooth.py, AdamW, checkpointing on", "dreambooth",
        side="theirs", gradient_checkpointing=True, compare_with="sd15-dreambooth-adamw"),
)


# ---------------------------------------------------------------------------------------------------- checks

def loss_check(losses: list[float], reference: list[float] | None, reference_id: str | None) -> dict:
    """Did the loss fall, judged against a frozen run with the same draws (see the module docstring)?"""
    if reference is None:
        return {"passed": None, "detail": f"no frozen run to compare with ({reference_id or 'none'})"}
    if len(losses) < 2 * LOSS_WINDOW or len(reference) != len(losses):
        return {"passed": False, "detail": f"{len(losses)} losses against {len(reference)} of the frozen run"}
    ratios = [a / b for a, b in zip(losses, reference)]
    first, last = ratios[0], sum(ratios[-LOSS_WINDOW:]) / LOSS_WINDOW
    noise = abs(first - 1.0)
    result = {"reference": reference_id, "ratio_step_1": first, f"ratio_last_{LOSS_WINDOW}": last,
              "fall": first - last, "noise": noise, "ratios": [round(r, 6) for r in ratios]}
    if not all(map(math.isfinite, ratios)):
        return dict(result, passed=False, detail="a loss is not finite")
    if noise > MAX_REFERENCE_MISMATCH:
        return dict(result, passed=False, detail=f"step 1 differs from the frozen run by {noise:.1%}: the runs did "
                                                 "not draw the same images, timesteps and noise")
    passed = first - last > noise
    return dict(result, passed=passed, detail=f"loss / frozen run's: {first:.4f} at step 1, {last:.4f} over the last "
                                              f"{LOSS_WINDOW} steps" + ("" if passed else " (did not fall)"))


def memory_check(raw: dict, weight_bytes: int, cuda: bool) -> dict:
    before, after = raw.get("memory_before_run_bytes"), raw.get("memory_after_run_bytes")
    if before is None or after is None:
        return {"passed": None, "detail": "the child reported no memory figures"}
    tolerance = int(0.01 * weight_bytes) + (CUDA_WORKSPACE_BYTES if cuda else 0)
    left = after - before
    return {"passed": left <= tolerance, "before_bytes": before, "after_bytes": after, "tolerance_bytes": tolerance,
            "measure": raw.get("memory_measure"),
            "detail": f"{_mb(left)} left after the run (tolerance {_mb(tolerance)}, {raw.get('memory_measure')})"}


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KB"


def read_losses(artifact: Path) -> list[float]:
    from safetensors import safe_open

    with safe_open(str(artifact), "pt") as handle:
        return json.loads((handle.metadata() or {})["personalize.losses"])


class LoadBack:
    """Loads each artifact with diffusers' own loaders, against the base pipeline (loaded once, on the CPU)."""

    def __init__(self, model: Path):
        self.model = model
        self._pipe = None
        self._cast: dict[tuple[str, object], dict] = {}

    @property
    def pipe(self):
        if self._pipe is None:
            import torch
            from diffusers import DiffusionPipeline

            self._pipe = DiffusionPipeline.from_pretrained(str(self.model), torch_dtype=torch.float32,
                                                           safety_checker=None)
        return self._pipe

    def base_weights(self, name: str, dtype) -> dict:
        """The base pipeline's ``name`` weights at ``dtype``, cast once (SD1.5's in fp16: 2 GB, seconds to cast)."""
        if (name, dtype) not in self._cast:
            self._cast[(name, dtype)] = {k: v.to(dtype) for k, v in getattr(self.pipe, name).state_dict().items()}
        return self._cast[(name, dtype)]

    def check(self, method: str, artifact: Path, frozen: bool, frozen_artifact: Path | None) -> dict:
        try:
            passed, detail = getattr(self, method)(artifact, frozen, frozen_artifact)
        except Exception as error:  # noqa: BLE001 - a file that does not load is this check's finding
            return {"passed": False, "detail": f"{type(error).__name__}: {error}"[:500]}
        return {"passed": passed, "detail": detail}

    def lora(self, artifact: Path, frozen: bool, _frozen_artifact) -> tuple[bool, str]:
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file

        tensors = load_file(str(artifact))
        modules = {key.split(".")[0] for key in tensors}
        pipe = self.pipe
        pipe.load_lora_weights(str(artifact), adapter_name="gpu_check")
        try:
            adapters = sum(len(get_peft_model_state_dict(part, adapter_name="gpu_check")) // 2
                           for part in pipe.components.values() if hasattr(part, "peft_config"))
        finally:
            pipe.unload_lora_weights()
        moved = sum(bool(t.count_nonzero()) for key, t in tensors.items() if ".lora_up." in key)
        changed_ok = moved == 0 if frozen else moved > 0
        return adapters == len(modules) and changed_ok, (
            f"load_lora_weights: {adapters} adapters for {len(modules)} modules in the file; {moved} up-projections "
            f"non-zero" + (" (lr 0: all should be zero)" if frozen else ""))

    def embedding(self, artifact: Path, frozen: bool, frozen_artifact: Path | None) -> tuple[bool, str]:
        import torch
        from safetensors import safe_open

        with safe_open(str(artifact), "pt") as handle:
            metadata = handle.metadata() or {}
            vectors = handle.get_tensor("emb_params")
        token = metadata["personalize.token"]
        pipe = self.pipe
        size = len(pipe.tokenizer)
        pipe.load_textual_inversion(str(artifact), token=token)
        try:
            grew = len(pipe.tokenizer) - size
            table = pipe.text_encoder.get_input_embeddings().weight
            rows = table[size:size + grew].detach()
            in_table = grew == len(vectors) and torch.equal(rows, vectors.to(rows.dtype))
        finally:
            pipe.unload_textual_inversion()
        detail = f"load_textual_inversion: {grew} token(s) added for {len(vectors)} vector(s), " + \
                 ("equal to the file's" if in_table else "NOT equal to the file's")
        moved = True
        if not frozen and frozen_artifact is not None and frozen_artifact.is_file():
            with safe_open(str(frozen_artifact), "pt") as handle:
                moved = not torch.equal(vectors, handle.get_tensor("emb_params"))
            detail += "; the vectors moved from the frozen run's" if moved else "; the vectors did NOT move"
        return in_table and moved, detail

    def dreambooth(self, artifact: Path, _frozen, _frozen_artifact) -> tuple[bool, str]:
        import torch
        from safetensors import safe_open

        base_single_file = self.model.parent / "model.safetensors"
        with safe_open(str(artifact), "pt") as saved, safe_open(str(base_single_file), "pt") as base:
            keys_match = set(saved.keys()) == set(base.keys())
            saved_dtype = saved.get_tensor(next(iter(saved.keys()))).dtype
        # Loaded at the saved precision, so that an unchanged weight equals the base's rounded to it, bit for bit.
        loaded = type(self.pipe).from_single_file(str(artifact), config=str(self.model), torch_dtype=saved_dtype)
        counts = {}
        for name in ("unet", "text_encoder", "vae"):
            mine, base = getattr(loaded, name).state_dict(), self.base_weights(name, saved_dtype)
            same = sum(torch.equal(mine[k], v) for k, v in base.items() if k in mine)
            counts[name] = (same, len(base))
        del loaded
        unet_changed = counts["unet"][1] - counts["unet"][0]
        frozen_same = all(same == total for same, total in (counts["text_encoder"], counts["vae"]))
        return keys_match and unet_changed > 0 and frozen_same, (
            f"from_single_file: keys {'match' if keys_match else 'DIFFER from'} the base checkpoint's; UNet "
            f"{unet_changed}/{counts['unet'][1]} tensors changed; text encoder "
            f"{counts['text_encoder'][0]}/{counts['text_encoder'][1]} and VAE {counts['vae'][0]}/{counts['vae'][1]} "
            f"equal to the base at {str(saved_dtype).replace('torch.', '')}")


# -------------------------------------------------------------------------------------------------- the run

def probe_result(process: subprocess.Popen, timeout: float = 120.0) -> tuple[str, str, int]:
    """A probe's stdout, stderr and exit status; one that hangs (a broken CUDA library) is killed and fails."""
    try:
        out, error = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, error = process.communicate()
        return out, f"no answer after {timeout:.0f} s", 1
    return out, error, process.returncode


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.size = "tiny" if self.dry else "full"
        self.precision = "no" if self.dry else "bf16"
        self.threads = 1 if self.dry else (os.cpu_count() or 1)
        self.env = speed.child_env(self.threads)
        self.work = Path(args.work).expanduser().resolve()
        self.out = Path(args.out).resolve()
        self.started = time.time()
        self.rows: dict[str, dict] = {}
        self.artifacts: dict[str, Path] = {}
        self.seconds_by_kind: dict[tuple[str, str, str], float] = {}
        self.flops: dict[tuple[bool, int], float | None] = {}
        self.report: dict = {}
        self.unavailable: dict[str, str | None] = {}

    # ------------------------------------------------------------------ budget

    def remaining(self) -> float:
        return self.args.budget_seconds - (time.time() - self.started)

    def expected_seconds(self, row: Row) -> float:
        kind = (row.side, row.family, row.method)
        if kind in self.seconds_by_kind:
            return self.seconds_by_kind[kind]
        seconds = PRIOR_SECONDS[self.size][row.method] * (THEIRS_FACTOR if row.side == "theirs" else 1.0)
        return seconds + (SDXL_EXTRA_SECONDS if row.family == "sdxl" and not self.dry else 0)

    # ------------------------------------------------------------------ output

    def write(self) -> None:
        self.report["elapsed_seconds"] = round(time.time() - self.started, 1)
        self.report["rows"] = [self.rows[row.id] for row in ROWS if row.id in self.rows]
        speed.write_atomically(self.out / "gpu.json", json.dumps(self.report, indent=1))
        speed.write_atomically(self.out / "gpu.md", render_markdown(self.report))

    def record(self, row: Row, entry: dict) -> dict:
        self.rows[row.id] = entry
        self.write()
        speed.log(f"{row.id}: {entry['status']}" + (f" ({entry['reason']})" if entry.get("reason") else ""))
        return entry

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "gpu-check").mkdir(parents=True, exist_ok=True)
        machine = speed.machine_info(self.threads, self.device)
        peak = speed.peak_tflops_for(machine.get("gpu"), self.args.peak_tflops) if not self.dry else \
            (None, "not a GPU run")
        self.report = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python bench/gpu_check.py " + " ".join(self.args.argv),
            "dry_run": self.dry, "finished": False, "machine": machine, "budget_seconds": self.args.budget_seconds,
            "gpu_peak_tflops": {"value": peak[0], "source": peak[1]},
            "settings": {"device": self.device, "model_size": self.size, "precision": self.precision,
                         "steps": STEPS, "warmup_intervals": WARMUP, "batch_size": 1, "lora_rank": speed.RANK,
                         "resolution": {"sd15": self.resolution("sd15"), "sdxl": self.resolution("sdxl")},
                         "learning_rates": {"lora": LORA_LR, "embedding": EMBEDDING_LR, "dreambooth": DREAMBOOTH_LR,
                                            "theirs": speed.LR}},
            "setup_seconds": {}, "rows": []}
        self.write()
        probes = self.start_probes()  # they run while the model is built
        self.model = self.timed("model", lambda: speed.prepare_model(self.work, self.size))
        self.timed("images", lambda: speed.prepare_images(self.work, self.resolution("sd15")))
        # The UNet's FLOPs per step with input gradients only (LoRA, TI) and with weight gradients (DreamBooth).
        resolution = self.resolution("sd15")
        counted = self.timed("flops", lambda: speed.unet_flops_of(
            self.model, [("lora", resolution), ("dreambooth", resolution)], sys.executable, self.env))
        self.flops = {(False, resolution): counted[0], (True, resolution): counted[1]}
        self.load_back = LoadBack(self.model)
        self.unavailable = self.timed("probes", lambda: self.finish_probes(probes))
        self.report["unavailable"] = self.unavailable
        self.write()

    def timed(self, name: str, work):
        began = time.time()
        result = work()
        self.report["setup_seconds"][name] = round(self.report["setup_seconds"].get(name, 0) + time.time() - began, 1)
        return result

    def resolution(self, family: str) -> int:
        return 64 if self.dry else {"sd15": 512, "sdxl": 1024}[family]

    def start_probes(self) -> dict[str, subprocess.Popen]:
        def start(command: list[str]) -> subprocess.Popen:
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                    cwd=speed.REPO)

        probes = {"sdxl": start([sys.executable, "-m", "comfyui_personalize", "make-tiny-model", "--help"])}
        if self.device == "cuda":
            probes["8bit"] = start([sys.executable, "-c", "import bitsandbytes; bitsandbytes.optim.AdamW8bit"])
        return probes

    def finish_probes(self, probes: dict[str, subprocess.Popen]) -> dict[str, str | None]:
        """Why each optional row cannot run here (None: it can)."""
        output = {name: probe_result(process) for name, process in probes.items()}
        reasons: dict[str, str | None] = {}
        if self.device != "cuda":
            reasons["8bit"] = "8-bit AdamW (bitsandbytes) runs on CUDA only; this run is on the CPU"
            reasons["bf16"] = "bf16 weights need a CUDA GPU with bf16 support; this run is on the CPU"
        else:
            import torch

            reasons["bf16"] = None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(0)} has no bf16"
            _, error, code = output["8bit"]
            reasons["8bit"] = None if code == 0 else \
                "bitsandbytes does not import: " + (error.strip().splitlines() or ["?"])[-1][:300]
        choices = re.search(r"--arch \{([^}]*)\}", output["sdxl"][0])
        arches = choices.group(1).split(",") if choices else []
        reasons["sdxl"] = None if "sdxl" in arches else \
            f"SDXL family not available in this version (make-tiny-model --arch offers {arches or 'no choice'})"
        examples = self.args.examples_dir
        if not examples:
            reasons["theirs"] = "DIFFUSERS_EXAMPLES_DIR is not set"
        else:
            reasons["theirs"] = speed.examples_problem(Path(examples).resolve(), self.args.theirs_python,
                                                       sorted({r.method for r in ROWS if r.side == "theirs"}))
        return reasons

    def sdxl_model(self) -> Path:
        root = self.work / "models" / f"sdxl-{self.size}"
        if not (root / "diffusers" / "model_index.json").is_file():
            speed.log(f"make-tiny-model --arch sdxl --size {self.size} -> {root}")
            speed.run_checked([sys.executable, "-m", "comfyui_personalize", "make-tiny-model", "--arch", "sdxl",
                               "--size", self.size, "--out", str(root), "--json"], env=self.env)
        return root / "diffusers"

    # ------------------------------------------------------------------ rows

    def run_row(self, row: Row) -> dict:
        entry = {"id": row.id, "what": row.what, "side": row.side, "family": row.family, "method": row.method,
                 "resolution": self.resolution(row.family), "steps": STEPS,
                 "gradient_checkpointing": row.gradient_checkpointing,
                 "lr": row.lr if row.side == "ours" else speed.LR[row.method], "checks": {}}
        reason = self.skip_reason(row)
        if reason:
            return self.record(row, dict(entry, status="skipped", reason=reason))
        began = time.time()
        try:
            entry = self.measure(row, entry)
        except Exception as error:  # noqa: BLE001 - one broken row must not cost the others
            entry = dict(entry, status="failed", reason=f"{type(error).__name__}: {error}"[:500],
                         traceback=traceback.format_exc()[-3000:])
        self.seconds_by_kind[(row.side, row.family, row.method)] = time.time() - began
        entry["row_seconds"] = round(time.time() - began, 1)
        return self.record(row, entry)

    def skip_reason(self, row: Row) -> str | None:
        reason = self.unavailable.get("theirs" if row.side == "theirs" else row.needs or "")
        if reason:
            return reason
        expected = self.expected_seconds(row)
        if expected > self.remaining():
            return f"budget: needs about {expected:.0f} s, {max(self.remaining(), 0):.0f} s left"
        return None

    def measure(self, row: Row, entry: dict) -> dict:
        model = self.sdxl_model() if row.family == "sdxl" else self.model
        resolution = self.resolution(row.family)
        images = speed.prepare_images(self.work, resolution)
        case = speed.Case(self.size, row.method, model, images, resolution, STEPS, WARMUP, self.work, self.device,
                          self.precision)
        folder = self.work / "gpu-check"
        if row.side == "ours":
            artifact = folder / f"{row.id}.safetensors"
            artifact.unlink(missing_ok=True)
            # argparse keeps an option's last value: these override the speed benchmark's settings.
            argv = case.ours_argv(artifact) + ["--lr", f"{row.lr:g}"] + \
                (["--gradient-checkpointing"] if row.gradient_checkpointing else []) + list(row.extra_argv)
            spec, python = {"kind": "ours", "argv": argv}, sys.executable
        else:
            artifact = folder / row.id
            shutil.rmtree(artifact, ignore_errors=True)
            argv = case.theirs_argv(artifact) + (["--gradient_checkpointing"] if row.gradient_checkpointing else [])
            spec = {"kind": "theirs", "script": str(Path(self.args.examples_dir).resolve() / speed.SCRIPTS[row.method]),
                    "argv": argv, "cwd": str(folder)}
            python = self.args.theirs_python
        spec.update(threads=self.threads, device=self.device)
        speed.log(f"{row.id}: {STEPS} steps at {resolution} px ({max(self.remaining(), 0):.0f} s of budget left)")
        raw = speed.spawn(spec, python, self.env, folder / f"{row.id}.log", timeout=max(self.remaining(), 1.0))
        summary = speed.summarize(raw, WARMUP, artifact)
        if "error" in summary:
            return dict(entry, status="failed", reason=summary["error"][:1500])
        entry.update(self.figures(row, raw, summary, resolution))
        if row.side == "theirs":
            shutil.rmtree(artifact, ignore_errors=True)  # a DreamBooth pipeline folder is GBs
            entry["ratios"] = self.ratios(entry, self.rows.get(row.compare_with))
            return dict(entry, status="ok")
        self.artifacts[row.id] = artifact
        checks = entry["checks"]
        if self.device == "cuda" and "8bit" == row.needs and "AdamW8bit" not in entry["optimizers"]:
            checks["optimizer"] = {"passed": False, "detail": f"8-bit AdamW asked for, {entry['optimizers']} ran"}
        entry["losses"] = read_losses(artifact)
        if row.frozen:
            checks["loss_falls"] = {"passed": None, "detail": "the frozen run (lr 0) the others are compared with"}
        else:
            reference = self.rows.get(row.reference, {})
            checks["loss_falls"] = loss_check(entry["losses"], reference.get("losses"), row.reference)
        loader = LoadBack(model) if row.family == "sdxl" else self.load_back
        checks["loads_back"] = loader.check(row.method, artifact, row.frozen, self.artifacts.get(row.reference))
        weight_bytes = sum(p.stat().st_size for p in model.rglob("*.safetensors"))
        checks["memory_back_to_baseline"] = memory_check(raw, weight_bytes, self.device == "cuda")
        failed = [name for name, check in checks.items() if check.get("passed") is False]
        return dict(entry, status="failed" if failed else "ok",
                    reason=("failed checks: " + ", ".join(failed)) if failed else None)

    def figures(self, row: Row, raw: dict, summary: dict, resolution: int) -> dict:
        step = summary["seconds_per_step"]
        figures = {"seconds_per_step": step, "it_per_s": 1.0 / step, "step_spread": summary["step_spread"],
                   "startup_seconds": summary["startup_seconds"], "wall_seconds": summary["wall_seconds"],
                   "peak_rss_mb": summary["peak_rss_training_mb"], "artifact_bytes": summary["artifact_bytes"],
                   "optimizers": raw.get("optimizers", [])}
        if self.device == "cuda":
            figures.update(cuda_peak_mb=raw["cuda_peak_at_last_step_mb"],
                           cuda_reserved_peak_mb=raw.get("cuda_reserved_peak_mb"))
        flops = self.flops.get((row.method == "dreambooth", resolution)) if row.family == "sd15" else None
        if flops:
            figures["unet_flops_per_step"] = flops
            figures["unet_tflops"] = flops / step / 1e12
            peak = self.report["gpu_peak_tflops"]["value"]
            if peak:
                figures["unet_mfu"] = figures["unet_tflops"] / peak
        return figures

    @staticmethod
    def ratios(theirs: dict, ours: dict | None) -> dict:
        if not ours or ours.get("status") != "ok":
            return {}
        ratios = {"ours": ours["id"], "seconds_per_step": ours["seconds_per_step"] / theirs["seconds_per_step"]}
        if ours.get("cuda_peak_mb") and theirs.get("cuda_peak_mb"):
            ratios["cuda_peak"] = ours["cuda_peak_mb"] / theirs["cuda_peak_mb"]
        return ratios


# --------------------------------------------------------------------------------------------------- markdown

def _check_cell(check: dict | None) -> str:
    if not check or check.get("passed") is None:
        return "–"
    return "✓" if check["passed"] else "✗"


def markdown_row(entry: dict) -> list[str]:
    """The cells of one row of gpu.md (the test reads them back against gpu.json)."""
    status = entry["status"] + (f": {entry['reason'].splitlines()[0][:200]}" if entry.get("reason") else "")
    checks = entry.get("checks", {})
    return [entry["id"], entry["what"], status, str(entry["resolution"]), cell(entry.get("seconds_per_step"), "s"),
            cell(entry.get("it_per_s"), "f1"), cell(entry.get("cuda_peak_mb"), "mb"),
            cell(entry.get("cuda_reserved_peak_mb"), "mb"), cell(entry.get("unet_tflops"), "g3"),
            cell(entry.get("unet_mfu"), "%"), cell(entry.get("startup_seconds"), "f1"),
            _check_cell(checks.get("loss_falls")), _check_cell(checks.get("loads_back")),
            _check_cell(checks.get("memory_back_to_baseline"))]


HEADER = ["row", "what", "status", "px", "s/step", "it/s", "peak VRAM MB", "reserved MB", "UNet TFLOP/s",
          "of peak", "start-up s", "loss falls", "loads back", "memory back"]


def render_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    where = m.get("gpu") or f"{m['cpu']} (CPU)"
    title = "# GPU check" + (" — dry run on the CPU (tiny model; not GPU figures)" if report["dry_run"] else "")
    peak = report["gpu_peak_tflops"]
    lines = [title, "",
             f"{report['date']} · {where} · {m['cores']} cores, {m['memory_gb']} GB · torch {m['torch']}, diffusers "
             f"{m['diffusers']}, transformers {m['transformers']}, peft {m['peft']} · {s['model_size']} random-weight "
             f"models · precision {s['precision']} · batch 1 · {s['steps']} steps per run · "
             f"LoRA rank {s['lora_rank']}" + (f" · peak {peak['value']:g} TFLOP/s ({peak['source']})"
                                              if peak.get("value") else ""), "",
             f"Command: `{report['command']}` · {report['elapsed_seconds']:.0f} s of a "
             f"{report['budget_seconds']:.0f} s budget · "
             + ("finished" if report["finished"] else "**not finished** (rows so far)"), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(markdown_row(entry)) + " |" for entry in report["rows"]]
    compared = [e for e in report["rows"] if e.get("ratios")]
    if compared:
        lines += ["", "| ours | diffusers example | s/step ours/theirs | peak VRAM ours/theirs |", "|---|---|---|---|"]
        lines += [f"| {e['ratios']['ours']} | {e['id']} | {cell(e['ratios']['seconds_per_step'], 'x')} | "
                  f"{cell(e['ratios'].get('cuda_peak'), 'x')} |" for e in compared]
    details = [f"- {e['id']}, {name}: {check['detail']}" for e in report["rows"]
               for name, check in e.get("checks", {}).items() if check.get("detail")]
    if details:
        lines += ["", "Checks:", ""] + details
    lines += ["", "s/step: median time between optimizer steps after the first "
              f"{s['warmup_intervals']} (start-up excluded); it/s its inverse. Peak VRAM: "
              "`torch.cuda.max_memory_allocated` at the last step; reserved: the caching allocator's peak (what the "
              "card must hold, without the CUDA context). UNet TFLOP/s: the UNet's forward and backward FLOPs per "
              "step (counted on the meta device; recomputation under gradient checkpointing not counted) over s/step. "
              "Loss falls: per-step losses over a frozen run's with the same draws; loads back: diffusers' loaders; "
              "memory back: allocated memory after the run against before it. Details: `bench/gpu_check.py`."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 64 px: every code path, no GPU")
    parser.add_argument("--budget-seconds", type=float, default=480.0, help="total time for everything, set-up "
                        "included; rows that would not fit are skipped")
    parser.add_argument("--out", default=None, help="where gpu.json and gpu.md go (default: bench/results; dry run: "
                        "<work>/dry-run, never bench/results)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "comfyui-personalize" / "bench"),
                        help="models, images and run outputs (shared with bench.speed)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if the table "
                        "in bench/speed.py does not know the card")
    parser.add_argument("--examples-dir", default=os.environ.get("DIFFUSERS_EXAMPLES_DIR"),
                        help="diffusers' examples/ folder: adds their scripts' rows (env DIFFUSERS_EXAMPLES_DIR)")
    parser.add_argument("--theirs-python", default=os.environ.get("DIFFUSERS_EXAMPLES_PYTHON", sys.executable),
                        help="Python with torchvision for the example scripts (env DIFFUSERS_EXAMPLES_PYTHON)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.out is None:
        args.out = str(Path(args.work).expanduser() / "dry-run") if args.dry_run else str(RESULTS)
    if args.dry_run and Path(args.out).resolve() == RESULTS.resolve():
        parser.error("--dry-run writes tiny-model CPU figures: give it an --out other than bench/results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(f"error: no CUDA device: torch {torch.__version__} ({sys.executable}) sees none. This check needs "
                  "torch built for CUDA on a GPU machine; on a CPU, run it with --dry-run.", file=sys.stderr)
            return 2
    check = Check(args)
    check.setup()
    for row in ROWS:
        check.run_row(row)
    check.report["finished"] = True
    check.write()
    print((check.out / "gpu.md").read_text())
    failed = [e["id"] for e in check.report["rows"] if e["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
