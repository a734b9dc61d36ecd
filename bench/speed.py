"""Training speed and memory of the pack's trainers, optionally side by side with diffusers' example scripts.

    python -m bench.speed                      # from the repo root: every method on the tiny and full models
    python -m bench.speed --sizes tiny --methods lora,embedding --repeats 3
    DIFFUSERS_EXAMPLES_DIR=/path/to/diffusers/examples python -m bench.speed   # + theirs, A/B/A/B
    python -m bench.speed --device cuda --peak-tflops 989                      # on a GPU (512 px by default)

What it measures, per method (LoRA, DreamBooth without and with prior preservation, Textual Inversion) and model
(``tiny``, and ``full`` = SD1.5's real architecture with random weights, both from ``make-tiny-model``):
- seconds per step: the median time between consecutive optimizer steps after a warm-up, so start-up is excluded;
- start-up: wall time from spawning the process to the start of the first step (imports, model loading, caching);
- peak RSS: the process's high-water mark at the last optimizer step (training) and at exit (incl. export);
  on CUDA also ``torch.cuda.max_memory_allocated``, it/s and achieved UNet TFLOP/s (UNet forward+backward FLOPs
  per step counted with ``torch.utils.flop_counter`` on the meta device, over seconds per step, against the
  card's peak from ``--peak-tflops`` or a small table of known cards);
- artifact size: the file the trainer writes (theirs: the files in its output folder).

Every measurement runs in a fresh subprocess (``bench/_child.py``; peak RSS is per process), and all of them run
with the same thread count (``--threads``; ``auto`` = all cores when the machine is idle, else 1, because on a busy
machine torch's spinning intra-op threads make small operators up to ~100x slower). The load average before and
after is recorded: compare numbers only from one run on one machine.

Side-by-side mode: when ``DIFFUSERS_EXAMPLES_DIR`` (or ``--examples-dir``) points at a checkout of diffusers'
``examples/``, the same method also runs through ``dreambooth/train_dreambooth_lora.py``,
``dreambooth/train_dreambooth.py`` or ``textual_inversion/textual_inversion.py`` with the same model folder,
images, resolution, batch size (1), steps, precision, learning rate, LoRA rank (4, alpha = rank) and prior
preservation setting, gradient checkpointing off on both, alternating ours and theirs (A/B/A/B, ``--repeats``),
and the table gains ours/theirs ratios. Their scripts need torchvision: give a Python that has it with
``--theirs-python`` / ``DIFFUSERS_EXAMPLES_PYTHON`` (default: this one). Their scripts are run unchanged, offline
(``HF_HUB_OFFLINE=1``), and timed by the same optimizer-step hook as ours.

Writes ``bench/results/speed.json`` and ``bench/results/speed.md`` (``--out`` to change). Models, images and the
runs' outputs go to ``--work`` (default ``~/.cache/comfyui-personalize/bench``); the full model takes ~6 GB there.
This is a benchmark, not a test: it asserts nothing and prints ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "_child.py"
METHODS = ("lora", "dreambooth", "dreambooth-prior", "embedding")
SIZES = ("tiny", "full")
SCRIPTS = {
    "lora": "dreambooth/train_dreambooth_lora.py",
    "dreambooth": "dreambooth/train_dreambooth.py",
    "dreambooth-prior": "dreambooth/train_dreambooth.py",
    "embedding": "textual_inversion/textual_inversion.py",
}
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of a dog"
CLASS_IMAGES = 4
TOKEN, INIT_WORD = "<sks-subject>", "dog"
LR = {"lora": 1e-4, "dreambooth": 5e-6, "dreambooth-prior": 5e-6, "embedding": 5e-3}
RANK = 4
# (steps, warm-up intervals dropped) per device and size; the full model's DreamBooth keeps it short on CPU.
DEFAULT_STEPS = {("cpu", "tiny"): (30, 5), ("cpu", "full"): (8, 2), ("cuda", "tiny"): (60, 10),
                 ("cuda", "full"): (40, 10)}
DEFAULT_STEPS_DREAMBOOTH_CPU_FULL = (5, 1)
# Resolutions per device and size. On CPU the full model runs at 64 and 128 px: at 64 px (8x8 latents) its UNet step
# is bound by reading 3.4 GB of weights, so the per-step VAE work that caching removes is a smaller share of the
# step than at real resolutions; 128 px is closer to the 512 px proportions. DreamBooth's full model: 64 px only
# (its step is dominated by AdamW over 860M parameters, and it takes minutes per run on CPU).
DEFAULT_RESOLUTIONS = {("cpu", "tiny"): (128,), ("cpu", "full"): (64, 128), ("cuda", "tiny"): (512,),
                       ("cuda", "full"): (512,)}
DEFAULT_RESOLUTIONS_DREAMBOOTH_CPU_FULL = (64,)
# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) of a few cards, matched against the device name.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                     "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "T4": 65.0, "V100": 125.0}
# Peak memory of one full-model run (GB, measured at 64-128 px + margin): DreamBooth holds fp32 weights, gradients
# and two AdamW moments of the 860M-parameter UNet (~14.6 GB measured on both sides).
FULL_MEMORY_GB = {"lora": 6.0, "embedding": 6.5, "dreambooth": 15.5, "dreambooth-prior": 15.5}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def mem_available_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def machine_info(threads: int, device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": None, "threads": threads, "device": device,
            "python": platform.python_version(), "torch": torch.__version__}
    try:
        total = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        info["memory_gb"] = round(int(total.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    for name in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------------- preparation

def run_checked(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def prepare_model(work: Path, size: str) -> Path:
    """The diffusers folder of ``make-tiny-model --size SIZE``, in fp32 (the full model is written in fp16; both
    trainers then load the same fp32 weights instead of each deciding how to upcast)."""
    root = work / "models" / size
    folder = root / "diffusers-fp32"
    if (folder / "model_index.json").is_file():
        return folder
    if not (root / "diffusers" / "model_index.json").is_file():
        log(f"make-tiny-model --size {size} -> {root}")
        run_checked([sys.executable, "-m", "comfyui_personalize", "make-tiny-model", "--out", str(root), "--size",
                     size, "--json"], env=child_env(0))
    log(f"writing an fp32 copy of the {size} model")
    script = (
        "import sys, shutil, torch\n"
        "from pathlib import Path\n"
        "from diffusers import UNet2DConditionModel, AutoencoderKL\n"
        "from transformers import CLIPTextModel\n"
        "src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "tmp = dst.with_name(dst.name + '.tmp'); shutil.rmtree(tmp, ignore_errors=True)\n"
        "shutil.copytree(src, tmp, ignore=shutil.ignore_patterns('*.safetensors', '*.bin'))\n"
        "for name, cls in (('unet', UNet2DConditionModel), ('vae', AutoencoderKL)):\n"
        "    cls.from_pretrained(src, subfolder=name, torch_dtype=torch.float32).save_pretrained(tmp / name)\n"
        "CLIPTextModel.from_pretrained(src, subfolder='text_encoder', dtype=torch.float32)"
        ".save_pretrained(tmp / 'text_encoder')\n"
        "tmp.rename(dst)\n")
    run_checked([sys.executable, "-c", script, str(root / "diffusers"), str(folder)], env=child_env(0))
    vocab_size = json.loads((folder / "text_encoder" / "config.json").read_text())["vocab_size"]
    grow_tokenizer(folder / "tokenizer", vocab_size)
    return folder


def grow_tokenizer(folder: Path, size: int) -> None:
    """Give the tokenizer as many tokens as the text encoder has rows (SD1.5: 49408).

    ``make-tiny-model`` writes a small generated vocabulary (hundreds of tokens) even for the full model, whose
    text encoder has CLIP's 49408 rows; the pack's Textual Inversion refuses that mismatch, and diffusers' script
    would shrink the table to the tokenizer, making its per-step work (AdamW over the whole table) unrealistically
    small. Filler merges (pairs of byte symbols) are appended after the existing ones, so the prompts used here
    tokenize as before, and the two special tokens stay the highest ids, as in CLIP."""
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    if len(vocab) >= size:
        return
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1]) if t not in specials]
    merges = [line for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    known, symbols = set(tokens), tokens[:256]
    need = size - len(specials) - len(tokens)
    for a in symbols:
        for b in symbols:
            for end in ("", "</w>"):
                if need > 0 and a + b + end not in known:
                    merges.append(f"{a} {b}{end}")
                    tokens.append(a + b + end)
                    known.add(a + b + end)
                    need -= 1
    tokens += specials
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer.json").unlink(missing_ok=True)  # else the fast tokenizer keeps the old vocabulary


def prepare_images(work: Path, resolution: int) -> Path:
    """Four made-up subject photos (the pack's synthetic subject) as PNG files at the training resolution."""
    folder = work / "images" / f"subject-{resolution}"
    if len(list(folder.glob("*.png"))) >= 4:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    script = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from comfyui_personalize.trainers.testing.synthetic import subject_photos\n"
        "size = int(sys.argv[2])\n"
        "for i, image in enumerate(subject_photos(4, size)):\n"
        "    Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(f'{sys.argv[1]}/{i:02d}.png')\n")
    run_checked([sys.executable, "-c", script, str(folder), str(resolution)], env=child_env(0))
    return folder


