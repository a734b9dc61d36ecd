"""The pack's ComfyUI nodes: thin adapters over ``trainers/``, one module per node."""

from comfy_api.latest import ComfyExtension

from .apply_lora import ApplyLoRA
from .bridge import register_model_folders
from .dino_score import DINOScore
from .load_subject_images import LoadSubjectImages
from .train_dreambooth import TrainDreamBooth
from .train_embedding import TrainEmbedding
from .train_lora import TrainLoRA


class PersonalizeExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folders()

    async def get_node_list(self):
        return [LoadSubjectImages, TrainLoRA, ApplyLoRA, TrainDreamBooth, TrainEmbedding, DINOScore]
