"""What the three trainer nodes share: their first inputs, caption handling and the report shown on the node."""

from __future__ import annotations

from comfy_api.latest import io


def trainer_inputs(default_name: str) -> list[io.Input]:
    """The inputs every trainer node starts with: the base model, the photos, and where the result goes."""
    return [
        io.Model.Input("model", tooltip="the base model to personalize (any SD1.x loader)"),
        io.Clip.Input("clip"),
        io.Vae.Input("vae"),
        io.Image.Input("images", tooltip="3-5 photos of the subject (LoadSubjectImages, or any IMAGE batch)"),
        io.String.Input("name", default=default_name, tooltip="file name of the result"),
        io.Boolean.Input("overwrite", default=False, tooltip="replace a file of that name (otherwise a _1, _2, "
                         "... suffix is added); an identical earlier run is reused either way"),
        io.String.Input("captions", optional=True, force_input=True, multiline=True,
                        tooltip="one caption per line and image (LoadSubjectImages' captions), appended to the "
                        "prompt"),
    ]


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
    return {"text": [report], "personalize_loss": list(artifact.losses)}
