"""The example workflows (example_workflows/): ComfyUI offers the three UI workflows as the pack's templates and not
their API twins; each twin is exactly the UI workflow converted with /object_info (so every widget value sits in the
right slot); the trainers show the nodes' real defaults; and each twin, made small for the CPU (full-size random
checkpoint, 64 px, 2-3 steps), runs to success: train → apply → sample → save → DINOScore."""

from __future__ import annotations

import copy
import json
import os
import re
import time
import urllib.request
import uuid

import pytest

from .harness import CHECKPOINT, PACK_FOLDER, record_run, saved_images, unit_conftest
from .test_3_more_nodes import DREAMBOOTH_MIN_FREE_GIB, free_gib
from .workflows import (API_DIR, WORKFLOWS, WORKFLOWS_DIR, WRITE_TWINS, api_path, dump_api, load, nodes_of, ui_path,
                        ui_to_api, widget_inputs)

pytestmark = pytest.mark.integration

TRAINERS = {"lora": "TrainLoRA", "embedding": "TrainEmbedding", "dreambooth": "TrainDreamBooth"}
ARTIFACT_FOLDER = {"lora": "loras", "embedding": "embeddings", "dreambooth": "checkpoints"}
TRAIN_STEPS = {"lora": 3, "embedding": 3, "dreambooth": 2}
SUBJECT_IMAGES = 4  # the base_dir fixture's subject folder
BATCH = 2  # sampled images per run (DINOScore then also reports DIV)
# Trainer widgets an example may set to something other than the node default (for its subject, a dog).
EXAMPLE_CHOICES = {"init_word"}


def test_only_the_ui_workflows_are_templates(client):
    """GET /workflow_templates lists example_workflows/*.json only (not api/), and each is served as it is."""
    listed = client.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_FOLDER, [])) == sorted(f"personalize_{m}" for m in WORKFLOWS), listed
    for method in WORKFLOWS:
        url = f"{client.url}/api/workflow_templates/{PACK_FOLDER}/personalize_{method}.json"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert json.load(response) == load(ui_path(method))
    assert sorted(p.name for p in WORKFLOWS_DIR.glob("*.json")) == sorted(f"personalize_{m}.json" for m in WORKFLOWS)
    assert sorted(p.name for p in API_DIR.glob("*.json")) == sorted(f"personalize_{m}.json" for m in WORKFLOWS)


@pytest.mark.parametrize("method", WORKFLOWS)
def test_api_twin_is_the_ui_workflow(client, method):
    """The twin is ui_to_api(UI workflow): same nodes, links and widget values, each value in its widget's slot.
    PERSONALIZE_WRITE_API_TWINS=1 rewrites the twin instead (after editing the UI workflow)."""
    prompt = ui_to_api(load(ui_path(method)), client.object_info(refresh=True))
    if WRITE_TWINS:
        api_path(method).parent.mkdir(exist_ok=True)
        api_path(method).write_text(dump_api(prompt), encoding="utf-8")
    twin = load(api_path(method))
    assert twin == prompt, (f"{api_path(method)} differs from its UI workflow {ui_path(method).name} converted; "
                            f"run with PERSONALIZE_WRITE_API_TWINS=1 to rewrite it")


