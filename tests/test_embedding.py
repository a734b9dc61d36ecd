"""Textual Inversion on the tiny model: only the new vectors train, the file loads in diffusers, the CLI works."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_subject_images, pack
from safetensors.torch import load_file

TOKEN = "<tok>"
VECTORS = 3


def encode(pipeline, prompt: str) -> torch.Tensor:
    """The UNet conditioning for ``prompt``, through the pipeline (which expands a multi-vector token)."""
    return pipeline.encode_prompt(prompt, "cpu", 1, do_classifier_free_guidance=False)[0]


def denoising_loss(components, latents, noise, timesteps, prompt: str) -> float:
    loop = pack("trainers.loop")
    noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        ids = pack("trainers.families.clip").tokenize(components.tokenizer, [prompt] * len(latents))
        hidden = components.text_encoder(ids)[0]
        prediction = components.unet(noisy, timesteps, hidden).sample
    target = loop.denoising_target(components.noise_scheduler, latents, noise, timesteps)
    return float(torch.nn.functional.mse_loss(prediction, target))


def state(components) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(components, name).state_dict().items()}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One 3-vector run (the loop, then the method's export), with what the tests compare it to."""
    loop, embedding = pack("trainers.loop"), pack("trainers.methods.embedding")
    components = pack("trainers.models").load_base(tiny_model["single_file"])
    config = embedding.EmbeddingConfig(token=TOKEN, init_word="toy", vectors=VECTORS, steps=20, lr=2e-2,
                                       resolution=64, seed=0)
    pixels = pack("trainers.data").images_to_training_pixels(make_subject_images(), config.resolution)

    # A fixed set of (image, timestep, noise) triples, independent of the training seed.
    mean, std = loop.encode_latent_posterior(components.vae, pixels)
    generator = torch.Generator().manual_seed(1234)
    index = torch.arange(16) % len(pixels)
    latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) \
        * components.vae.config.scaling_factor
    pairs = (latents, torch.randn(latents.shape, generator=generator),
             torch.randint(0, 1000, (len(latents),), generator=generator))
    # Every new vector starts as the init word's vector, so this is the untrained token's loss.
    loss_before = denoising_loss(components, *pairs, "a photo of a " + " ".join(["toy"] * VECTORS))
    before = state(components)
    vocab_size = len(components.tokenizer)

    method = embedding.EmbeddingMethod(config)
    result = loop.train(components, method, pixels, [""] * len(pixels), config, device=torch.device("cpu"))
    hidden = encode(components.pipeline(), f"a photo of {TOKEN}")
    path, metadata = method.export(components, config, result, tmp_path_factory.mktemp("ti") / "tok.safetensors")
    return dict(components=components, config=config, method=method, result=result, path=path, metadata=metadata,
                before=before, after=state(components), vocab_size=vocab_size, hidden=hidden,
                loss_before=loss_before, loss_after=denoising_loss(components, *pairs, f"a photo of a {TOKEN}"))


def test_denoising_loss_decreases_on_fixed_pairs(trained):
    assert trained["loss_before"] - trained["loss_after"] > 1e-4, (trained["loss_before"], trained["loss_after"])


def test_only_the_new_vectors_change(trained):
    before, after, vocab_size = trained["before"], trained["after"], trained["vocab_size"]
    table_key = "text_encoder.embeddings.token_embedding.weight"
    assert set(before) == set(after)
    for key in before:
        if key != table_key:
            assert torch.equal(before[key], after[key]), key
    table = after[table_key]
    assert table.shape[0] == vocab_size + VECTORS
    assert torch.equal(table[:vocab_size], before[table_key])
    vectors = load_file(str(trained["path"]))["emb_params"]
    assert torch.equal(table[vocab_size:], vectors)
    init = before[table_key][trained["components"].tokenizer.convert_tokens_to_ids("toy</w>")]
    assert all(not torch.equal(v, init) for v in vectors)
    # The new vectors stayed within the length cap.
    assert vectors.norm(dim=1).max() <= trained["method"].splices[0][2] * (1 + 1e-5)


def test_file_loads_in_diffusers_with_the_trained_conditioning(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model["diffusers"], safety_checker=None)
    pack("trainers.methods.embedding").load_embedding(pipeline, trained["path"])  # token from the file's metadata
    assert [pipeline.tokenizer.convert_ids_to_tokens(i) for i in range(len(pipeline.tokenizer) - VECTORS,
                                                                       len(pipeline.tokenizer))] \
        == [TOKEN, f"{TOKEN}_1", f"{TOKEN}_2"]
    loaded = encode(pipeline, f"a photo of {TOKEN}")
    assert (loaded - trained["hidden"]).abs().max() <= 1e-6


