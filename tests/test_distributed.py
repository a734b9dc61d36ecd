"""Data-parallel training under accelerate launch, and train-many.

The equivalence test launches ``accelerate launch --multi_gpu --num_processes 2 -m comfyui_personalize train-many``
on the CPU (gloo; torchrun starts the processes, so no GPU is needed) with batch 1 per process, and compares every
artifact with one process at batch 2 from the same manifest: the same images, noise and timesteps are drawn, and
DDP's average over processes equals the batch's average over samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_subject_images, pack

PRIOR = {"class_prompt": "a photo of a toy", "class_images": 2, "class_sampler_steps": 2}
ROWS = [
    # Prior preservation and text-encoder LoRA (class rows in the batch, a second trained module under DDP), with
    # gradient accumulation (DDP syncs on the last micro-batch only) and min-SNR weights.
    {"name": "toy-lora", "method": "lora", "images": "photos", "prompt": "a photo of sks toy", "steps": 3,
     "resolution": 64, "rank": 2, "lr": 1e-3, "train_text_encoder": True, "gradient_accumulation": 2,
     "min_snr_gamma": 5, "save_precision": "fp32", "seed": 3, **PRIOR},
    # The token vectors live in a Parameter spliced into the text encoder.
    {"name": "toy-ti", "method": "embedding", "images": "photos", "token": "<toy>", "init_word": "toy", "steps": 4,
     "resolution": 64, "vectors": 2, "seed": 3},
    {"name": "broken", "method": "lora", "images": "no-such-folder", "steps": 4, "resolution": 64},
    # Every weight with prior preservation and gradient checkpointing; the text encoder stops training after step 2
    # (DDP is rewrapped around what still trains). An fp32 file, so that the comparison is exact.
    {"name": "toy-db", "method": "dreambooth", "images": "photos", "steps": 3, "resolution": 64, "lr": 1e-4,
     "fused_backward": False, "save_precision": "fp32", "train_text_encoder": True, "text_encoder_steps": 2,
     "seed": 3, **PRIOR},
]


def write_manifest(folder, batch_size: int):
    photos = folder / "photos"
    photos.mkdir(exist_ok=True)
    for i, image in enumerate(make_subject_images(3)):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(photos / f"{i}.png")
    path = folder / f"manifest-batch{batch_size}.json"
    path.write_text(json.dumps([dict(row, batch_size=batch_size) for row in ROWS]))
    return path


def train_many_argv(manifest, model, out, cache):
    return ["train-many", str(manifest), "--base", model["single_file"], "--out", str(out), "--device", "cpu",
            "--class-cache", str(cache)]


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The manifest at batch 2 in this process, as a plain ``python -m comfyui_personalize`` run trains it."""
    folder = tmp_path_factory.mktemp("many")
    manifest = write_manifest(folder, batch_size=2)
    argv = train_many_argv(manifest, tiny_model, folder / "out", folder / "class")
    code = pack("cli").main(argv)
    return {"folder": folder, "manifest": manifest, "argv": argv, "code": code, "out": folder / "out"}


