"""Subject images: a folder of photos -> an IMAGE batch, and any IMAGE batch -> training pixels.

``load_subject_folder`` reads the JPEG/PNG/WebP files of one folder in name order, applies their EXIF orientation,
flattens every mode to RGB (alpha on white), resizes and center-crops (or pads) them to a square, or keeps each one's
shape (``keep``: scaled down to about the resolution's area, for aspect buckets), and pairs each with the caption in
``<stem>.txt`` if there is one, and optionally with a mask (its alpha channel, or the file of the same stem in a mask
folder; white = subject). Unreadable files are skipped with a warning that names them; a folder with nothing usable
is a PersonalizeError. The batch follows ComfyUI's IMAGE convention: [B,H,W,3] float32 in 0..1; with ``keep`` it is a
list of [1,H,W,3] images (ComfyUI's list of IMAGE).
"""

from __future__ import annotations

import os
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
    fit: str = option("crop", "crop: fill the square and cut what overflows; pad: keep the whole image, pad with "
                      "white", choices=("crop", "pad"))


# 'keep': each photo at its own aspect ratio (for aspect buckets), scaled down to about the resolution's area.
FITS = ("crop", "pad", "keep")


@dataclass
class SubjectImages:
    images: torch.Tensor | list[torch.Tensor]  # [B,H,W,3] float32 in 0..1; with fit=keep a list of [1,H,W,3]
    captions: list[str]  # '' where the image has no caption file
    files: list[str]  # file names, in load order
    sizes: list[tuple[int, int]]  # (width, height) of each file, upright (after EXIF orientation)
    warnings: list[str]
    masks: list[torch.Tensor] | None = None  # [H,W] in 0..1 per image, at its size, when asked for


def resolve_inside(base_dir, name) -> Path:
    """``base_dir / name`` resolved (symlinks too), refused unless it stays inside ``base_dir``."""
    base = Path(base_dir).resolve()
    path = (base / name).resolve()  # an absolute name replaces base here, and is then judged like any other
    if not path.is_relative_to(base):
        raise PersonalizeError(f"Folder name {name!r} leads outside {base} (to {path}); "
                               f"put the images in a folder inside {base}.")
    return path


def load_subject_folder(folder, resolution: int = 512, fit: str = "crop", masks: str | Path | None = None,
                        confine_to=None) -> SubjectImages:
    """``masks``: None, ``"alpha"`` (each photo's alpha channel; opaque photos get a full mask) or a folder holding
    one mask image per photo under the same stem (any format; white = subject). ``confine_to``: a folder every photo
    must really be in, symlinks resolved (a node's input directory)."""
    if fit not in FITS:
        raise PersonalizeError(f"fit must be one of {', '.join(FITS)}; got {fit!r}.")
    validate(LoadSubjectConfig(resolution=resolution))
    mask_dir = None if masks in (None, "alpha") else Path(masks).expanduser()
    if mask_dir is not None and not mask_dir.is_dir():
        raise PersonalizeError(f"Mask folder {mask_dir} does not exist; give a folder of masks named like the photos, "
                               "or 'alpha' to use the photos' transparency.")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PersonalizeError(f"Subject folder {folder} does not exist or is not a folder.")
    # Dot files are skipped: macOS leaves '._photo.jpg' metadata files beside the photos.
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise PersonalizeError(f"Subject folder {folder} is empty; put 3-20 JPEG, PNG or WebP photos of the subject "
                               "in it.")
    named = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    if not named:
        listed = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise PersonalizeError(f"Subject folder {folder} has no .jpg, .jpeg, .png or .webp file (it holds {listed}).")

    pictures, captions, files, sizes, warnings, mask_list = [], [], [], [], [], []
    for path in named:
        problem = _placement_problem(path, confine_to)
        image = alpha = None
        if not problem:
            image, problem, alpha = _read_upright(path)
        if image is None:
            warnings.append(f"{path.name}: {problem}; skipped.")
            continue
        square, enlarged = _fit(image, resolution, fit)
        if enlarged:
            warnings.append(f"{path.name} is only {image.width}x{image.height}, so it was upscaled to the "
                            f"{resolution}px training size and will look blurry. Use a larger photo.")
        if masks is not None:
            mask = alpha if mask_dir is None else _read_mask(mask_dir, path, image.size)
            mask = mask if mask is not None else Image.new("L", image.size, 255)
            mask_list.append(torch.from_numpy(np.asarray(_fit(mask, resolution, fit)[0], dtype=np.float32) / 255.0))
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
    images = [torch.from_numpy(p).unsqueeze(0) for p in pictures] if fit == "keep" \
        else torch.from_numpy(np.stack(pictures))
    return SubjectImages(images, captions, files, sizes, warnings, mask_list if masks is not None else None)


