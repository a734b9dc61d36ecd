"""ApplyLoRA: a trained LoRA (or any file in models/loras) onto MODEL + CLIP, through ComfyUI's own LoRA patching."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainers.errors import PersonalizeError
from .types import LoRAArtifact

NONE = "(use the lora input)"


def _lora_files() -> list[str]:
    import folder_paths

    return [NONE] + folder_paths.get_filename_list("loras")


class ApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyLoRA",
            display_name="Apply LoRA (Personalize)",
            category="personalize/apply",
            description="Patch MODEL and CLIP with a LoRA the way ComfyUI's LoraLoader does: the LoRA from a "
                        "TrainLoRA node, or a file from models/loras.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Combo.Input("lora_name", options=_lora_files(), tooltip="a file from models/loras; ignored "
                               "when the lora input is connected"),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01),
                LoRAArtifact.Input("lora", optional=True, tooltip="the lora output of a TrainLoRA node"),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip")],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, strength_model, strength_clip, lora=None) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils
        import folder_paths

        if lora is not None:
            path = str(lora.path)
        elif lora_name != NONE:
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
        else:
            raise PersonalizeError("ApplyLoRA needs a LoRA: connect a TrainLoRA node's lora output or pick a file "
                                   "in lora_name")
        weights = comfy.utils.load_torch_file(path, safe_load=True)
        model, clip = comfy.sd.load_lora_for_models(model, clip, weights, strength_model, strength_clip)
        return io.NodeOutput(model, clip)