def child_env(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(shim_dir())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


_SHIM: Path | None = None


def shim_dir() -> Path:
    """A folder where ``comfyui_personalize`` is this checkout (whatever is installed), first on PYTHONPATH."""
    global _SHIM
    if _SHIM is None:
        import tempfile

        _SHIM = Path(tempfile.mkdtemp(prefix="personalize-bench-"))
        (_SHIM / "comfyui_personalize").symlink_to(REPO, target_is_directory=True)
    return _SHIM


# ------------------------------------------------------------------------------------------------ the two sides

class Case:
    """One (size, method) cell: the arguments of ours and theirs."""

    def __init__(self, size: str, method: str, model: Path, images: Path, resolution: int, steps: int, warmup: int,
                 work: Path, device: str, precision: str):
        self.size, self.method, self.model, self.images = size, method, model, images
        self.resolution, self.steps, self.warmup, self.device, self.precision = resolution, steps, warmup, device, \
            precision
        self.dir = work / "runs" / f"{size}-{method}-{resolution}"
        self.class_cache = work / "class-cache" / size
        self.class_dir = work / "class-images" / f"{size}-{resolution}"

    @property
    def prior(self) -> bool:
        return self.method == "dreambooth-prior"

    def ours_argv(self, out: Path, steps: int | None = None) -> list[str]:
        command = {"lora": "train-lora", "dreambooth": "train-dreambooth", "dreambooth-prior": "train-dreambooth",
                   "embedding": "train-embedding"}[self.method]
        argv = [command, "--base", str(self.model), "--images", str(self.images), "--out", str(out), "--overwrite",
                "--device", self.device, "--resolution", str(self.resolution), "--batch-size", "1",
                "--steps", str(steps or self.steps), "--lr", f"{LR[self.method]:g}", "--seed", "0",
                "--lr-scheduler", "constant", "--mixed-precision", self.precision, "--no-use-8bit-adam",
                "--no-gradient-checkpointing", "--max-grad-norm", "1.0"]
        if self.method == "lora":
            argv += ["--prompt", INSTANCE_PROMPT, "--rank", str(RANK), "--alpha", str(RANK)]
        elif self.method.startswith("dreambooth"):
            argv += ["--prompt", INSTANCE_PROMPT, "--save-precision", "fp16"]
            if self.prior:
                argv += ["--class-prompt", CLASS_PROMPT, "--class-images", str(CLASS_IMAGES),
                         "--class-sampler-steps", "1", "--class-cache", str(self.class_cache)]
            else:
                argv += ["--class-prompt", ""]
        else:
            argv += ["--token", TOKEN, "--init-word", INIT_WORD, "--vectors", "1"]
        return argv

    def theirs_argv(self, out: Path) -> list[str]:
        precision = {"no": "no", "fp16": "fp16", "bf16": "bf16", "auto": "bf16"}[self.precision]
        common = ["--pretrained_model_name_or_path", str(self.model), "--resolution", str(self.resolution),
                  "--train_batch_size", "1", "--max_train_steps", str(self.steps), "--learning_rate",
                  f"{LR[self.method]:g}", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
                  "--output_dir", str(out), "--checkpointing_steps", "1000000", "--mixed_precision", precision,
                  "--dataloader_num_workers", "0"]
        if self.method == "embedding":
            return common + ["--train_data_dir", str(self.images), "--placeholder_token", TOKEN,
                             "--initializer_token", INIT_WORD, "--learnable_property", "object", "--num_vectors",
                             "1", "--save_steps", "1000000"]
        argv = common + ["--instance_data_dir", str(self.images), "--instance_prompt", INSTANCE_PROMPT,
                         "--max_grad_norm", "1.0"]
        if self.method == "lora":
            argv += ["--rank", str(RANK)]
        if self.prior:
            argv += ["--with_prior_preservation", "--class_data_dir", str(self.class_dir), "--class_prompt",
                     CLASS_PROMPT, "--num_class_images", str(CLASS_IMAGES), "--prior_loss_weight", "1.0"]
        return argv


def spawn(spec: dict, python: str, env: dict, log_path: Path, timeout: float | None = None) -> dict:
    """Run one child and return its result (with the parent's spawn time folded in); a child still running after
    ``timeout`` seconds is killed and reported as an error."""
    spawned = time.time()
    with open(log_path, "w") as log_file:
        try:
            done = subprocess.run([python, str(CHILD), json.dumps(spec)], stdout=subprocess.PIPE, stderr=log_file,
                                  text=True, env=env, cwd=spec.get("cwd") or REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out: stopped after {timeout:.0f} s (log: {log_path})", "timed_out": True,
                    "wall_seconds": time.time() - spawned}
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if not lines:
        tail = log_path.read_text(errors="replace")[-1500:]
        return {"error": f"child exited {done.returncode} without a result; log {log_path}:\n{tail}"}
    result = json.loads(lines[-1][len("BENCH_RESULT "):])
    result["spawn_wall"] = spawned
    result["wall_seconds"] = time.time() - spawned
    if result.get("error"):
        result["error"] += f" (log: {log_path})"
    return result


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "logs" not in p.relative_to(path).parts)


