"""The pack's ComfyUI nodes: thin adapters over ``trainers/``, one module per node."""

from comfy_api.latest import ComfyExtension

from .apply_lora import ApplyLoRA
from .load_subject_images import LoadSubjectImages
from .train_lora import TrainLoRA


class PersonalizeExtension(ComfyExtension):
    async def get_node_list(self):
        return [LoadSubjectImages, TrainLoRA, ApplyLoRA]
