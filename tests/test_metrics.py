"""DINO / CLIP-I / CLIP-T / PRES / DIV on random-weight models: definitions, preprocessing, checkpoint layouts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel

from conftest import pack

metrics = pack("trainers.metrics")
random_dino = pack("trainers.testing.dino")
devices = pack("trainers.device")
cli = pack("cli")
PersonalizeError = pack("trainers.errors").PersonalizeError


def images(count, seed, size=(96, 128)):
    """An IMAGE batch [count,H,W,3] of smooth random colour fields, different enough for DINO to tell apart."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 6, 8, generator=generator)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).contiguous()


def cls_feature(dino, image):
    """One image's raw CLS feature, computed alone (batch of 1)."""
    with torch.no_grad():
        pixels = dino.preprocess(metrics.to_pil_images(image[None]))
        return dino.vit(pixel_values=pixels).last_hidden_state[0, 0].double()


def original_dino_cls(state, pixels):
    """DINO's own VisionTransformer forward (facebookresearch/dino, vision_transformer.py), from its checkpoint keys."""
    heads, width = 6, 384
    x = F.conv2d(pixels, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    for i in range(12):
        w = {key[len(f"blocks.{i}."):]: value for key, value in state.items() if key.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (width,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
        batch, tokens, _ = h.shape
        qkv = F.linear(h, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(batch, tokens, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (width // heads) ** -0.5).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + F.linear(mixed, w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (width,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                         w["mlp.fc2.bias"])
    return F.layer_norm(x, (width,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 0]


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    """A models/dino-like folder: dino-vits16/ (Hub layout) and original/dino_deitsmall16_pretrain.pth, same weights."""
    root = tmp_path_factory.mktemp("dino")
    random_dino.make_random_dino(root / "dino-vits16", seed=0)
    random_dino.make_random_dino_original(root / "original" / metrics.DINO_PTH_NAME, seed=0)
    return root


@pytest.fixture(scope="module")
def dino(dino_dir):
    return metrics.load_dino(dino_dir / "dino-vits16", "cpu")


# ------------------------------------------------------------------------------------------------- definitions

def test_an_image_scored_against_itself_is_one(dino):
    image = images(1, seed=1)
    result = metrics.dino_score(dino, image, image)
    assert result.score == pytest.approx(1.0, abs=1e-5)
    assert result.pairs == 1 and result.metric == "DINO"


def test_a_set_against_itself_scores_the_mean_of_its_cosine_matrix(dino):
    batch = images(3, seed=2)
    features = torch.stack([cls_feature(dino, image) for image in batch])
    matrix = F.cosine_similarity(features[:, None], features[None, :], dim=-1)
    result = metrics.dino_score(dino, batch, batch)
    assert result.score == pytest.approx(matrix.mean().item(), abs=1e-6)
    assert result.per_image == pytest.approx(matrix.mean(dim=1).tolist(), abs=1e-6)
    assert result.max == pytest.approx(1.0, abs=1e-6) and result.min == pytest.approx(matrix.min().item(), abs=1e-6)
    assert result.score < 1.0 - 1e-4, "distinct images must not all embed alike"


def test_score_equals_a_plain_loop_over_pairs(dino):
    generated, reference = images(3, seed=3), images(2, seed=4, size=(120, 80))
    generated_features = [cls_feature(dino, image) for image in generated]
    reference_features = [cls_feature(dino, image) for image in reference]
    pairs = [F.cosine_similarity(g, r, dim=0).item() for g in generated_features for r in reference_features]
    result = metrics.dino_score(dino, generated, reference, batch_size=2)
    assert result.pairs == 6
    assert result.score == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert (result.min, result.max) == pytest.approx((min(pairs), max(pairs)), abs=1e-6)


def test_score_does_not_depend_on_batch_size(dino):
    generated, reference = images(4, seed=5), images(1, seed=6)
    results = [metrics.dino_score(dino, generated, reference, batch_size=size) for size in (1, 3)]
    for result in results[1:]:
        assert result.score == pytest.approx(results[0].score, abs=1e-6)
        assert result.per_image == pytest.approx(results[0].per_image, abs=1e-6)


def test_inference_mode_inputs_and_a_model_loaded_in_inference_mode_work(dino_dir, tmp_path):
    # ComfyUI runs nodes under inference_mode: the IMAGE batch, and the first load_dino, may happen there.
    copy = tmp_path / metrics.DINO_PTH_NAME
    copy.write_bytes((dino_dir / "original" / metrics.DINO_PTH_NAME).read_bytes())
    with torch.inference_mode():
        batch = images(2, seed=7)
        model = metrics.load_dino(copy, "cpu")
        inside = metrics.dino_score(model, batch, batch).score
    outside = metrics.dino_score(model, batch, batch).score
    assert batch.is_inference() and inside == pytest.approx(outside, abs=1e-6)
    assert not any(p.is_inference() for p in model.vit.parameters()), "the cached model must outlive inference mode"


def test_pres_is_the_dino_computation_on_class_generations(dino):
    class_generated, subject = images(2, seed=8), images(1, seed=9)
    pres = metrics.pres_score(dino, class_generated, subject)
    assert pres.metric == "PRES"
    assert pres.score == pytest.approx(metrics.dino_score(dino, class_generated, subject).score, abs=1e-9)


def test_div_is_zero_for_identical_images_and_one_minus_cosine_for_distinct_ones(dino):
    same = images(1, seed=10).repeat(3, 1, 1, 1)
    assert metrics.div_score(dino, same).score == pytest.approx(0.0, abs=1e-6)
    two = images(2, seed=11)
    result = metrics.div_score(dino, two)
    cosine = F.cosine_similarity(cls_feature(dino, two[0]), cls_feature(dino, two[1]), dim=0).item()
    assert result.pairs == 1 and result.score == pytest.approx(1.0 - cosine, abs=1e-6) and result.score > 1e-4
    with pytest.raises(PersonalizeError, match="at least 2"):
        metrics.div_score(dino, two[:1])


def test_report_names_the_metric_score_and_each_image(dino):
    result = metrics.dino_score(dino, images(2, seed=12), images(1, seed=13))
    text = result.report(["a.png", "b.png"])
    assert text.startswith(f"DINO: {result.score:.4f}") and "a.png" in text and "b.png" in text and "0.668" in text


# ------------------------------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("width, height, resized, crop_box", [
    (512, 384, (341, 256), (58, 16, 282, 240)),   # int(256 * 512 / 384) = 341; round(58.5) = 58, as torchvision
    (384, 512, (256, 341), (16, 58, 240, 282)),
])
def test_preprocessing_is_resize_shorter_to_256_bicubic_center_crop_224_imagenet_norm(width, height, resized,
                                                                                      crop_box):
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    rgb = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + 3 * y) % 256], axis=-1).astype(np.uint8)
    batch = torch.from_numpy(rgb.astype(np.float32) / 255.0)[None]

    actual = metrics.DINO_PREPROCESS(metrics.to_pil_images(batch))

    cropped = Image.fromarray(rgb).resize(resized, Image.Resampling.BICUBIC).crop(crop_box)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = ((np.asarray(cropped, dtype=np.float64) / 255.0 - mean) / std).transpose(2, 0, 1)
    assert actual.shape == (1, 3, 224, 224) and actual.dtype == torch.float32
    np.testing.assert_allclose(actual[0].numpy(), expected, atol=1e-6)


def test_non_image_tensors_are_refused(dino):
    with pytest.raises(PersonalizeError, match=r"\[batch, height, width, 3\]"):
        metrics.dino_score(dino, torch.rand(2, 3, 64, 64), images(1, seed=14))


# ------------------------------------------------------------------------------------------------- model files

def test_original_pth_and_hub_layout_give_dino_s_own_embeddings(dino, dino_dir):
    original = metrics.load_dino(dino_dir / "original" / metrics.DINO_PTH_NAME, "cpu")
    batch = images(2, seed=15)
    assert torch.allclose(original.embed(batch), dino.embed(batch), atol=1e-6)

    state = torch.load(dino_dir / "original" / metrics.DINO_PTH_NAME, weights_only=True)
    with torch.no_grad():
        reference = F.normalize(original_dino_cls(state, dino.preprocess(metrics.to_pil_images(batch))).double(), dim=-1)
    assert torch.allclose(dino.embed(batch), reference, atol=1e-5)


def test_find_dino_model_takes_either_layout(dino_dir):
    assert metrics.find_dino_model([dino_dir / "nowhere", dino_dir]) == dino_dir / "dino-vits16"
    assert metrics.find_dino_model([dino_dir / "dino-vits16"]) == dino_dir / "dino-vits16"
    pth = dino_dir / "original" / metrics.DINO_PTH_NAME
    assert metrics.find_dino_model([dino_dir / "original"]) == pth


def test_a_missing_model_names_what_to_download_and_where(tmp_path):
    models_dino = tmp_path / "models" / "dino"
    models_dino.mkdir(parents=True)
    with pytest.raises(PersonalizeError) as caught:
        metrics.find_dino_model([models_dino, tmp_path / "absent"])
    message = str(caught.value)
    assert metrics.DINO_PTH_URL in message and "facebook/dino-vits16" in message
    assert f"put {metrics.DINO_PTH_NAME} in {models_dino}" in message and str(models_dino / "dino-vits16") in message


def test_a_foreign_pth_is_refused_with_the_expected_file(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(PersonalizeError, match=r"not the DINO ViT-S/16 checkpoint dino_deitsmall16_pretrain.pth "
                                               r"\(missing blocks\.0\..*; unexpected conv\.weight\)"):
        metrics.load_dino(path, "cpu")


def test_a_hub_folder_with_missing_weights_is_refused_not_left_random(dino_dir, tmp_path):
    folder = tmp_path / "dino-vits16"
    folder.mkdir()
    (folder / "config.json").write_bytes((dino_dir / "dino-vits16" / "config.json").read_bytes())
    state = load_file(dino_dir / "dino-vits16" / "model.safetensors")
    del state["layernorm.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(PersonalizeError, match="missing weights for ViTModel: layernorm.weight"):
        metrics.load_dino(folder, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(dino_dir):
    with pytest.raises(PersonalizeError, match="no CUDA GPU"):
        metrics.load_dino(dino_dir / "dino-vits16", "cuda")
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_models_are_cached_per_path_and_mtime(dino_dir, dino):
    folder = dino_dir / "dino-vits16"
    assert metrics.load_dino(folder, "cpu") is dino
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert metrics.load_dino(folder, "cpu") is not dino
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_dino_score_reads_files_at_their_own_size_and_prints_json(dino_dir, dino, tmp_path, capsys):
    generated, reference = images(2, seed=16), images(2, seed=17, size=(150, 100))
    for name, batch in (("generated", generated), ("reference", reference)):
        (tmp_path / name).mkdir()
        for i, picture in enumerate(metrics.to_pil_images(batch)):
            picture.save(tmp_path / name / f"{i}.png")

    code = cli.main(["dino-score", "--model", str(dino_dir), "--generated", str(tmp_path / "generated"),
                     "--reference", str(tmp_path / "reference"), "--batch-size", "3", "--device", "cpu", "--json"])

    assert code == 0
    output = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = metrics.dino_score(dino, generated, reference)
    assert output["dino"] == pytest.approx(expected.score, abs=1e-6) and output["pairs"] == 4
    assert list(output["per_image"]) == ["0.png", "1.png"]


# ------------------------------------------------------------------------------------------------- CLIP

def write_tiny_clip(folder):
    """A random CLIPModel and a byte-level BPE tokenizer of lowercase letters, one merge and the two specials."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = list(letters) + [c + "</w>" for c in letters] + ["ph", "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\np h\n", encoding="utf-8")
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=24, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return vocab


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    vocab = write_tiny_clip(folder)
    model = metrics.load_clip(folder, "cpu")
    ids = model.tokenizer("a photo").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"] and vocab["ph"] in ids
    return model


def test_clip_i_of_an_image_with_itself_is_one_and_embeddings_are_unit_rows(clip):
    batch = images(3, seed=18)
    embeddings = clip.embed(batch)
    assert embeddings.shape == (3, 16)
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-9)
    assert clip.preprocess(metrics.to_pil_images(batch)).shape == (3, 3, 32, 32)
    assert metrics.clip_i_score(clip, batch[:1], batch[:1]).score == pytest.approx(1.0, abs=1e-5)
    assert metrics.clip_i_score(clip, batch, batch[1:]).pairs == 6


def test_clip_t_is_the_cosine_of_each_image_with_its_prompt(clip):
    batch, prompts = images(2, seed=19), ["a photo of a dog", "a cat"]
    texts = clip.embed_texts(prompts)
    assert texts.shape == (2, 16)
    result = metrics.clip_t_score(clip, batch, prompts)
    expected = (clip.embed(batch) * texts).sum(dim=1)
    assert result.metric == "CLIP-T" and result.pairs == 2
    assert result.per_image == pytest.approx(expected.tolist(), abs=1e-9)
    shared = metrics.clip_t_score(clip, batch, "a cat")
    assert shared.per_image[1] == pytest.approx(result.per_image[1], abs=1e-6)
    with pytest.raises(PersonalizeError, match="one per image"):
        metrics.clip_t_score(clip, batch, ["a", "b", "c"])