def test_file_format_size_and_metadata(trained):
    path, metadata = trained["path"], trained["metadata"]
    tensors = load_file(str(path))
    assert list(tensors) == ["emb_params"]
    assert tensors["emb_params"].shape == (VECTORS, 48) and tensors["emb_params"].dtype == torch.float32
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + VECTORS * 48 * 4
    assert pack("trainers.checkpoints").read_metadata(path) == metadata
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert (metadata["personalize.token"], metadata["personalize.init_word"], metadata["personalize.vectors"],
            metadata["personalize.steps"]) == (TOKEN, "toy", "3", "20")
    assert metadata["personalize.base_model_hash"] == trained["components"].fingerprint


def test_prompts_come_from_the_templates():
    embedding = pack("trainers.methods.embedding")
    config = embedding.EmbeddingConfig(token=TOKEN, vectors=2, templates="style")
    options = embedding.EmbeddingMethod(config).prompts(config, ["", "at night"])
    assert options[0][0] == f"a painting in the style of {TOKEN} {TOKEN}_1"
    assert len(options[0]) == len(embedding.TEMPLATES["style"])
    assert options[1][0] == f"a painting in the style of {TOKEN} {TOKEN}_1, at night"


def test_token_names_and_init_word_rules(components):
    embedding = pack("trainers.methods.embedding")
    PersonalizeError = pack("trainers.errors").PersonalizeError

    def prepare(**values):
        config = embedding.EmbeddingConfig(**values)
        method = embedding.EmbeddingMethod(config)
        return method, method.prepare(components, config)

    for bad, message in [("My<Tok>", "lowercase"), ("two words", "without spaces"), ("", "without spaces")]:
        with pytest.raises(PersonalizeError, match=message):
            embedding.EmbeddingMethod(embedding.EmbeddingConfig(token=bad))
    for word in ("toy", "sks"):  # words the tokenizer knows
        with pytest.raises(PersonalizeError, match=f"token '{word}' is already .* e.g. '<{word}>'"):
            prepare(token=word)
    with pytest.raises(PersonalizeError, match="init word ' ' has no tokens"):
        prepare(token=TOKEN, init_word=" ")
    assert len(components.tokenizer) == components.text_encoder.config.vocab_size  # refusals add nothing

    # A phrase of several tokens: every vector starts at the mean of their vectors.
    table = components.text_encoder.get_input_embeddings().weight.detach().clone()
    method, groups = prepare(token=TOKEN, init_word="teddy bear", vectors=2)
    ids = components.tokenizer.convert_tokens_to_ids(["teddy</w>", "bear</w>"])
    assert groups[0]["params"] == [method.splices[0][1].vectors]
    assert torch.equal(method.splices[0][1].vectors, table[ids].mean(dim=0).repeat(2, 1))
    # The name is now taken (also by the next free suggestion's check).
    with pytest.raises(PersonalizeError, match=f"token '{TOKEN}' is already .* e.g. '<tok-2>'"):
        prepare(token=TOKEN)


def test_cli_trains_and_writes_an_embedding(tiny_model, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, image in enumerate(make_subject_images(count=2)):
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(images / f"{i}.png")
    out = tmp_path / "tok.safetensors"
    args = ["train-embedding", "--base", tiny_model["single_file"], "--images", str(images), "--out", str(out),
            "--token", TOKEN, "--init-word", "toy", "--vectors", "1", "--steps", "3", "--resolution", "64",
            "--device", "cpu", "--json"]
    cli = pack("cli")
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["output"] == str(out) and report["steps"] == 3
    for key in ("final_loss", "seconds_per_step", "peak_rss_mb"):
        assert report[key] > 0, key
    assert load_file(str(out))["emb_params"].shape == (1, 48)

    # The same inputs again reuse the file; other inputs are refused and leave it as it was, before training.
    written = out.read_bytes()
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"] is True
    other = [*args]
    other[other.index("--steps") + 1] = "4"
    assert cli.main(other) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == written
    assert cli.main(args[:-1] + ["--vectors", "17", "--json"]) == 2
    assert "vectors must be at most 16" in capsys.readouterr().err
