"""SD2.x on the tiny model: the OpenCLIP-H layout both ways, ε and v-prediction, and every method with files that
diffusers loads."""

from __future__ import annotations

import re

import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from conftest import make_subject_images, pack

models = pack("trainers.models")
families = pack("trainers.families")
sd2 = pack("trainers.families.sd2")
ldm = pack("trainers.families.ldm")
run = pack("trainers.run")
tiny = pack("trainers.testing.tiny")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
dreambooth = pack("trainers.methods.dreambooth")
checkpoints = pack("trainers.checkpoints")

PROMPT = "a photo of sks toy"
CPU = torch.device("cpu")
PARTS = ("unet", "vae", "text_encoder")


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
            if "lora_" not in k}


def pipeline(folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def prediction(unet, hidden, seed=0):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return unet(latents, torch.tensor([500]), hidden).sample


def our_hidden(components, prompt):
    family = components.family
    return family.encode(components, family.tokenize(components, [prompt]))["encoder_hidden_states"]


def their_hidden(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)[0]


def test_both_layouts_load_identically_and_the_single_file_round_trips(tiny_sd2):
    original = load_file(tiny_sd2["single_file"])
    from_file = models.load_base(tiny_sd2["single_file"])
    from_folder = models.load_base(tiny_sd2["diffusers"])
    assert from_file.family is from_folder.family is sd2.FAMILY
    for name in PARTS:
        assert state_dicts_equal(getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict())
    assert original["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    # The file has one more text layer than diffusers' encoder (the conditioning is the penultimate one).
    assert from_file.text_encoder.config.num_hidden_layers == 2
    assert any(k.startswith("cond_stage_model.model.transformer.resblocks.2.") for k in original)
    assert state_dicts_equal(models.original_state_dict(from_file), original)
    # A diffusers folder holds everything but that layer, the projection and the logit scale.
    aside = {k for k in original if ".resblocks.2." in k or k.endswith(("text_projection", "logit_scale"))}
    assert state_dicts_equal(models.original_state_dict(from_folder), {k: v for k, v in original.items()
                                                                       if k not in aside})
    ids = from_file.family.tokenize(from_file, [PROMPT])
    assert ids[0, -1] == 0 and torch.equal(ids, from_folder.family.tokenize(from_folder, [PROMPT]))


def test_conversion_agrees_with_diffusers_and_so_does_the_conditioning(tiny_sd2):
    components = models.load_base(tiny_sd2["single_file"])
    theirs = StableDiffusionPipeline.from_single_file(tiny_sd2["single_file"], config=tiny_sd2["diffusers"],
                                                      safety_checker=None)
    for name in PARTS:
        state = {k: v for k, v in getattr(theirs, name).state_dict().items() if not k.endswith("position_ids")}
        assert state_dicts_equal(state, getattr(components, name).state_dict()), name
    with torch.no_grad():
        assert torch.allclose(our_hidden(components, PROMPT), their_hidden(pipeline(tiny_sd2["diffusers"]), PROMPT),
                              atol=1e-6)


def test_v_prediction_variant_from_the_marker_or_comfyuis_probe(tmp_path):
    model = tiny.make_tiny_model(tmp_path, arch="sd2", prediction_type="v_prediction")
    for path in (model["single_file"], model["diffusers"]):
        assert models.load_base(path).prediction_type == "v_prediction"
    assert checkpoints.read_metadata(model["single_file"])["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    spread = {sd2.V_PROBE: torch.randn(1280, generator=torch.Generator().manual_seed(0)) * 0.2}
    assert sd2.FAMILY.noise_scheduler(spread).config.prediction_type == "v_prediction"
    assert sd2.FAMILY.noise_scheduler({sd2.V_PROBE: torch.zeros(1280)}).config.prediction_type == "epsilon"


def test_the_full_sd2_architecture_is_what_comfyui_detects_as_sd2():
    config = families.shipped_config("sd2_unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    original = ldm.unet_key_map(config).to_original(unet.state_dict())
    assert len(original) == 686
    assert original["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 1024
    assert original["input_blocks.1.1.proj_in.weight"].ndim == 2 and "label_emb.0.0.weight" not in original
    assert original["output_blocks.11.1.transformer_blocks.0.norm1.bias"].shape == (320,)  # ComfyUI's v probe
    inferred = sd2.FAMILY.unet_config(original, {})
    assert {k: inferred[k] for k in config} == config


def test_sd2_lora_is_kohya_v2_and_loads_in_diffusers_with_every_key(tiny_sd2, tmp_path):
    components = models.load_base(tiny_sd2["single_file"])
    before = {name: weights(getattr(components, name)) for name in PARTS}
    cfg = lora.LoRAConfig(prompt=PROMPT, steps=10, lr=1e-2, resolution=64, rank=4, alpha=4.0,
                          train_text_encoder=True, save_precision="fp32")
    artifact = run.personalize(components, lora.LoRAMethod(cfg), make_subject_images(), None, cfg,
                               tmp_path / "sd2.safetensors", device=CPU)
    for name in PARTS:
        assert state_dicts_equal(weights(getattr(components, name)), before[name]), name
    tensors = load_file(artifact.path)
    bases = {k.split(".")[0] for k in tensors}
    assert all(re.match(r"^lora_(unet|te_text_model_encoder_layers)_", b) for b in bases)
    assert any(b.startswith("lora_te_") for b in bases) and len(tensors) == 3 * len(bases)
    meta = checkpoints.read_metadata(artifact.path)
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    pipe = pipeline(tiny_sd2["diffusers"])
    with torch.no_grad():
        base = prediction(pipe.unet, their_hidden(pipe, PROMPT))
    lora.apply_lora(pipe, artifact.path)
    loaded = sum(len(get_peft_model_state_dict(getattr(pipe, n), adapter_name="personalize"))
                 for n in ("unet", "text_encoder"))
    assert loaded == 2 * len(bases)
    with torch.no_grad():
        theirs = prediction(pipe.unet, their_hidden(pipe, PROMPT))
        ours = prediction(components.unet, our_hidden(components, PROMPT))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (base - theirs).abs().max() > 100 * (ours - theirs).abs().max()


def test_sd2_embedding_is_emb_params_and_loads_in_diffusers(tiny_sd2, tmp_path):
    components = models.load_base(tiny_sd2["single_file"])
    table = components.text_encoder.get_input_embeddings().weight.clone()
    cfg = embedding.EmbeddingConfig(token="<tok>", init_word="toy", vectors=2, steps=10, lr=2e-2, resolution=64)
    artifact = run.personalize(components, embedding.EmbeddingMethod(cfg), make_subject_images(), None, cfg,
                               tmp_path / "tok.safetensors", device=CPU)
    tensors = load_file(artifact.path)
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (2, 64)
    assert torch.equal(components.text_encoder.get_input_embeddings().weight[: len(table)], table)
    pipe = pipeline(tiny_sd2["diffusers"])
    embedding.load_embedding(pipe, artifact.path)
    with torch.no_grad():
        assert torch.allclose(our_hidden(components, "a photo of <tok> <tok>_1"),
                              their_hidden(pipe, "a photo of <tok>"), atol=1e-6)


def test_sd2_dreambooth_exports_exactly_the_input_key_set(tiny_sd2, tmp_path):
    components = models.load_base(tiny_sd2["single_file"])
    before = weights(components.unet)
    cfg = dreambooth.DreamBoothConfig(prompt=PROMPT, steps=2, lr=1e-4, resolution=64, class_prompt="")
    out = tmp_path / "toy.safetensors"
    run.personalize(components, dreambooth.DreamBoothMethod(cfg), make_subject_images(), None, cfg, out,
                    device=CPU, release_frozen=True)
    after = weights(components.unet)
    assert all(not torch.equal(after[k], before[k]) for k in after)
    assert load_file(out).keys() == load_file(tiny_sd2["single_file"]).keys()
    assert checkpoints.read_metadata(out)["modelspec.architecture"] == "stable-diffusion-v2-512"
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=tiny_sd2["diffusers"], safety_checker=None)
    assert all(torch.equal(pipe.unet.state_dict()[k], v.half().float()) for k, v in after.items())
