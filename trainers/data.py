"""Subject images: a folder of photos -> an IMAGE batch, and any IMAGE batch -> training pixels.

``load_subject_folder`` reads the JPEG/PNG/WebP files of one folder in name order, applies their EXIF orientation,
flattens every mode to RGB (alpha on white), resizes and center-crops (or pads) them to a square, and pairs each with
the caption in ``<stem>.txt`` if there is one. Unreadable files are skipped with a warning that names them; a folder
with nothing usable is a PersonalizeError. The batch follows ComfyUI's IMAGE convention: [B,H,W,3] float32 in 0..1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import PersonalizeError
from .options import option, validate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Decoders Image.open may pick: the content decides, so a PNG named .jpg loads and a GIF named .png is refused.
_FORMATS = ("JPEG", "PNG", "WEBP")
_WHITE = (255, 255, 255)


@dataclass
class LoadSubjectConfig:
    resolution: int = option(512, "side of the square images, in pixels", min=8, max=4096, step=8)
    fit: str = option("crop", "crop: fill the square and cut what overflows; pad: keep the whole image, pad with white",
                      choices=("crop", "pad"))


@dataclass
class SubjectImages:
    images: torch.Tensor  # [B,H,W,3] float32 in 0..1
    captions: list[str]  # '' where the image has no caption file
    files: list[str]  # file names, in load order
    sizes: list[tuple[int, int]]  # (width, height) of each file, upright (after EXIF orientation)
    warnings: list[str]


def resolve_inside(base_dir, name) -> Path:
    """``base_dir / name`` resolved (symlinks too), refused unless it stays inside ``base_dir``."""
    base = Path(base_dir).resolve()
    path = (base / name).resolve()  # an absolute name replaces base here, and is then judged like any other
    if not path.is_relative_to(base):
        raise PersonalizeError(f"Folder name {name!r} leads outside {base} (to {path}); "
                               f"put the images in a folder inside {base}.")
    return path


def load_subject_folder(folder, resolution: int = 512, fit: str = "crop") -> SubjectImages:
    validate(LoadSubjectConfig(resolution=resolution, fit=fit))
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PersonalizeError(f"Subject folder {folder} does not exist or is not a folder.")
    # Dot files are skipped: macOS leaves '._photo.jpg' metadata files beside the photos.
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise PersonalizeError(f"Subject folder {folder} is empty; put 3-20 JPEG, PNG or WebP photos of the subject "
                               "in it.")
    candidates = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not candidates:
        listed = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise PersonalizeError(f"Subject folder {folder} has no .jpg, .jpeg, .png or .webp file (it holds {listed}).")

    pictures, captions, files, sizes, warnings = [], [], [], [], []
    for path in candidates:
        image, problem = _read_upright_rgb(path)
        if image is None:
            warnings.append(f"{path.name}: {problem}; skipped.")
            continue
        square, enlarged = _to_square(image, resolution, fit)
        if enlarged:
            warnings.append(f"{path.name} is only {image.width}x{image.height}, so it was upscaled to fill the "
                            f"{resolution}px square and will look blurry. Use a larger photo.")
        caption, caption_problem = _read_caption(path)
        if caption_problem:
            warnings.append(caption_problem)
        pictures.append(np.asarray(square, dtype=np.float32) / 255.0)
        captions.append(caption)
        files.append(path.name)
        sizes.append(image.size)
    if not pictures:
        raise PersonalizeError(f"No usable image in {folder}: {' '.join(warnings)} "
                               "Replace these files with JPEG, PNG or WebP photos.")
    return SubjectImages(torch.from_numpy(np.stack(pictures)), captions, files, sizes, warnings)


def _read_upright_rgb(path: Path) -> tuple[Image.Image | None, str]:
    """The decoded, EXIF-rotated RGB image, or None and why it can't be used."""
    if path.stat().st_size == 0:
        return None, "the file is empty (0 bytes)"
    limit = Image.MAX_IMAGE_PIXELS  # read now, so that a limit changed at run time is honoured
    try:
        with Image.open(path, formats=_FORMATS) as image:
            # Pillow raises above twice the limit and only warns between 1x and 2x; both count as too large here.
            if limit and image.width * image.height > limit:
                return None, (f"{image.width}x{image.height} is over Pillow's limit of {limit} pixels "
                              "(decompression-bomb guard); downscale it")
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        return None, f"{error} Downscale it"
    except Image.UnidentifiedImageError:
        return None, "not a JPEG, PNG or WebP image (corrupt, or the extension is wrong)"
    except Exception as error:  # noqa: BLE001 - any decoder failure on a user's file means "unreadable", not a bug
        return None, f"could not be decoded ({error})"
    return _to_rgb(image), ""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert clips values above 255 to white, so scale 0..65535 down.
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def _to_square(image: Image.Image, resolution: int, fit: str) -> tuple[Image.Image, bool]:
    """The image at resolution x resolution, and whether it had to be enlarged to get there."""
    size = (resolution, resolution)
    if fit == "pad":
        enlarged = max(image.size) < resolution
        return ImageOps.pad(image, size, method=Image.Resampling.LANCZOS, color=_WHITE), enlarged
    enlarged = min(image.size) < resolution
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS), enlarged


def _read_caption(path: Path) -> tuple[str, str]:
    """The caption in ``<stem>.txt`` beside the image ('' if none), and a warning if that file can't be read."""
    caption_path = path.with_suffix(".txt")
    if not caption_path.is_file():
        return "", ""
    try:
        return caption_path.read_text(encoding="utf-8-sig").strip(), ""
    except UnicodeDecodeError:
        return "", f"{caption_path.name} is not UTF-8 text; caption ignored. Save it as UTF-8."


def images_to_training_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """A ComfyUI IMAGE batch [B,H,W,3 or 4] in 0..1 -> contiguous float32 [B,3,R,R] in -1..1.

    Center-crops to a square and resizes to R. Alpha is composited on white, as the folder loader does. The result
    is always a new normal tensor: ComfyUI runs nodes under torch.inference_mode(), and inference tensors can't take
    part in autograd.
    """
    if images.dim() != 4 or images.shape[-1] not in (3, 4) or images.shape[0] == 0:
        raise PersonalizeError(f"Expected an IMAGE batch shaped [batch, height, width, 3]; got {list(images.shape)}.")
    # Outside inference mode, the arithmetic below makes fresh normal tensors even from an inference-tensor input.
    with torch.inference_mode(False):
        pixels = images.detach().float().permute(0, 3, 1, 2)
        if pixels.shape[1] == 4:
            rgb, alpha = pixels[:, :3], pixels[:, 3:]
            pixels = rgb * alpha + (1.0 - alpha)
        height, width = pixels.shape[-2:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[:, :, top:top + side, left:left + side]
        if side != resolution:
            pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0.0, 1.0)
        return (pixels * 2.0 - 1.0).contiguous()
