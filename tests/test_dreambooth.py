import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_subject_images, pack

loop = pack("trainers.loop")
dreambooth = pack("trainers.methods.dreambooth")
run = pack("trainers.run")
data = pack("trainers.data")
models = pack("trainers.models")
clip_text = pack("trainers.families.clip")
checkpoints = pack("trainers.checkpoints")
optim = pack("trainers.optim")
errors = pack("trainers.errors")

PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of a toy"
CPU = torch.device("cpu")


def config(**overrides):
    # Tiny-model settings: a random model needs a far higher lr than 5e-6 to move visibly in a few steps, and
    # gradient checkpointing only costs time here.
    values = dict(prompt=PROMPT, class_prompt="", steps=4, lr=1e-4, resolution=64, seed=0,
                  gradient_checkpointing=False, class_images=2, class_sampler_steps=2)
    values.update(overrides)
    return dreambooth.DreamBoothConfig(**values)


def train_in_memory(components, images, class_pixels=None, callbacks=None, **overrides):
    """The shared loop with the DreamBooth method, no export: for tests about what training does to the weights."""
    cfg = config(**overrides)
    return loop.train(components, dreambooth.DreamBoothMethod(cfg), data.images_to_training_pixels(images, 64),
                      [""] * images.shape[0], cfg, class_pixels=class_pixels, device=CPU, callbacks=callbacks)


def personalize(components, images, out, **overrides):
    cfg = config(**overrides)
    return run.personalize(components, dreambooth.DreamBoothMethod(cfg), images, None, cfg, out,
                           class_cache_dir=out.parent / "class", device=CPU)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def one_colour(count, rgb, size=64):
    """Class images as training pixels: [count,3,size,size] in -1..1, all one colour."""
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) * 2 - 1).expand(count, 3, size, size).clone()


def test_defaults_follow_the_paper():
    cfg = dreambooth.DreamBoothConfig()
    assert (cfg.lr, cfg.steps, cfg.prior_weight, cfg.class_images) == (5e-6, 1000, 1.0, 200)
    assert cfg.prior_preservation and cfg.class_prompt == "a photo of a dog" and cfg.prompt == "a photo of sks dog"
    assert cfg.gradient_checkpointing and cfg.save_precision == "fp16" and cfg.weights_dtype == "fp32"


def test_training_lowers_the_denoising_loss_and_moves_every_unet_weight(components, subject_images):
    pixels = data.images_to_training_pixels(subject_images, 64)
    before_loss = loop.fixed_denoising_loss(components, pixels, PROMPT)
    before = weights(components.unet)
    result = train_in_memory(components, subject_images, steps=30, lr=3e-4)
    after_loss = loop.fixed_denoising_loss(components, pixels, PROMPT)
    assert after_loss / before_loss < 0.9, (before_loss, after_loss)
    unchanged = [k for k, v in weights(components.unet).items() if torch.equal(v, before[k])]
    assert unchanged == [], f"UNet weights not trained: {unchanged[:5]}"
    # Trained conv weights on CPU: contiguous (faster there than the channels_last they were loaded in).
    assert all(p.is_contiguous() for p in components.unet.parameters() if p.ndim == 4)
    assert len(result.losses) == 30 and result.prior_losses == []


def test_fused_backward_is_the_same_adamw_without_a_full_set_of_gradients(tiny_model, subject_images):
    """Stepping each weight inside the backward pass gives the weights the usual step gives (without clipping,
    which it then does per weight), and no gradient outlives the moment its weight is updated."""
    trained, grads_held = {}, {}
    for fused_backward in (False, True):
        components = models.load_base(tiny_model["single_file"])
        unet_weights = list(components.unet.parameters())
        held = grads_held[fused_backward] = []

        def count_when_backward_reaches(_module, _args, output):
            # A tensor hook on the first down block's output runs once the backward pass has gone through the
            # rest of the UNet: count the weights whose gradient is held at that moment.
            output[0].register_hook(lambda grad: held.append(sum(w.grad is not None for w in unet_weights)))

        hook = components.unet.down_blocks[0].register_forward_hook(count_when_backward_reaches)
        train_in_memory(components, subject_images, steps=3, max_grad_norm=0.0, train_text_encoder=True,
                        fused_backward=fused_backward)
        hook.remove()
        trained[fused_backward] = {**weights(components.unet), **weights(components.text_encoder)}
    assert trained[False].keys() == trained[True].keys()
    assert all(torch.equal(trained[True][k], v) for k, v in trained[False].items())
    assert len(grads_held[False]) == len(grads_held[True]) == 3
    assert min(grads_held[False]) > len(unet_weights) // 2 and max(grads_held[True]) == 0, grads_held
    with pytest.raises(errors.PersonalizeError, match="gradient_accumulation"):
        train_in_memory(models.load_base(tiny_model["single_file"]), subject_images, steps=1, gradient_accumulation=2)