def summarize(result: dict, warmup: int, artifact: Path | None) -> dict:
    if result.get("error"):
        return {"error": result["error"]}
    intervals = result["step_intervals"]
    kept = intervals[warmup:] if len(intervals) > warmup else intervals
    if not kept:
        return {"error": f"only {result['steps_seen']} optimizer steps were seen"}
    step = statistics.median(kept)
    summary = {
        "seconds_per_step": step,
        "step_spread": [min(kept), max(kept)],
        "steps_measured": len(kept),
        "startup_seconds": result["first_step_end_wall"] - result["spawn_wall"] - step,
        "wall_seconds": result["wall_seconds"],
        "peak_rss_training_mb": result["rss_at_last_step_mb"],
        "peak_rss_process_mb": result["rss_process_peak_mb"],
        "rss_at_last_step_mb": result.get("rss_parts_at_last_step_mb"),
        "artifact_bytes": folder_bytes(artifact) if artifact is not None and artifact.exists() else None,
        "threads": result["threads"],
    }
    if result.get("cuda_process_peak_mb"):
        summary["cuda_peak_training_mb"] = result["cuda_peak_at_last_step_mb"]
        summary["cuda_peak_process_mb"] = result["cuda_process_peak_mb"]
    if result.get("ours"):
        summary["ours_reported"] = {k: result["ours"].get(k) for k in ("seconds_per_step", "startup_seconds",
                                                                       "peak_rss_mb", "bytes", "final_loss")}
    return summary


