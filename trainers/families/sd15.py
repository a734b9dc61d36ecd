"""SD1.x (SD1.4, SD1.5 and their fine-tunes): UNet with cross-attention on one CLIP ViT-L/14 text encoder's last
hidden states, 8× VAE, DDPM schedule (ε-prediction, or v-prediction when the file carries ComfyUI's ``v_pred``
marker key).

Single files load through the SD1.5 configs shipped in ``configs/`` with every size that the weights reveal (channels,
depth, attention placement, context width, vocabulary) read from the state dict, so real SD1.x files and the pack's
tiny test models load through one path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..checkpoints import read_safetensors
from ..components import Components, fingerprint_state_dict, materialize
from ..errors import PersonalizeError
from .base import Family, TextEncoderSlot, shipped_config
from .clip import has_tokenizer_files, infer_text_config, text_encoder_key_map, tokenize, tokenizer_for
from .ldm import UNET_PREFIX, VAE_PREFIX, infer_unet_config, infer_vae_config, unet_key_map, vae_key_map

TEXT_PREFIX = "cond_stage_model.transformer.text_model."
_OLD_TEXT_PREFIX = "cond_stage_model.transformer."  # early SD1 files lack "text_model."
_PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class SD15(Family):
    name = "sd15"
    title = "SD1.x"
    modelspec_architecture = "stable-diffusion-v1"
    kohya_base_version = "sd_v1"
    comfy_tokenizer = "sd1_tokenizer"
    text_encoder_slots = (TextEncoderSlot("text_encoder", "tokenizer", "lora_te", "emb_params"),)

    # ------------------------------------------------------------------------------------------------ detection

    def claims_checkpoint(self, keys: set[str]) -> bool:
        return (any(k.startswith(UNET_PREFIX) for k in keys)
                and any(k.startswith(_OLD_TEXT_PREFIX) for k in keys))

    def claims_folder(self, model_index: dict, folder: Path) -> bool:
        return model_index.get("_class_name") == "StableDiffusionPipeline"

    # ------------------------------------------------------------------------------------------------ loading

    def from_original(self, state_dict: dict, tokenizer_dir: str | Path, *, name: str = "model",
                      dtype: torch.dtype = torch.float32, owned: bool = False) -> Components:
        parts = split_original(state_dict)
        with torch.inference_mode(False):
            unet, vae = self.unet_and_vae(parts, dtype, owned)
            text_config = infer_text_config(parts["text_encoder"], shipped_config("sd15_text_encoder"))
            text_encoder = self.text_model(CLIPTextModel, text_config, parts["text_encoder"], dtype, owned)
        components = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer_for(text_encoder, tokenizer_dir),
                                noise_scheduler=self.noise_scheduler(state_dict), name=name,
                                tokenizer_dir=str(tokenizer_dir))
        components.fingerprint = fingerprint_state_dict(state_dict)
        return components

    def unet_config(self, unet_sd: dict, parts: dict) -> dict:
        """The UNet's diffusers config: the shipped one with every size the weights reveal."""
        return infer_unet_config(unet_sd, shipped_config(f"{self.name}_unet"))

    def unet_and_vae(self, parts: dict, dtype: torch.dtype, owned: bool):
        unet_config = self.unet_config(parts["unet"], parts)
        vae_config = infer_vae_config(parts["vae"], shipped_config(f"{self.name}_vae"))
        try:
            unet = materialize(lambda: UNet2DConditionModel.from_config(unet_config),
                               unet_key_map(unet_config).to_diffusers(parts["unet"]), dtype, "UNet", self.title,
                               owned)
            vae = materialize(lambda: AutoencoderKL.from_config(vae_config),
                              vae_key_map(vae_config).to_diffusers(parts["vae"]), dtype, "VAE", self.title, owned,
                              channels_last=False)
        except RuntimeError as error:
            raise PersonalizeError(f"the model weights have unexpected shapes for an {self.title} model: "
                                   f"{error}") from None
        return unet, vae

    def text_model(self, model_class, config, weights: dict, dtype: torch.dtype, owned: bool):
        """A transformers CLIP text model holding flat CLIP text weights (no ``text_model.``), built without random
        init: a normal build would hold a second copy while loading (SDXL's bigG: 2.8 GB in fp32). Its
        non-persistent position ids are made as usual (an empty init only skips parameters)."""
        with init_empty_weights():
            rename = text_encoder_key_map(model_class(config).state_dict())
        # A projection (CLIPTextModelWithProjection) sits beside text_model, not in it.
        named = {k if k == "text_projection.weight" else rename(k): v for k, v in weights.items()}
        try:
            return materialize(lambda: model_class(config), named, dtype, "text encoder", self.title, owned,
                               channels_last=False)
        except RuntimeError as error:
            raise PersonalizeError(f"the text encoder weights have unexpected shapes for an {self.title} model: "
                                   f"{error}") from None

    def noise_scheduler(self, state_dict: dict) -> DDPMScheduler:
        scheduler_config = shipped_config(f"{self.name}_scheduler")
        # The convention ComfyUI and A1111 use for v-prediction single files.
        scheduler_config["prediction_type"] = "v_prediction" if "v_pred" in state_dict else "epsilon"
        return DDPMScheduler.from_config(scheduler_config)

    pipeline_parts = _PIPELINE_PARTS

    def from_diffusers(self, folder: Path, dtype: torch.dtype = torch.float32) -> Components:
        self._check_folder(folder)
        with torch.inference_mode(False):
            unet, vae, text_encoder = self._diffusers_unet_vae_clip(folder, dtype)
        components = Components(family=self, unet=unet, vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer_for(text_encoder, folder / "tokenizer"),
                                noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
                                name=folder.name, tokenizer_dir=str(folder / "tokenizer"))
        components.fingerprint = fingerprint_state_dict(self.to_original(components))
        return components

    def _check_folder(self, folder: Path) -> None:
        for part in self.pipeline_parts:
            if not (folder / part).is_dir():
                raise PersonalizeError(f"the diffusers folder {folder} has no '{part}' subfolder; an {self.title} "
                                       f"pipeline needs {', '.join(self.pipeline_parts)}")

    def _diffusers_unet_vae_clip(self, folder: Path, dtype: torch.dtype):
        """The UNet, VAE and CLIP-L text encoder every family's diffusers folder holds."""
        return (self._diffusers_model(UNet2DConditionModel, folder / "unet", dtype, "UNet"),
                self._diffusers_model(AutoencoderKL, folder / "vae", dtype, "VAE", channels_last=False),
                self._diffusers_text_encoder(CLIPTextModel, folder, "text_encoder", dtype))

    @staticmethod
    def _diffusers_text_encoder(model_class, folder: Path, subfolder: str, dtype: torch.dtype, **config):
        """A transformers text encoder from safetensors only, refused when any of its weights is missing."""
        _require_safetensors(folder / subfolder, subfolder.replace("_", " "))
        encoder, info = model_class.from_pretrained(folder, subfolder=subfolder, dtype=dtype, use_safetensors=True,
                                                    output_loading_info=True, **config)
        if info["missing_keys"] or info["mismatched_keys"]:  # transformers would leave those random
            broken = sorted(info["missing_keys"]) + [str(k) for k in info["mismatched_keys"]]
            raise PersonalizeError(f"{folder / subfolder} lacks weights for {len(broken)} tensors (e.g. "
                                   f"{broken[:3]}); is the folder complete?")
        return encoder.eval()

    def _diffusers_model(self, model_class, folder: Path, dtype: torch.dtype, what: str, channels_last: bool = True):
        weights = folder / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():  # sharded weights: diffusers' own loader
            _require_safetensors(folder, what)
            model = model_class.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
            return (model.to(memory_format=torch.channels_last) if channels_last else model).eval()
        config = model_class.load_config(folder)
        tensors = read_safetensors(weights, dtype, channels_last_prefix="" if channels_last else None)
        return materialize(lambda: model_class.from_config(config), tensors, dtype, what, self.title, owned=True,
                           channels_last=channels_last)

    def find_tokenizer(self, checkpoint: Path, explicit: str | Path | None) -> Path:
        candidates = [Path(explicit)] if explicit else [checkpoint.parent / "tokenizer",
                                                        checkpoint.with_suffix("") / "tokenizer"]
        for candidate in candidates:
            if has_tokenizer_files(candidate):
                return candidate
        raise PersonalizeError(
            f"no CLIP tokenizer for {checkpoint.name}: put a 'tokenizer' folder with vocab.json and merges.txt beside "
            "the checkpoint (or pass --tokenizer DIR), or run inside ComfyUI, which brings its own SD1 tokenizer "
            "(comfy/sd1_tokenizer)." + (f" Looked in: {', '.join(map(str, candidates))}." if candidates else ""))

    # ------------------------------------------------------------------------------------------------ export

    def to_original(self, components: Components) -> dict[str, torch.Tensor]:
        out = self.unet_and_vae_original(components)
        out.update({TEXT_PREFIX + k: v for k, v in flat_text_state_dict(components.text_encoder).items()})
        return out

    def unet_and_vae_original(self, components: Components) -> dict[str, torch.Tensor]:
        """UNet and VAE in the original layout, the keys no component holds, and the v-prediction marker."""
        unet_map = unet_key_map(components.unet.config)
        vae_map = vae_key_map(components.vae.config)
        out = {UNET_PREFIX + k: v for k, v in unet_map.to_original(components.unet.state_dict()).items()}
        out.update({VAE_PREFIX + k: v for k, v in vae_map.to_original(components.vae.state_dict()).items()})
        out.update(components.original_extras)
        if components.prediction_type == "v_prediction":
            out["v_pred"] = torch.tensor([])
        return out

    # ------------------------------------------------------------------------------------------------ conditioning

    def tokenize(self, components: Components, prompts: list[str]) -> torch.Tensor:
        return tokenize(components.tokenizer, prompts)

    def encode(self, components: Components, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": components.text_encoder(input_ids)[0]}

    def denoise(self, unet, noisy, timesteps, conditioning):
        return unet(noisy, timesteps, conditioning["encoder_hidden_states"]).sample

    def pipeline(self, components: Components, scheduler=None) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, scheduler=scheduler or DDIMScheduler.from_config(components.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def flat_text_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights without ``text_model.`` (whatever the transformers version) and
    without the position-id buffer, which original-layout files do not need."""
    nested = text_encoder_key_map(text_encoder.state_dict())("") == "text_model."
    out = {}
    for key, value in text_encoder.state_dict().items():
        name = key[len("text_model."):] if nested and key.startswith("text_model.") else key
        if name != "embeddings.position_ids":
            out[name] = value
    return out
def _require_safetensors(folder: Path, what: str) -> None:
    """Diffusers and transformers would unpickle ``.bin`` weights: refuse them before either loader sees them."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise PersonalizeError(f"the {what} weights in {folder} are pickle files ({', '.join(pickles)}), which the "
                               "pack does not load since a pickle can run code; convert the model to safetensors "
                               "(diffusers: pipeline.save_pretrained(folder, safe_serialization=True))")
    raise PersonalizeError(f"{folder} has no {what} weights (no .safetensors file); is the folder complete?")


def split_original(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SD1.x single-file state dict into its three components, prefixes removed."""
    parts = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX):]] = value
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX):]] = value
        elif key.startswith(_OLD_TEXT_PREFIX):
            name = key[len(TEXT_PREFIX if key.startswith(TEXT_PREFIX) else _OLD_TEXT_PREFIX):]
            if name != "embeddings.position_ids":
                parts["text_encoder"][name] = value
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
    for name, part in parts.items():
        if not part:
            raise PersonalizeError(f"the checkpoint has no {name} weights (no keys starting with '{prefixes[name]}')")
    return parts


FAMILY = SD15()
