"""SDXL on the tiny model: loading both layouts, the conversion both ways, conditioning as the SDXL pipeline makes
it, and every method (LoRA, Textual Inversion, DreamBooth) with files that diffusers loads."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from conftest import make_subject_images, pack

models = pack("trainers.models")
families = pack("trainers.families")
sdxl = pack("trainers.families.sdxl")
openclip = pack("trainers.families.openclip")
ldm = pack("trainers.families.ldm")
run = pack("trainers.run")
loop = pack("trainers.loop")
data = pack("trainers.data")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
dreambooth = pack("trainers.methods.dreambooth")
checkpoints = pack("trainers.checkpoints")
errors = pack("trainers.errors")

PROMPT = "a photo of sks toy"
CPU = torch.device("cpu")
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def weights(module) -> dict[str, torch.Tensor]:
    """A module's weights under their names before peft wrapped layers, adapters left out."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
            if "lora_" not in k}


def pipeline(folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_conditioning(pipe, prompt: str) -> dict[str, torch.Tensor]:
    """The UNet's inputs for ``prompt`` as the diffusers SDXL pipeline computes them (64 px, square, no crop)."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}


def pipeline_prediction(pipe, latents, timestep, conditioning) -> torch.Tensor:
    added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
    return pipe.unet(latents, timestep, conditioning["encoder_hidden_states"], added_cond_kwargs=added).sample


def our_prediction(components, latents, timestep, prompt: str) -> torch.Tensor:
    family = components.family
    conditioning = family.encode(components, family.tokenize(components, [prompt]))
    return family.denoise(components.unet, latents, timestep, conditioning)


# ------------------------------------------------------------------------------------------------ the model


def test_make_tiny_model_writes_both_sdxl_layouts(tiny_sdxl):
    single = load_file(tiny_sdxl["single_file"])
    assert {k.split(".")[0] for k in single} == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.encoder.layers.") for k in single)
    fused = single["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert fused.shape == (3 * 64, 64)  # q|k|v of bigG fused, OpenCLIP's layout
    assert single["conditioner.embedders.1.model.text_projection"].shape == (64, 64)
    assert single["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 64 + 6 * 8
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sdxl["diffusers"] and (models.Path(tiny_sdxl["diffusers"]) / part).is_dir()), part
    assert families.detect_checkpoint(single).name == "sdxl"
    assert families.detect_folder(models.Path(tiny_sdxl["diffusers"])).name == "sdxl"


def test_single_file_and_diffusers_folder_load_to_identical_components(tiny_sdxl):
    from_file = models.load_base(tiny_sdxl["single_file"])
    from_folder = models.load_base(tiny_sdxl["diffusers"])
    assert from_file.family is from_folder.family is sdxl.FAMILY
    for name in PARTS:
        assert state_dicts_equal(getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict())
    settings = [k for k in families.shipped_config("sdxl_unet") if k != "sample_size"]
    assert {k: from_file.unet.config[k] for k in settings} == {k: from_folder.unet.config[k] for k in settings}
    assert from_file.fingerprint == from_folder.fingerprint
    # bigG pads with id 0 where CLIP-L pads with its end token, as the original and ComfyUI do.
    ids = from_file.family.tokenize(from_file, [PROMPT])
    assert ids.shape == (1, 2, 77) and ids[0, 0, -1] == from_file.tokenizer.eos_token_id and ids[0, 1, -1] == 0
    assert torch.equal(ids, from_folder.family.tokenize(from_folder, [PROMPT]))


def test_conversion_is_bit_exact_in_both_directions(tiny_sdxl, tmp_path):
    original = load_file(tiny_sdxl["single_file"])
    # original → components → original, and diffusers folder → components → original
    assert state_dicts_equal(models.original_state_dict(models.load_base(tiny_sdxl["single_file"])), original)
    assert state_dicts_equal(models.original_state_dict(models.load_base(tiny_sdxl["diffusers"])), original)
    # original → components → diffusers folder: the same files as the folder written from the random model
    written = models.save_diffusers(models.load_base(tiny_sdxl["single_file"]), tmp_path / "again")
    for part in PARTS:
        name = "diffusion_pytorch_model.safetensors" if part in ("unet", "vae") else "model.safetensors"
        assert state_dicts_equal(load_file(written / part / name),
                                 load_file(models.Path(tiny_sdxl["diffusers"]) / part / name)), part


def test_our_conversion_agrees_with_diffusers_own_single_file_loader(tiny_sdxl):
    original = load_file(tiny_sdxl["single_file"])
    components = models.load_base(tiny_sdxl["single_file"])
    pipe = StableDiffusionXLPipeline.from_single_file(tiny_sdxl["single_file"], config=tiny_sdxl["diffusers"],
                                                      add_watermarker=False)
    for name in PARTS:
        theirs = getattr(pipe, name).state_dict()
        ours = getattr(components, name).state_dict()
        assert state_dicts_equal({k: v for k, v in theirs.items() if not k.endswith("position_ids")}, ours), name
    split = openclip.to_transformers({k[len(sdxl.BIGG_PREFIX):]: v for k, v in original.items()
                                      if k.startswith(sdxl.BIGG_PREFIX)})
    library = convert_open_clip_checkpoint(components.text_encoder_2, original, prefix=sdxl.BIGG_PREFIX)
    assert state_dicts_equal({k.removeprefix("text_model."): v for k, v in library.items()}, split)


def test_keys_no_component_holds_are_written_back(tiny_sdxl, tmp_path):
    """A real SDXL file also carries OpenCLIP's logit scale and CLIP's position ids; the export keeps them."""
    original = load_file(tiny_sdxl["single_file"])
    extras = {sdxl.BIGG_PREFIX + "logit_scale": torch.tensor(4.6052),
              sdxl.CLIP_L_PREFIX + "embeddings.position_ids": torch.arange(77).unsqueeze(0)}
    save_file(original | extras, tmp_path / "real-like.safetensors")
    components = models.load_base(tmp_path / "real-like.safetensors", tokenizer_dir=tiny_sdxl["tokenizer"])
    assert state_dicts_equal(models.original_state_dict(components), original | extras)


def test_conditioning_and_prediction_match_the_diffusers_sdxl_pipeline(tiny_sdxl):
    components = models.load_base(tiny_sdxl["single_file"])
    pipe = pipeline(tiny_sdxl["diffusers"])
    family = components.family
    with torch.no_grad():
        ours = family.encode(components, family.tokenize(components, [PROMPT]))
        theirs = pipeline_conditioning(pipe, PROMPT)
        assert ours["encoder_hidden_states"].shape == (1, 77, 48 + 64)
        for key in ("encoder_hidden_states", "text_embeds"):
            assert torch.allclose(ours[key], theirs[key], atol=1e-6), key
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(sdxl.size_ids(64, 64, 1, latents), theirs["time_ids"])
        prediction = family.denoise(components.unet, latents, torch.tensor([500]), ours)
        assert torch.allclose(prediction, pipeline_prediction(pipe, latents, torch.tensor([500]), theirs), atol=1e-5)


def test_the_full_sdxl_architecture_is_what_comfyui_detects_as_sdxl():
    """ComfyUI compares model_channels 320, transformer depth [0, 0, 2, 2, 10, 10] (+10 in the middle), context
    2048 and adm 2816 exactly; the shipped config gives them, and loading infers that config back from the keys
    (built on the meta device: nothing is allocated)."""
    config = families.shipped_config("sdxl_unet")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    original = ldm.unet_key_map(config).to_original(unet.state_dict())
    assert len(original) == 1680  # the UNet key count of sd_xl_base_1.0.safetensors
    depth = [ldm.count_indices(original, f"input_blocks.{i}.1.transformer_blocks.") for i in range(1, 9) if i % 3]
    assert depth == [0, 0, 2, 2, 10, 10]
    assert ldm.count_indices(original, "middle_block.1.transformer_blocks.") == 10
    assert original["input_blocks.0.0.weight"].shape[0] == 320
    assert original["label_emb.0.0.weight"].shape[1] == 2816
    assert original["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 2048
    assert original["input_blocks.4.1.proj_in.weight"].ndim == 2  # use_linear_in_transformer
    parts = {"openclip": {openclip.PROJECTION: torch.empty(1280, 1280, device="meta")}}
    inferred = sdxl.FAMILY.unet_config(original, parts)
    assert {k: inferred[k] for k in config} == config


def test_an_sdxl_refiner_is_refused_naming_what_it_is():
    keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)}
    with pytest.raises(errors.PersonalizeError, match="SDXL refiner"):
        families.detect_checkpoint(keys)


def test_cli_makes_tiny_sdxl_and_lists_the_arch(tmp_path, capsys):
    with pytest.raises(SystemExit):
        pack("cli").main(["make-tiny-model", "--help"])
    assert re.search(r"--arch \{[^}]*sdxl", capsys.readouterr().out)
    assert pack("cli").main(["make-tiny-model", "--arch", "sdxl", "--out", str(tmp_path), "--json"]) == 0
    assert families.detect_checkpoint(load_file(tmp_path / "model.safetensors")).name == "sdxl"


# ------------------------------------------------------------------------------------------------ LoRA

KOHYA = re.compile(r"^(lora_unet|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def trained_lora(tiny_sdxl, tmp_path_factory):
    components = models.load_base(tiny_sdxl["single_file"])
    before = {name: weights(getattr(components, name)) for name in PARTS}
    pixels = data.images_to_training_pixels(make_subject_images(), 64)
    loss_before = loop.fixed_denoising_loss(components, pixels, PROMPT)
    # Every target kind, so that the diffusers check covers projections and feed-forward layers too.
    cfg = lora.LoRAConfig(prompt=PROMPT, steps=60, lr=2e-2, resolution=64, seed=0, rank=4, alpha=2.0,
                          train_text_encoder=True, save_precision="fp32",
                          unet_targets="attention+projections+feedforward")
    out = tmp_path_factory.mktemp("sdxl-lora") / "subject.safetensors"
    artifact = run.personalize(components, lora.LoRAMethod(cfg), make_subject_images(), None, cfg, out,
                               device=CPU)
    return dict(components=components, artifact=artifact, before=before, loss_before=loss_before,
                loss_after=loop.fixed_denoising_loss(components, pixels, PROMPT))


def test_sdxl_lora_trains_only_adapters_in_the_unet_and_both_text_encoders(trained_lora):
    components = trained_lora["components"]
    for name in PARTS:
        assert state_dicts_equal(weights(getattr(components, name)), trained_lora["before"][name]), name
    for name in ("unet", "text_encoder", "text_encoder_2"):
        ups = [p for n, p in getattr(components, name).named_parameters() if "lora_B" in n]
        assert ups and all(p.abs().sum() > 0 for p in ups), name
    assert trained_lora["loss_after"] < 0.95 * trained_lora["loss_before"]


def test_sdxl_lora_file_is_kohya_sdxl_layout_with_metadata(trained_lora):
    path = trained_lora["artifact"].path
    tensors = load_file(path)
    assert all(KOHYA.match(k) for k in tensors), [k for k in tensors if not KOHYA.match(k)][:5]
    bases = {k.split(".")[0] for k in tensors}
    assert len(tensors) == 3 * len(bases)
    te1 = {b for b in bases if b.startswith("lora_te1_text_model_encoder_layers_")}
    te2 = {b for b in bases if b.startswith("lora_te2_text_model_encoder_layers_")}
    # q, k, v, out of bigG's 2 layers; of CLIP-L's first only: its last layer's output is unused.
    assert len(te1) == 4 and len(te2) == 2 * 4 and not any("layers_1_" in b for b in te1)
    assert tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 48)
    assert tensors["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 64)
    meta = checkpoints.read_metadata(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_lora_loads_in_diffusers_with_every_key_and_reproduces_outputs(trained_lora, tiny_sdxl):
    components, path = trained_lora["components"], trained_lora["artifact"].path
    pipe = pipeline(tiny_sdxl["diffusers"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([500])
    with torch.no_grad():
        base = pipeline_prediction(pipe, latents, timestep, pipeline_conditioning(pipe, PROMPT))
    lora.apply_lora(pipe, path)
    loaded = sum(len(get_peft_model_state_dict(getattr(pipe, name), adapter_name="personalize"))
                 for name in ("unet", "text_encoder", "text_encoder_2"))
    assert loaded == 2 * len({k.split(".")[0] for k in load_file(path)})
    with torch.no_grad():
        theirs = pipeline_prediction(pipe, latents, timestep, pipeline_conditioning(pipe, PROMPT))
        ours = our_prediction(components, latents, timestep, PROMPT)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (base - theirs).abs().max() > 100 * (ours - theirs).abs().max(), "the LoRA should change the output"


# ------------------------------------------------------------------------------------------------ Textual Inversion

TOKEN = "<tok>"


@pytest.fixture(scope="module")
def trained_embedding(tiny_sdxl, tmp_path_factory):
    components = models.load_base(tiny_sdxl["single_file"])
    before = {name: weights(getattr(components, name)) for name in PARTS}
    tables = [components.text_encoder.get_input_embeddings().weight.clone(),
              components.text_encoder_2.get_input_embeddings().weight.clone()]
    cfg = embedding.EmbeddingConfig(token=TOKEN, init_word="toy", vectors=2, steps=15, lr=2e-2, resolution=64)
    out = tmp_path_factory.mktemp("sdxl-ti") / "tok.safetensors"
    method = embedding.EmbeddingMethod(cfg)
    artifact = run.personalize(components, method, make_subject_images(), None, cfg, out, device=CPU)
    return dict(components=components, artifact=artifact, before=before, tables=tables)


def test_sdxl_embedding_has_one_set_of_vectors_per_text_encoder(trained_embedding):
    tensors = load_file(trained_embedding["artifact"].path)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert tensors["clip_l"].shape == (2, 48) and tensors["clip_g"].shape == (2, 64)
    meta = checkpoints.read_metadata(trained_embedding["artifact"].path)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    components = trained_embedding["components"]
    # Export folded the vectors into the tables: every old row is unchanged, the new rows are the file's.
    for key, encoder, table in (("clip_l", components.text_encoder, trained_embedding["tables"][0]),
                                ("clip_g", components.text_encoder_2, trained_embedding["tables"][1])):
        now = encoder.get_input_embeddings().weight
        assert torch.equal(now[: len(table)], table)
        assert torch.equal(now[len(table):], tensors[key])
        init = table[components.tokenizer("toy", add_special_tokens=False).input_ids].mean(0)
        assert all(not torch.equal(row, init) for row in tensors[key])
    for name in ("unet", "vae"):
        assert state_dicts_equal(weights(getattr(components, name)), trained_embedding["before"][name])


def test_sdxl_embedding_loads_in_diffusers_with_the_trained_conditioning(trained_embedding, tiny_sdxl):
    components = trained_embedding["components"]
    pipe = pipeline(tiny_sdxl["diffusers"])
    embedding.load_embedding(pipe, trained_embedding["artifact"].path)
    prompt = f"a photo of {TOKEN}"
    family = components.family
    with torch.no_grad():
        theirs = pipeline_conditioning(pipe, prompt)
        ours = family.encode(components, family.tokenize(components, [f"a photo of {TOKEN} {TOKEN}_1"]))
    for key in ("encoder_hidden_states", "text_embeds"):
        assert torch.allclose(ours[key], theirs[key], atol=1e-6), key


# ------------------------------------------------------------------------------------------------ DreamBooth


def test_sdxl_dreambooth_with_prior_preservation_exports_the_input_key_set(tiny_sdxl, tmp_path):
    components = models.load_base(tiny_sdxl["single_file"])
    before = {name: weights(getattr(components, name)) for name in PARTS}
    cfg = dreambooth.DreamBoothConfig(prompt=PROMPT, steps=3, lr=1e-4, resolution=64, seed=0,
                                      class_prompt="a photo of a toy", class_images=2, class_sampler_steps=2,
                                      gradient_checkpointing=False)
    out = tmp_path / "toy.safetensors"
    artifact = run.personalize(components, dreambooth.DreamBoothMethod(cfg), make_subject_images(), None, cfg, out,
                               class_cache_dir=tmp_path / "class", device=CPU, release_frozen=True)
    assert artifact.class_images_generated == 2 and len(artifact.result.prior_losses) == 3
    after = weights(components.unet)
    moved = [k for k in after if not torch.equal(after[k], before["unet"][k])]
    assert len(moved) == len(after)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        assert state_dicts_equal(weights(getattr(components, name)), before[name]), name
    exported = load_file(out)
    assert exported.keys() == load_file(tiny_sdxl["single_file"]).keys()
    assert checkpoints.read_metadata(out)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=tiny_sdxl["diffusers"],
                                                      torch_dtype=torch.float32, add_watermarker=False)
    assert all(torch.equal(pipe.unet.state_dict()[k], v.half().float()) for k, v in after.items())
    reloaded = models.load_base(out, tokenizer_dir=tiny_sdxl["tokenizer"])
    assert state_dicts_equal(models.original_state_dict(reloaded), {k: v.float() for k, v in exported.items()})


def test_family_defaults_replace_only_options_left_at_the_method_default():
    sd15 = families.family_named("sd15")
    assert sd15.with_defaults(lora.LoRAConfig()) == lora.LoRAConfig()
    chosen = sdxl.FAMILY.with_defaults(lora.LoRAConfig())
    assert (chosen.resolution, chosen.rank, chosen.alpha) == (1024, 16, 8.0)
    kept = sdxl.FAMILY.with_defaults(lora.LoRAConfig(resolution=768, rank=4))
    assert (kept.resolution, kept.rank) == (768, 4)
    assert sdxl.FAMILY.with_defaults(embedding.EmbeddingConfig()).resolution == 1024
    assert sdxl.FAMILY.with_defaults(dreambooth.DreamBoothConfig()).resolution == 1024