def test_loss_is_instance_term_plus_lambda_times_prior_term(tiny_model, subject_images):
    class_pixels = one_colour(3, (0.2, 0.6, 0.3))
    runs = {}
    for weight in (1.0, 2.5):
        components = models.load_base(tiny_model["single_file"])
        result = train_in_memory(components, subject_images, class_pixels, steps=3, class_prompt=CLASS_PROMPT,
                                 prior_weight=weight)
        assert len(result.instance_losses) == len(result.prior_losses) == 3
        for total, instance, prior in zip(result.losses, result.instance_losses, result.prior_losses):
            assert total == pytest.approx(instance + weight * prior, rel=1e-5)
        runs[weight] = (result, weights(components.unet))
    (first, unet_first), (second, unet_second) = runs[1.0], runs[2.5]
    # Same seed, same draws: step 1 sees the same model, so both terms agree; λ only scales the prior's gradient.
    assert first.instance_losses[0] == pytest.approx(second.instance_losses[0], rel=1e-6)
    assert first.prior_losses[0] == pytest.approx(second.prior_losses[0], rel=1e-6)
    assert any(not torch.equal(unet_first[k], unet_second[k]) for k in unet_first)

    components = models.load_base(tiny_model["single_file"])
    no_prior = train_in_memory(components, subject_images, class_pixels, steps=3, class_prompt=CLASS_PROMPT,
                               prior_weight=0.0)
    assert no_prior.prior_losses == [] and no_prior.losses == no_prior.instance_losses
    assert any(not torch.equal(unet_first[k], v) for k, v in weights(components.unet).items())


def test_prior_term_is_the_denoising_loss_on_the_class_images(components, subject_images, monkeypatch):
    """With lr 0 and the VAE posterior collapsed to its mean, the loop's prior term must equal the loss computed
    here from scratch: class latents (one colour → one latent) noised with the loop's own draws, class prompt."""
    real_posterior = loop.encode_latent_posterior

    def posterior_mean_only(vae, pixels, **kwargs):
        mean, std = real_posterior(vae, pixels, **kwargs)
        return mean, torch.zeros_like(std)

    monkeypatch.setattr(loop, "encode_latent_posterior", posterior_mean_only)
    draws = []
    add_noise = components.noise_scheduler.add_noise

    def recording_add_noise(latents, noise, timesteps):
        draws.append((latents.clone(), noise.clone(), timesteps.clone()))
        return add_noise(latents, noise, timesteps)

    monkeypatch.setattr(components.noise_scheduler, "add_noise", recording_add_noise)
    class_pixels = one_colour(2, (0.1, 0.3, 0.9))
    result = train_in_memory(components, subject_images, class_pixels, steps=1, lr=0.0, batch_size=2,
                             class_prompt=CLASS_PROMPT)
    (latents, noise, timesteps), = draws
    scaling = components.vae.config.scaling_factor
    with torch.no_grad():
        class_latent = real_posterior(components.vae, class_pixels[:1])[0] * scaling
        assert torch.allclose(latents[2:], class_latent.expand(2, -1, -1, -1), atol=1e-6)
        assert not torch.allclose(latents[:2], class_latent.expand(2, -1, -1, -1), atol=1e-2)
        hidden = components.text_encoder(clip_text.tokenize(components.tokenizer, [CLASS_PROMPT]))[0].expand(2, -1, -1)
        prediction = components.unet(add_noise(class_latent.expand(2, -1, -1, -1), noise[2:], timesteps[2:]),
                                     timesteps[2:], hidden).sample
        expected = torch.nn.functional.mse_loss(prediction, noise[2:]).item()
    assert result.prior_losses[0] == pytest.approx(expected, rel=1e-4)


