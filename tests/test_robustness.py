"""The pieces behind the bad-input suite (tests/test_bad_inputs.py), checked on their own: the divergence guard and
its off switch, the output lock, the cleanup of a killed run's temporary files, portable names, the one image
decoder, and the base-model checks."""

from __future__ import annotations

import math
import os
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack

errors = pack("trainers.errors")
files = pack("trainers.files")
divergence = pack("trainers.divergence")
loop = pack("trainers.loop")
lora = pack("trainers.methods.lora")
run = pack("trainers.run")
data = pack("trainers.data")
metrics = pack("trainers.metrics")
preflight = pack("trainers.preflight")
families_clip = pack("trainers.families.clip")


# ---------------------------------------------------------------------------------------------------- divergence


def test_divergence_needs_a_sustained_climb_not_one_spike():
    steady = [1.0, 0.2, 1.5, 0.1, 0.9] * 4
    divergence.check_divergence(steady, 1e-4)  # noisy but level
    divergence.check_divergence(steady[:-4] + [500.0] * 4, 1e-4)  # spikes, but not most of a window
    with pytest.raises(errors.PersonalizeError, match="diverged.*lr is 0.5.*stop_on_divergence"):
        divergence.check_divergence(steady[:14] + [30.0] * 6, 0.5)
    divergence.check_divergence([1.0] * 5 + [1000.0] * 14, 0.5)  # too short to judge


def _exploding(monkeypatch):
    real = loop.per_sample_loss
    calls = []

    def per_sample_loss(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * 2.0 ** len(calls)
    monkeypatch.setattr(loop, "per_sample_loss", per_sample_loss)


@pytest.mark.parametrize("guard", [True, False])
def test_an_exploding_loss_stops_the_run_unless_the_guard_is_off(guard, components, subject_images, tmp_path,
                                                                 monkeypatch):
    _exploding(monkeypatch)
    config = lora.LoRAConfig(steps=22, resolution=64, rank=2, stop_on_divergence=guard)
    out = tmp_path / "x.safetensors"
    if guard:
        with pytest.raises(errors.PersonalizeError, match="diverged") as caught:
            run.personalize(components, lora.LoRAMethod(config), subject_images[:2], None, config, out,
                            device=torch.device("cpu"))
        assert "to step 20" in str(caught.value)  # the first step at which two windows exist
        assert list(tmp_path.iterdir()) == []
    else:
        artifact = run.personalize(components, lora.LoRAMethod(config), subject_images[:2], None, config, out,
                                   device=torch.device("cpu"))
        assert out.is_file() and artifact.losses[-1] > 1000 * artifact.losses[0]


# ---------------------------------------------------------------------------------------------------- the lock


def test_the_output_lock_refuses_a_second_holder_and_goes_away(tmp_path):
    out = tmp_path / "a.safetensors"
    with files.exclusive_output(out):
        lock = tmp_path / ".a.safetensors.lock"
        assert lock.read_text() == str(os.getpid())
        holder = rf"{re.escape(str(out))}.*another run.*process {os.getpid()}"
        with pytest.raises(errors.PersonalizeError, match=holder):
            with files.exclusive_output(out):
                pass
        with files.exclusive_output(tmp_path / "b.safetensors"):  # another output is independent
            pass
    assert not lock.exists()
    with files.exclusive_output(out):  # free again
        pass


def test_only_temporaries_older_than_the_lock_are_removed(tmp_path):
    out = run.Output.named(tmp_path, "dog")
    old, fresh, other = (tmp_path / ".dog_2.safetensors.abcdefgh.tmp", tmp_path / ".dog.safetensors.ijklmnop.tmp",
                         tmp_path / ".doggy.safetensors.qrstuvwx.tmp")
    for path in (old, fresh, other):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 60, time.time() - 60))
    os.utime(other, (time.time() - 60, time.time() - 60))
    os.utime(fresh, (time.time() + 60, time.time() + 60))  # written after the lock was taken: not a leftover
    with files.exclusive_output(out.path, out.names):
        pass
    assert not old.exists() and fresh.exists() and other.exists()


# ---------------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, expected", [("CON", "_CON"), ("nul.txt", "_nul.txt"), ("Lpt1", "_Lpt1"),
                                            ("console", "console"), (" aux ", "_aux"), ("a/b/../c", "c")])
def test_sanitized_names_avoid_windows_devices(name, expected):
    assert files.sanitize_name(name) == expected


def test_long_names_are_cut_to_fit_with_suffix_counter_and_temporary_name(tmp_path):
    stem = files.sanitize_name("é" * 300, ".safetensors")
    assert len(f".{stem}_9999.safetensors.abcdefgh.tmp".encode()) <= 255
    assert stem == "é" * len(stem)  # cut between characters, never inside one
    path = files.output_path(tmp_path, "x" * 400, ".safetensors")
    path.write_bytes(b"1")
    assert len(files.output_path(tmp_path, "x" * 400, ".safetensors").name.encode()) <= files.MAX_NAME_BYTES


@pytest.mark.parametrize("name", ["CON.safetensors", "a:b", "x" * 250, "end.", "tab\there", ""])
def test_name_problem_names_what_is_wrong(name):
    assert files.name_problem(name)


def test_portable_names_pass():
    assert files.name_problem("my dog_v2.safetensors") is None and files.name_problem("é" * 100) is None


# ---------------------------------------------------------------------------------------------------- images


def test_training_and_metrics_decode_16_bit_and_alpha_alike(tmp_path):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))
    Image.fromarray(gradient * 257).save(tmp_path / "a16.png")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red, fully transparent
    Image.fromarray(rgba).save(tmp_path / "b_alpha.png")
    _, (gray, transparent) = metrics.read_image_folder(tmp_path)
    subject = data.load_subject_folder(tmp_path, resolution=64)
    assert np.array_equal(np.asarray(gray)[..., 0], gradient.astype(np.uint8))
    assert np.allclose(subject.images[0, ..., 0].numpy() * 255, gradient, atol=0.5)
    assert np.asarray(transparent)[0, 0].tolist() == [200, 0, 0]  # alpha dropped, as ComfyUI's LoadImage does
    assert subject.images[1, 0, 0].tolist() == [1.0, 1.0, 1.0]  # alpha on white, as the trainers want


def test_every_reader_honours_the_decompression_bomb_limit(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(errors.PersonalizeError, match="big.png.*limit"):
        metrics.read_image_folder(tmp_path)
    with pytest.raises(errors.PersonalizeError, match="big.png.*limit"):
        data.load_subject_folder(tmp_path, resolution=64)


# ---------------------------------------------------------------------------------------------------- base checks


def test_base_checks_refuse_an_empty_tokenizer_and_nan_weights(components, tmp_path):
    preflight.check_base(components)
    (tmp_path / "empty").mkdir()
    empty = families_clip.load_tokenizer(tmp_path / "empty")
    with pytest.raises(errors.PersonalizeError, match="no usable vocabulary"):
        preflight.check_base(type(components)(**{**components.__dict__, "tokenizer": empty}))
    with torch.no_grad():
        weight = next(components.unet.parameters())
        weight[(0,) * weight.ndim] = math.nan
    with pytest.raises(errors.PersonalizeError, match="NaN or infinite weights in its UNet"):
        preflight.check_base(components)
