"""TrainLoRA: train a LoRA on the subject from the graph's MODEL/CLIP/VAE; writes models/loras/<name>.safetensors."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainers.methods.lora import LoRAConfig, LoRAMethod
from ..trainers.report import loss_curve_image, pil_to_image_batch
from .bridge import train_in_comfy
from .schema import config_from_inputs, option_inputs
from .trainer_node import caption_lines, run_inputs, single_inputs, trainer_inputs, \
    training_ui, validation_grid_output, validation_grid_socket
from .types import LoRAArtifact


class TrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainLoRA",
            display_name="Train LoRA (Personalize)",
            category="personalize/train",
            description="Train a LoRA of the subject (a few MB). Saved to models/loras in kohya's layout, which "
                        "ComfyUI's LoraLoader, A1111/Forge and diffusers load with every key matched.",
            inputs=trainer_inputs("my_subject_lora") + option_inputs(LoRAConfig),
            outputs=[LoRAArtifact.Output(display_name="lora"),
                     io.Image.Output(display_name="loss_curve"),
                     io.String.Output(display_name="lora_name", tooltip="file name inside models/loras"),
                     validation_grid_socket()],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            is_input_list=True,
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        images, masks, options = single_inputs(inputs)
        model, clip, vae, name, overwrite = (options.pop(k) for k in ("model", "clip", "vae", "name", "overwrite"))
        captions = options.pop("captions", None)
        steering = run_inputs(options)
        config = config_from_inputs(LoRAConfig, options)
        artifact = train_in_comfy(LoRAMethod(config), config, model, clip, vae, images,
                                  caption_lines(captions, len(images)), folder_kind="loras", name=name,
                                  suffix=".safetensors", overwrite=overwrite, node_id=cls.hidden.unique_id, masks=masks,
                                  **steering)
        curve = pil_to_image_batch([loss_curve_image(artifact.losses, "LoRA loss")])
        return io.NodeOutput(artifact, curve, artifact.name, validation_grid_output(artifact),
                             ui=training_ui(artifact, "LoRA"))
