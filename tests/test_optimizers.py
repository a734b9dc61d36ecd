"""Optimizers, schedules and EMA: each optimizer steps (the adapters move and the loss stays finite), a missing
optional package is a clear error before any work, the new schedules shape the rate, EMA's average is what is saved."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_subject_images, pack

lora = pack("trainers.methods.lora")
run = pack("trainers.run")
models = pack("trainers.models")
optim = pack("trainers.optim")
errors = pack("trainers.errors")
CPU = torch.device("cpu")


def train(tiny_model, out, **overrides):
    values = dict(prompt="a photo of sks toy", steps=4, lr=1e-3, resolution=64, seed=0, rank=2, alpha=2.0,
                  save_precision="fp32")
    values.update(overrides)
    config = lora.LoRAConfig(**values)
    components = models.load_base(tiny_model["single_file"])
    artifact = run.personalize(components, lora.LoRAMethod(config), make_subject_images(2), None, config, out,
                               device=CPU)
    return artifact, components


@pytest.mark.parametrize("name,lr", [("adamw", 1e-3), ("adafactor", 1e-3), ("prodigy", 1.0), ("adamw8bit", 1e-3)])
def test_each_optimizer_steps(name, lr, tiny_model, tmp_path):
    if name in ("prodigy", "adamw8bit"):
        pytest.importorskip({"prodigy": "prodigyopt", "adamw8bit": "bitsandbytes"}[name])
    artifact, components = train(tiny_model, tmp_path / "x.safetensors", optimizer=name, lr=lr)
    ups = [p for n, p in components.unet.named_parameters() if "lora_B" in n]
    assert ups and all(p.abs().sum() > 0 for p in ups), "lora_B starts at 0: every one must have moved"
    assert all(torch.isfinite(torch.tensor(artifact.result.losses)))


@pytest.mark.parametrize("name,package", [("prodigy", "prodigyopt"), ("adamw8bit", "bitsandbytes")])
def test_a_missing_optimizer_package_is_a_clear_error_before_training(name, package, tiny_model, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # what Python does for a module that can't be imported
    steps = []
    with pytest.raises(errors.PersonalizeError, match=f"needs the {package} package.*pip install {package}"):
        config = lora.LoRAConfig(steps=2, resolution=64, optimizer=name)
        run.personalize(models.load_base(tiny_model["single_file"]), lora.LoRAMethod(config), make_subject_images(2),
                        None, config, tmp_path / "x.safetensors", device=CPU,
                        callbacks=pack("trainers.loop").Callbacks(on_step=steps.append))
    assert steps == [] and not (tmp_path / "x.safetensors").exists()


def test_restart_and_polynomial_schedules_shape_the_rate(tiny_model, tmp_path):
    restarts, _ = train(tiny_model, tmp_path / "a.safetensors", steps=8, lr_scheduler="cosine_with_restarts",
                        lr_cycles=2)
    lrs = restarts.result.lrs
    # Two cosine cycles of 4 steps: it decays, restarts at the top, and repeats.
    assert lrs[0] > lrs[1] > lrs[2] < lrs[3] and lrs[4:7] == pytest.approx(lrs[0:3]), lrs
    polynomial, _ = train(tiny_model, tmp_path / "b.safetensors", steps=8, lr_scheduler="polynomial", lr_power=2.0)
    lrs = polynomial.result.lrs
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[0] < 1e-3


def test_ema_saves_the_average_not_the_last_weights(tiny_model, tmp_path):
    last, _ = train(tiny_model, tmp_path / "last.safetensors", steps=6, lr=1e-2)
    averaged, _ = train(tiny_model, tmp_path / "ema.safetensors", steps=6, lr=1e-2, ema_decay=0.9)
    assert last.result.losses == averaged.result.losses, "EMA does not change the training itself"
    last_tensors, ema_tensors = load_file(last.path), load_file(averaged.path)
    ups = [k for k in last_tensors if k.endswith("lora_up.weight")]
    # lora_up starts at 0 and grows: its average lags behind the last value.
    assert sum(ema_tensors[k].norm() for k in ups) < sum(last_tensors[k].norm() for k in ups)
    assert all(ema_tensors[k].abs().sum() > 0 for k in ups)
