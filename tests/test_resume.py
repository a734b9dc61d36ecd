"""Checkpoints and resume: a run stopped at step k and resumed equals the uninterrupted run bit for bit (CPU), for
every method; a resume from other inputs is refused, saying what differs; keep_last keeps exactly K; a kill while
a checkpoint or the state is written leaves nothing partial."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import pack

models = pack("trainers.models")
run = pack("trainers.run")
loop = pack("trainers.loop")
state = pack("trainers.state")
errors = pack("trainers.errors")
files = pack("trainers.files")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
dreambooth = pack("trainers.methods.dreambooth")

CPU = torch.device("cpu")
STEPS = 6
PRIOR = dict(class_prompt="a photo of a toy", class_images=2, class_sampler_steps=2)
CASES = {
    "lora": (dict(steps=STEPS, resolution=64, lr=1e-3, seed=3, rank=4), lora.LoRAConfig, lora.LoRAMethod),
    "lora_text_encoder_prior": (dict(steps=STEPS, resolution=64, lr=1e-3, seed=3, rank=4, train_text_encoder=True,
                                     lr_scheduler="cosine", **PRIOR), lora.LoRAConfig, lora.LoRAMethod),
    "embedding": (dict(token="<tok>", init_word="toy", steps=STEPS, resolution=64, seed=3, vectors=2),
                  embedding.EmbeddingConfig, embedding.EmbeddingMethod),
    # Fused backward (one AdamW per weight) with prior preservation and a text encoder that stops at step 2.
    "dreambooth": (dict(steps=STEPS, resolution=64, lr=1e-4, seed=3, gradient_checkpointing=False,
                        train_text_encoder=True, text_encoder_steps=2, **PRIOR),
                   dreambooth.DreamBoothConfig, dreambooth.DreamBoothMethod),
}


def make(case, **overrides):
    values, config_type, method_type = CASES[case]
    config = config_type(**{**values, **overrides})
    return config, method_type(config)


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def personalize(tiny_model, case, out, callbacks=None, resume=False, **overrides):
    config, method = make(case, **overrides)
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    return run.personalize(models.load_base(tiny_model["single_file"]), method, photos, None, config,
                           out, class_cache_dir=out.parent.parent / "class", device=CPU, callbacks=callbacks,
                           release_frozen=True, resume=resume)


def stop_at(step, inside_next_step=False):
    """Callbacks whose should_stop turns true after ``step`` (between steps, or in the next step's UNet forward)."""
    seen = {"step": 0, "asked": 0}

    def on_step(info):
        seen["step"] = info.step

    def should_stop():
        if seen["step"] < step:
            return False
        seen["asked"] += 1
        return not inside_next_step or seen["asked"] > 2  # the loop's own check, then the first block's

    return loop.Callbacks(on_step=on_step, should_stop=should_stop)


@pytest.mark.parametrize("case", list(CASES))
def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(case, tiny_model, tmp_path):
    whole = personalize(tiny_model, case, tmp_path / "whole" / "x.safetensors")
    out = tmp_path / "stopped" / "x.safetensors"
    with pytest.raises(errors.TrainingCancelled):
        personalize(tiny_model, case, out, callbacks=stop_at(2, inside_next_step=True))
    assert not out.exists()
    assert state.read_info(state.latest_save(state.state_folder(out)))["step"] == 2
    with pytest.raises(errors.TrainingCancelled):  # a resumed run stopped again, now between steps
        personalize(tiny_model, case, out, callbacks=stop_at(4), resume=True)
    assert state.read_info(state.latest_save(state.state_folder(out)))["step"] == 4
    resumed = personalize(tiny_model, case, out, resume=True)
    assert resumed.resumed_from == 4
    assert resumed.result.losses == whole.result.losses and len(resumed.result.losses) == STEPS
    expected, got = tensors(whole.path), tensors(resumed.path)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def test_a_resume_from_other_inputs_is_refused_naming_what_differs(tiny_model, tmp_path):
    out = tmp_path / "run" / "x.safetensors"
    with pytest.raises(errors.TrainingCancelled):
        personalize(tiny_model, "lora", out, callbacks=stop_at(2))
    with pytest.raises(errors.PersonalizeError, match=r"lr was 0\.001, now 0\.002.*rank was 4, now 8"):
        personalize(tiny_model, "lora", out, resume=True, lr=2e-3, rank=8)
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 1)
    config, method = make("lora")
    with pytest.raises(errors.PersonalizeError, match="the subject images differ"):
        run.personalize(models.load_base(tiny_model["single_file"]), method, photos, None, config,
                        out, device=CPU, resume=True)
    with pytest.raises(errors.PersonalizeError, match="at step 2, past steps=1"):
        personalize(tiny_model, "lora", out, resume=True, steps=1)
    # Options that only checkpoint or validate may change; without resume the state is simply not used.
    assert personalize(tiny_model, "lora", out, resume=True, save_every=5).resumed_from == 2
    assert personalize(tiny_model, "lora", tmp_path / "other" / "x.safetensors", lr=2e-3).resumed_from == 0


