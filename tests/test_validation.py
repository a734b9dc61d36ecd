"""Validation during training: the per-step table, the best-step choice, and that validating changes nothing about
what is trained."""

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import pack

models = pack("trainers.models")
run = pack("trainers.run")
loop = pack("trainers.loop")
validation = pack("trainers.validation")
metrics = pack("trainers.metrics")
errors = pack("trainers.errors")
lora = pack("trainers.methods.lora")
state = pack("trainers.state")

CPU = torch.device("cpu")
# A recorded curve: DINO peaks at step 300 and falls (overfitting), CLIP-T falls steadily.
CURVE = [{"step": 100, "dino": 0.52, "clip_t": 0.31}, {"step": 200, "dino": 0.61, "clip_t": 0.30},
         {"step": 300, "dino": 0.66, "clip_t": 0.28}, {"step": 400, "dino": 0.66, "clip_t": 0.24},
         {"step": 500, "dino": 0.64, "clip_t": 0.21}]


def test_best_step_selection_on_a_recorded_metric_curve():
    assert validation.choose_step(CURVE, "dino") == (300, "step 300 has the highest DINO, 0.6600 (last step 500: "
                                                          "0.6400)")  # the earlier of two equal steps
    assert validation.choose_step(CURVE, "clip_t")[0] == 100
    # DINO x CLIP-T: 0.161, 0.183, 0.185, 0.158, 0.134
    assert validation.choose_step(CURVE, "balanced")[0] == 300
    assert validation.choose_step(CURVE[:2], "balanced")[0] == 200
    assert validation.choose_step(CURVE, "last")[0] == 500
    assert validation.choose_step(CURVE, "last", "no DINO model was given")[1].endswith("no DINO model was given")


def test_the_criterion_needs_its_models():
    assert validation.criterion_for("dino", None, None)[0] == "last"
    assert validation.criterion_for("dino", object(), None) == ("dino", "")
    with pytest.raises(errors.PersonalizeError, match="clip_t needs a CLIP model"):
        validation.criterion_for("clip_t", object(), None)
    with pytest.raises(errors.PersonalizeError, match="balanced needs a DINO model"):
        validation.criterion_for("balanced", None, object())


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    folder = pack("trainers.testing.dino").make_random_dino(tmp_path_factory.mktemp("dino"))
    return metrics.load_dino(folder, "cpu")


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def train(tiny_model, out, steps=6, callbacks=None, resume=False, dino=None, **overrides):
    config = lora.LoRAConfig(**{**dict(steps=steps, resolution=64, lr=1e-2, seed=3, rank=4,
                                       validation_sampler_steps=3, validation_images=2), **overrides})
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    return run.personalize(models.load_base(tiny_model["single_file"]), lora.LoRAMethod(config), photos, None,
                           config, out, device=CPU, callbacks=callbacks, release_frozen=True, resume=resume,
                           dino=dino)


def test_the_result_is_the_chosen_step_and_validating_changes_no_weight(tiny_model, dino, tmp_path):
    out = tmp_path / "v" / "x.safetensors"
    rows = []
    artifact = train(tiny_model, out, dino=dino, validate_every=2, save_every=2,
                     callbacks=loop.Callbacks(on_validation=lambda row, samples: rows.append((row, samples.size))))
    table = artifact.result.validation
    assert [r["step"] for r in table] == [2, 4, 6] and all(0 < r["dino"] <= 1 and "div" in r for r in table)
    assert [row["step"] for row, _ in rows] == [2, 4, 6]
    assert all(size == (6 * validation.CELL, validation.CELL) for _, size in rows)  # 3 prompts x 2 seeds
    best = max(table, key=lambda r: (r["dino"], -r["step"]))["step"]
    assert artifact.result.best_step == best and artifact.metadata["personalize.best_step"] == str(best)
    assert artifact.metadata["ss_steps"] == str(best)
    assert json.loads(artifact.metadata["personalize.validation"]) == table
    # The result holds exactly the weights of the chosen step (its checkpoint).
    result, _ = tensors(artifact.path)
    chosen, _ = tensors(out.parent / f"x-step{best}.safetensors")
    assert all(torch.equal(result[k], chosen[k]) for k in result)
    # Validation sampled between steps without changing any: the last checkpoint equals a run without it.
    plain = train(tiny_model, tmp_path / "plain" / "x.safetensors")
    last, _ = tensors(out.parent / "x-step6.safetensors")
    assert all(torch.equal(v, last[k]) for k, v in tensors(plain.path)[0].items())
    report = json.loads((out.parent / "x.validation.json").read_text())
    assert report["best_step"] == best and report["validation"] == table
    assert len(report["prompts"]) == 3 and report["prompts"][1].endswith("on the beach")
    with Image.open(out.parent / "x.validation.png") as grid:
        assert grid.height == 3 * validation.CELL


