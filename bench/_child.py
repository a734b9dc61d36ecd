"""One measured training run, in its own process (peak RSS is per process). Started by ``bench/speed.py`` and
``bench/gpu_check.py``; not a module to import.

    python bench/_child.py '<spec json>'

The spec names what to run: ``{"kind": "ours", "argv": [...]}`` runs ``python -m comfyui_personalize <argv>`` in this
process (through the package's ``__main__``, wherever the CLI lives); ``{"kind": "theirs", "script": path, "argv":
[...]}`` runs a diffusers example script as ``__main__`` (its file is read and run unchanged). Both are timed the
same way, by a global optimizer step hook (a public torch API,
``torch.optim.optimizer.register_optimizer_step_post_hook``): the time between consecutive optimizer steps is one
training step, whatever the trainer does in it (data loading, encoding, logging); the hook also records which
optimizer classes stepped. Start-up is the wall time from the parent's spawn to the start of the first step. Memory
left behind: on CUDA ``torch.cuda.memory_allocated`` before the run and after it (garbage collected, caches
emptied); on CPU the bytes of the tensors still alive, found by the garbage collector. The last stdout line is a
JSON object (``BENCH_RESULT {...}``).
"""

import time

_WALL0 = time.time()

import contextlib  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_parts_mb() -> dict:
    """Current resident memory split into private (anonymous) and file-backed pages (Linux; {} elsewhere).
    Safetensors weights are file mappings: pages count in RSS once touched, and as private memory once written."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if line.startswith(("RssAnon", "RssFile", "VmRSS")))
    except OSError:
        return {}
    return {key: int(value.split()[0]) / 1024.0 for key, value in fields.items()}


def _live_tensor_bytes() -> int:
    """Bytes of the distinct CPU tensor storages still reachable in this process (every tensor is gc-tracked)."""
    import torch

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some lazy deprecated objects warn about.
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _memory_in_use(cuda: bool) -> int:
    import torch

    gc.collect()
    if not cuda:
        return _live_tensor_bytes()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # cuBLAS keeps a workspace per (thread, stream) in the caching allocator until told to drop it.
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    return torch.cuda.memory_allocated()


def main() -> int:
    spec = json.loads(sys.argv[1])
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    threads = int(spec.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = spec.get("device") == "cuda"
    marks: list[tuple[float, float]] = []  # (perf_counter, wall) after each optimizer step
    state: dict = {"rss_at_last_step_mb": 0.0, "cuda_peak_at_last_step_mb": 0.0, "anon_max_mb": 0.0, "parts": {},
                   "optimizers": set()}

    def after_step(optimizer, args, kwargs) -> None:
        # accelerate wraps the real optimizer; count only the inner (torch) one, so that a step counts once.
        if type(optimizer).__name__ == "AcceleratedOptimizer":
            return
        state["optimizers"].add(type(optimizer).__name__)
        # Ours with fused_backward: one optimizer per weight steps inside the backward pass; the step is the
        # group optimizer's (trainers/optim.py, fuse_optimizer_into_backward).
        if getattr(optimizer, "fused_backward_part", False):
            return
        if cuda:
            torch.cuda.synchronize()
            state["cuda_peak_at_last_step_mb"] = torch.cuda.max_memory_allocated() / 2**20
        marks.append((time.perf_counter(), time.time()))
        state["rss_at_last_step_mb"] = _rss_peak_mb()
        state["parts"] = _rss_parts_mb()
        state["anon_max_mb"] = max(state["anon_max_mb"], state["parts"].get("RssAnon", 0.0))

    register_optimizer_step_post_hook(after_step)
    if cuda:
        torch.cuda.init()
    memory_before = _memory_in_use(cuda)

    error = None
    ours_json = None
    if spec["kind"] == "ours":
        captured = io.StringIO()
        sys.argv = ["comfyui_personalize"] + list(spec["argv"]) + ["--json"]
        with contextlib.redirect_stdout(captured):
            try:
                runpy.run_module("comfyui_personalize", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exit_:  # __main__ exits with the CLI's status; argparse exits too
                code = exit_.code or 0
        out = captured.getvalue().strip().splitlines()
        if code != 0:
            error = f"exit {code}: {' | '.join(out[-5:])}"
        elif out:
            ours_json = json.loads(out[-1])
    else:
        script = spec["script"]
        sys.argv = [script] + list(spec["argv"])
        sys.path.insert(0, os.path.dirname(script))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                error = f"exit {exit_.code}"
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
            import traceback

            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"

    memory_after = _memory_in_use(cuda)
    intervals = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    result = {
        "error": error,
        "steps_seen": len(marks),
        "step_intervals": intervals,
        "first_step_end_wall": marks[0][1] if marks else None,
        "last_step_end_wall": marks[-1][1] if marks else None,
        "child_start_wall": _WALL0,
        "end_wall": time.time(),
        "rss_at_last_step_mb": state["rss_at_last_step_mb"],
        "rss_process_peak_mb": _rss_peak_mb(),
        "rss_parts_at_last_step_mb": state["parts"],
        "anon_max_at_steps_mb": state["anon_max_mb"],
        "cuda_peak_at_last_step_mb": state["cuda_peak_at_last_step_mb"],
        "cuda_process_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "cuda_reserved_peak_mb": torch.cuda.max_memory_reserved() / 2**20 if cuda else 0.0,
        "memory_before_run_bytes": memory_before,
        "memory_after_run_bytes": memory_after,
        "memory_measure": "torch.cuda.memory_allocated" if cuda else "live CPU tensors",
        "optimizers": sorted(state["optimizers"]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ours": ours_json,
    }
    sys.stdout.flush()
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
