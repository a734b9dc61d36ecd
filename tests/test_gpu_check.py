"""``bench/gpu_check.py --dry-run``: the GPU check's every code path, on the CPU with the tiny model at 64 px.

The dry run is the real script run as a subprocess (its children drive the pack through ``python -m
comfyui_personalize``); the rows that need CUDA, SDXL or diffusers' example scripts are skipped with their reason.
The checks it makes (loss against a frozen run, memory back to baseline) are also fed cases that must fail.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, pack

gpu_check = pack("bench.gpu_check")
SCRIPT = REPO / "bench" / "gpu_check.py"
RESULTS = REPO / "bench" / "results"
MUST_RUN_ON_CPU = ("sd15-lora-gc-on", "sd15-lora-gc-off", "sd15-embedding-frozen", "sd15-embedding",
                   "sd15-dreambooth-adamw")
TRAINED = {"lora": "sd15-lora-gc-off", "embedding": "sd15-embedding", "dreambooth": "sd15-dreambooth-adamw"}


def _results_state() -> dict:
    return {name: (RESULTS / name).stat().st_mtime_ns if (RESULTS / name).exists() else None
            for name in ("gpu.json", "gpu.md")}


def _run(work, out, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFUSERS_EXAMPLES_DIR", "DIFFUSERS_EXAMPLES_PYTHON")}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--work", str(work), "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-check")
    before = _results_state()
    done = _run(root / "work", root / "out")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _results_state() == before, "the dry run touched bench/results"
    report = json.loads((root / "out" / "gpu.json").read_text())
    return {"root": root, "report": report, "rows": {row["id"]: row for row in report["rows"]},
            "markdown": (root / "out" / "gpu.md").read_text(encoding="utf-8")}


def test_every_row_ran_or_says_why_not(dry_run):
    report, rows = dry_run["report"], dry_run["rows"]
    assert report["dry_run"] and report["finished"]
    assert list(rows) == [row.id for row in gpu_check.ROWS]
    for row_id in MUST_RUN_ON_CPU:
        assert rows[row_id]["status"] == "ok", rows[row_id]
    for row_id in ("sd15-dreambooth-adamw8bit", "sd15-dreambooth-bf16-weights"):
        assert rows[row_id]["status"] == "skipped" and "CUDA" in rows[row_id]["reason"]
    for row_id in ("theirs-sd15-lora-gc-off", "theirs-sd15-embedding", "theirs-sd15-dreambooth-adamw"):
        assert rows[row_id]["status"] == "skipped" and "DIFFUSERS_EXAMPLES_DIR" in rows[row_id]["reason"]
    sdxl = rows["sdxl-lora"]
    assert sdxl["status"] == "ok" or (sdxl["status"] == "skipped" and "SDXL" in sdxl["reason"]), sdxl


def test_measured_rows_have_their_figures_and_pass_their_checks(dry_run):
    for row_id in MUST_RUN_ON_CPU:
        row = dry_run["rows"][row_id]
        assert row["seconds_per_step"] > 0 and row["it_per_s"] == pytest.approx(1 / row["seconds_per_step"])
        assert row["unet_tflops"] > 0 and row["optimizers"] == ["AdamW"]
        assert len(row["losses"]) == gpu_check.STEPS
        checks = row["checks"]
        assert checks["loads_back"]["passed"], checks["loads_back"]
        memory = checks["memory_back_to_baseline"]
        assert memory["passed"] and memory["after_bytes"] - memory["before_bytes"] <= memory["tolerance_bytes"]


def test_each_method_lowers_its_loss_against_the_frozen_run(dry_run):
    rows = dry_run["rows"]
    for method, row_id in TRAINED.items():
        check = rows[row_id]["checks"]["loss_falls"]
        assert check["passed"], (method, check)
        # Same seed, same draws: on the CPU the first step (before any update) matches the frozen run exactly.
        assert check["ratio_step_1"] == 1.0 and check["fall"] > 0
        reference = rows[check["reference"]]
        assert reference["lr"] == 0.0 and reference["method"] in (method, "lora")
    assert rows["sd15-dreambooth-adamw"]["checks"]["loss_falls"]["fall"] > 0.01  # a full fine-tune moves most


def test_markdown_agrees_with_the_json(dry_run):
    lines = dry_run["markdown"].splitlines()
    assert lines[0].startswith("# GPU check") and "dry run" in lines[0]
    table = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    for row in dry_run["report"]["rows"]:
        assert table[row["id"]] == "| " + " | ".join(gpu_check.markdown_row(row)) + " |"
    measured = dry_run["rows"]["sd15-lora-gc-off"]
    assert f"{measured['seconds_per_step']:.4f}" in table["sd15-lora-gc-off"]
    assert "skipped: 8-bit AdamW" in table["sd15-dreambooth-adamw8bit"]


def test_a_gpu_report_renders_its_cuda_figures_and_the_ratios_to_diffusers(dry_run):
    """The GPU-only parts of gpu.md (VRAM, TFLOP/s, share of peak, ours/theirs), from the dry run's report with
    figures a GPU run would add."""
    report = copy.deepcopy(dry_run["report"])
    report.update(dry_run=False, machine=dict(report["machine"], gpu="NVIDIA H200"),
                  gpu_peak_tflops={"value": 989.0, "source": "table (H200, dense bf16/fp16)"})
    rows = {row["id"]: row for row in report["rows"]}
    ours, theirs = rows["sd15-lora-gc-off"], rows["theirs-sd15-lora-gc-off"]
    ours.update(cuda_peak_mb=5123.4, cuda_reserved_peak_mb=6000.0, unet_tflops=247.25, unet_mfu=247.25 / 989.0)
    theirs.update(status="ok", reason=None, seconds_per_step=2 * ours["seconds_per_step"], cuda_peak_mb=10246.8)
    theirs["ratios"] = gpu_check.Check.ratios(theirs, ours)
    assert theirs["ratios"] == {"ours": "sd15-lora-gc-off", "seconds_per_step": 0.5, "cuda_peak": 0.5}
    markdown = gpu_check.render_markdown(report)
    assert "dry run" not in markdown.splitlines()[0] and "NVIDIA H200" in markdown and "peak 989 TFLOP/s" in markdown
    assert "| sd15-lora-gc-off | theirs-sd15-lora-gc-off | 0.50× | 0.50× |" in markdown
    line = next(line for line in markdown.splitlines() if line.startswith("| sd15-lora-gc-off |"))
    assert "| 5,123 | 6,000 | 247 | 25% |" in line


def test_rows_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    def check(*argv):
        parsed = gpu_check.parse_args(["--dry-run", "--work", str(tmp_path), *argv])
        return gpu_check.Check(parsed)

    lora = next(row for row in gpu_check.ROWS if row.id == "sd15-lora-gc-off")
    assert check("--budget-seconds", "600").skip_reason(lora) is None
    assert check("--budget-seconds", "1").skip_reason(lora).startswith("budget: needs about 15 s")
    measured = check("--budget-seconds", "600")
    measured.seconds_by_kind[("ours", "sd15", "lora")] = 900.0  # the last LoRA row took that long
    assert measured.skip_reason(lora) == "budget: needs about 900 s, 600 s left"
    measured.unavailable["sdxl"] = "SDXL family not available in this version"
    sdxl = next(row for row in gpu_check.ROWS if row.id == "sdxl-lora")
    assert measured.skip_reason(sdxl) == "SDXL family not available in this version"


def test_the_dry_run_refuses_to_write_bench_results():
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--out", str(RESULTS)])
    assert exit_.value.code == 2


def test_the_loss_check_fails_when_the_loss_does_not_fall_or_the_draws_differ():
    reference = [1.2, 1.06, 1.14, 0.96, 0.96, 1.11, 0.84, 1.09, 0.99, 0.88, 1.11, 1.15, 1.04, 1.23, 1.06, 1.0, 1.04,
                 1.2, 1.2, 0.92]
    falling = [loss * (1 - 0.005 * step) for step, loss in enumerate(reference)]
    assert gpu_check.loss_check(falling, reference, "frozen")["passed"]
    assert not gpu_check.loss_check(list(reference), reference, "frozen")["passed"]  # a trainer that learns nothing
    rising = [loss * (1 + 0.005 * step) for step, loss in enumerate(reference)]
    assert not gpu_check.loss_check(rising, reference, "frozen")["passed"]
    other_draws = gpu_check.loss_check(falling[1:] + falling[:1], reference, "frozen")
    assert not other_draws["passed"] and "did not draw the same" in other_draws["detail"]
    # A fall smaller than the first step's mismatch (numerical noise) is not a fall.
    noisy = [loss * 1.002 * (1 - 0.0001 * step) for step, loss in enumerate(reference)]
    assert not gpu_check.loss_check(noisy, reference, "frozen")["passed"]
    assert gpu_check.loss_check(falling, None, "frozen")["passed"] is None


def test_the_memory_check_fails_when_memory_is_left_behind():
    raw = {"memory_before_run_bytes": 1000, "memory_after_run_bytes": 1000 + 2**20, "memory_measure": "test"}
    assert not gpu_check.memory_check(raw, weight_bytes=10 * 2**20, cuda=False)["passed"]
    assert gpu_check.memory_check(raw, weight_bytes=200 * 2**20, cuda=False)["passed"]
    assert gpu_check.memory_check(raw, weight_bytes=10 * 2**20, cuda=True)["passed"]  # within the workspace margin
