"""One measured training run, in its own process (peak RSS is per process). Started by ``bench/speed.py``; not a
module to import.

    python bench/_child.py '<spec json>'

The spec names what to run: ``{"kind": "ours", "argv": [...]}`` runs ``python -m comfyui_personalize <argv>`` in this
process; ``{"kind": "theirs", "script": path, "argv": [...]}`` runs a diffusers example script as ``__main__`` (its
file is read and run unchanged). Both are timed the same way, by a global optimizer step hook (a public torch API,
``torch.optim.optimizer.register_optimizer_step_post_hook``): the time between consecutive optimizer steps is one
training step, whatever the trainer does in it (data loading, encoding, logging). Start-up is the wall time from
the parent's spawn to the start of the first step. The last stdout line is a JSON object (``BENCH_RESULT {...}``).
"""

import time

_WALL0 = time.time()

import contextlib  # noqa: E402
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


def main() -> int:
    spec = json.loads(sys.argv[1])
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    threads = int(spec.get("threads") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    cuda = spec.get("device") == "cuda"
    marks: list[tuple[float, float]] = []  # (perf_counter, wall) after each optimizer step
    state: dict = {"rss_at_last_step_mb": 0.0, "cuda_peak_at_last_step_mb": 0.0, "anon_max_mb": 0.0, "parts": {}}

    def after_step(optimizer, args, kwargs) -> None:
        # accelerate wraps the real optimizer; count only the inner (torch) one, so that a step counts once.
        if type(optimizer).__name__ == "AcceleratedOptimizer":
            return
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

    error = None
    ours_json = None
    if spec["kind"] == "ours":
        from comfyui_personalize.cli import main as cli_main

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            try:
                code = cli_main(list(spec["argv"]) + ["--json"])
            except SystemExit as exit_:  # argparse
                code = exit_.code
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
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ours": ours_json,
    }
    sys.stdout.flush()
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