@pytest.mark.parametrize("workflow_name", WORKFLOWS)
def test_ui_workflow_shows_a_real_setup(client, workflow_name):
    """What a user gets: the trainer at the node's defaults (real step counts; an SDXL model turns the default 512 px
    into its 1024), the seed fixed (re-queuing reuses the trained file), photos and samples at the family's size,
    load → train → apply → sample → score from left to right in groups, and notes."""
    info = client.object_info()
    workflow = load(ui_path(workflow_name))
    method = workflow_name.removeprefix("sdxl_")
    size = 1024 if workflow_name.startswith("sdxl_") else 512
    trainer_type = TRAINERS[method]
    (trainer,) = [n for n in workflow["nodes"] if n["type"] == trainer_type]
    values = iter(trainer["widgets_values"])
    for name, _kind, options, control in widget_inputs(info[trainer_type]):
        value = next(values)
        if name not in {"name", "prompt"} | EXAMPLE_CHOICES:
            assert value == options.get("default"), f"{trainer_type}.{name} = {value!r}, node default " \
                                                    f"{options.get('default')!r}"
        if control:
            assert next(values) == "fixed", f"{trainer_type}.{name}: control_after_generate must be 'fixed'"

    by_type: dict[str, list[dict]] = {}
    for node in workflow["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    (sampler,) = by_type["KSampler"]
    assert 20 <= sampler["widgets_values"][2] <= 30, sampler["widgets_values"]
    (latent,) = by_type["EmptyLatentImage"]
    assert latent["widgets_values"][:2] == [size, size]
    (subject,) = by_type["LoadSubjectImages"]
    assert subject["widgets_values"][:2] == ["my_subject", size]
    positive = [n["widgets_values"][0] for n in by_type["CLIPTextEncode"]]
    trigger = "embedding:my_subject" if method == "embedding" else "sks dog"
    assert any(trigger in text for text in positive), positive
    assert len(by_type.get("Note", [])) >= 4 and "DINOScore" in by_type and by_type.get("SaveImage")

    # Left to right: each stage's nodes sit in its group, and the groups are in this order.
    titles = [g["title"] for g in sorted(workflow["groups"], key=lambda g: g["bounding"][0])]
    assert [re.sub(r"\W.*", "", t.split("·")[-1].strip()) for t in titles] == [
        "Load", "Train", "Apply", "Sample", "Score"], titles
    stage_of = {"LoadSubjectImages": 0, "CheckpointLoaderSimple": 0, trainer_type: 1, "ApplyLoRA": 2,
                "CLIPTextEncode": 2, "KSampler": 3, "VAEDecode": 3, "SaveImage": 3, "DINOScore": 4}
    groups = sorted(workflow["groups"], key=lambda g: g["bounding"][0])
    for node in workflow["nodes"]:
        if node["type"] in stage_of:
            x, y, w, h = groups[stage_of[node["type"]]]["bounding"]
            nx, ny = node["pos"]
            nw, nh = node["size"]
            assert x <= nx and nx + nw <= x + w and y <= ny and ny + nh <= y + h, (node["type"], node["pos"],
                                                                                   groups[stage_of[node["type"]]])


# ------------------------------------------------------------------------------------------------ running them


@pytest.fixture(scope="module")
def dino_model(base_dir):
    """Random ViT-S/16 weights as models/dino/dino-vits16 (what DINOScore's "auto" finds); test_3 may have made it."""
    folder = base_dir.dino / "dino-vits16"
    if not (folder / "config.json").is_file():
        unit_conftest().pack("trainers.testing.dino").make_random_dino(folder, seed=0)
    return folder


def small(prompt: dict, method: str, name: str, prefix: str) -> dict:
    """The twin made quick on a CPU: the test checkpoint and subject folder, 64 px, few steps, one class image."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT
        elif kind == "LoadSubjectImages":
            inputs.update(folder="subject", resolution=64)
        elif kind == TRAINERS[method]:
            inputs.update(name=name, steps=TRAIN_STEPS[method], resolution=64)
            if method == "dreambooth":  # prior preservation stays on, with one class image sampled in 2 steps
                inputs.update(class_images=1, class_sampler_steps=2)
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=BATCH)
        elif kind == "KSampler":
            inputs["steps"] = 2
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
        elif kind in ("CLIPTextEncode", "DINOScore") and method == "embedding":
            key = "text" if kind == "CLIPTextEncode" else "prompt"
            inputs[key] = inputs[key].replace("embedding:my_subject", f"embedding:{name}")
    return prompt


def run_example(method: str, client, base_dir) -> None:
    twin = load(api_path(method))
    name = f"it_wf_{method}_{uuid.uuid4().hex[:8]}"
    prompt = small(twin, method, name, prefix=f"it_wf_{name}")
    trainer = nodes_of(prompt, TRAINERS[method])[0]
    (dino,) = nodes_of(prompt, "DINOScore")
    result = client.run(prompt, timeout=1800)
    record_run(f"example workflow personalize_{method} ({TRAINERS[method]} {TRAIN_STEPS[method]} steps @64px"
               f"{' + 1 class image' if method == 'dreambooth' else ''}, KSampler 2 steps x{BATCH} @64px, DINOScore)",
               result)
    assert result.status == "success", result.error_text()

    artifact = getattr(base_dir, ARTIFACT_FOLDER[method]) / f"{name}.safetensors"
    assert artifact.is_file() and artifact.stat().st_size > 0, sorted(base_dir.files(artifact.parent))
    report = "\n".join(result.history["outputs"].get(trainer, {}).get("text", []))
    assert f"{TRAIN_STEPS[method]} steps" in report, report
    images = saved_images(result, base_dir.output)
    assert len(images) == BATCH and all(p.is_file() and p.stat().st_size > 0 for p in images), \
        result.history["outputs"]
    metrics = result.history["outputs"].get(dino, {})
    (values,) = metrics.get("metrics", [None])
    assert values and -1.0001 <= values["dino"] <= 1.0001 and values["pairs"] == BATCH * SUBJECT_IMAGES, metrics
    assert "div" in values, values
    if method == "lora":
        assert "lora key not loaded" not in result.log
    if method == "embedding":
        for marker in ("does not exist", "shape mismatch", "error loading embedding"):
            assert marker not in result.log, [line for line in result.log.splitlines() if marker in line]


@pytest.mark.parametrize("method", ["lora", "embedding"])
def test_example_workflow_runs(method, client, server, base_dir, dino_model):
    run_example(method, client, base_dir)


def test_dreambooth_example_workflow_runs(client, server, base_dir, dino_model):
    # Models cached by earlier tests are dropped first, so the memory check sees what DreamBooth can use.
    status, body = client.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200, body
    time.sleep(3)
    available = free_gib()
    if available < DREAMBOOTH_MIN_FREE_GIB and os.environ.get("PERSONALIZE_IT_FORCE_DREAMBOOTH") != "1":
        pytest.skip(f"DreamBooth on a full-size SD1.5 on the CPU needs ~{DREAMBOOTH_MIN_FREE_GIB:.0f} GiB free RAM "
                    f"({available:.1f} GiB available); set PERSONALIZE_IT_FORCE_DREAMBOOTH=1 to run it anyway")
    print(f"\n[integration] free RAM before the DreamBooth example workflow: {available:.1f} GiB", flush=True)
    run_example("dreambooth", client, base_dir)