# ------------------------------------------------------------------------------------------------------- flops

def unet_flops(model: Path, method: str, resolution: int, python: str, env: dict) -> float | None:
    """UNet forward+backward FLOPs of one training step (batch 2 with prior preservation), counted on meta tensors.
    DreamBooth's backward includes weight gradients; LoRA's and TI's only input gradients (their trained
    parameters are a rounding error)."""
    return unet_flops_of(model, [(method, resolution)], python, env)[0]


def unet_flops_of(model: Path, cases: list[tuple[str, int]], python: str, env: dict) -> list[float | None]:
    """``unet_flops`` for several (method, resolution) cases, counted in one process."""
    script = (
        "import sys, json, torch\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "from diffusers import UNet2DConditionModel\n"
        "folder, cases = sys.argv[1], json.loads(sys.argv[2])\n"
        "config = UNet2DConditionModel.load_config(folder, subfolder='unet')\n"
        "with torch.device('meta'):\n"
        "    unet = UNet2DConditionModel.from_config(config)\n"
        "totals = []\n"
        "for method, res in cases:\n"
        "    weights = method.startswith('dreambooth')\n"
        "    unet.requires_grad_(weights)\n"
        "    batch = 2 if method == 'dreambooth-prior' else 1\n"
        "    side = res // 8\n"
        "    x = torch.randn(batch, config['in_channels'], side, side, device='meta', requires_grad=not weights)\n"
        "    h = torch.randn(batch, 77, config['cross_attention_dim'], device='meta', requires_grad=not weights)\n"
        "    with FlopCounterMode(display=False) as counter:\n"
        "        t = torch.zeros(batch, dtype=torch.long, device='meta')\n"
        "        unet(x, t, h).sample.float().pow(2).mean().backward()\n"
        "    totals.append(counter.get_total_flops())\n"
        "print(json.dumps(totals))\n")
    done = subprocess.run([python, "-c", script, str(model), json.dumps(cases)], capture_output=True, text=True,
                          env=env)
    try:
        return [float(total) for total in json.loads(done.stdout.strip().splitlines()[-1])]
    except (ValueError, IndexError):
        log(f"could not count UNet FLOPs: {done.stderr[-500:]}")
        return [None] * len(cases)


