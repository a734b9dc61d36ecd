import gc
import re
import weakref

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import pack

loop = pack("trainers.loop")
lora = pack("trainers.methods.lora")
run = pack("trainers.run")
data = pack("trainers.data")
models = pack("trainers.models")
clip_text = pack("trainers.families.clip")
errors = pack("trainers.errors")

PROMPT = "a photo of sks toy"
CPU = torch.device("cpu")


def config(**overrides):
    values = dict(prompt=PROMPT, steps=30, lr=1e-3, resolution=64, seed=0, rank=4, alpha=4.0)
    values.update(overrides)
    return lora.LoRAConfig(**values)


def train(components, images, out, callbacks=None, release_frozen=False, **overrides):
    cfg = config(**overrides)
    return run.personalize(components, lora.LoRAMethod(cfg), images, None, cfg, out,
                           class_cache_dir=out.parent / "class-cache", device=CPU, callbacks=callbacks,
                           release_frozen=release_frozen)


def base_weights(components):
    """Every non-adapter weight, under its name before peft wrapped the layer (".base_layer" removed)."""
    return {f"{name}.{k.replace('.base_layer', '')}": v.clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(components, name).state_dict().items() if "lora_" not in k}


def test_training_lowers_the_subject_loss_and_changes_only_the_adapters(components, subject_images, tmp_path):
    pixels = data.images_to_training_pixels(subject_images, 64)
    loss_before = loop.fixed_denoising_loss(components, pixels, PROMPT)
    weights_before = base_weights(components)

    artifact = train(components, subject_images, tmp_path / "lora.safetensors", steps=40, lr=1e-2,
                     train_text_encoder=True)

    weights_after = base_weights(components)
    assert weights_before.keys() == weights_after.keys()
    changed = [k for k in weights_before if not torch.equal(weights_before[k], weights_after[k])]
    assert changed == [], f"base weights changed: {changed[:5]}"
    for module in (components.unet, components.text_encoder):
        ups = [p for n, p in module.named_parameters() if "lora_B" in n]
        assert ups and all(p.abs().sum() > 0 for p in ups), "every adapter should have been trained"
    loss_after = loop.fixed_denoising_loss(components, pixels, PROMPT)
    assert loss_after / loss_before < 0.9, (loss_before, loss_after)
    assert len(artifact.result.losses) == 40 and all(map(torch.isfinite, torch.tensor(artifact.result.losses)))


def file_content(path):
    """Tensors and metadata of a safetensors file (its header's key order is not deterministic)."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_same_seed_gives_an_identical_file(tiny_model, subject_images, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "a" / "x.safetensors",
                  steps=5)
    second = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "b" / "x.safetensors",
                   steps=5)
    (first_tensors, first_meta), (second_tensors, second_meta) = file_content(first.path), file_content(second.path)
    assert first_meta == second_meta
    assert first_tensors.keys() == second_tensors.keys()
    assert all(torch.equal(first_tensors[k], second_tensors[k]) for k in first_tensors)
    third = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "c" / "x.safetensors",
                  steps=5, seed=1)
    third_tensors, _ = file_content(third.path)
    assert not all(torch.equal(first_tensors[k], third_tensors[k]) for k in first_tensors)


def test_releasing_the_frozen_parts_changes_nothing_but_what_is_held(tiny_model, subject_images, tmp_path):
    """The node and the CLI drop the VAE and a frozen text encoder once their outputs are cached: same file, less
    memory. A trained text encoder, or previews (which decode and encode prompts), keep what they need."""
    kept = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "kept" / "x.safetensors",
                 steps=4)
    released_components = models.load_base(tiny_model["single_file"])
    dropped = [weakref.ref(released_components.vae), weakref.ref(released_components.text_encoder)]
    still_alive = []

    def on_step(info):
        gc.collect()
        still_alive.append([ref() is not None for ref in dropped])

    released = train(released_components, subject_images, tmp_path / "released" / "x.safetensors", steps=4,
                     release_frozen=True, callbacks=loop.Callbacks(on_step=on_step))
    assert released_components.vae is None and released_components.text_encoder is None
    # Frozen conv weights keep the channels_last layout they were loaded in (faster for them on CPU).
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in released_components.unet.parameters() if p.ndim == 4)
    assert still_alive == [[False, False]] * 4, "nothing may keep a dropped module (and its memory) alive"
    kept_tensors, released_tensors = file_content(kept.path)[0], file_content(released.path)[0]
    assert kept_tensors.keys() == released_tensors.keys()
    assert all(torch.equal(kept_tensors[k], released_tensors[k]) for k in kept_tensors)

    with_text_encoder = models.load_base(tiny_model["single_file"])
    train(with_text_encoder, subject_images, tmp_path / "te" / "x.safetensors", steps=2, train_text_encoder=True,
          release_frozen=True)
    assert with_text_encoder.vae is None and with_text_encoder.text_encoder is not None

    previewed, previews = models.load_base(tiny_model["single_file"]), []
    train(previewed, subject_images, tmp_path / "preview" / "x.safetensors", steps=2, preview_every=2,
          callbacks=loop.Callbacks(on_preview=lambda step, image: previews.append(step)), release_frozen=True)
    assert previews == [2] and previewed.vae is not None and previewed.text_encoder is not None


KOHYA_KEY = re.compile(r"^(lora_unet|lora_te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One LoRA with text-encoder adapters, trained once for the export checks."""
    from conftest import make_subject_images

    components = models.load_base(tiny_model["single_file"])
    out = tmp_path_factory.mktemp("trained") / "subject.safetensors"
    artifact = train(components, make_subject_images(), out, steps=8, train_text_encoder=True, rank=4, alpha=2.0,
                     save_precision="fp32")
    return components, artifact