def test_a_bad_row_is_reported_and_the_others_are_written(one_process, capsys):
    assert one_process["code"] == 2, "a failed row makes the command fail"
    summary = json.loads((one_process["out"] / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["trained", "trained", "failed", "trained"]
    assert "no-such-folder" in summary[2]["error"] and "file" not in summary[2]
    for row in (summary[0], summary[1], summary[3]):
        assert load_file(row["file"]), row
        assert row["final_loss"] > 0 and row["steps"] == next(r["steps"] for r in ROWS if r["name"] == row["name"])
    table = (one_process["out"] / "summary.md").read_text()
    assert "| broken | lora | failed |" in table and "toy-db.safetensors" in table

    # Run again: trained rows are found by their fingerprint and reused, not trained again.
    stamps = {r["name"]: os.stat(r["file"]).st_mtime_ns for r in summary if "file" in r}
    assert pack("cli").main(one_process["argv"]) == 2
    again = json.loads((one_process["out"] / "summary.json").read_text())
    assert [r["status"] for r in again] == ["reused", "reused", "failed", "reused"]
    assert all(os.stat(r["file"]).st_mtime_ns == stamps[r["name"]] for r in again if "file" in r)
    assert "1 of 4 rows failed" in capsys.readouterr().err


def test_two_processes_at_batch_1_train_what_one_process_at_batch_2_does(one_process, tiny_model, tmp_path):
    manifest = write_manifest(one_process["folder"], batch_size=1)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "comfyui_personalize",
              *train_many_argv(manifest, tiny_model, out, one_process["folder"] / "class")]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode != 0 and "1 of 4 rows failed" in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("| toy-db |") == 1, "only the main process prints the summary"
    launched = {r["name"]: r for r in json.loads((out / "summary.json").read_text())}
    single = {r["name"]: r for r in json.loads((one_process["out"] / "summary.json").read_text())}
    assert launched["broken"]["status"] == "failed"
    base = load_file(tiny_model["single_file"])
    for name in ("toy-lora", "toy-ti", "toy-db"):
        # The logged loss is the global batch's on both sides.
        assert launched[name]["final_loss"] == pytest.approx(single[name]["final_loss"], abs=1e-5)
        one, two = load_file(single[name]["file"]), load_file(launched[name]["file"])
        assert one.keys() == two.keys()
        difference = max((one[k] - two[k]).abs().max().item() for k in one)
        if name != "toy-db":
            # Measured: LoRA 1.4e-6, embedding 5.5e-8 (without gradient sync: 5.9e-3 and 2.1e-2).
            assert difference < 1e-5 if name == "toy-ti" else difference < 1e-4, (name, difference)
            continue
        # Biases that feed a GroupNorm have a true gradient of zero, and Adam scales the rounding noise of fp32
        # to lr-sized steps: compare the whole update, not its worst element. Measured: 1.2e-3 of the update's
        # length, 0.2% of weights off by more than 1e-6 (without gradient sync: 0.83 and 64%).
        moved = torch.sqrt(sum(((one[k] - base[k]) ** 2).sum() for k in one))
        apart = torch.sqrt(sum(((one[k] - two[k]) ** 2).sum() for k in one))
        off = sum(((one[k] - two[k]).abs() > 1e-6).sum().item() for k in one) / sum(t.numel() for t in one.values())
        assert moved > 0 and apart / moved < 1e-2 and off < 0.01, (apart / moved, off, difference)


def test_manifest_rows_are_checked_before_anything_loads(tmp_path):
    many = pack("cli.many")
    errors = pack("trainers.errors")
    (tmp_path / "m.csv").write_text("name,method,images,steps,flip,lr,base\n"
                                    "a,lora,photos,12,yes,,\n"
                                    "b,embedding,photos,,,0.01,other.safetensors\n")
    first, second = many.read_manifest(tmp_path / "m.csv")
    row = many.parse_row(first, tmp_path, "base.safetensors")
    assert (row.config.steps, row.config.flip, row.config.lr) == (12, True, 1e-4)  # empty cell: the default
    assert row.images == tmp_path / "photos" and str(row.base) == "base.safetensors"
    other = many.parse_row(second, tmp_path, "base.safetensors")
    assert other.config.lr == 0.01 and other.base == tmp_path / "other.safetensors"
    for bad, message in (({"method": "lora", "images": "x"}, "no name"),
                         ({"name": "a", "method": "lora-x", "images": "x"}, "method must be one of"),
                         ({"name": "a", "method": "embedding", "images": "x", "prompt": "p"}, "prompt: not an option"),
                         ({"name": "a", "method": "lora", "images": "x", "steps": "many"}, "steps must be of type int"),
                         ({"name": "a", "method": "lora", "images": "x", "steps": 0}, "steps must be at least 1")):
        with pytest.raises(errors.PersonalizeError, match=message):
            many.parse_row(bad, tmp_path, "base.safetensors")


def test_dreambooth_fused_backward_is_turned_off_only_under_the_launcher(monkeypatch):
    distributed = pack("trainers.distributed")
    config = pack("trainers.methods.dreambooth").DreamBoothConfig()
    assert distributed.launcher_config(config) is config and config.fused_backward
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launcher_config(config).fused_backward is False


def test_checkpoints_resume_and_validation_are_refused_under_the_launcher(monkeypatch):
    distributed = pack("trainers.distributed")
    errors = pack("trainers.errors")
    lora = pack("trainers.methods.lora")
    distributed.refuse_state_under_launcher(lora.LoRAConfig(save_every=5), resume=True)  # one process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.refuse_state_under_launcher(lora.LoRAConfig(), resume=False)
    for config, resume in ((lora.LoRAConfig(save_every=5), False), (lora.LoRAConfig(validate_every=5), False),
                           (lora.LoRAConfig(), True)):
        with pytest.raises(errors.PersonalizeError, match="not supported under accelerate launch"):
            distributed.refuse_state_under_launcher(config, resume)
