"""Captions: the trigger placement rule (instance prompt first), tag shuffling that keeps the first tags, dropout."""

import math

import torch

from conftest import make_subject_images, pack

captions = pack("trainers.captions")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
run = pack("trainers.run")
models = pack("trainers.models")


def config(**overrides):
    return lora.LoRAConfig(**dict(dict(prompt="a photo of sks dog", resolution=64, steps=3, rank=2), **overrides))


def test_the_instance_prompt_comes_first_and_the_previews_use_the_same_rule():
    method = lora.LoRAMethod(config())
    assert method.prompts(config(), ["on a beach, red collar", ""]) == [["a photo of sks dog, on a beach, red collar"],
                                                                       ["a photo of sks dog"]]
    assert method.preview_prompt(config()) == captions.compose("a photo of sks dog", "") == "a photo of sks dog"


def test_shuffling_keeps_the_first_tags_and_reorders_the_rest():
    cfg = config(shuffle_tags=True, keep_tags=1, seed=3)
    (options,) = lora.LoRAMethod(cfg).prompts(cfg, ["on a beach, red collar, sitting, sunny"])
    assert len(options) > 1 and len(set(options)) == len(options)
    for option in options:
        tags = option.split(", ")
        assert tags[0] == "a photo of sks dog"
        assert sorted(tags[1:]) == sorted(["on a beach", "red collar", "sitting", "sunny"])
    assert lora.LoRAMethod(cfg).prompts(cfg, ["on a beach, red collar, sitting, sunny"]) == [options], "seeded"
    kept = captions.shuffled("a, b, c, d, e", 3, torch.Generator().manual_seed(0))
    assert all(v.startswith("a, b, c, ") for v in kept)
    emb = embedding.EmbeddingConfig(token="<t>", shuffle_tags=True)
    for option in embedding.EmbeddingMethod(emb).prompts(emb, ["x, y, z"])[0]:
        assert option.split(", ")[0] in {t.format(*["<t>"]) for t in embedding.TEMPLATES[emb.templates]}


def test_caption_dropout_draws_the_uncaptioned_prompt_at_its_rate():
    generator = torch.Generator().manual_seed(0)
    picks = [captions.choose(["with caption"], ["without"], 0.25, generator) for _ in range(2000)]
    assert abs(picks.count("without") / 2000 - 0.25) < 0.04
    assert {captions.choose(["a"], None, 0.0, generator) for _ in range(20)} == {"a"}


def test_a_run_with_shuffling_and_dropout_trains(tiny_model, tmp_path):
    cfg = config(shuffle_tags=True, caption_dropout=0.5)
    photos = make_subject_images(2)
    artifact = run.personalize(models.load_base(tiny_model["single_file"]), lora.LoRAMethod(cfg), photos,
                               ["on a beach, red collar, sitting", "in snow, blue collar"], cfg,
                               tmp_path / "x.safetensors", device=torch.device("cpu"))
    assert artifact.path.is_file() and all(map(math.isfinite, artifact.result.losses))
