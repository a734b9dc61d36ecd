"""TrainDreamBooth, TrainEmbedding and DINOScore graphs. Each test skips until its node is registered (their
modules are being written). The graphs are built from /object_info: inputs this suite names get values when the node
has them, and required MODEL/CLIP/VAE/IMAGE sockets are linked by type, so small schema changes don't break them."""

from __future__ import annotations

import math
import os
import re

import pytest
from safetensors import safe_open

from .harness import (CHECKPOINT, adaptive_node, output_index, record_run, sampling_nodes, saved_images,
                      unit_conftest)

pytestmark = pytest.mark.integration

LOADER = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}
SUBJECT = {"class_type": "LoadSubjectImages", "inputs": {"folder": "subject", "resolution": 64, "fit": "crop"}}
LINKS = {"MODEL": ["1", 0], "CLIP": ["1", 1], "VAE": ["1", 2], "IMAGE": ["2", 0]}
# Full fine-tuning of SD1.5 on the CPU (fp32 weights + AdamW state; gradients one weight at a time) with ComfyUI's
# own copy of the model: the machine peaked at 16.0 GB used while this test ran.
DREAMBOOTH_MIN_FREE_GIB = float(os.environ.get("PERSONALIZE_IT_DREAMBOOTH_MIN_GIB", "18"))


def require_node(client, node_id: str) -> dict:
    info = client.object_info(refresh=True)
    if node_id not in info:
        pytest.skip(f"{node_id} is not registered in nodes/__init__.py yet")
    return info


def free_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return math.inf


def is_output_node(info: dict, node_id: str) -> bool:
    return bool(info[node_id].get("output_node"))