def test_a_finished_run_continues_to_more_steps_through_train_or_reuse(tiny_model, tmp_path):
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    base = run.BaseModel(models.load_base(tiny_model["single_file"]).fingerprint,
                         lambda: models.load_base(tiny_model["single_file"]))
    out = tmp_path / "continued" / "x.safetensors"

    def train(steps, resume, where=out):
        config, method = make("lora", steps=steps, save_every=3)
        return run.train_or_reuse(base, method, photos, None, config, run.Output.file(where),
                                  device=CPU, resume=resume)

    first = train(6, resume=False)
    assert state.read_info(state.latest_save(state.state_folder(out)))["step"] == 6  # kept after the run
    with pytest.raises(errors.PersonalizeError, match="already exists"):  # without resume: another run's file
        train(9, resume=False)
    continued = train(9, resume=True)
    assert continued.path == first.path and continued.resumed_from == 6 and len(continued.losses) == 9
    uninterrupted = train(9, resume=False, where=tmp_path / "whole" / "x.safetensors")
    assert continued.losses == uninterrupted.losses
    expected, got = tensors(uninterrupted.path), tensors(continued.path)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert train(9, resume=True).reused  # the same inputs again: the file is reused, nothing trains


@pytest.mark.parametrize("case", ["lora", "embedding", "dreambooth"])
def test_checkpoints_are_the_artifact_of_a_run_that_stopped_there_and_keep_last_keeps_k(case, tiny_model,
                                                                                     tmp_path):
    out = tmp_path / "ckpt" / "x.safetensors"
    final = personalize(tiny_model, case, out, save_every=1, keep_last=2)
    names = sorted(p.name for p in out.parent.glob("x-step*.safetensors"))
    assert names == [f"x-step{STEPS - 1}.safetensors", f"x-step{STEPS}.safetensors"]
    # Checkpointing changes nothing about the run.
    plain = personalize(tiny_model, case, tmp_path / "plain" / "x.safetensors")
    assert all(torch.equal(v, tensors(final.path)[k]) for k, v in tensors(plain.path).items())
    shorter = personalize(tiny_model, case, tmp_path / "short" / "x.safetensors", steps=STEPS - 1)
    checkpoint = out.parent / f"x-step{STEPS - 1}.safetensors"
    expected, got = tensors(shorter.path), tensors(checkpoint)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    with safe_open(str(checkpoint), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_steps"] == str(STEPS - 1)
    assert metadata.keys() == shorter.metadata.keys()


def test_keep_last_counts_only_this_runs_checkpoints(tiny_model, tmp_path):
    out = tmp_path / "k" / "x.safetensors"
    stranger = out.parent / "x-step1000.safetensors"  # another run's file of the same name pattern
    stranger.parent.mkdir(parents=True)
    stranger.write_bytes(b"not ours")
    personalize(tiny_model, "lora", out, save_every=2, keep_last=1)
    assert sorted(p.name for p in out.parent.glob("x-step*")) == ["x-step1000.safetensors", "x-step6.safetensors"]


def test_a_short_disk_is_a_clear_error_before_the_first_step(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(state.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    steps = []
    out = tmp_path / "full" / "x.safetensors"
    with pytest.raises(errors.PersonalizeError, match="not enough free disk space.*save_every"):
        personalize(tiny_model, "dreambooth", out, save_every=2,
                    callbacks=loop.Callbacks(on_step=lambda info: steps.append(info.step)))
    assert steps == [] and not out.parent.exists()


def complete_files(folder):
    """Every visible file under ``folder`` is complete: safetensors files load, state saves hold all their parts."""
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix in (".safetensors", ".tensors"):
            tensors(path)
        if path.is_dir() and state._SAVE.match(path.name):
            assert {p.name for p in path.iterdir()} == {state.WEIGHTS_FILE, state.TORCH_FILE, state.INFO_FILE}
            json.loads((path / state.INFO_FILE).read_text())


def test_an_interrupted_write_leaves_the_last_complete_files(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "killed" / "x.safetensors"
    real_save = torch.save
    calls = {"n": 0}

    def save_then_die(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # from the second state save on: half a file, then the process dies
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise KeyboardInterrupt
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(state.torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        personalize(tiny_model, "lora", out, save_every=2)
    monkeypatch.undo()
    complete_files(out.parent)
    assert not [p for p in out.parent.rglob(".*")], "temporary files are removed"
    assert state.read_info(state.latest_save(state.state_folder(out)))["step"] == 2
    assert sorted(p.name for p in out.parent.glob("*.safetensors")) == ["x-step2.safetensors", "x-step4.safetensors"]
    resumed = personalize(tiny_model, "lora", out, save_every=2, resume=True)
    whole = personalize(tiny_model, "lora", tmp_path / "whole" / "x.safetensors")
    assert all(torch.equal(v, tensors(resumed.path)[k]) for k, v in tensors(whole.path).items())


def test_the_nodes_renaming_output_resumes_its_own_state(tiny_model, tmp_path):
    """As a node writes (a taken name gets _1, _2, ...): a re-queued cancelled run continues into its own name, a
    finished one continues to more steps into its own file, and other inputs get a new name."""
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    base = run.BaseModel(models.load_base(tiny_model["single_file"]).fingerprint,
                         lambda: models.load_base(tiny_model["single_file"]))
    folder = tmp_path / "loras"

    def queue(callbacks=None, **overrides):
        config, method = make("lora", **overrides)
        return run.train_or_reuse(base, method, photos, None, config, run.Output.named(folder, "x"), device=CPU,
                                  resume=True, callbacks=callbacks)

    with pytest.raises(errors.TrainingCancelled):
        queue(callbacks=stop_at(2), save_every=2)
    first = queue(save_every=2)
    assert first.path == folder / "x.safetensors" and first.resumed_from == 2
    longer = queue(save_every=2, steps=STEPS + 2)
    assert longer.path == first.path and longer.resumed_from == STEPS
    other = queue(lr=5e-4)
    assert other.path == folder / "x_1.safetensors" and other.resumed_from == 0