def _read_mask(mask_dir: Path, photo: Path, size: tuple[int, int]) -> Image.Image:
    found = sorted(p for p in mask_dir.glob(f"{photo.stem}.*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise PersonalizeError(f"No mask for {photo.name} in {mask_dir}; add {photo.stem}.png (white = subject).")
    with Image.open(found[0]) as mask:
        mask = ImageOps.exif_transpose(mask).convert("L")
    if mask.size != size:
        raise PersonalizeError(f"Mask {found[0].name} is {mask.size[0]}x{mask.size[1]} but {photo.name} is "
                               f"{size[0]}x{size[1]}; a mask must have its photo's size.")
    return mask


def _placement_problem(path: Path, confine_to) -> str:
    if path.is_symlink() and not path.exists():
        return f"a broken link (to {os.readlink(path)})"
    if not path.is_file():
        return "not a file"
    if confine_to is not None:
        base = Path(confine_to).resolve()
        if not path.resolve().is_relative_to(base):
            return f"a link to {path.resolve()}, outside {base}; copy the photo into the folder instead"
    return ""


def read_image(path: str | Path, alpha: str = "white") -> Image.Image:
    """One image file as an upright RGB image, or a PersonalizeError naming it: see ``decode_image``."""
    image, problem = decode_image(path, alpha)
    if image is None:
        raise PersonalizeError(f"Could not read {path}: {problem}. Replace or remove it.")
    return image


def decode_image(path: str | Path, alpha: str = "white") -> tuple[Image.Image | None, str]:
    """The pack's one image decoder (subject photos, metric images, cached class images): JPEG, PNG or WebP by
    content, Pillow's decompression-bomb limit, EXIF orientation, 16-bit scaled to 8, every mode made RGB with alpha
    composited on white (``alpha="white"``) or dropped as ComfyUI's LoadImage does (``"drop"``). Returns the image,
    or None and why it can't be used."""
    image, problem, _ = _read_upright(path, alpha)
    return image, problem


def _read_upright(path: str | Path, alpha: str = "white") -> tuple[Image.Image | None, str, Image.Image | None]:
    """``decode_image``'s image and problem, and the file's alpha channel (None if opaque or unreadable)."""
    path = Path(path)
    if not path.is_file():
        return None, "not a file", None
    if path.stat().st_size == 0:
        return None, "the file is empty (0 bytes)", None
    limit = Image.MAX_IMAGE_PIXELS  # read now, so that a limit changed at run time is honoured
    try:
        with Image.open(path, formats=_FORMATS) as image:
            # Pillow raises above twice the limit and only warns between 1x and 2x; both count as too large here.
            if limit and image.width * image.height > limit:
                return None, (f"{image.width}x{image.height} is over Pillow's limit of {limit} pixels "
                              "(decompression-bomb guard); downscale it"), None
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as error:
        return None, f"{error} Downscale it", None
    except Image.UnidentifiedImageError:
        return None, "not a JPEG, PNG or WebP image (corrupt, or the extension is wrong)", None
    except Exception as error:  # noqa: BLE001 - any decoder failure on a user's file means "unreadable", not a bug
        return None, f"could not be decoded ({error})", None
    channel = image.convert("RGBA").getchannel("A") if _has_alpha(image) else None
    return _to_rgb(image, alpha), "", channel


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert clips values above 255 to white, so scale 0..65535 down.
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8))
    if _has_alpha(image) and alpha == "white":
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    return image.convert("RGB")