def test_text_encoder_is_bit_identical_unless_trained(components, subject_images):
    before = weights(components.text_encoder)
    train_in_memory(components, subject_images, steps=2)
    assert all(torch.equal(v, before[k]) for k, v in weights(components.text_encoder).items())


def test_text_encoder_trains_and_stops_after_text_encoder_steps(components, subject_images):
    initial = weights(components.text_encoder)
    snapshots = {}

    def on_step(info):
        snapshots[info.step] = weights(components.text_encoder)

    train_in_memory(components, subject_images, callbacks=loop.Callbacks(on_step=on_step), steps=4,
                    train_text_encoder=True, text_encoder_lr=1e-3, text_encoder_steps=2)

    def changed(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a)

    assert changed(initial, snapshots[1]) and changed(snapshots[1], snapshots[2])
    assert not changed(snapshots[2], snapshots[3]) and not changed(snapshots[2], snapshots[4])


def test_single_file_round_trips_with_the_original_key_set(tiny_model, components, subject_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "dog.safetensors"
    method = dreambooth.DreamBoothMethod(config(train_text_encoder=True), diffusers_out=tmp_path / "dog-diffusers")
    cfg = config(train_text_encoder=True)
    # Run as the node and the CLI run it: releasing frozen parts must keep what the checkpoint needs.
    artifact = run.personalize(components, method, subject_images, None, cfg, out, device=CPU, release_frozen=True)
    assert components.vae is not None and components.text_encoder is not None
    assert artifact.path == out and sorted(p.name for p in tmp_path.iterdir()) == ["dog-diffusers", "dog.safetensors"]
    assert load_file(out).keys() == load_file(tiny_model["single_file"]).keys()
    assert all(v.dtype == torch.float16 for v in load_file(out).values())

    metadata = checkpoints.read_metadata(out)
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.trigger_phrase"] == PROMPT and metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.title"] == "dog" and metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["personalize.method"] == "dreambooth" and "modelspec.date" in metadata

    # Loaded back, every weight is the trained one rounded to fp16 (exactly: fp16 → fp32 is lossless).
    trained = {name: {k: v.half().float() for k, v in weights(getattr(components, name)).items()}
               for name in ("unet", "vae", "text_encoder")}
    reloaded = models.load_base(out, tokenizer_dir=tiny_model["tokenizer"])
    for name in trained:
        again = weights(getattr(reloaded, name))
        assert all(torch.equal(again[k], v) for k, v in trained[name].items()), name
    pipeline = StableDiffusionPipeline.from_single_file(str(out), config=tiny_model["diffusers"],
                                                        torch_dtype=torch.float32)
    assert all(torch.equal(pipeline.unet.state_dict()[k], v) for k, v in trained["unet"].items())
    assert all(torch.equal(pipeline.text_encoder.state_dict()[k], v)
               for k, v in trained["text_encoder"].items() if k in pipeline.text_encoder.state_dict())
    # The diffusers folder keeps the training precision.
    folder = StableDiffusionPipeline.from_pretrained(str(tmp_path / "dog-diffusers"))
    assert all(torch.equal(folder.unet.state_dict()[k], v) for k, v in weights(components.unet).items())


def test_class_images_are_generated_once_and_reused(tiny_model, subject_images, tmp_path):
    overrides = dict(steps=1, class_prompt=CLASS_PROMPT, class_images=2, class_sampler_steps=2)
    first = personalize(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "a.safetensors",
                        **overrides)
    second = personalize(models.load_base(tiny_model["single_file"]), subject_images, tmp_path / "b.safetensors",
                         **overrides)
    assert (first.class_images_generated, second.class_images_generated) == (2, 0)
    assert first.class_image_dir == second.class_image_dir
    assert len(first.result.prior_losses) == 1


def test_cancel_writes_no_artifact_only_the_training_state(components, subject_images, tmp_path):
    steps = []
    callbacks = loop.Callbacks(on_step=lambda info: steps.append(info.step), should_stop=lambda: len(steps) >= 2)
    cfg = config(steps=10)
    with pytest.raises(errors.TrainingCancelled):
        run.personalize(components, dreambooth.DreamBoothMethod(cfg, tmp_path / "folder"), subject_images, None, cfg,
                        tmp_path / "out" / "dog.safetensors", device=CPU, callbacks=callbacks)
    assert steps == [1, 2]
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "dog.state"]
    assert not (tmp_path / "folder").exists()


