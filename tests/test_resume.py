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
    "lora": (lambda **o: lora.LoRAConfig(steps=STEPS, resolution=64, lr=1e-3, seed=3, rank=4, **o), lora.LoRAMethod),
    "lora_text_encoder_prior": (lambda **o: lora.LoRAConfig(steps=STEPS, resolution=64, lr=1e-3, seed=3, rank=4,
                                                            train_text_encoder=True, lr_scheduler="cosine",
                                                            **PRIOR, **o), lora.LoRAMethod),
    "embedding": (lambda **o: embedding.EmbeddingConfig(token="<tok>", init_word="toy", steps=STEPS, resolution=64,
                                                        seed=3, vectors=2, **o), embedding.EmbeddingMethod),
    # Fused backward (one AdamW per weight) with prior preservation and a text encoder that stops at step 2.
    "dreambooth": (lambda **o: dreambooth.DreamBoothConfig(steps=STEPS, resolution=64, lr=1e-4, seed=3,
                                                           gradient_checkpointing=False, train_text_encoder=True,
                                                           text_encoder_steps=2, **PRIOR, **o),
                   dreambooth.DreamBoothMethod),
}


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def personalize(tiny_model, case, out, callbacks=None, resume=False, **overrides):
    make_config, method_type = CASES[case]
    config = make_config(**overrides)
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    return run.personalize(models.load_base(tiny_model["single_file"]), method_type(config), photos, None, config,
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