def _fit(image: Image.Image, resolution: int, fit: str) -> tuple[Image.Image, bool]:
    """The image at resolution x resolution (``keep``: at its aspect ratio, no larger than the resolution's area),
    and whether it had to be enlarged to get there. Masks ("L") take the same path: padding is background."""
    size = (resolution, resolution)
    if fit == "keep":
        scale = resolution / (image.width * image.height) ** 0.5
        if scale >= 1:
            return image, scale > 1
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.LANCZOS), False
    if fit == "pad":
        enlarged = max(image.size) < resolution
        return ImageOps.pad(image, size, method=Image.Resampling.LANCZOS,
                            color=0 if image.mode == "L" else _WHITE), enlarged
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


def as_image_list(images) -> list[torch.Tensor]:
    """An IMAGE batch [B,H,W,C], or a list of batches / [H,W,C] images at their own sizes (ComfyUI's list of IMAGE),
    as a list of [1,H,W,C] images."""
    batches = list(images) if isinstance(images, (list, tuple)) else [images]
    photos = []
    for batch in batches:
        if not torch.is_tensor(batch) or batch.dim() not in (3, 4):
            raise PersonalizeError("Expected IMAGE inputs shaped [batch, height, width, 3] (or a list of them); got "
                                   f"{type(batch).__name__} {list(getattr(batch, 'shape', []))}.")
        photos += list((batch.unsqueeze(0) if batch.dim() == 3 else batch).split(1))
    if not photos:
        raise PersonalizeError("Expected at least one image; the IMAGE input is empty.")
    return photos


def as_square_batch(images, resolution: int) -> torch.Tensor:
    """An IMAGE batch as it is; a list of images at their own sizes as one batch of center-cropped squares (what
    needs one batch of references: validation's DINO scores)."""
    if torch.is_tensor(images):
        return images
    return torch.cat([(images_to_training_pixels(p, resolution) + 1.0) / 2.0 for p in as_image_list(images)]
                     ).permute(0, 2, 3, 1).contiguous()


def images_to_training_pixels(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """A ComfyUI IMAGE batch [B,H,W,3 or 4] in 0..1 -> contiguous float32 [B,3,R,R] in -1..1.

    Center-crops to a square and resizes to R (``None``: keeps the size as it is). Alpha is composited on white, as
    the folder loader does. The result is always a new normal tensor: ComfyUI runs nodes under
    torch.inference_mode(), and inference tensors can't take part in autograd.
    """
    if images.dim() != 4 or images.shape[-1] not in (3, 4) or images.shape[0] == 0:
        raise PersonalizeError(f"Expected an IMAGE batch shaped [batch, height, width, 3]; got {list(images.shape)}.")
    # Outside inference mode, the arithmetic below makes fresh normal tensors even from an inference-tensor input.
    with torch.inference_mode(False):
        pixels = images.detach().float().permute(0, 3, 1, 2)
        if pixels.shape[1] == 4:
            rgb, alpha = pixels[:, :3], pixels[:, 3:]
            pixels = rgb * alpha + (1.0 - alpha)
        if resolution is not None:
            height, width = pixels.shape[-2:]
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            pixels = pixels[:, :, top:top + side, left:left + side]
            if side != resolution:
                pixels = F.interpolate(pixels, size=(resolution, resolution), mode="bicubic", antialias=True,
                                       align_corners=False).clamp(0.0, 1.0)
        return (pixels * 2.0 - 1.0).contiguous()
