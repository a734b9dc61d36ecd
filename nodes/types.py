"""The pack's own ComfyUI socket types (documented in the README's node reference)."""

from comfy_api.latest import io

# A trained LoRA file: nodes.bridge.TrainedArtifact (path, name in models/loras, metadata, losses).
LoRAArtifact = io.Custom("PERSONALIZE_LORA")