def peak_tflops_for(gpu_name: str | None, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if gpu_name and key.lower() in gpu_name.lower():
            return value, f"table ({key}, dense bf16/fp16)"
    return None, "unknown card: pass --peak-tflops"


# -------------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma list of tiny,full")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--resolutions", default=None, help="comma list of pixel sizes for every cell (default: "
                        "128 tiny, 64 and 128 full (DreamBooth 64) on CPU; 512 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per size)")
    parser.add_argument("--warmup", type=int, default=None, help="step intervals dropped before the median")
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs per cell (ours-only: runs per cell)")
    parser.add_argument("--threads", default="auto", help="torch intra-op threads for every run (auto: all cores "
                        "if the 1-minute load average is below 1, else 1)")
    parser.add_argument("--precision", default=None, choices=("no", "bf16", "fp16"),
                        help="mixed precision for both sides (default: no = fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--examples-dir", default=os.environ.get("DIFFUSERS_EXAMPLES_DIR"),
                        help="diffusers' examples/ folder: enables side-by-side mode (env DIFFUSERS_EXAMPLES_DIR)")
    parser.add_argument("--theirs-python", default=os.environ.get("DIFFUSERS_EXAMPLES_PYTHON", sys.executable),
                        help="Python with torchvision for the example scripts (env DIFFUSERS_EXAMPLES_PYTHON)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak TFLOP/s for utilization")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "comfyui-personalize" / "bench"),
                        help="models, images and run outputs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where speed.json/speed.md go")
    parser.add_argument("--no-memory-guard", action="store_true", help="run full-model cells even when "
                        "MemAvailable looks too small for them")
    parser.add_argument("--memory-wait", type=float, default=900, help="seconds to wait for enough MemAvailable "
                        "before a full-model cell is skipped (other processes may be using it for a while)")
    parser.add_argument("--update", action="store_true", help="keep the cells of the existing speed.json that this "
                        "run does not measure (each cell records when it was measured)")
    args = parser.parse_args(argv)

    sizes = [s for s in args.sizes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for value, allowed in ((sizes, SIZES), (methods, METHODS)):
        unknown = set(value) - set(allowed)
        if unknown:
            parser.error(f"unknown {sorted(unknown)}; choose from {allowed}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    threads = (os.cpu_count() or 1) if args.threads == "auto" and (load_average() or [0])[0] < 1.0 else \
        1 if args.threads == "auto" else int(args.threads)
    precision = args.precision or ("no" if args.device == "cpu" else "bf16")
    examples = Path(args.examples_dir).resolve() if args.examples_dir else None
    if examples is not None:
        problem = examples_problem(examples, args.theirs_python, methods)
        if problem:
            parser.error(problem)
    work = Path(args.work).expanduser().resolve()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(threads)
    started = time.time()
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m bench.speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(threads, args.device),
        "load_average_before": load_average(),
        "mode": "side-by-side" if examples else "ours only",
        "precision": precision,
        "examples_commit": None,
        "settings": {"batch_size": 1, "lora_rank": RANK, "lora_alpha": RANK, "learning_rates": LR,
                     "class_images": CLASS_IMAGES, "gradient_checkpointing": False, "seed": 0},
        "cells": [],
    }
    if examples is not None:
        head = subprocess.run(["git", "-C", str(examples), "log", "-1", "--format=%H"], capture_output=True,
                              text=True)
        report["examples_commit"] = head.stdout.strip() or None
    gpu_peak = None
    if args.device == "cuda":
        gpu_peak = peak_tflops_for(report["machine"].get("gpu"), args.peak_tflops)
        report["gpu_peak_tflops"] = {"value": gpu_peak[0], "source": gpu_peak[1]}
    log(f"threads={threads} precision={precision} mode={report['mode']} load={report['load_average_before']}")
    kept: list[dict] = []
    if args.update and (out_dir / "speed.json").is_file():
        previous = json.loads((out_dir / "speed.json").read_text())
        if previous.get("mode") == report["mode"] and previous.get("precision") == precision:
            kept = previous.get("cells", [])
            report["earlier_commands"] = previous.get("earlier_commands", []) + [previous.get("command")]
    report["cells"] = kept

    for size in sizes:
        model = prepare_model(work, size)
        for method, resolution in [(m, r) for m in methods for r in resolutions_for(args, size, m)]:
            steps, warmup = DEFAULT_STEPS[(args.device, size)]
            if args.device == "cpu" and size == "full" and method.startswith("dreambooth"):
                steps, warmup = DEFAULT_STEPS_DREAMBOOTH_CPU_FULL
            steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
            images = prepare_images(work, resolution)
            report["cells"] = [c for c in report["cells"] if (c["size"], c["method"], c["resolution"]) !=
                               (size, method, resolution)]
            case = Case(size, method, model, images, resolution, steps, warmup, work, args.device, precision)
            cell = {"size": size, "method": method, "resolution": resolution, "steps": steps, "warmup": warmup,
                    "measured_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "load_average": load_average(), "ours": [], "theirs": []}
            report["cells"].append(cell)
            available = mem_available_gb()
            deadline = time.time() + args.memory_wait
            while (size == "full" and args.device == "cpu" and not args.no_memory_guard and available is not None
                   and available < FULL_MEMORY_GB[method] and time.time() < deadline):
                log(f"{size}/{method}: waiting for {FULL_MEMORY_GB[method]:.0f} GB of MemAvailable "
                    f"({available:.1f} GB now)")
                time.sleep(20)
                available = mem_available_gb()
            if (size == "full" and args.device == "cpu" and not args.no_memory_guard and available is not None
                    and available < FULL_MEMORY_GB[method]):
                cell["skipped"] = (f"not run: needs about {FULL_MEMORY_GB[method]:.0f} GB of RAM, MemAvailable was "
                                   f"{available:.1f} GB (--no-memory-guard to force)")
                log(f"{size}/{method}: {cell['skipped']}")
                continue
            shutil.rmtree(case.dir, ignore_errors=True)
            case.dir.mkdir(parents=True)
            if case.prior:
                prepare_class_images(case, env)
            if args.device == "cuda":
                cell["unet_flops_per_step"] = unet_flops(model, method, resolution, sys.executable, env)
            for repeat in range(args.repeats):
                sides = ["ours"] + (["theirs"] if examples else [])
                for side in sides:
                    out = case.dir / f"{side}-{repeat}"
                    if side == "ours":
                        artifact = out.with_suffix(".safetensors")
                        spec = {"kind": "ours", "argv": case.ours_argv(artifact)}
                        python = sys.executable
                    else:
                        artifact = out
                        spec = {"kind": "theirs", "script": str(examples / SCRIPTS[method]),
                                "argv": case.theirs_argv(out), "cwd": str(case.dir)}
                        python = args.theirs_python
                    spec.update(threads=threads, device=args.device)
                    log(f"{size}/{method} {side} #{repeat + 1} ({steps} steps at {resolution}px)")
                    raw = spawn(spec, python, env, case.dir / f"{side}-{repeat}.log")
                    summary = summarize(raw, warmup, artifact)
                    if side == "theirs" and method == "lora" and out.is_dir():
                        summary["artifact_bytes"] = folder_bytes(out / "pytorch_lora_weights.safetensors")
                    if cell.get("unet_flops_per_step") and "seconds_per_step" in summary:
                        achieved = cell["unet_flops_per_step"] / summary["seconds_per_step"] / 1e12
                        summary["unet_tflops"] = achieved
                        if gpu_peak and gpu_peak[0]:
                            summary["unet_mfu"] = achieved / gpu_peak[0]
                    cell[side].append(summary)
                    log("  " + (summary["error"] if "error" in summary else
                                f"{summary['seconds_per_step']:.4f} s/step, start-up "
                                f"{summary['startup_seconds']:.1f} s, peak RSS {summary['peak_rss_training_mb']:.0f}"
                                f" MB"))
                    if side == "theirs":
                        shutil.rmtree(out, ignore_errors=True)  # a DreamBooth pipeline folder is GBs
                    elif artifact.exists():
                        artifact.unlink()
            finish_cell(cell)
            write_results(report, out_dir, started)
    report["load_average_after"] = load_average()
    write_results(report, out_dir, started)
    print((out_dir / "speed.md").read_text())
    return 0


def examples_problem(examples: Path, python: str, methods: list[str]) -> str | None:
    """Why diffusers' example scripts for ``methods`` cannot run from ``examples`` with ``python``; None if they can."""
    missing = sorted(set(SCRIPTS[m] for m in methods if not (examples / SCRIPTS[m]).is_file()))
    if missing:
        return f"--examples-dir {examples} lacks {missing}"
    probe = subprocess.run([python, "-c", "import torchvision.transforms, accelerate"], capture_output=True, text=True)
    if probe.returncode != 0:
        return (f"{python} cannot import torchvision/accelerate, which the example scripts need; pass "
                f"--theirs-python: {probe.stderr.strip()[-300:]}")
    return None


def resolutions_for(args, size: str, method: str) -> tuple[int, ...]:
    if args.resolutions:
        return tuple(int(r) for r in args.resolutions.split(",") if r)
    if args.device == "cpu" and size == "full" and method.startswith("dreambooth"):
        return DEFAULT_RESOLUTIONS_DREAMBOOTH_CPU_FULL
    return DEFAULT_RESOLUTIONS[(args.device, size)]


def prepare_class_images(case: Case, env: dict) -> None:
    """Prior preservation's class images: ours generates and caches them (1 sampler step: only their count and
    size matter here) in a 1-step run that is not measured; theirs gets a copy of the same PNGs."""
    if len(list(case.class_dir.glob("*.png"))) >= CLASS_IMAGES:
        return
    log(f"{case.size}: generating {CLASS_IMAGES} class images (not measured)")
    out = case.dir / "class-warmup.safetensors"
    spec = {"kind": "ours", "argv": case.ours_argv(out, steps=1), "threads": 0, "device": case.device}
    raw = spawn(spec, sys.executable, env, case.dir / "class-warmup.log")
    if raw.get("error"):
        raise SystemExit(f"class-image warm-up failed: {raw['error']}")
    pngs = sorted(case.class_cache.rglob("0*.png"))[:CLASS_IMAGES]
    case.class_dir.mkdir(parents=True, exist_ok=True)
    for png in pngs:
        shutil.copy(png, case.class_dir / png.name)
    if out.exists():
        out.unlink()


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None and "error" not in r]
    return statistics.median(values) if values else None


def finish_cell(cell: dict) -> None:
    keys = ("seconds_per_step", "startup_seconds", "peak_rss_training_mb", "peak_rss_process_mb", "artifact_bytes",
            "cuda_peak_training_mb", "unet_tflops", "unet_mfu")
    for side in ("ours", "theirs"):
        if cell[side]:
            cell[f"{side}_median"] = {k: _median(cell[side], k) for k in keys if _median(cell[side], k) is not None}
    if cell.get("theirs_median") and cell.get("ours_median"):
        ours, theirs = cell["ours_median"], cell["theirs_median"]
        cell["ratio"] = {k: ours[k] / theirs[k] for k in keys if ours.get(k) and theirs.get(k)}
        pairs = [(a, b) for a, b in zip(cell["ours"], cell["theirs"]) if "error" not in a and "error" not in b]
        cell["ratio_per_pair"] = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in pairs]