def test_export_is_kohya_layout_in_complete_triples_with_metadata(trained):
    _, artifact = trained
    tensors = load_file(artifact.path)
    assert all(KOHYA_KEY.match(k) for k in tensors), [k for k in tensors if not KOHYA_KEY.match(k)][:5]
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    for base in bases:
        down, up = tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"]
        assert down.shape[0] == 4 and up.shape[1] == 4
        assert tensors[f"{base}.alpha"].item() == 2.0
    assert len(tensors) == 3 * len(bases)
    assert any(b.startswith("lora_te_text_model_encoder_layers_") for b in bases)
    with safe_open(str(artifact.path), "pt") as f:
        meta = f.metadata()
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_learning_rate",
                "ss_max_train_steps", "ss_resolution", "ss_sd_model_name", "ss_new_sd_model_hash",
                "sshs_model_hash", "modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase",
                "modelspec.resolution", "modelspec.prediction_type", "modelspec.date"):
        assert meta.get(key), key
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.trigger_phrase"] == PROMPT


def comfyui_sd1_lora_names(components) -> set[str]:
    """The LoRA module names ComfyUI's SD1 key map accepts (comfy/lora.py: model_lora_keys_unet / _clip):
    'lora_unet_' + any diffusers UNet weight's module path with '.' → '_', and 'lora_te_text_model_encoder_layers_
    {i}_{self_attn_q_proj|…|mlp_fc2}' for the CLIP-L layers."""
    weights = [k.replace(".base_layer", "") for k in components.unet.state_dict() if "lora_" not in k]
    unet = {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in weights if k.endswith(".weight")}
    layers = components.text_encoder.config.num_hidden_layers
    parts = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    text = {f"lora_te_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}
    return unet | text


def test_every_key_maps_to_a_module_under_comfyui_naming(trained):
    components, artifact = trained
    accepted = comfyui_sd1_lora_names(components)
    bases = {k.split(".")[0] for k in load_file(artifact.path)}
    assert bases <= accepted, sorted(bases - accepted)[:5]


def test_file_loads_in_diffusers_and_reproduces_the_trained_outputs(trained, tiny_model):
    components, artifact = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model["diffusers"], safety_checker=None)
    lora.apply_lora(pipe, artifact.path)
    # Every module in the file became an adapter in the pipeline: nothing was dropped or left over.
    from peft import get_peft_model_state_dict

    loaded = len(get_peft_model_state_dict(pipe.unet, adapter_name="personalize")) + \
        len(get_peft_model_state_dict(pipe.text_encoder, adapter_name="personalize"))
    assert loaded == 2 * len({k.split(".")[0] for k in load_file(artifact.path)})

    ids = clip_text.tokenize(components.tokenizer, [PROMPT])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    timestep = torch.tensor([500])
    with torch.no_grad():
        ours_text = components.text_encoder(ids)[0]
        theirs_text = pipe.text_encoder(ids)[0]
        ours = components.unet(latents, timestep, ours_text).sample
        theirs = pipe.unet(latents, timestep, theirs_text).sample
        base_pipe = StableDiffusionPipeline.from_pretrained(tiny_model["diffusers"], safety_checker=None)
        base = base_pipe.unet(latents, timestep, base_pipe.text_encoder(ids)[0]).sample
    assert torch.allclose(ours_text, theirs_text, atol=1e-4)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(base, theirs, atol=1e-4), "the LoRA should change the output"