def with_output(info: dict, graph: dict, node: str, node_id: str) -> dict:
    """Trainer/metric nodes are expected to be output nodes; if one is not, a PreviewAny keeps the graph valid."""
    if not is_output_node(info, node_id):
        graph[str(max(map(int, graph)) + 1)] = {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
    return graph


def new_files(before: set[str], after: set[str], suffixes: tuple[str, ...]) -> list[str]:
    return sorted(f for f in after - before if f.endswith(suffixes) and not os.path.basename(f).startswith("."))


def test_dreambooth_graph(client, server, base_dir, unique):
    info = require_node(client, "TrainDreamBooth")
    if free_gib() < DREAMBOOTH_MIN_FREE_GIB and os.environ.get("PERSONALIZE_IT_FORCE_DREAMBOOTH") != "1":
        pytest.skip(f"DreamBooth on a full-size SD1.5 on the CPU needs ~{DREAMBOOTH_MIN_FREE_GIB:.0f} GiB free RAM "
                    f"({free_gib():.1f} GiB available); set PERSONALIZE_IT_FORCE_DREAMBOOTH=1 to run it anyway")
    name = f"it_db_{unique}"
    trainer = adaptive_node(info, "TrainDreamBooth", LINKS, {
        "name": name, "overwrite": False, "steps": 2, "resolution": 64, "prompt": "a photo of sks toy",
        "class_prompt": "", "train_text_encoder": False, "gradient_checkpointing": True, "captions": ["2", 2]})
    graph = {"1": LOADER, "2": SUBJECT, "3": trainer}
    model_out, clip_out, vae_out = (output_index(info, "TrainDreamBooth", t) for t in ("MODEL", "CLIP", "VAE"))
    if model_out is not None and clip_out is not None:  # sample with the trained model in the same graph
        vae = ["3", vae_out] if vae_out is not None else ["1", 2]
        graph.update(sampling_nodes(["3", model_out], ["3", clip_out], vae, "a photo of sks toy",
                                    prefix=f"it_db_{unique}", first_id=4))
    graph = with_output(info, graph, "3", "TrainDreamBooth")
    before = base_dir.files(base_dir.checkpoints)
    result = client.run(graph)
    record_run("DreamBooth graph (TrainDreamBooth 2 steps @64px, no prior)", result)
    assert result.status == "success", result.error_text()
    written = new_files(before, base_dir.files(base_dir.checkpoints), (".safetensors", ".ckpt"))
    assert len(written) == 1 and written[0].startswith(name), written
    with safe_open(str(base_dir.checkpoints / written[0]), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert {"model", "cond_stage_model", "first_stage_model"} <= prefixes, prefixes
    assert written[0] in client.get("/models/checkpoints")

    # ComfyUI's own loader detects and samples the new checkpoint.
    sample = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": written[0]}},
              **sampling_nodes(["1", 0], ["1", 1], ["1", 2], "a photo of sks toy", prefix=f"it_db_ckpt_{unique}",
                               first_id=2)}
    result = client.run(sample)
    record_run("DreamBooth checkpoint → CheckpointLoaderSimple → KSampler 2 steps", result)
    assert result.status == "success", result.error_text()
    assert saved_images(result, base_dir.output)


def test_embedding_graph(client, server, base_dir, unique):
    info = require_node(client, "TrainEmbedding")
    name = f"it_emb_{unique}"
    trainer = adaptive_node(info, "TrainEmbedding", LINKS, {
        "name": name, "overwrite": False, "steps": 3, "resolution": 64, "init_word": "toy", "vectors": 1,
        "captions": ["2", 2]})
    graph = with_output(info, {"1": LOADER, "2": SUBJECT, "3": trainer}, "3", "TrainEmbedding")
    before = base_dir.files(base_dir.embeddings)
    result = client.run(graph)
    record_run("Embedding graph (TrainEmbedding 3 steps @64px)", result)
    assert result.status == "success", result.error_text()
    written = new_files(before, base_dir.files(base_dir.embeddings), (".safetensors", ".pt", ".bin"))
    assert len(written) == 1 and os.path.basename(written[0]).startswith(name), written
    path = base_dir.embeddings / written[0]
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys()]
        assert any(len(s) == 2 and s[-1] == 768 for s in shapes), shapes

    # The embedding works in a prompt: ComfyUI finds it and its width matches CLIP-L.
    stem = written[0].rsplit(".", 1)[0]
    sample = {"1": LOADER, **sampling_nodes(["1", 0], ["1", 1], ["1", 2], f"a photo of embedding:{stem}",
                                            prefix=f"it_emb_{unique}", first_id=2)}
    result = client.run(sample)
    record_run("prompt with embedding:<trained> → KSampler 2 steps", result)
    assert result.status == "success", result.error_text()
    for marker in ("does not exist", "shape mismatch", "error loading embedding"):
        assert marker not in result.log, [l for l in result.log.splitlines() if marker in l]
    assert saved_images(result, base_dir.output)


def test_dino_score_graph(client, server, base_dir):
    info = require_node(client, "DINOScore")
    # Random ViT-S/16 weights in the Hugging Face layout as models/dino/dino-vits16 (what the DINO search finds).
    random_dino = unit_conftest().pack("trainers.testing.dino").make_random_dino(base_dir.dino / "dino-vits16", seed=0)
    info = client.object_info(refresh=True)  # model lists in combos are read when /object_info is built
    values = {}
    for input_name, entry in {**info["DINOScore"]["input"].get("required", {}),
                              **info["DINOScore"]["input"].get("optional", {})}.items():
        options = entry[1].get("options") if entry[0] == "COMBO" and len(entry) > 1 else (
            entry[0] if isinstance(entry[0], list) else None)
        if options and any("dino" in str(o) for o in options):
            values[input_name] = next(o for o in options if "dino" in str(o))
    node = adaptive_node(info, "DINOScore", {"IMAGE": ["2", 0]}, values)
    graph = with_output(info, {"2": SUBJECT, "3": node}, "3", "DINOScore")
    result = client.run(graph)
    record_run("DINOScore graph (subject images vs themselves, random ViT-S/16)", result)
    assert result.status == "success", result.error_text() + f"\n(dino model at {random_dino})"
    texts = [t for output in result.history["outputs"].values() for t in output.get("text", [])]
    scores = [float(x) for t in texts for x in re.findall(r"-?\d+\.\d+", t)]
    assert scores and all(-1.0001 <= s <= 1.0001 for s in scores[:1]), texts
