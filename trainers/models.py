"""Offline model loading: diffusers folders, single-file checkpoints and in-memory original-layout state dicts.

Everything becomes the same ``Components`` (UNet, VAE, CLIP text encoder, tokenizer, noise scheduler). Configs of a
single-file model are the SD1.5 configs shipped in ``configs/`` with every size that the weights reveal (channels,
depth, attention placement, context width, vocabulary) read from the state dict, so real SD1.x files and the pack's
tiny test models load through one path. Nothing here downloads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from .convert import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, split_original, text_encoder_key_map, unet_key_map, \
    vae_key_map
from .errors import PersonalizeError
from .export import atomic_save_safetensors
from .tokenizer import load_tokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def shipped_config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None once training released it (loop.train's release_frozen)
    text_encoder: CLIPTextModel | None
    tokenizer: object
    noise_scheduler: DDPMScheduler
    arch: str = "sd15"
    name: str = "model"
    tokenizer_dir: str | None = None
    fingerprint: str = field(default="", repr=False)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline:
        """A sampling pipeline sharing these modules (no copies)."""
        from diffusers import DDIMScheduler

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or DDIMScheduler.from_config(self.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------------- detection

def detect_architecture(state_dict) -> str:
    """'sd15' for SD1.x-shaped files; a PersonalizeError naming what was found for anything else."""
    keys = list(state_dict.keys())
    if any(k.startswith("conditioner.embedders.") for k in keys):
        found = "SDXL (conditioner.embedders.* keys)"
    elif any(k.startswith("cond_stage_model.model.") for k in keys):
        found = "SD2.x (OpenCLIP text encoder, cond_stage_model.model.* keys)"
    elif any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        found = "a LoRA (lora_unet_*/lora_te_* keys), not a model: load it with ApplyLoRA or LoraLoader"
    elif any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith("cond_stage_model.transformer.")
                                                              for k in keys):
        return "sd15"
    else:
        prefixes = sorted({k.split(".")[0] for k in keys})[:8]
        found = f"an unknown layout (top-level key prefixes: {', '.join(prefixes) or 'none'})"
    raise PersonalizeError(f"this checkpoint is {found}; the pack trains SD1.x models (SD1.4/1.5 and their "
                           "fine-tunes). Pick an SD1.x checkpoint.")


def detect_prediction_type(state_dict) -> str:
    # The convention ComfyUI and A1111 use for v-prediction single files.
    return "v_prediction" if "v_pred" in state_dict else "epsilon"


def _count_indices(keys, prefix: str) -> int:
    indices = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def infer_unet_config(unet_sd: dict) -> dict:
    keys = list(unet_sd)
    config = shipped_config("sd15_unet")
    blocks = _count_indices(keys, "input_blocks.")
    downsample_at = sorted(int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.") and ".op." in k)
    per_level = (downsample_at[0] - 1) if downsample_at else blocks - 1
    levels = blocks // (per_level + 1)
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        channels.append(unet_sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attention = f"input_blocks.{first}.1."
        depth = _count_indices(keys, attention + "transformer_blocks.")
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(max(depth, 1))
    context = next((v.shape[1] for k, v in unet_sd.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((v for k, v in unet_sd.items() if k.endswith(".proj_in.weight")), None)
    config.update(
        in_channels=unet_sd["input_blocks.0.0.weight"].shape[1],
        out_channels=unet_sd["out.2.weight"].shape[0],
        block_out_channels=channels,
        layers_per_block=per_level,
        down_block_types=down_types,
        up_block_types=["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D"
                        for t in reversed(down_types)],
        transformer_layers_per_block=depths if len(set(depths)) > 1 else depths[0],
        cross_attention_dim=context or config["cross_attention_dim"],
        use_linear_projection=proj_in is not None and proj_in.ndim == 2,
    )
    return config


def infer_vae_config(vae_sd: dict) -> dict:
    keys = list(vae_sd)
    config = shipped_config("sd15_vae")
    levels = _count_indices(keys, "encoder.down.")
    per_level = _count_indices(keys, "encoder.down.0.block.")
    config.update(
        in_channels=vae_sd["encoder.conv_in.weight"].shape[1],
        out_channels=vae_sd["decoder.conv_out.weight"].shape[0],
        block_out_channels=[vae_sd[f"encoder.down.{i}.block.{per_level - 1}.conv2.weight"].shape[0]
                            for i in range(levels)],
        layers_per_block=per_level,
        latent_channels=vae_sd["post_quant_conv.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
    )
    return config


def infer_text_config(text_sd: dict) -> CLIPTextConfig:
    config = shipped_config("sd15_text_encoder")
    token_table = text_sd["embeddings.token_embedding.weight"]
    config.update(
        vocab_size=token_table.shape[0],
        hidden_size=token_table.shape[1],
        intermediate_size=text_sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_indices(text_sd, "encoder.layers."),
        max_position_embeddings=text_sd["embeddings.position_embedding.weight"].shape[0],
    )
    return CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})


# ---------------------------------------------------------------------------------------------------- building

def tokenizer_for(text_encoder: CLIPTextModel, folder: str | Path):
    """The tokenizer in ``folder``, padding and truncating to the text encoder's positions (ComfyUI's bundled SD1
    tokenizer files declare a longer maximum, since ComfyUI chunks long prompts itself)."""
    tokenizer = load_tokenizer(folder)
    tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    return tokenizer


def _materialize(model_factory, state_dict: dict, dtype: torch.dtype, what: str, owned: bool = False,
                 channels_last: bool = True):
    """Build a model without random init and fill it with ``state_dict``. Tensors the caller hands over
    (``owned``, e.g. just read from a file in the right dtype and layout) are used as they are; anything else is
    copied, so training never modifies a host's live weights and inference-mode tensors become normal ones."""
    with init_empty_weights():
        model = model_factory()
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if missing or unexpected:
        raise PersonalizeError(f"the {what} weights do not fit an SD1.x {what}: {len(missing)} missing "
                               f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                               f"(e.g. {sorted(unexpected)[:3]}). Is this a complete SD1.x checkpoint?")
    tensors = {k: v.to(dtype=dtype, memory_format=_layout(v.ndim, channels_last), copy=not owned)
               for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def _layout(ndim: int, channels_last: bool = True) -> torch.memory_format:
    # Conv weights in channels_last make CPU convolutions take oneDNN's path (-34% per SD1.5 LoRA step at small
    # resolutions) and suit tensor cores on GPUs; copying straight into that layout costs no extra memory. Only
    # the UNet, which runs every step: the VAE runs once per run (5% slower as stored), and a weight kept as stored
    # can stay a view of the file (see read_safetensors), so its decoder costs no memory while training.
    return torch.channels_last if ndim == 4 and channels_last else torch.contiguous_format


def _shape_mismatch(error: Exception, what: str) -> PersonalizeError:
    return PersonalizeError(f"the {what} weights have unexpected shapes for an SD1.x {what}: {error}")


def components_from_original(state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                             dtype: torch.dtype = torch.float32, owned: bool = False) -> Components:
    """Components from an original-layout SD1.x state dict (a single file, or what ComfyUI's models hand out)."""
    arch = detect_architecture(state_dict)
    parts = split_original(state_dict)
    with torch.inference_mode(False):
        unet_config = infer_unet_config(parts["unet"])
        vae_config = infer_vae_config(parts["vae"])
        text_config = infer_text_config(parts["text_encoder"])
        try:
            unet = _materialize(lambda: UNet2DConditionModel.from_config(unet_config),
                                unet_key_map(unet_config).to_diffusers(parts["unet"]), dtype, "UNet", owned)
            vae = _materialize(lambda: AutoencoderKL.from_config(vae_config),
                               vae_key_map(vae_config).to_diffusers(parts["vae"]), dtype, "VAE", owned,
                               channels_last=False)
            # Built normally (it is small): CLIP keeps non-persistent buffers that an empty init would leave unset.
            text_encoder = CLIPTextModel(text_config).to(dtype).eval()
            rename = text_encoder_key_map(text_encoder.state_dict())
            text_encoder.load_state_dict({rename(k): v for k, v in parts["text_encoder"].items()}, strict=True)
        except RuntimeError as error:
            raise _shape_mismatch(error, "model") from None
    scheduler_config = shipped_config("sd15_scheduler")
    scheduler_config["prediction_type"] = detect_prediction_type(state_dict)
    components = Components(unet=unet, vae=vae, text_encoder=text_encoder,
                            tokenizer=tokenizer_for(text_encoder, tokenizer_dir),
                            noise_scheduler=DDPMScheduler.from_config(scheduler_config), arch=arch, name=name,
                            tokenizer_dir=str(tokenizer_dir))
    components.fingerprint = fingerprint_state_dict(state_dict)
    return components


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None,
                     channels_last_prefix: str | None = "") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, floating ones in ``dtype``, 4-D ones whose name starts with
    ``channels_last_prefix`` (None: none) laid out channels_last.

    A tensor already stored that way is a view of a private memory map of the file, as diffusers loads: it is read
    when first used, so weights a run never touches cost no memory (and no start-up time), and training's changes
    stay in this process. Any other tensor is read on its own and converted as it arrives: a whole-file map would
    keep every page it touched resident beside the converted copies (an fp16 SD1.5 file turned into fp32 would
    peak at file + model); one tensor at a time peaks at the model.
    """
    path = Path(path)
    file_size = path.stat().st_size
    file_map = None
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        data_start = 8 + header_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise PersonalizeError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which the pack "
                                       "cannot train; use an fp32/fp16/bf16 checkpoint")
            stored, shape = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
            begin, end = info["data_offsets"]
            if data_start + end > file_size:
                raise PersonalizeError(f"{path.name} is truncated (tensor {name}); download it again")
            wanted = (dtype or stored) if stored.is_floating_point else stored
            layout = _layout(len(shape), stored.is_floating_point and channels_last_prefix is not None
                             and name.startswith(channels_last_prefix))
            offset, itemsize = data_start + begin, stored.itemsize
            if wanted == stored and layout == torch.contiguous_format and offset % itemsize == 0:
                if file_map is None:
                    file_map = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=file_size)
                tensors[name] = torch.empty(0, dtype=stored).set_(file_map, offset // itemsize, shape)
                continue
            tensor = torch.empty(shape, dtype=stored)
            f.seek(offset)
            if f.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise PersonalizeError(f"{path.name} is truncated (tensor {name}); download it again")
            tensors[name] = tensor.to(dtype=wanted, memory_format=layout)
    return tensors


def read_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's state dict: safetensors, or a pickle loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise PersonalizeError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            return read_safetensors(path, dtype, channels_last_prefix=UNET_PREFIX)
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure of a user file is a bad input, not a bug
        raise PersonalizeError(f"could not read {path.name} as a model checkpoint ({error}); "
                               "is the file complete and a .safetensors or .ckpt model?") from None
    return checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint


def find_tokenizer_dir(checkpoint: Path, explicit: str | Path | None) -> Path:
    candidates = [Path(explicit)] if explicit else [checkpoint.parent / "tokenizer",
                                                    checkpoint.with_suffix("") / "tokenizer"]
    for candidate in candidates:
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
    raise PersonalizeError(
        f"no CLIP tokenizer for {checkpoint.name}: put a 'tokenizer' folder with vocab.json and merges.txt beside "
        "the checkpoint (or pass --tokenizer DIR), or run inside ComfyUI, which brings its own SD1 tokenizer "
        "(comfy/sd1_tokenizer)." + (f" Looked in: {', '.join(map(str, candidates))}." if candidates else ""))


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32) -> Components:
    index = folder / "model_index.json"
    if not index.is_file():
        raise PersonalizeError(f"{folder} is not a diffusers model folder (no model_index.json)")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise PersonalizeError(f"the diffusers folder {folder} has no '{part}' subfolder; an SD1.x pipeline "
                                   "needs unet, vae, text_encoder, tokenizer and scheduler")
    with torch.inference_mode(False):
        unet = _load_diffusers_model(UNet2DConditionModel, folder / "unet", dtype, "UNet")
        vae = _load_diffusers_model(AutoencoderKL, folder / "vae", dtype, "VAE", channels_last=False)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=dtype).eval()
    components = Components(unet=unet, vae=vae, text_encoder=text_encoder,
                            tokenizer=tokenizer_for(text_encoder, folder / "tokenizer"),
                            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                            name=folder.name, tokenizer_dir=str(folder / "tokenizer"))
    components.fingerprint = fingerprint_state_dict(original_state_dict(components))
    return components


def _load_diffusers_model(model_class, folder: Path, dtype: torch.dtype, what: str, channels_last: bool = True):
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():  # sharded or .bin weights: diffusers' own loader
        model = model_class.from_pretrained(folder, torch_dtype=dtype)
        return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()
    config = model_class.load_config(folder)
    tensors = read_safetensors(weights, dtype, channels_last_prefix="" if channels_last else None)
    return _materialize(lambda: model_class.from_config(config), tensors, dtype, what, owned=True,
                        channels_last=channels_last)


def load_base(path: str | Path, tokenizer_dir: str | Path | None = None,
              dtype: torch.dtype = torch.float32) -> Components:
    """Load a base model from a diffusers folder or a single-file SD1.x checkpoint, offline."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_diffusers_folder(path, dtype)
    if not path.exists():
        raise PersonalizeError(f"--base {path} does not exist; give a diffusers folder or a .safetensors/.ckpt file")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise PersonalizeError(f"--base {path.name}: expected a diffusers folder or a single file ending in "
                               f"{', '.join(SINGLE_FILE_SUFFIXES)}")
    state_dict = read_checkpoint(path, dtype)
    detect_architecture(state_dict)  # before looking for a tokenizer: an SDXL file should say so first
    return components_from_original(state_dict, find_tokenizer_dir(path, tokenizer_dir), name=path.stem,
                                    dtype=dtype, owned=True)


