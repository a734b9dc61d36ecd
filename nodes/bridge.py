"""Between ComfyUI and the trainers: models in, progress/cancel/previews/loss events out, memory handed back.

ComfyUI modules are imported inside the functions, so this module (and the pack) imports without ComfyUI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..trainers.errors import PersonalizeError, TrainingCancelled
from ..trainers.export import output_path, sanitize_name
from ..trainers.loop import Callbacks, Method, StepInfo, free_memory
from ..trainers.models import components_from_original, fingerprint_state_dict, read_metadata
from ..trainers.run import find_trained, personalize, training_fingerprint

LOSS_EVENT = "personalize.loss"


def sd1_tokenizer_dir() -> Path:
    """The CLIP tokenizer files ComfyUI ships for SD1.x (comfy/sd1_tokenizer)."""
    import comfy.sd1_clip

    return Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer"


def original_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """The graph's MODEL/CLIP/VAE as one original-layout SD1.x state dict, with any LoRA patched in, on the CPU
    (the path ComfyUI's own checkpoint saving takes)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model, clip.load_model()])
    state_dict = model.state_dict_for_saving(clip.state_dict_for_saving(), vae.get_sd(), None)
    # UNet values are lazy: .to() returns the weight with the patcher's patches merged.
    return {k: v.to("cpu") for k, v in state_dict.items()}


def release_comfy_models() -> None:
    """Ask ComfyUI to unload what it holds so training gets the memory."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def training_device() -> torch.device:
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def model_folder(kind: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths(kind)[0])


def comfy_callbacks(node_id: str | None, total: int) -> Callbacks:
    """ComfyUI's progress bar (with previews), its Cancel button, and loss events for the web extension."""
    import comfy.model_management
    import comfy.utils
    from server import PromptServer

    bar = comfy.utils.ProgressBar(total)
    server = PromptServer.instance

    def on_step(info: StepInfo) -> None:
        bar.update_absolute(info.step, info.total)
        if server.client_id is not None:  # a prompt queued without a client id must not reach every browser
            server.send_sync(LOSS_EVENT, {"node": node_id, "step": info.step, "total": info.total,
                                          "loss": info.loss, "lr": info.lr}, server.client_id)

    def on_preview(step: int, image) -> None:
        bar.update_absolute(step, total, ("JPEG", image, 512))

    def on_prepare(done: int, count: int, what: str) -> None:
        bar.update_absolute(done, count)

    # The bar's hook is throttled, so it may skip its own interrupt check: ask every step.
    return Callbacks(on_step=on_step, on_preview=on_preview, on_prepare=on_prepare,
                     should_stop=comfy.model_management.processing_interrupted)


@dataclass
class TrainedArtifact:
    """What a trainer node hands downstream: the file, its name in its model folder, and its metadata."""
    path: Path
    name: str
    method: str
    metadata: dict[str, str]
    losses: list[float] = field(default_factory=list)
    reused: bool = False


def train_in_comfy(method: Method, config, model, clip, vae, images: torch.Tensor, captions: list[str] | None,
                   *, folder_kind: str, name: str, suffix: str, overwrite: bool, node_id: str | None,
                   rename_on_collision: bool = True) -> TrainedArtifact:
    """Run (or reuse) a training for a node: the same inputs give the same file, also after a restart.

    A different file of the same name gets a ``_1``, ``_2``… suffix, unless ``rename_on_collision`` is off (an
    embedding's file name is the word used in prompts): then it is an error, or replaced with ``overwrite``.
    """
    import comfy.model_management
    import folder_paths

    folder = model_folder(folder_kind)
    stem = sanitize_name(name)
    with torch.inference_mode(False):
        state_dict = original_state_dict(model, clip, vae)
        fingerprint = training_fingerprint(method, config, images, captions or [""] * images.shape[0],
                                           fingerprint_state_dict(state_dict))
        existing = find_trained(folder, stem, suffix, fingerprint)
        if existing is not None:
            return _artifact(existing, folder, method, reused=True)
        release_comfy_models()
        components = None
        try:
            components = components_from_original(state_dict, sd1_tokenizer_dir(), name=_base_name(model))
            del state_dict
            out = output_path(folder, stem, suffix, overwrite=overwrite or not rename_on_collision)
            if out.exists() and not overwrite:
                raise PersonalizeError(f"{out.name} already exists in {folder} and was trained from other inputs; "
                                       "choose another name, or turn on overwrite to replace it")
            artifact = personalize(components, method, images, captions, config, out,
                                   class_cache_dir=Path(folder_paths.get_output_directory()) / "personalize_class_images",
                                   device=training_device(), callbacks=comfy_callbacks(node_id, config.steps),
                                   release_frozen=True)
        except TrainingCancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        finally:
            components = None
            free_memory()
            comfy.model_management.soft_empty_cache()
    return _artifact(artifact.path, folder, method, losses=artifact.result.losses)


def _artifact(path: Path, folder: Path, method: Method, losses=None, reused=False) -> TrainedArtifact:
    metadata = read_metadata(path)
    if losses is None:
        losses = json.loads(metadata.get("personalize.losses", "[]"))
    return TrainedArtifact(path=path, name=os.path.relpath(path, folder).replace(os.sep, "/"), method=method.name,
                           metadata=metadata, losses=list(losses), reused=reused)


def _base_name(model) -> str:
    """A readable name of the base checkpoint for the artifact's metadata."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else "comfyui-model"


def register_model_folders() -> None:
    """Add ComfyUI's ``models/dino`` folder kind (for DINOScore), keeping paths an extra_model_paths.yaml gave."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, "dino")
    if "dino" in folder_paths.folder_names_and_paths:
        paths, _extensions = folder_paths.folder_names_and_paths["dino"]
        if default not in paths:
            paths.append(default)
    else:
        folder_paths.folder_names_and_paths["dino"] = ([default], set(folder_paths.supported_pt_extensions))