def test_without_a_dino_model_the_last_step_is_kept_and_samples_still_come(tiny_model, tmp_path):
    artifact = train(tiny_model, tmp_path / "x.safetensors", validate_every=3, validation_images=1)
    assert [r["step"] for r in artifact.result.validation] == [3, 6]
    assert artifact.result.best_step == 6 and "no DINO model" in artifact.result.selection
    with pytest.raises(errors.PersonalizeError, match="clip_t needs a CLIP model"):
        train(tiny_model, tmp_path / "y.safetensors", validate_every=3, select_best="clip_t")


def test_cancel_during_validation_resumes_with_that_validation(tiny_model, dino, tmp_path):
    out = tmp_path / "c" / "x.safetensors"
    seen = {"validating": False}

    def on_prepare(done, total, what):
        seen["validating"] = what == "validating step 4"

    with pytest.raises(errors.TrainingCancelled):
        train(tiny_model, out, dino=dino, validate_every=2,
              callbacks=loop.Callbacks(on_prepare=on_prepare, should_stop=lambda: seen["validating"]))
    info = state.read_info(state.latest_save(state.state_folder(out)))
    assert info["step"] == 4 and [r["step"] for r in info["validation"]] == [2]
    resumed = train(tiny_model, out, dino=dino, validate_every=2, resume=True)
    assert resumed.resumed_from == 4 and [r["step"] for r in resumed.result.validation] == [2, 4, 6]
    whole = train(tiny_model, tmp_path / "w" / "x.safetensors", dino=dino, validate_every=2)
    assert resumed.result.validation == [dict(r, seconds=resumed.result.validation[i]["seconds"])
                                         for i, r in enumerate(whole.result.validation)]
    assert all(torch.equal(v, tensors(resumed.path)[0][k]) for k, v in tensors(whole.path)[0].items())


def test_a_best_step_before_the_last_is_exported_also_after_a_resume(tiny_model, dino, tmp_path, monkeypatch):
    """The scores replaced by a recorded curve that peaks at step 4 (what an overfitting run shows): the result is
    step 4's weights, also when the run was stopped after step 5 and resumed."""
    recorded = {2: 0.50, 4: 0.70, 6: 0.60}
    real_run = validation.Validator.run

    def run_with_curve(self, components, step, amp_dtype, callbacks):
        record, row = real_run(self, components, step, amp_dtype, callbacks)
        return dict(record, dino=recorded[step]), row

    monkeypatch.setattr(validation.Validator, "run", run_with_curve)
    out = tmp_path / "b" / "x.safetensors"
    done = []
    with pytest.raises(errors.TrainingCancelled):
        train(tiny_model, out, dino=dino, validate_every=2, save_every=2, validation_images=1,
              callbacks=loop.Callbacks(on_step=lambda info: done.append(info.step), should_stop=lambda: 5 in done))
    assert state.read_info(state.latest_save(state.state_folder(out)))["step"] == 5
    artifact = train(tiny_model, out, dino=dino, validate_every=2, save_every=2, validation_images=1, resume=True)
    assert artifact.result.best_step == 4 and "step 4 has the highest DINO" in artifact.result.selection
    result, metadata = tensors(artifact.path)
    chosen, _ = tensors(out.parent / "x-step4.safetensors")
    last, _ = tensors(out.parent / "x-step6.safetensors")
    assert all(torch.equal(result[k], chosen[k]) for k in result)
    assert not all(torch.equal(result[k], last[k]) for k in result)
    assert metadata["ss_steps"] == "4" and metadata["personalize.best_step"] == "4"