# ---------------------------------------------------------------------------------------------------- export

def original_state_dict(components: Components) -> dict[str, torch.Tensor]:
    """The components in the original single-file layout (the exact key set of an SD1.x checkpoint)."""
    unet_map = unet_key_map(components.unet.config)
    vae_map = vae_key_map(components.vae.config)
    out = {UNET_PREFIX + k: v for k, v in unet_map.to_original(components.unet.state_dict()).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_map.to_original(components.vae.state_dict()).items()})
    nested = text_encoder_key_map(components.text_encoder.state_dict())("") == "text_model."
    for key, value in components.text_encoder.state_dict().items():
        name = key[len("text_model."):] if nested else key
        if name != "embeddings.position_ids":
            out[TEXT_PREFIX + name] = value
    if components.prediction_type == "v_prediction":
        out["v_pred"] = torch.tensor([])
    return out


def save_single_file(components: Components, path: str | Path, dtype: torch.dtype | None = torch.float16,
                     metadata: dict[str, str] | None = None) -> Path:
    state_dict = original_state_dict(components)
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    return atomic_save_safetensors(state_dict, path, metadata)


def save_diffusers(components: Components, folder: str | Path) -> Path:
    folder = Path(folder)
    components.pipeline(scheduler=components.noise_scheduler).save_pretrained(folder, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; older loaders need vocab.json + merges.txt as well.
    if components.tokenizer_dir:
        for name in ("vocab.json", "merges.txt"):
            source = Path(components.tokenizer_dir) / name
            if source.is_file():
                (folder / "tokenizer" / name).write_bytes(source.read_bytes())
    return folder


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------------------------------------------- identity

def fingerprint_state_dict(state_dict: dict[str, torch.Tensor], samples: int = 256) -> str:
    """A fast content hash: every key, shape and dtype, and the first values of each tensor.

    Cheap enough for a 2 GB model held in memory (ComfyUI hands us state dicts, not files), touching one small
    block per tensor whatever its memory layout, and sensitive to any fine-tune, merge or LoRA bake, which change
    values throughout every weight they touch.
    """
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        while tensor.ndim > 1 and tensor.numel() > samples:
            tensor = tensor[0]
        digest.update(tensor.reshape(-1)[:samples].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