TARGETS = {"lora": 0.7, "embedding": 0.7, "dreambooth": 0.8, "dreambooth-prior": 0.8}


def format_cell(value, kind: str = "") -> str:
    """A table cell of the benchmark reports (this one and gpu_check's): seconds, MB, bytes, ratios, shares."""
    if value is None:
        return "–"
    if kind == "s":
        return f"{value:.4f}" if value < 1 else f"{value:.2f}"
    if kind == "mb":
        return f"{value:,.0f}"
    if kind == "bytes":
        return f"{value / 2**20:,.2f} MB" if value >= 2**20 else f"{value / 2**10:,.1f} KB"
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "%":
        return f"{value:.0%}"
    if kind == "f1":
        return f"{value:.1f}"
    if kind == "g3":
        return f"{value:.3g}"
    return str(value)


def write_results(report: dict, out_dir: Path, started: float) -> None:
    report["bench_seconds"] = round(time.time() - started, 1)
    write_atomically(out_dir / "speed.json", json.dumps(report, indent=1))
    m = report["machine"]
    lines = [f"# Training speed ({report['mode']})", "",
             f"{report['date']} · {m['cpu']} · {m['cores']} cores, {m['memory_gb']} GB · device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "") + f" · **{m['threads']} torch thread(s)** · "
             f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, peft {m['peft']} · "
             f"precision {report['precision']} · load average before {report['load_average_before']}"
             + (f", after {report['load_average_after']}" if report.get("load_average_after") else ""), "",
             f"Command: `{report['command']}` ({report['bench_seconds']:.0f} s)"
             + "".join(f"; cells kept from `{c}`" for c in report.get("earlier_commands", []) if c), ""]
    if report.get("examples_commit"):
        lines += [f"Theirs: diffusers examples at commit {report['examples_commit']}, run unchanged.", ""]
    side_by_side = report["mode"] == "side-by-side"
    header = ["model", "method", "px", "steps", "ours s/step", "ours start-up s", "ours peak RSS MB",
              "ours artifact"]
    if report["machine"]["device"] == "cuda":
        header += ["ours CUDA peak MB", "ours UNet TFLOP/s", "ours MFU"]
    if side_by_side:
        header += ["theirs s/step", "theirs start-up s", "theirs peak RSS MB", "theirs artifact",
                   "**s/step ours/theirs**", "per A/B pair", "target", "peak RSS ours/theirs"]
    header += ["measured (1-min load)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {name: i for i, name in enumerate(SIZES + METHODS)}
    for cell in sorted(report["cells"], key=lambda c: (order[c["size"]], order[c["method"]], c["resolution"])):
        row = [cell["size"], cell["method"], str(cell["resolution"]), f"{cell['steps']} ({cell['warmup']} warm-up)"]
        if cell.get("skipped"):
            lines.append("| " + " | ".join(row + [cell["skipped"]] + [""] * (len(header) - 5)) + " |")
            continue
        ours = cell.get("ours_median", {})
        errors = [r["error"].splitlines()[0][:120] for side in ("ours", "theirs") for r in cell[side] if "error" in r]
        row += [format_cell(ours.get("seconds_per_step"), "s"), format_cell(ours.get("startup_seconds"), "s"),
                format_cell(ours.get("peak_rss_training_mb"), "mb"), format_cell(ours.get("artifact_bytes"), "bytes")]
        if report["machine"]["device"] == "cuda":
            row += [format_cell(ours.get("cuda_peak_training_mb"), "mb"),
                    f"{ours['unet_tflops']:.1f}" if ours.get("unet_tflops") else "–",
                    f"{ours['unet_mfu']:.0%}" if ours.get("unet_mfu") else "–"]
        if side_by_side:
            theirs, ratio = cell.get("theirs_median", {}), cell.get("ratio", {})
            target = TARGETS[cell["method"]]
            speed = ratio.get("seconds_per_step")
            mark = "" if speed is None else (" ✓" if speed <= target else " ✗")
            rss = ratio.get("peak_rss_training_mb")
            row += [format_cell(theirs.get("seconds_per_step"), "s"), format_cell(theirs.get("startup_seconds"), "s"),
                    format_cell(theirs.get("peak_rss_training_mb"), "mb"),
                    format_cell(theirs.get("artifact_bytes"), "bytes"),
                    f"**{format_cell(speed, 'x')}**{mark}",
                    ", ".join(f"{r:.2f}" for r in cell.get("ratio_per_pair", [])) or "–", f"≤ {target}×",
                    format_cell(rss, "x") + ("" if rss is None else (" ✓" if rss <= 1.0 else " ✗"))]
        row.append(f"{cell['measured_at'][11:16]} ({cell['load_average'][0]})" if cell.get('measured_at') else "–")
        lines.append("| " + " | ".join(row) + " |")
        for error in errors:
            lines.append(f"| | ↳ error: {error} |" + " |" * (len(header) - 2))
    lines += ["", "s/step: median time between consecutive optimizer steps after the warm-up (start-up excluded). "
              "Start-up: spawn to the start of the first step. Peak RSS: the process's high-water mark at the "
              "last optimizer step (both sides load the same fp32 model). Every run is a fresh process; ours and "
              "theirs alternate (A/B/A/B)."]
    if report["machine"]["device"] == "cpu":
        lines += ["", "GPU: not run here (no CUDA device). `python -m bench.speed --device cuda` measures 512 px, "
                  "CUDA peak memory, it/s and UNet TFLOP/s on a GPU."]
    write_atomically(out_dir / "speed.md", "\n".join(lines) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """A reader (or a run cut short) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