def test_bf16_weights_are_refused_on_cpu(components, subject_images):
    with pytest.raises(errors.PersonalizeError, match="bf16"):
        train_in_memory(components, subject_images, weights_dtype="bf16")


def test_stochastic_rounding_keeps_updates_below_bf16_resolution():
    """At lr 5e-6 a 0.02 weight's update is 1/24 of a bf16 step: round-to-nearest keeps it where it was,
    stochastic rounding moves it by the right amount on average."""
    moved = {}
    for name, optimizer_type, dtype in (("nearest", torch.optim.AdamW, torch.bfloat16),
                                        ("stochastic", optim.StochasticAdamW, torch.bfloat16),
                                        ("fp32", torch.optim.AdamW, torch.float32)):
        start = torch.full((50_000,), 0.02, dtype=dtype)
        parameter = torch.nn.Parameter(start.clone())
        optimizer = optimizer_type([parameter], lr=5e-6, weight_decay=0.0)
        for _ in range(20):
            parameter.grad = torch.ones_like(parameter)
            optimizer.step()
        moved[name] = (parameter.float() - start.float()).mean().item()
    assert moved["nearest"] == 0.0
    assert moved["fp32"] == pytest.approx(-20 * 5e-6, rel=1e-3)
    assert moved["stochastic"] == pytest.approx(moved["fp32"], rel=0.05)


def test_cli_trains_end_to_end(tiny_model, tmp_path, capsys):
    images = tmp_path / "subject"
    images.mkdir()
    for i, image in enumerate(make_subject_images(3)):
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(images / f"{i}.png")
    out = tmp_path / "dog.safetensors"
    argv = ["train-dreambooth", "--base", tiny_model["single_file"], "--images", str(images), "--out", str(out),
            "--steps", "2", "--lr", "1e-4", "--resolution", "64", "--class-prompt", CLASS_PROMPT,
            "--class-images", "2", "--class-sampler-steps", "2", "--class-cache", str(tmp_path / "class"),
            "--train-text-encoder", "--no-gradient-checkpointing", "--device", "cpu",
            "--diffusers-out", str(tmp_path / "dog-diffusers"), "--json"]
    cli = pack("cli")
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output"] == str(out) and out.is_file() and result["steps"] == 2
    assert result["diffusers"] == str(tmp_path / "dog-diffusers")
    assert result["class_images_generated"] == 2
    for key in ("final_loss", "seconds_per_step", "peak_rss_mb"):
        assert isinstance(result[key], float) and result[key] > 0
    # No silent overwrite: the same command again is refused before any training; nor is the base replaced.
    assert cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    onto_base = argv[:argv.index("--diffusers-out")] + ["--json"]
    onto_base[onto_base.index(str(out))] = tiny_model["single_file"]
    assert cli.main(onto_base + ["--overwrite"]) == 2
    assert "is the base model itself" in capsys.readouterr().err


def test_adafactor_trains_with_a_fraction_of_adamws_state(components, subject_images):
    from transformers.optimization import Adafactor

    before = weights(components.unet)
    method = dreambooth.DreamBoothMethod(config(optimizer="adafactor", fused_backward=False))
    optimizers = []
    make = method.make_optimizer
    method.make_optimizer = lambda *args: optimizers.append(make(*args)) or optimizers[-1]
    loop.train(components, method, data.images_to_training_pixels(subject_images, 64), [""] * 4,
               config(optimizer="adafactor", fused_backward=False), device=CPU)
    (optimizer,) = optimizers
    assert isinstance(optimizer, Adafactor)
    after = weights(components.unet)
    assert all(not torch.equal(after[k], before[k]) for k in after)
    state = sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    parameters = sum(p.numel() for p in components.unet.parameters())
    assert state < 0.6 * parameters  # AdamW keeps 2 per parameter; Adafactor factors the second moment


def test_adafactor_refuses_bf16_weights():
    with pytest.raises(errors.PersonalizeError, match="adafactor"):
        dreambooth.check_device(config(optimizer="adafactor", weights_dtype="bf16"), CPU)
