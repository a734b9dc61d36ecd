"""Aspect-ratio buckets and masked loss: photos keep their shape (only the rounding to a bucket is cut), batches come
from one bucket, square photos train exactly as before, and a mask at floor 0 makes the background not count."""

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_subject_images, pack

buckets = pack("trainers.buckets")
loop = pack("trainers.loop")
lora = pack("trainers.methods.lora")
run = pack("trainers.run")
models = pack("trainers.models")
data = pack("trainers.data")
CPU = torch.device("cpu")


def photo(width, height, seed=0):
    """[1,H,W,3] noise with a red first column and a blue last one (to see what a crop cut)."""
    image = torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25
    image[:, :, 0] = torch.tensor([1.0, 0.0, 0.0])
    image[:, :, -1] = torch.tensor([0.0, 0.0, 1.0])
    return image


def test_buckets_are_multiples_of_64_about_the_resolutions_area():
    sizes = buckets.bucket_sizes(512)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= 512 * 512 and width * (height + 64) > 512 * 512 or max(width, height) == 1024
        assert 256 <= min(width, height) and max(width, height) <= 1024
    # At the test models' 64 px only the square fits: buckets then change nothing.
    assert buckets.bucket_sizes(64) == [(64, 64)]


@pytest.mark.parametrize("width,height", [(600, 200), (200, 400), (300, 200), (256, 256), (500, 100)])
def test_a_photo_keeps_its_aspect_and_loses_only_the_rounding_to_its_bucket(width, height):
    prepared = buckets.prepare_images([photo(width, height)], 256, bucketing=True)
    (bucket,) = prepared.buckets
    bucket_width, bucket_height = bucket.size
    assert bucket.pixels.shape == (1, 3, bucket_height, bucket_width)
    # The nearest bucket in aspect ratio, and the part cut is exactly the aspect mismatch (to a pixel).
    mismatch = abs(math.log(width / height) - math.log(bucket_width / bucket_height))
    assert mismatch == min(abs(math.log(width / height) - math.log(w / h)) for w, h in buckets.bucket_sizes(256))
    kept = min(width / height, bucket_width / bucket_height) / max(width / height, bucket_width / bucket_height)
    condition = prepared.conditioning[0]
    assert condition.original_size == (height, width) and condition.target_size == (bucket_height, bucket_width)
    if bucket_width / bucket_height > width / height:  # taller than the bucket: rows were cut
        assert abs(condition.crop_top_left[0] * 2 / bucket_height - (1 / kept - 1)) < 0.05
    else:
        assert abs(condition.crop_top_left[1] * 2 / bucket_width - (1 / kept - 1)) < 0.05
    if mismatch == 0:  # an exact fit: both edge columns survive
        pixels = (bucket.pixels[0] + 1) / 2
        assert pixels[0, :, 0].mean() > 0.8 and pixels[2, :, -1].mean() > 0.8


def test_without_bucketing_photos_are_center_cropped_squares_as_before():
    images = [photo(600, 200), photo(200, 400, seed=1)]
    prepared = buckets.prepare_images(images, 128, bucketing=False)
    (bucket,) = prepared.buckets
    assert bucket.size == (128, 128)
    expected = torch.cat([data.images_to_training_pixels(image, 128) for image in images])
    assert torch.equal(bucket.pixels, expected)


