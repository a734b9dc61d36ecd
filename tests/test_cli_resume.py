"""The CLI face of checkpoints, resume and validation: the --json table, SIGTERM saving the state, --resume, and a
kill -9 during saving leaving only complete files."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack
from test_resume import complete_files, tensors

cli = pack("cli")
state = pack("trainers.state")


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    photos = root / "photos"
    photos.mkdir()
    for i, image in enumerate(pack("trainers.testing.synthetic").subject_photos(4, 64, 0)):
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(photos / f"{i}.png")
    dino = pack("trainers.testing.dino").make_random_dino(root / "dino")
    return {"base": tiny_model["single_file"], "photos": str(photos), "dino": str(dino)}


def command(inputs, out, *extra):
    return ["train-lora", "--base", inputs["base"], "--images", inputs["photos"], "--out", str(out),
            "--resolution", "64", "--lr", "1e-3", "--rank", "4", "--device", "cpu", "--json", *extra]


def run_cli(argv, capsys):
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_json_has_the_validation_table_and_the_chosen_step(inputs, tmp_path, capsys):
    result, err = run_cli(command(inputs, tmp_path / "x.safetensors", "--steps", "4", "--validate-every", "2",
                                  "--validation-images", "2", "--validation-sampler-steps", "3", "--dino-model",
                                  inputs["dino"]), capsys)
    assert [r["step"] for r in result["validation"]] == [2, 4]
    assert result["best_step"] in (2, 4) and "highest DINO" in result["selection"]
    assert result["validation_seconds"] > 0 and result["training_seconds"] > 0
    assert "validation:" in err and "dino" in err and "result: step" in err
    assert (tmp_path / "x.validation.png").is_file() and result["validation_grid"].endswith("x.validation.png")


def start(inputs, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "comfyui_personalize", *command(inputs, out, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for(condition, process, seconds=300):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_saves_the_state_and_resume_continues_to_the_same_result(inputs, tmp_path, capsys):
    out = tmp_path / "t" / "x.safetensors"
    process = start(inputs, out, "--steps", "40", "--save-every", "3")
    wait_for(lambda: state.latest_save(state.state_folder(out)) is not None, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "--resume continues it" in err and not out.exists()
    stopped_at = state.read_info(state.latest_save(state.state_folder(out)))["step"]
    assert 3 <= stopped_at < 40
    resumed, _ = run_cli(command(inputs, out, "--steps", "40", "--resume"), capsys)
    assert resumed["resumed_from"] == stopped_at
    whole, _ = run_cli(command(inputs, tmp_path / "w" / "x.safetensors", "--steps", "40"), capsys)
    expected, got = tensors(whole["output"]), tensors(resumed["output"])
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_kill_while_saving_leaves_only_complete_files(inputs, tmp_path):
    out = tmp_path / "k" / "x.safetensors"
    process = start(inputs, out, "--steps", "200", "--save-every", "1", "--keep-last", "2")
    wait_for(lambda: state.latest_save(state.state_folder(out)) is not None and
             int(state.latest_save(state.state_folder(out)).name.split("-")[1]) >= 3, process)
    process.kill()
    process.communicate()
    complete_files(out.parent)
    assert len(list(out.parent.glob("x-step*.safetensors"))) <= 3  # keep_last 2, and perhaps one being replaced
