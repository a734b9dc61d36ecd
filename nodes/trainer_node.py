"""What the three trainer nodes share: their first inputs, list inputs, caption handling and the node's report.

The trainer nodes take their inputs as lists (``is_input_list``), so that LoadSubjectImages' ``photos`` (a list of
images at their own sizes, for aspect buckets) arrive whole instead of running the node once per photo;
``single_inputs`` turns that back into one value per input, and the images and masks into lists of single ones."""

from __future__ import annotations

from comfy_api.latest import io

from .dino_score import NO_CLIP, clip_choices, dino_choices

NO_DINO = "(none)"
RUN_INPUTS = ("resume", "dino_model", "clip_model")
def validation_grid_socket() -> io.Output:
    """A new output each time: ComfyUI numbers an output without an id by its place in the node, in the object."""
    return io.Image.Output(display_name="validation_grid", tooltip="the validation samples, one row per validated "
                           "step, the chosen step marked")


def trainer_inputs(default_name: str) -> list[io.Input]:
    """The inputs every trainer node starts with: the base model, the photos, where the result goes, resume, and
    the models that score validation."""
    return [
        io.Model.Input("model", tooltip="the base model to personalize (an SD1.x or SDXL checkpoint; "
                        "SDXL trains at 1024 px and LoRA rank 16 where those options are left at their defaults)"),
        io.Clip.Input("clip"),
        io.Vae.Input("vae"),
        io.Image.Input("images", tooltip="3-5 photos of the subject: LoadSubjectImages' photos (their own sizes, "
                       "for aspect buckets) or images (squares), or any IMAGE batch"),
        io.String.Input("name", default=default_name, tooltip="file name of the result"),
        io.Boolean.Input("overwrite", default=False, tooltip="replace a file of that name (otherwise a _1, _2, "
                         "... suffix is added); an identical earlier run is reused either way", advanced=True),
        io.String.Input("captions", optional=True, force_input=True, multiline=True,
                        tooltip="one caption per line and image (LoadSubjectImages' captions), appended to the "
                        "prompt"),
        io.Boolean.Input("resume", default=True, tooltip="continue the training state a cancelled (or finished) "
                         "run of the same inputs saved beside the file, instead of starting over; steps stays the "
                         "total", advanced=True),
        io.Combo.Input("dino_model", options=[NO_DINO] + dino_choices(), default=NO_DINO, optional=True,
                       tooltip="DINO ViT-S/16 in models/dino that scores the validation samples (validate_every) "
                       "and picks the best step (select_best)"),
        io.Combo.Input("clip_model", options=clip_choices(), default=NO_CLIP, optional=True,
                       tooltip="a Hugging Face CLIP folder "
                       "in models/clip_vision: CLIP-I and CLIP-T of the validation samples"),
        io.Mask.Input("masks", optional=True, tooltip="masked loss: one mask per image at its size (1 = subject; "
                      "e.g. a segmentation node's MASK, or LoadImage's alpha); the background counts mask_floor"),
    ]


def single_inputs(inputs: dict) -> tuple[list, list | None, dict]:
    """The images and masks of list inputs as lists of single ones ([1,H,W,C] / [H,W]), and every other input as
    its one value."""
    images = [image for batch in inputs.pop("images") for image in batch.split(1)]
    masks = inputs.pop("masks", None)
    if masks is not None:
        masks = [mask for batch in masks for mask in (batch.unsqueeze(0) if batch.dim() == 2 else batch)]
    return images, masks, {name: values[0] for name, values in inputs.items()}


def run_inputs(options: dict) -> dict:
    """Take the inputs that steer the run, not the training, out of a node's options."""
    return {name: options.pop(name) for name in RUN_INPUTS if name in options}


def caption_lines(captions: str | None, count: int) -> list[str] | None:
    if not captions:
        return None
    lines = captions.split("\n")
    return (lines + [""] * count)[:count]


def training_ui(artifact, what: str) -> dict:
    """The node's report text, and its loss history so the web extension redraws the curve of a reused run."""
    if artifact.reused:
        report = f"{what} {artifact.name}: reused (same inputs as the run that wrote it)"
    else:
        final = sum(artifact.losses[-10:]) / max(len(artifact.losses[-10:]), 1)
        report = f"{what} {artifact.name}: {len(artifact.losses)} steps, final loss {final:.4f}"
    if artifact.selection:
        report += f"\nresult: {artifact.selection}"
    return {"text": [report], "personalize_loss": list(artifact.losses),
            "personalize_validation": list(artifact.validation),
            "personalize_best_step": [artifact.best_step] if artifact.best_step is not None else []}


def validation_grid_output(artifact):
    """The node's IMAGE of the validation samples (rows = steps), or a note that there was no validation."""
    from PIL import Image, ImageDraw

    from ..trainers.report import pil_to_image_batch

    grid = artifact.grid
    if grid is None:
        grid = Image.new("RGB", (320, 48), (255, 255, 255))
        ImageDraw.Draw(grid).text((8, 16), "no validation (validate_every 0)", fill=(90, 90, 90))
    return pil_to_image_batch([grid])
