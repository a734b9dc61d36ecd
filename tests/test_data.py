"""Subject-folder loading: every odd image a user's folder may hold, made here in tmp_path, and the training pixels."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack

data = pack("trainers.data")
cli = pack("cli")
PersonalizeError = pack("trainers.errors").PersonalizeError

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def solid(color, size=(32, 32), mode="RGB"):
    return Image.new(mode, size, color)


def halves(left, right, size=(40, 20)):
    """An RGB image whose left half is ``left`` and right half is ``right``."""
    image = solid(left, size)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def pixel(subject, index, x, y):
    return tuple(round(float(v) * 255) for v in subject.images[index, y, x])


def close(actual, expected, tolerance=6):
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def load_one(folder, name, image, resolution=16, fit="crop", **save):
    image.save(folder / name, **save)
    subject = data.load_subject_folder(folder, resolution, fit)
    assert subject.files == [name]
    return subject


# --- what comes out -----------------------------------------------------------------------------------------------

def test_batch_follows_comfyui_image_convention(tmp_path):
    solid(RED, (50, 30)).save(tmp_path / "a.png")
    solid(BLUE, (30, 50)).save(tmp_path / "b.jpg", quality=95)
    subject = data.load_subject_folder(tmp_path, resolution=24)
    assert subject.images.shape == (2, 24, 24, 3)
    assert subject.images.dtype == torch.float32
    assert 0.0 <= subject.images.min() and subject.images.max() <= 1.0
    assert subject.sizes == [(50, 30), (30, 50)]
    assert subject.captions == ["", ""] and subject.warnings == []
    assert close(pixel(subject, 0, 12, 12), RED) and close(pixel(subject, 1, 12, 12), BLUE)


def test_files_load_in_name_order_and_other_files_are_ignored(tmp_path):
    for name, color in (("b.png", GREEN), ("c.webp", BLUE), ("a.PNG", RED)):
        solid(color).save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
    (tmp_path / "README.md").write_text("my dog")
    (tmp_path / "notes.txt").write_text("not a caption of any image")
    (tmp_path / "sub").mkdir()
    solid(RED).save(tmp_path / "sub" / "nested.png")
    (tmp_path / "._a.PNG").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    subject = data.load_subject_folder(tmp_path, 16)
    assert subject.files == ["a.PNG", "b.png", "c.webp"]
    assert [pixel(subject, i, 8, 8) for i in range(3)] == [RED, GREEN, BLUE]
    assert subject.warnings == []


def test_captions_come_from_the_txt_beside_each_image(tmp_path):
    solid(RED).save(tmp_path / "dog1.png")
    solid(RED).save(tmp_path / "dog2.jpg")
    (tmp_path / "dog1.txt").write_text("\ufeffa photo of sks dog on grass\n", encoding="utf-8")
    (tmp_path / "dog2.txt").write_bytes("caf\xe9".encode("latin-1"))
    subject = data.load_subject_folder(tmp_path, 16)
    assert subject.captions == ["a photo of sks dog on grass", ""]
    assert subject.files == ["dog1.png", "dog2.jpg"]
    assert len(subject.warnings) == 1 and "dog2.txt" in subject.warnings[0] and "UTF-8" in subject.warnings[0]


def test_crop_fills_the_square_and_pad_keeps_the_whole_image(tmp_path):
    halves(RED, BLUE, (80, 40)).save(tmp_path / "wide.png")
    cropped = data.load_subject_folder(tmp_path, 20, "crop")
    padded = data.load_subject_folder(tmp_path, 20, "pad")
    # crop keeps the middle 40x40: still half red, half blue, no white anywhere
    assert pixel(cropped, 0, 2, 0) == RED and pixel(cropped, 0, 17, 19) == BLUE
    assert (cropped.images < 0.99).any(dim=-1).all()
    # pad scales to 20x10 and puts 5 white rows above and below
    assert pixel(padded, 0, 10, 0) == WHITE and pixel(padded, 0, 10, 19) == WHITE
    assert close(pixel(padded, 0, 2, 10), RED) and close(pixel(padded, 0, 17, 10), BLUE)
    assert cropped.warnings == padded.warnings == []


def test_downscaling_is_smooth(tmp_path):
    # a 1-pixel checkerboard averages to mid grey with a proper filter; nearest-neighbour would keep pure black/white
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    subject = load_one(tmp_path, "checker.png", Image.fromarray(checker))
    assert torch.allclose(subject.images[0, 4:-4, 4:-4], torch.tensor(0.5), atol=0.05)


# --- every kind of image ------------------------------------------------------------------------------------------

def test_exif_orientation_6_rotates_the_pixels(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    subject = load_one(tmp_path, "phone.jpg", halves(RED, BLUE, (40, 20)), 40, "pad", exif=exif, quality=95)
    assert subject.sizes == [(20, 40)]  # upright size
    # upright it is portrait: the stored left (red) half is now on top, and the padding is at the sides
    assert close(pixel(subject, 0, 20, 5), RED, 20) and close(pixel(subject, 0, 20, 34), BLUE, 20)
    assert pixel(subject, 0, 2, 20) == WHITE and pixel(subject, 0, 37, 20) == WHITE


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 4112, 32896, 65535]], dtype=np.uint16).repeat(16, axis=0).repeat(4, axis=1)
    Image.fromarray(values).save(tmp_path / "depth.png")
    assert Image.open(tmp_path / "depth.png").mode.startswith("I")
    subject = data.load_subject_folder(tmp_path, 16)
    row = [pixel(subject, 0, x, 8) for x in (1, 6, 9, 14)]
    assert [r[0] for r in row] == [0, 16, 128, 255]
    assert all(r[0] == r[1] == r[2] for r in row)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    subject = load_one(tmp_path, "print.jpg", solid((255, 0, 0, 0), mode="CMYK"), quality=95)  # pure cyan ink
    assert close(pixel(subject, 0, 8, 8), (0, 255, 255), 8)


def test_palette_png_transparency_goes_on_white(tmp_path):
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, *BLUE] + [0] * 762)  # index 0 black (made transparent), index 1 blue
    image.paste(1, (16, 0, 32, 32))
    subject = load_one(tmp_path, "logo.png", image, transparency=0)
    assert pixel(subject, 0, 2, 8) == WHITE and pixel(subject, 0, 13, 8) == BLUE


def test_rgba_alpha_goes_on_white(tmp_path):
    image = Image.new("RGBA", (30, 10), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (10, 0, 20, 10))
    image.paste((0, 0, 0, 128), (20, 0, 30, 10))
    subject = load_one(tmp_path, "cutout.png", image, 30, "pad")
    assert pixel(subject, 0, 4, 15) == WHITE  # transparent red -> white, not red or black
    assert pixel(subject, 0, 15, 15) == BLUE
    assert close(pixel(subject, 0, 25, 15), (127, 127, 127), 2)


def test_grayscale_and_grayscale_alpha_become_rgb(tmp_path):
    solid(100, mode="L").save(tmp_path / "a_gray.png")
    solid((100, 0), mode="LA").save(tmp_path / "b_gray_alpha.png")
    subject = data.load_subject_folder(tmp_path, 16)
    assert subject.images.shape == (2, 16, 16, 3)
    assert pixel(subject, 0, 8, 8) == (100, 100, 100)
    assert pixel(subject, 1, 8, 8) == WHITE


def test_webp_loads(tmp_path):
    subject = load_one(tmp_path, "shot.webp", halves(RED, GREEN, (32, 32)), lossless=True)
    assert pixel(subject, 0, 2, 8) == RED and pixel(subject, 0, 13, 8) == GREEN


def test_tiny_image_is_upscaled_with_a_warning(tmp_path):
    subject = load_one(tmp_path, "dot.png", solid(GREEN, (1, 1)))
    assert subject.images.shape == (1, 16, 16, 3)
    assert (subject.images == torch.tensor([0.0, 1.0, 0.0])).all()
    assert subject.sizes == [(1, 1)]
    assert len(subject.warnings) == 1 and "dot.png" in subject.warnings[0] and "upscaled" in subject.warnings[0]


def test_small_side_warns_only_when_the_fit_enlarges_it(tmp_path):
    solid(RED, (40, 10)).save(tmp_path / "strip.png")
    assert len(data.load_subject_folder(tmp_path, 20, "crop").warnings) == 1  # 10 < 20: enlarged to fill
    assert data.load_subject_folder(tmp_path, 20, "pad").warnings == []  # shrunk to 20x5 and padded


# --- files that can't be used -------------------------------------------------------------------------------------

def write_broken_files(folder):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "cut.jpg", quality=95)
    full = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(full[: len(full) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is text, not a picture")
    solid(RED).save(folder / "anim.png", format="GIF")  # a real image, in a format we don't read


def test_broken_files_are_skipped_with_a_warning_naming_each(tmp_path):
    write_broken_files(tmp_path)
    solid(RED).save(tmp_path / "good.png")
    subject = data.load_subject_folder(tmp_path, 16)
    assert subject.files == ["good.png"]
    assert len(subject.warnings) == 4
    warnings = dict(w.split(":", 1) for w in subject.warnings)
    assert "truncated" in warnings["cut.jpg"]
    assert "empty" in warnings["empty.jpg"]
    assert "not a JPEG, PNG or WebP" in warnings["notes.png"] and "not a JPEG, PNG or WebP" in warnings["anim.png"]
    assert all(w.endswith("skipped.") for w in subject.warnings)


def test_folder_of_only_broken_files_is_an_error_naming_them(tmp_path):
    write_broken_files(tmp_path)
    with pytest.raises(PersonalizeError) as raised:
        data.load_subject_folder(tmp_path, 16)
    message = str(raised.value)
    assert str(tmp_path) in message
    assert all(name in message for name in ("cut.jpg", "empty.jpg", "notes.png", "anim.png"))


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    solid(RED, (64, 64)).save(tmp_path / "a_bomb.png")  # 4096 px: over twice the limit, Pillow raises
    solid(RED, (40, 40)).save(tmp_path / "b_bomb.png")  # 1600 px: Pillow only warns, we still refuse
    solid(BLUE, (30, 30)).save(tmp_path / "c_ok.png")
    with pytest.warns(Image.DecompressionBombWarning):
        subject = data.load_subject_folder(tmp_path, 16)
    assert subject.files == ["c_ok.png"]
    assert [w.split(":")[0] for w in subject.warnings] == ["a_bomb.png", "b_bomb.png"]
    assert all("limit" in w for w in subject.warnings)


@pytest.mark.parametrize("make, expected", [
    (lambda folder: None, "is empty"),
    (lambda folder: (folder / "README.md").write_text("photos to come"), "no .jpg, .jpeg, .png or .webp file"),
])
def test_folder_without_images_is_an_error(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(PersonalizeError, match=expected) as raised:
        data.load_subject_folder(tmp_path)
    assert str(tmp_path) in str(raised.value)


def test_missing_folder_and_bad_options_are_errors(tmp_path):
    with pytest.raises(PersonalizeError, match="does not exist"):
        data.load_subject_folder(tmp_path / "nope")
    with pytest.raises(PersonalizeError, match="fit"):
        data.load_subject_folder(tmp_path, 16, "stretch")
    with pytest.raises(PersonalizeError, match="resolution"):
        data.load_subject_folder(tmp_path, 0)


# --- folder names from the node -----------------------------------------------------------------------------------

def test_resolve_inside_accepts_subfolders(tmp_path):
    (tmp_path / "dog" / "set 2").mkdir(parents=True)
    assert data.resolve_inside(tmp_path, "dog") == (tmp_path / "dog").resolve()
    assert data.resolve_inside(str(tmp_path), "dog/set 2") == (tmp_path / "dog" / "set 2").resolve()


@pytest.mark.parametrize("name", ["../outside", "dog/../../outside", "link", "link/inner", "ABSOLUTE"])
def test_resolve_inside_refuses_escapes(tmp_path, name):
    base, outside = tmp_path / "input", tmp_path / "outside"
    (base / "dog").mkdir(parents=True)
    (outside / "inner").mkdir(parents=True)
    os.symlink(outside, base / "link")
    if name == "ABSOLUTE":
        name = str(outside)
    with pytest.raises(PersonalizeError, match="leads outside"):
        data.resolve_inside(base, name)


# --- any IMAGE batch -> training pixels ---------------------------------------------------------------------------

def test_training_pixels_from_an_inference_mode_rgba_batch():
    with torch.inference_mode():
        images = torch.zeros(2, 10, 20, 4)
        images[..., 0] = 1.0  # red...
        images[:, :, :10, 3] = 1.0  # ...opaque on the left half, transparent on the right
    assert images.is_inference()
    pixels = data.images_to_training_pixels(images, 16)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32 and pixels.is_contiguous()
    assert not pixels.is_inference()
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    # center crop keeps columns 5..14: red on the left, red-on-white = white on the right
    assert torch.allclose(pixels[:, :, 8, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(pixels[:, :, 8, 15], torch.tensor([1.0, 1.0, 1.0]))
    weight = torch.ones(1, requires_grad=True)
    (pixels * weight).sum().backward()  # an inference tensor would refuse to be saved for backward
    assert weight.grad is not None


def test_training_pixels_called_inside_inference_mode_are_still_normal():
    loaded = torch.rand(1, 16, 16, 3)
    with torch.inference_mode():
        pixels = data.images_to_training_pixels(loaded, 16)
    assert not pixels.is_inference()
    assert torch.allclose(pixels, loaded.permute(0, 3, 1, 2) * 2 - 1)
    assert pixels.data_ptr() != loaded.data_ptr()


def test_training_pixels_accept_a_loaded_folder(tmp_path):
    solid(GREEN, (30, 20)).save(tmp_path / "a.png")
    pixels = data.images_to_training_pixels(data.load_subject_folder(tmp_path, 24).images, 8)
    assert pixels.shape == (1, 3, 8, 8)
    assert torch.allclose(pixels[0, :, 4, 4], torch.tensor([-1.0, 1.0, -1.0]), atol=1e-3)


@pytest.mark.parametrize("shape", [(16, 16, 3), (1, 16, 16, 2), (0, 16, 16, 3)])
def test_training_pixels_refuse_what_is_not_an_image_batch(shape):
    with pytest.raises(PersonalizeError, match="IMAGE batch"):
        data.images_to_training_pixels(torch.zeros(shape), 16)


# --- the load-subject command -------------------------------------------------------------------------------------

@pytest.fixture
def run_cli(capsys):
    def run(*argv):
        code = cli.main(["load-subject", *map(str, argv)])
        return code, capsys.readouterr()
    return run


def test_cli_json_reports_the_folder(tmp_path, run_cli):
    solid(RED, (40, 30)).save(tmp_path / "b.png")
    solid(BLUE, (1, 1)).save(tmp_path / "a.png")
    (tmp_path / "b.txt").write_text("sks dog")
    code, out = run_cli(tmp_path, "--resolution", 16, "--fit", "pad", "--json")
    assert code == 0
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["count"] == 2
    assert result["files"] == ["a.png", "b.png"]
    assert result["sizes"] == [[1, 1], [40, 30]]
    assert result["captions"] == ["", "sks dog"]
    assert len(result["warnings"]) == 1 and "a.png" in result["warnings"][0]


def test_cli_human_mode_prints_warnings_on_stderr(tmp_path, run_cli):
    solid(BLUE, (1, 1)).save(tmp_path / "dot.png")
    code, out = run_cli(tmp_path)
    assert code == 0
    assert "count: 1" in out.out
    assert "warning: dot.png" in out.err


def test_cli_empty_folder_exits_2_with_the_error(tmp_path, run_cli):
    code, out = run_cli(tmp_path, "--json")
    assert code == 2
    assert out.out == ""
    assert out.err.startswith("error: ") and str(tmp_path) in out.err and "empty" in out.err
