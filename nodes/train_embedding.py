"""TrainEmbedding: Textual Inversion of the subject; writes models/embeddings/<name>.safetensors, used in any prompt
as ``embedding:<name>``."""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..trainers.methods.embedding import EmbeddingConfig, EmbeddingMethod
from ..trainers.report import loss_curve_image, pil_to_image_batch
from .bridge import train_in_comfy
from .schema import config_from_inputs, option_inputs
from .trainer_node import caption_lines, run_inputs, single_inputs, trainer_inputs, \
    training_ui, validation_grid_output, validation_grid_socket


class TrainEmbedding(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainEmbedding",
            display_name="Train Embedding (Personalize)",
            category="personalize/train",
            description="Textual Inversion: learn a new word for the subject (a few KB; the model is untouched). "
                        "Saved to models/embeddings; write embedding:<name> in any prompt. Connect the clip output "
                        "to your CLIPTextEncode so the file exists before the prompt is encoded.",
            inputs=trainer_inputs("my_subject") + option_inputs(EmbeddingConfig),
            outputs=[io.String.Output(display_name="embedding_name"),
                     io.String.Output(display_name="prompt_fragment", tooltip="embedding:<name>, for a prompt"),
                     io.Clip.Output(display_name="clip", tooltip="the input CLIP, passed on after the embedding "
                                    "is written"),
                     io.Image.Output(display_name="loss_curve"), validation_grid_socket()],
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
        # The file name is the word used in prompts, so it names the token too.
        config = dataclasses.replace(config_from_inputs(EmbeddingConfig, options), token=name.strip())
        artifact = train_in_comfy(EmbeddingMethod(config), config, model, clip, vae, images,
                                  caption_lines(captions, len(images)), folder_kind="embeddings", name=name,
                                  suffix=".safetensors", overwrite=overwrite, node_id=cls.hidden.unique_id,
                                  rename_on_collision=False, masks=masks, **steering)
        embedding_name = artifact.name.removesuffix(".safetensors")
        curve = pil_to_image_batch([loss_curve_image(artifact.losses, "embedding loss")])
        return io.NodeOutput(embedding_name, f"embedding:{embedding_name}", clip, curve,
                             validation_grid_output(artifact),
                             ui=training_ui(artifact, "embedding"))
