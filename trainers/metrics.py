"""The DreamBooth paper's subject-fidelity metrics: DINO, CLIP-I, CLIP-T, PRES and DIV.

Every metric is a mean of cosine similarities between unit-length embeddings:

- **DINO**: generated vs. real subject images, CLS token of DINO ViT-S/16 (last layer, after the final norm);
- **CLIP-I**: the same pairs with CLIP image embeddings; **CLIP-T**: each generated image vs. its prompt;
- **PRES**: DINO between generations of the *class* prompt and the real subject (lower: less class collapse);
- **DIV**: diversity of same-prompt generations, 1 - DINO cosine over distinct pairs (see :func:`div_score`).

Images are a ComfyUI IMAGE batch ([B,H,W,3] float32 in 0..1, possibly an inference tensor) or a list of PIL
images (the CLI's files, which may differ in size). Each image is rounded to 8 bits and preprocessed with PIL exactly
as the reference torchvision pipeline does on image files, so a node fed LoadImage's batch and the CLI fed the same
files give the same score. Models load offline from files the user downloaded, once per (path, mtime, device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

from .data import IMAGE_SUFFIXES, read_image
from .checkpoints import describe_load_error
from .device import resolve_device
from .errors import PersonalizeError

Images = Union[torch.Tensor, Sequence[Image.Image]]

DINO_HF_REPO = "facebook/dino-vits16"
DINO_HF_FOLDER = "dino-vits16"
DINO_PTH_NAME = "dino_deitsmall16_pretrain.pth"
DINO_PTH_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# For scale only: the paper averages 30 subjects x 25 prompts x 4 images, and its CLIP model may differ from yours.
_PAPER = {
    "DINO": "paper (Table 1): real images 0.774, DreamBooth SD 0.668, Textual Inversion SD 0.569; higher is closer",
    "CLIP-I": "paper (Table 1): real images 0.885, DreamBooth SD 0.803, Textual Inversion SD 0.780",
    "CLIP-T": "paper (Table 1): DreamBooth SD 0.305, Textual Inversion SD 0.255",
    "PRES": "paper (Table 3, Imagen): 0.493 with prior preservation, 0.664 without; lower is less class collapse",
    "DIV": "DINO substitute for the paper's LPIPS DIV, not comparable with its 0.391; higher is more diverse",
}


# ---------------------------------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side (bicubic), center-crop a square, scale to 0..1, normalize: torchvision's
    ``Resize(resize) + CenterCrop(crop) + ToTensor + Normalize`` on a PIL image, re-done in PIL + numpy."""
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """[B,3,crop,crop] float32."""
        return torch.stack([self._one(image) for image in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.resize * long / short)  # int(), not round(): torchvision's rule
        size = (self.resize, new_long) if width <= height else (new_long, self.resize)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = (np.asarray(image, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)


DINO_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def to_pil_images(images: Images) -> list[Image.Image]:
    """RGB PIL images from an IMAGE batch (rounded to 8 bits, as when saved) or from a list of PIL images."""
    if not isinstance(images, torch.Tensor):
        return [image.convert("RGB") for image in images]
    if images.dim() != 4 or images.shape[-1] != 3:
        raise PersonalizeError(f"Expected an IMAGE batch shaped [batch, height, width, 3]; got {list(images.shape)}.")
    pixels = (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(array) for array in pixels]


def read_image_folder(folder) -> tuple[list[str], list[Image.Image]]:
    """File names and upright RGB images of a folder's JPEG/PNG/WebP files, in name order, at their own size.

    ``data.load_subject_folder`` would resize them to a square, which the metrics' own preprocessing must not see.
    Alpha is dropped as ComfyUI's LoadImage does, so the CLI and a node fed the same files agree.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PersonalizeError(f"Image folder {folder} does not exist or is not a folder.")
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not paths:
        raise PersonalizeError(f"Image folder {folder} has no .jpg, .jpeg, .png or .webp file.")
    return [p.name for p in paths], [read_image(p, alpha="drop") for p in paths]


# ---------------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SimilarityResult:
    metric: str
    score: float
    pairs: int
    per_image: list[float]  # each generated image's mean over its pairs
    min: float  # over all pairs
    max: float

    def report(self, names: Sequence[str] | None = None) -> str:
        names = names or [f"image {i}" for i in range(len(self.per_image))]
        lines = [f"{self.metric}: {self.score:.4f} (mean of {self.pairs} pairs; min {self.min:.4f}, "
                 f"max {self.max:.4f})", f"  {_PAPER[self.metric]}"]
        lines += [f"  {name}: {value:.4f}" for name, value in zip(names, self.per_image)]
        return "\n".join(lines)


def _result(metric: str, pair_values: torch.Tensor, per_image: torch.Tensor) -> SimilarityResult:
    return SimilarityResult(metric=metric, score=pair_values.mean().item(), pairs=pair_values.numel(),
                            per_image=per_image.tolist(), min=pair_values.min().item(), max=pair_values.max().item())


# ---------------------------------------------------------------------------------------------------- embedders

class ImageEmbedder:
    """A model and its preprocessing, turning images into unit-length embeddings."""
    preprocess: Preprocess
    device: torch.device

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: Images, batch_size: int = 8) -> torch.Tensor:
        """[N, D] float64 on the CPU, each row of length 1."""
        if batch_size < 1:
            raise PersonalizeError(f"batch size must be at least 1; got {batch_size}.")
        pictures = to_pil_images(images)
        if not pictures:
            raise PersonalizeError("No images to score: the image batch is empty.")
        chunks = [self.features(self.preprocess(pictures[start:start + batch_size]).to(self.device)).float().cpu()
                  for start in range(0, len(pictures), batch_size)]
        return F.normalize(torch.cat(chunks).double(), dim=-1)


class DinoModel(ImageEmbedder):
    preprocess = DINO_PREPROCESS

    def __init__(self, vit: ViTModel, device: torch.device):
        self.vit = vit.to(device).eval()
        self.device = device

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=pixels).last_hidden_state[:, 0]


class ClipModel(ImageEmbedder):
    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        size = model.config.vision_config.image_size
        self.preprocess = Preprocess(resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # Spelled out rather than get_image_features(), whose return type changed in transformers 5.
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, D] float64 on the CPU, each row of length 1."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return F.normalize(self.model.text_projection(pooled).float().cpu().double(), dim=-1)


# ---------------------------------------------------------------------------------------------------- metrics

def image_similarity(model: ImageEmbedder, generated: Images, reference: Images, metric: str,
                     batch_size: int = 8) -> SimilarityResult:
    """Mean cosine similarity over all (generated, reference) pairs: DINO, CLIP-I and PRES are this."""
    similarities = model.embed(generated, batch_size) @ model.embed(reference, batch_size).T
    return _result(metric, similarities, similarities.mean(dim=1))


def dino_score(dino: DinoModel, generated: Images, reference: Images, batch_size: int = 8) -> SimilarityResult:
    return image_similarity(dino, generated, reference, "DINO", batch_size)


def pres_score(dino: DinoModel, class_generated: Images, reference: Images, batch_size: int = 8) -> SimilarityResult:
    """Prior preservation: DINO between generations of the class prompt ("a dog") and the real subject."""
    return image_similarity(dino, class_generated, reference, "PRES", batch_size)


def clip_i_score(clip: ClipModel, generated: Images, reference: Images, batch_size: int = 8) -> SimilarityResult:
    return image_similarity(clip, generated, reference, "CLIP-I", batch_size)


def clip_t_score(clip: ClipModel, generated: Images, prompts: str | Sequence[str],
                 batch_size: int = 8) -> SimilarityResult:
    """Cosine between each generated image and its prompt: one prompt for all images, or one per image."""
    images = clip.embed(generated, batch_size)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) not in (1, len(images)):
        raise PersonalizeError(f"CLIP-T needs one prompt, or one per image; got {len(prompts)} prompts "
                               f"for {len(images)} images.")
    similarities = (images * clip.embed_texts(prompts)).sum(dim=1)
    return _result("CLIP-T", similarities, similarities)


def div_score(dino: DinoModel, generated: Images, batch_size: int = 8) -> SimilarityResult:
    """Diversity of same-prompt generations: mean of 1 - DINO cosine over all distinct pairs (0: all identical).

    The paper's DIV is mean LPIPS, which needs ImageNet-pretrained AlexNet/VGG weights plus LPIPS's learned
    layer weights; none can be shipped here or downloaded offline. DINO distance is a perceptual, learned feature
    distance from the model the other metrics already load, so it ranks diversity the same way in spirit, but its
    values are on another scale and are not comparable with the paper's numbers.
    ``per_image`` holds each image's mean distance to the others.
    """
    embeddings = dino.embed(generated, batch_size)
    count = len(embeddings)
    if count < 2:
        raise PersonalizeError(f"DIV compares generations with each other and needs at least 2 images; got {count}.")
    distances = 1.0 - embeddings @ embeddings.T
    upper = torch.triu_indices(count, count, offset=1)
    per_image = (distances.sum(dim=1) - distances.diagonal()) / (count - 1)
    return _result("DIV", distances[upper[0], upper[1]], per_image)


# ---------------------------------------------------------------------------------------------------- model files

def dino_vits16_config() -> ViTConfig:
    # The Hub's config.json says layer_norm_eps 1e-12, a conversion leftover; DINO itself uses 1e-6. Loading both
    # layouts with 1e-6 keeps them identical to the original model.
    return ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                     patch_size=16, image_size=224, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / name).is_file() for name in _HF_WEIGHTS)


def find_dino_model(search_dirs: Iterable[str | Path]) -> Path:
    """The first DINO ViT-S/16 in ``search_dirs``: a folder that is itself the Hugging Face layout, or holds one
    named ``dino-vits16``, or holds ``dino_deitsmall16_pretrain.pth``."""
    searched = [Path(d).expanduser() for d in search_dirs]
    for folder in searched:
        for candidate in (folder, folder / DINO_HF_FOLDER):
            if _is_hf_folder(candidate):
                return candidate
        if (folder / DINO_PTH_NAME).is_file():
            return folder / DINO_PTH_NAME
    where = ", ".join(str(d) for d in searched) or "(no folder given)"
    first = searched[0] if searched else Path("models/dino")
    raise PersonalizeError(
        f"No DINO ViT-S/16 model found in {where}. Download either the original checkpoint {DINO_PTH_URL} and put "
        f"{DINO_PTH_NAME} in {first}, or the Hugging Face repository {DINO_HF_REPO} (config.json and "
        f"model.safetensors) into the folder {first / DINO_HF_FOLDER}.")


def load_dino(path: str | Path, device: str | torch.device = "auto") -> DinoModel:
    """DINO ViT-S/16 from a Hugging Face folder or the original ``.pth``; cached per (path, mtime, device)."""
    return _load_cached(_build_dino, path, device)


def load_clip(folder: str | Path, device: str | torch.device = "auto") -> ClipModel:
    """A CLIP model from a Hugging Face folder (CLIPModel weights + tokenizer files); cached like :func:`load_dino`."""
    return _load_cached(_build_clip, folder, device)


def _load_cached(build, path, device):
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise PersonalizeError(f"Model path {path} does not exist.")
    files = [path, *path.iterdir()] if path.is_dir() else [path]
    stamp = max(f.stat().st_mtime_ns for f in files)
    return _cached(build, str(path), stamp, str(resolve_device(device)))


@functools.lru_cache(maxsize=4)
def _cached(build, path: str, stamp: int, device: str):
    # A model first loaded inside a ComfyUI node must still work outside inference mode.
    with torch.inference_mode(False):
        return build(Path(path), torch.device(device))


def _build_dino(path: Path, device: torch.device) -> DinoModel:
    if path.is_file():
        return DinoModel(_vit_from_original(path), device)
    if not _is_hf_folder(path):
        raise PersonalizeError(f"{path} is neither {DINO_PTH_NAME} nor a {DINO_HF_REPO} folder "
                               f"(config.json + model.safetensors or pytorch_model.bin).")
    config = ViTConfig.from_pretrained(path)
    shape = (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size)
    if shape != (384, 12, 16, 224):
        raise PersonalizeError(f"{path} holds a ViT with hidden size {shape[0]}, {shape[1]} layers, patch {shape[2]}, "
                               f"image size {shape[3]}; the DINO score uses ViT-S/16 ({DINO_HF_REPO}).")
    return DinoModel(_from_pretrained(ViTModel, path, config=dino_vits16_config(), add_pooling_layer=False), device)


def _build_clip(path: Path, device: torch.device) -> ClipModel:
    if not path.is_dir():
        raise PersonalizeError(f"{path} is not a folder; CLIP metrics need a Hugging Face CLIP folder "
                               "(config.json, model.safetensors, vocab.json, merges.txt).")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise PersonalizeError(f"No CLIP tokenizer in {path} (vocab.json and merges.txt): {error}") from error
    return ClipModel(_from_pretrained(CLIPModel, path), tokenizer, device)


def _from_pretrained(model_class, folder: Path, **kwargs):
    """``from_pretrained`` that refuses partial weights instead of leaving random ones in place."""
    try:
        model, info = model_class.from_pretrained(folder, local_files_only=True, weights_only=True,
                                                  output_loading_info=True, **kwargs)
    except OSError as error:
        raise PersonalizeError(f"Could not load {model_class.__name__} from {folder}: {error}") from error
    broken = sorted(info["missing_keys"]) + [str(m) for m in info["mismatched_keys"]]
    if broken:
        raise PersonalizeError(f"{folder} is missing weights for {model_class.__name__}: "
                               f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}.")
    return model


# Original DINO (timm-style) keys <-> transformers ViTModel keys. transformers 5 renamed ViT's modules; 4.x uses the
# names facebook/dino-vits16 stores on the Hub. attn.qkv is one [3*384, 384] matrix, split into attn.q/k/v here.
_TOP_KEYS = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_HUB_BLOCK = ("encoder.layer.{}.", {
    "norm1": "layernorm_before", "attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
    "attn.v": "attention.attention.value", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
_V5_BLOCK = ("layers.{}.", {
    "norm1": "layernorm_before", "attn.q": "attention.q_proj", "attn.k": "attention.k_proj",
    "attn.v": "attention.v_proj", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})


def _key_map(block: tuple[str, dict[str, str]], layers: int = 12) -> dict[str, str]:
    prefix, names = block
    mapping = dict(_TOP_KEYS)
    for i in range(layers):
        for original, converted in names.items():
            for kind in ("weight", "bias"):
                mapping[f"blocks.{i}.{original}.{kind}"] = f"{prefix.format(i)}{converted}.{kind}"
    return mapping


def _installed_block(model: ViTModel) -> tuple[str, dict[str, str]]:
    return _V5_BLOCK if hasattr(model, "layers") else _HUB_BLOCK


def _split_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    split = {}
    for key, value in state.items():
        if ".attn.qkv." in key:
            # Rows are [q; k; v], each head-major, as DINO's reshape(B, N, 3, heads, head_dim) reads them.
            for part, chunk in zip("qkv", value.chunk(3)):
                split[key.replace(".attn.qkv.", f".attn.{part}.")] = chunk.clone()
        else:
            split[key] = value
    return split


def _rename(state: dict[str, torch.Tensor], mapping: dict[str, str], source: Path | str) -> dict[str, torch.Tensor]:
    missing, unknown = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    problems = [f"{kind} {', '.join(keys[:3])}" for kind, keys in (("missing", missing), ("unexpected", unknown)) if keys]
    if problems:
        raise PersonalizeError(f"{source} is not the DINO ViT-S/16 checkpoint {DINO_PTH_NAME} ({'; '.join(problems)}). "
                               f"Download it from {DINO_PTH_URL}.")
    return {mapping[key]: value for key, value in state.items()}


def dino_hub_state(state: dict[str, torch.Tensor], source: Path | str) -> dict[str, torch.Tensor]:
    """An original DINO state dict with facebook/dino-vits16's (the Hub's) key names."""
    return _rename(_split_qkv(state), _key_map(_HUB_BLOCK), source)


def _vit_from_original(path: Path) -> ViTModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle and zip errors vary; any of them means "not this checkpoint"
        raise PersonalizeError(f"Could not read {path} as a PyTorch checkpoint ({describe_load_error(error)}). "
                               f"Download {DINO_PTH_NAME} from {DINO_PTH_URL}.") from error
    if not isinstance(state, dict):
        raise PersonalizeError(f"{path} holds a {type(state).__name__}, not a state dict; expected {DINO_PTH_NAME}.")
    vit = ViTModel(dino_vits16_config(), add_pooling_layer=False)
    vit.load_state_dict(_rename(_split_qkv(state), _key_map(_installed_block(vit)), path))
    return vit
