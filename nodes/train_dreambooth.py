"""TrainDreamBooth: fine-tune the whole model on the subject with prior preservation; writes
models/checkpoints/<name>.safetensors and hands back MODEL/CLIP/VAE loaded from it by ComfyUI's own loader."""

from __future__ import annotations

from comfy_api.latest import io

from ..trainers.methods.dreambooth import DreamBoothConfig, DreamBoothMethod, check_device
from ..trainers.report import loss_curve_image, pil_to_image_batch
from .bridge import train_in_comfy, training_device
from .schema import config_from_inputs, option_inputs
from .trainer_node import caption_lines, run_inputs, single_inputs, trainer_inputs, \
    training_ui, validation_grid_output, validation_grid_socket


class TrainDreamBooth(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainDreamBooth",
            display_name="Train DreamBooth (Personalize)",
            category="personalize/train",
            description="DreamBooth: fine-tune every UNet weight (and optionally the text encoder) on the subject, "
                        "with the class-prior-preservation loss. Saved as a single-file checkpoint in "
                        "models/checkpoints (~2 GB fp16); its MODEL/CLIP/VAE come out ready to sample. Needs a GPU "
                        "with 12-16 GB (24 GB with the text encoder).",
            inputs=trainer_inputs("my_subject_dreambooth") + option_inputs(DreamBoothConfig),
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae"),
                     io.String.Output(display_name="ckpt_name", tooltip="file name inside models/checkpoints"),
                     io.Image.Output(display_name="loss_curve"), validation_grid_socket()],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
            is_input_list=True,
        )

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        import comfy.sd
        import folder_paths

        images, masks, options = single_inputs(inputs)
        model, clip, vae, name, overwrite = (options.pop(k) for k in ("model", "clip", "vae", "name", "overwrite"))
        captions = options.pop("captions", None)
        steering = run_inputs(options)
        config = config_from_inputs(DreamBoothConfig, options)
        check_device(config, training_device())
        artifact = train_in_comfy(DreamBoothMethod(config), config, model, clip, vae, images,
                                  caption_lines(captions, len(images)), folder_kind="checkpoints", name=name,
                                  suffix=".safetensors", overwrite=overwrite, node_id=cls.hidden.unique_id,
                                  masks=masks, **steering)
        # The same loader as CheckpointLoaderSimple, so the graph samples with exactly what a user would load.
        trained_model, trained_clip, trained_vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(artifact.path), output_vae=True, output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
        curve = pil_to_image_batch([loss_curve_image(artifact.losses, "DreamBooth loss")])
        return io.NodeOutput(trained_model, trained_clip, trained_vae, artifact.name, curve,
                             validation_grid_output(artifact),
                             ui=training_ui(artifact, "DreamBooth"))