def test_batches_come_from_one_bucket_and_every_bucket_is_drawn():
    images = [photo(384, 128), photo(128, 384, 1), photo(384, 128, 2), photo(256, 256, 3)]
    prepared = buckets.prepare_images(images, 256, bucketing=True)
    assert sorted(len(b.indices) for b in prepared.buckets) == [1, 1, 2]

    def posterior(pixels):  # latents that name their photo: the mean's value is the photo's first pixel
        mean = pixels[:, :4, ::8, ::8]
        return mean.unsqueeze(0), torch.zeros_like(mean).unsqueeze(0)

    cache = buckets.LatentCache(prepared, posterior, flip=False)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        batch = cache.draw(generator, 3)
        sizes = {tuple(reversed(prepared.conditioning[i].target_size)) for i in batch.indices}
        assert len(sizes) == 1 and batch.mean.shape[-2:] == tuple(s // 8 for s in reversed(sizes.pop()))
        seen.update(batch.indices)
    assert seen == {0, 1, 2, 3}


def lora_config(**overrides):
    values = dict(prompt="a photo of sks toy", steps=3, lr=1e-3, resolution=64, seed=0, rank=2, alpha=2.0)
    values.update(overrides)
    return lora.LoRAConfig(**values)


def train(tiny_model, images, out, masks=None, **overrides):
    config = lora_config(**overrides)
    return run.personalize(models.load_base(tiny_model["single_file"]), lora.LoRAMethod(config), images, None, config,
                           out, device=CPU, class_cache_dir=out.parent / "class", masks=masks)


def test_square_photos_train_the_same_file_with_and_without_buckets(tiny_model, tmp_path):
    photos = make_subject_images(3)
    on = train(tiny_model, photos, tmp_path / "on.safetensors", bucketing=True)
    off = train(tiny_model, list(photos.split(1)), tmp_path / "off.safetensors", bucketing=False)
    assert on.result.buckets == [{"width": 64, "height": 64, "images": 3}]
    first, second = load_file(on.path), load_file(off.path)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_photos_of_several_shapes_train_in_their_buckets_with_prior_preservation(tiny_model, tmp_path):
    images = [photo(256, 64), photo(64, 256, 1), photo(250, 70, 2), photo(128, 128, 3)]
    artifact = train(tiny_model, images, tmp_path / "x.safetensors", resolution=128, steps=6, batch_size=2,
                     class_prompt="a photo of a toy", class_images=2, class_sampler_steps=1)
    assert json.loads(artifact.metadata["ss_bucket_info"])["buckets"]["0"]["count"] >= 1
    assert sorted((b["width"], b["height"], b["images"]) for b in artifact.result.buckets) == [
        (64, 256, 1), (128, 128, 1), (256, 64, 2)]
    assert len(artifact.result.prior_losses) == 6 and all(map(math.isfinite, artifact.result.losses))


def test_a_mask_of_another_size_than_its_image_is_a_clear_error():
    with pytest.raises(pack("trainers.errors").PersonalizeError, match="mask 2 is 8x8 but image 2 is 16x8"):
        buckets.prepare_images([photo(8, 8), photo(16, 8)], 64, True, masks=[torch.ones(8, 8), torch.ones(8, 8)])


def test_masked_loss_at_floor_0_ignores_the_background():
    """The loss, and its gradient, do not see what the prediction or the target hold where the mask is 0."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1.0
    changed = target.clone()
    changed[:, :, :2] += 5.0  # another background

    def loss_and_gradient(target, floor):
        prediction = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
        weights = floor + (1 - floor) * mask
        loss = loop.per_sample_loss(prediction, target, scheduler, torch.tensor([10, 500]), 0.0, weights).sum()
        loss.backward()
        return loss.detach(), prediction.grad

    loss, gradient = loss_and_gradient(target, 0.0)
    assert torch.equal(gradient * (1 - mask), torch.zeros_like(gradient))
    changed_loss, changed_gradient = loss_and_gradient(changed, 0.0)
    assert torch.equal(loss, changed_loss) and torch.equal(gradient, changed_gradient)
    floored, _ = loss_and_gradient(target, 0.1)
    assert not torch.equal(loss_and_gradient(changed, 0.1)[0], floored), "with a floor the background counts"
    unmasked = loop.per_sample_loss(target * 0, target, scheduler, torch.tensor([10, 500]), 0.0)
    assert torch.allclose(unmasked, target.pow(2).mean(dim=(1, 2, 3)))


def test_a_masked_run_is_not_changed_by_the_background_of_its_photos_at_floor_0(tiny_model, tmp_path):
    """End to end at floor 0 with a mask that is 0 on whole latent pixels: the background's latents still enter the
    UNet (its convolutions see them), so the file differs, but the loss counts only the subject's pixels: a mask
    of ones trains like no mask, and a run with masks trains (finite, the file complete)."""
    photos = make_subject_images(2)
    ones = [torch.ones(64, 64), torch.ones(64, 64)]
    plain = train(tiny_model, photos, tmp_path / "plain.safetensors")
    full = train(tiny_model, photos, tmp_path / "full.safetensors", masks=ones, mask_floor=0.0)
    for key, value in load_file(plain.path).items():
        assert torch.allclose(value.float(), load_file(full.path)[key].float(), atol=1e-3), key
    half = [torch.zeros(64, 64), torch.zeros(64, 64)]
    for mask in half:
        mask[:, :32] = 1.0
    masked = train(tiny_model, photos, tmp_path / "masked.safetensors", masks=half, mask_floor=0.0)
    assert all(map(math.isfinite, masked.result.losses))
    assert load_file(masked.path).keys() == load_file(plain.path).keys()
    assert masked.result.losses != plain.result.losses


def test_cli_trains_in_buckets_with_alpha_masks_and_reports_them(tiny_model, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (width, height) in enumerate([(256, 64), (64, 256), (128, 128)]):
        rgba = Image.new("RGBA", (width, height), (200, 30, 30, 0))
        rgba.paste((30, 200, 30, 255), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        rgba.save(folder / f"{i}.png")
    out = tmp_path / "cli.safetensors"
    code = pack("cli").main(["train-lora", "--base", tiny_model["single_file"], "--images", str(folder), "--out",
                             str(out), "--steps", "2", "--resolution", "128", "--rank", "2", "--device", "cpu",
                             "--masks", "alpha", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted((b["width"], b["height"]) for b in result["buckets"]) == [(64, 256), (128, 128), (256, 64)]
    subject = data.load_subject_folder(folder, 128, "keep", masks="alpha")
    assert [tuple(image.shape[1:3]) for image in subject.images] == [(64, 256), (256, 64), (128, 128)]
    assert all(mask.shape == image.shape[1:3] for mask, image in zip(subject.masks, subject.images))
    assert subject.masks[0][32, 128] == 1.0 and subject.masks[0][2, 2] == 0.0