def test_prior_preservation_generates_class_images_once_then_reuses_them(tiny_model, subject_images, tmp_path):
    settings = dict(steps=2, class_prompt="a photo of a toy", class_images=3, class_sampler_steps=2)
    first = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "a.safetensors",
                  **settings)
    assert first.class_images_generated == 3
    assert len(list(first.class_image_dir.glob("*.png"))) == 3
    assert len(first.result.prior_losses) == 2
    second = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "b.safetensors",
                   **settings)
    assert second.class_images_generated == 0 and second.class_image_dir == first.class_image_dir
    more = train(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "c.safetensors",
                 **dict(settings, class_images=4))
    assert more.class_images_generated == 1, "only the missing image is generated"


def test_cancel_stops_within_one_step_and_writes_only_the_training_state(components, subject_images, tmp_path):
    steps_seen = []
    callbacks = loop.Callbacks(on_step=lambda info: steps_seen.append(info.step),
                               should_stop=lambda: len(steps_seen) >= 3)
    out = tmp_path / "cancelled.safetensors"
    with pytest.raises(errors.TrainingCancelled):
        train(components, subject_images, out, callbacks=callbacks, steps=50)
    assert steps_seen == [1, 2, 3]
    assert list(tmp_path.iterdir()) == [tmp_path / "cancelled.state"]  # what a resume continues from
    assert [p.name for p in (tmp_path / "cancelled.state").iterdir()] == ["step-000003"]


def test_a_diverging_loss_stops_with_a_clear_error_and_no_file(components, subject_images, tmp_path):
    out = tmp_path / "nan.safetensors"
    with pytest.raises(errors.PersonalizeError, match="loss became .* lower the learning rate|Lower the learning"):
        train(components, subject_images, out, steps=30, lr=1e6, max_grad_norm=0.0)
    assert not out.exists()


@pytest.fixture
def cli_lora(tiny_model, tmp_path, capsys):
    """The train-lora command line on 3 photos in a folder, its --out, and a runner returning (exit code, the --json
    object or stderr)."""
    import json

    from PIL import Image

    from conftest import make_subject_images

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(make_subject_images(3)):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    out = tmp_path / "cli.safetensors"
    args = ["train-lora", "--base", tiny_model["single_file"], "--images", str(folder), "--out", str(out),
            "--steps", "3", "--resolution", "64", "--rank", "2", "--device", "cpu", "--json"]

    def run(argv):
        code = pack("cli").main(argv)
        captured = capsys.readouterr()
        return code, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err

    return args, out, run


def test_cli_trains_and_reports_json(cli_lora):
    args, out, run = cli_lora
    code, result = run(args)
    assert code == 0
    for key in ("output", "steps", "final_loss", "seconds_per_step", "peak_rss_mb"):
        assert key in result
    assert result["output"] == str(out) and out.is_file() and result["steps"] == 3 and result["reused"] is False


def test_cli_reuses_an_out_trained_from_the_same_inputs_and_refuses_one_from_others(cli_lora):
    args, out, run = cli_lora
    code, first = run(args)
    assert code == 0 and first["reused"] is False
    written, stamp = out.read_bytes(), out.stat().st_mtime_ns
    code, again = run(args)
    assert code == 0 and again["reused"] is True and again["seconds_per_step"] is None
    assert abs(again["final_loss"] - first["final_loss"]) < 1e-4 and again["steps"] == 3  # 5 decimals kept
    assert out.read_bytes() == written and out.stat().st_mtime_ns == stamp, "a reused file is not rewritten"
    other = [*args]
    other[other.index("--rank") + 1] = "4"
    code, error = run(other)
    assert code == 2 and "already exists" in error and "--overwrite" in error
    assert out.read_bytes() == written
    code, replaced = run(other + ["--overwrite"])
    assert code == 0 and replaced["reused"] is False and out.read_bytes() != written


def test_cancel_during_a_step_stops_inside_the_unet(components, subject_images, tmp_path):
    """Cancel is asked at every UNet block too: a long step of a big model does not run to its end first."""
    asked, steps_done = [], []

    def should_stop():
        asked.append(1)
        return len(asked) >= 3  # the step's own check, the first block, then stop at the second block

    with pytest.raises(errors.TrainingCancelled):
        train(components, subject_images, tmp_path / "x.safetensors", steps=5,
              callbacks=loop.Callbacks(on_step=steps_done.append, should_stop=should_stop))
    assert steps_done == [] and len(asked) == 3
    assert list(tmp_path.iterdir()) == []
