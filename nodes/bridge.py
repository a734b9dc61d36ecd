"""Between ComfyUI and the trainers: models in, progress/cancel/previews/loss events out, memory handed back.

ComfyUI modules are imported inside the functions, so this module (and the pack) imports without ComfyUI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..trainers import metrics
from ..trainers.components import fingerprint_state_dict
from ..trainers.device import free_memory
from ..trainers.errors import TrainingCancelled
from ..trainers.families import detect_checkpoint
from ..trainers.loop import Callbacks, StepInfo
from ..trainers.methods.base import Method
from ..trainers.models import components_from_original
from ..trainers.run import BaseModel, Output, train_or_reuse

LOSS_EVENT = "personalize.loss"
VALIDATION_EVENT = "personalize.validation"


def comfy_tokenizer_dir(family) -> Path:
    """The tokenizer files ComfyUI ships for a family (e.g. comfy/sd1_tokenizer)."""
    import comfy.sd1_clip

    return Path(comfy.sd1_clip.__file__).parent / family.comfy_tokenizer


def comfy_state_dict(model, clip, vae) -> dict[str, torch.Tensor]:
    """The graph's MODEL/CLIP/VAE as one original-layout state dict (SD1.x, SDXL), with any LoRA patched in, on the CPU
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

    def on_validation(row: dict, samples) -> None:
        bar.update_absolute(row["step"], total, ("JPEG", samples, 512))
        if server.client_id is not None:
            server.send_sync(VALIDATION_EVENT, {"node": node_id, "total": total, **row}, server.client_id)

    # The bar's hook is throttled, so it may skip its own interrupt check: ask every step.
    return Callbacks(on_step=on_step, on_preview=on_preview, on_prepare=on_prepare, on_validation=on_validation,
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
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    selection: str = ""
    grid: object = None  # PIL image of the validation samples, rows = steps


def validation_models(dino_model: str | None, clip_model: str | None, device):
    """The DINO and CLIP embedders a trainer node's combos name (None for '(none)')."""
    import folder_paths

    from .dino_score import AUTO, NO_CLIP, resolve_model

    dino = None
    if dino_model and dino_model != "(none)":
        path = (metrics.find_dino_model(folder_paths.get_folder_paths("dino")) if dino_model == AUTO
                else resolve_model("dino", dino_model))
        dino = metrics.load_dino(path, device)
    clip = metrics.load_clip(resolve_model("clip_vision", clip_model), device) \
        if clip_model and clip_model != NO_CLIP else None
    return dino, clip


def train_in_comfy(method: Method, config, model, clip, vae, images: torch.Tensor, captions: list[str] | None,
                   *, folder_kind: str, name: str, suffix: str, overwrite: bool, node_id: str | None,
                   rename_on_collision: bool = True, resume: bool = True, dino_model: str | None = None,
                   clip_model: str | None = None, masks: list[torch.Tensor] | None = None) -> TrainedArtifact:
    """Run (or reuse) a training for a node: the same inputs give the same file, also after a restart; with
    ``resume``, a cancelled run of the same inputs continues where it stopped.

    A different file of the same name gets a ``_1``, ``_2``… suffix, unless ``rename_on_collision`` is off (an
    embedding's file name is the word used in prompts): then it is an error, or replaced with ``overwrite``.
    """
    import comfy.model_management
    import folder_paths

    folder = model_folder(folder_kind)
    on_collision = "overwrite" if overwrite else ("rename" if rename_on_collision else "refuse")
    output = Output.named(folder, name, suffix, on_collision)
    dino, clip_embedder = validation_models(dino_model, clip_model, training_device()) if config.validate_every \
        else (None, None)
    with torch.inference_mode(False):
        held = {"state_dict": comfy_state_dict(model, clip, vae)}
        family = detect_checkpoint(held["state_dict"])
        config = family.with_defaults(config)  # e.g. SDXL's 1024 px where the node's resolution was left at 512

        def load():
            release_comfy_models()
            state_dict = held.pop("state_dict")  # the components copy it; this copy goes as soon as they exist
            return components_from_original(state_dict, comfy_tokenizer_dir(family), name=_base_name(model))

        base = BaseModel(fingerprint_state_dict(held["state_dict"]), load)
        try:
            artifact = train_or_reuse(
                base, method, images, captions, config, output,
                class_cache_dir=Path(folder_paths.get_output_directory()) / "personalize_class_images",
                device=training_device(), callbacks=comfy_callbacks(node_id, config.steps), release_frozen=True,
                resume=resume, dino=dino, clip=clip_embedder, masks=masks)
        except TrainingCancelled:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        finally:
            held.clear()
            free_memory()
            comfy.model_management.soft_empty_cache()
    metadata = artifact.metadata
    validation = json.loads(metadata.get("personalize.validation", "[]"))
    grid_path = artifact.path.with_name(f"{artifact.path.stem}.validation.png")
    grid = artifact.report.get("grid") or (_read_image(grid_path) if validation and grid_path.is_file() else None)
    return TrainedArtifact(path=artifact.path, name=os.path.relpath(artifact.path, folder).replace(os.sep, "/"),
                           method=artifact.method, metadata=metadata, losses=list(artifact.losses),
                           reused=artifact.reused, validation=validation,
                           best_step=int(metadata["personalize.best_step"]) if validation else None,
                           selection=metadata.get("personalize.selection", ""), grid=grid)


def _read_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


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
