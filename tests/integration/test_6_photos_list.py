"""LoadSubjectImages' photos (a list of IMAGE at their own sizes) reach TrainLoRA whole: the trainer takes list
inputs, trains once on all the photos and ComfyUI applies the result with every key loaded."""

from __future__ import annotations

import uuid

from .harness import lora_graph, record_run

TRAINER = "3"


def test_the_photos_list_trains_once_on_every_photo(client, base_dir):
    name = f"it_photos_{uuid.uuid4().hex[:8]}"
    graph = lora_graph(name, prefix=name, steps=2)
    graph[TRAINER]["inputs"]["images"] = ["2", 3]  # the photos output (is_output_list) instead of the batch
    result = client.run(graph)
    record_run("LoRA graph on the photos list (2 steps @64px)", result)
    assert result.status == "success", result.error_text()
    texts = result.history["outputs"].get(TRAINER, {}).get("text", [])
    assert len(texts) == 1 and "2 steps" in texts[0], texts  # one run, not one per photo
    assert (base_dir.loras / f"{name}.safetensors").is_file()
    assert "lora key not loaded" not in result.log
