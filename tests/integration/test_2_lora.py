"""The LoRA graph end to end: train → apply → sample → save; progress and loss events; caching; reuse after a
restart; interrupt. The tests share one trained run (module fixture) and run in file order; the restart comes last."""

from __future__ import annotations

import math
import time
import uuid

import pytest
from safetensors import safe_open

from .harness import RunResult, lora_graph, record, record_run, saved_images

pytestmark = pytest.mark.integration

TRAINER = "3"  # node id of TrainLoRA in lora_graph
STEPS = 3


@pytest.fixture(scope="module")
def lora_run(server, client, base_dir):
    """The LoRA graph run once (3 steps, 64 px) with a websocket listening."""
    name = f"it_lora_{uuid.uuid4().hex[:8]}"
    graph = lora_graph(name, prefix=f"it_lora_{name}", steps=STEPS)
    comfy_loras = server.setup.comfy_dir / "models" / "loras"
    before = base_dir.files(base_dir.loras)
    comfy_before = base_dir.files(comfy_loras) if comfy_loras.is_dir() else set()
    result = client.run(graph)
    record_run("LoRA graph (TrainLoRA 3 steps @64px + ApplyLoRA + KSampler 2 steps @64px)", result)
    assert result.status == "success", result.error_text()
    return {"name": name, "graph": graph, "result": result, "before": before, "comfy_loras": comfy_loras,
            "comfy_before": comfy_before, "after": base_dir.files(base_dir.loras)}


def trainer_text(result: RunResult) -> str:
    return "\n".join(result.history["outputs"].get(TRAINER, {}).get("text", []))


def test_lora_graph_trains_applies_and_samples(lora_run, base_dir):
    result: RunResult = lora_run["result"]
    name = lora_run["name"]
    images = saved_images(result, base_dir.output)
    assert images and all(p.is_file() and p.stat().st_size > 0 for p in images), result.history["outputs"]
    assert "lora key not loaded" not in result.log, [l for l in result.log.splitlines() if "lora key" in l][:5]
    assert f"{STEPS} steps" in trainer_text(result), trainer_text(result)

    assert lora_run["after"] - lora_run["before"] == {f"{name}.safetensors"}
    # Nothing was written into ComfyUI's own models/loras (what happens without is_default in the yaml).
    comfy_loras = lora_run["comfy_loras"]
    if comfy_loras.is_dir():
        assert base_dir.files(comfy_loras) == lora_run["comfy_before"]

    path = base_dir.loras / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys), [
        k for k in keys if not k.startswith(("lora_unet_", "lora_te_"))][:10]
    assert any(k.startswith("lora_te_") for k in keys), "train_text_encoder was on but no lora_te_ keys"
    assert metadata.get("personalize.fingerprint"), sorted(metadata)


def test_progress_and_loss_events_for_the_trainer(lora_run):
    result: RunResult = lora_run["result"]
    progress = [e for e in result.events_of("progress") if e.get("node") == TRAINER]
    assert progress, f"no progress events for node {TRAINER}; types: {sorted({e['type'] for e in result.events})}"
    assert progress[-1]["value"] == progress[-1]["max"] == STEPS, progress
    losses = result.events_of("personalize.loss")
    assert [e["step"] for e in losses] == list(range(1, STEPS + 1)), losses
    for event in losses:
        assert event["total"] == STEPS and event["node"] == TRAINER, event
        assert isinstance(event["loss"], float) and math.isfinite(event["loss"]), event


def test_unchanged_graph_is_served_from_cache(lora_run, client, base_dir):
    first: RunResult = lora_run["result"]
    again = client.run(first.prompt)
    record_run("LoRA graph again, unchanged (ComfyUI cache)", again)
    assert again.status == "success", again.error_text()
    cached = [node for e in again.events_of("execution_cached") for node in e["nodes"]]
    assert TRAINER in cached, f"execution_cached: {cached}"
    assert again.seconds < first.seconds / 3, (again.seconds, first.seconds)
    assert base_dir.files(base_dir.loras) == lora_run["after"]


def test_interrupt_during_training_stops_quickly_and_a_requeue_resumes(server, client, base_dir, unique):
    name = f"it_interrupt_{unique}"
    graph = {key: node for key, node in lora_graph(name, prefix="unused", steps=500).items() if key in ("1", "2", "3")}
    before = base_dir.files(base_dir.models)
    client_id = f"it-interrupt-{unique}"
    started = time.perf_counter()
    with client.listen(client_id) as ws:
        prompt_id = client.queue(graph, client_id)
        first = ws.wait_for(lambda e: e.get("type") == "personalize.loss" and e["data"].get("node") == TRAINER
                            and e["data"].get("step", 0) >= 2, timeout=600,
                            what=f"the second training step of node {TRAINER}")
        record("interrupt graph: queue → second training step", time.perf_counter() - started)
        asked = time.perf_counter()
        client.interrupt(prompt_id)
        end = ws.wait_for(lambda e: e.get("type") in ("execution_interrupted", "execution_error", "execution_success")
                          and e["data"].get("prompt_id") == prompt_id, timeout=120, what="end of the prompt")
        latency = time.perf_counter() - asked
        record("interrupt → execution_interrupted (the training state saved)", latency)
        steps_done = [e["data"]["step"] for e in ws.events if e.get("type") == "personalize.loss"
                      and e["data"].get("node") == TRAINER]
    assert first["data"]["total"] == 500
    assert end["type"] == "execution_interrupted", end
    assert latency < 30, f"the interrupt took {latency:.1f} s (steps done: {steps_done})"
    assert max(steps_done or [0]) < 500
    history = client.wait(prompt_id, 60)
    assert history["status"]["status_str"] == "error" and not history["status"]["completed"], history["status"]
    assert "execution_interrupted" in [name for name, _ in history["status"]["messages"]], history["status"]
    assert "Processing interrupted" in server.log_text()
    # No artifact and no temp file anywhere under models/: only the training state a re-queue continues from.
    new = base_dir.files(base_dir.models) - before
    state = f"loras/{name}.state/"
    assert new and all(path.startswith(state) and "/." not in path for path in new), new
    saved = max(int(path[len(state):].split("/")[0].split("-")[1]) for path in new)
    assert saved >= 1

    # Re-queued (resume is on by default) with a total a few steps past the saved one: it continues there.
    graph["3"]["inputs"]["steps"] = saved + 2
    resumed = client.run(graph, client_id=client_id, timeout=300)
    steps = [e["data"]["step"] for e in resumed.events if e.get("type") == "personalize.loss"
             and e["data"].get("node") == TRAINER]
    record_run("re-queued interrupted graph (resumed, 2 steps)", resumed)
    assert resumed.status == "success", resumed.error_text()
    assert steps == [saved + 1, saved + 2]
    assert (base_dir.loras / f"{name}.safetensors").is_file()


def test_restart_reuses_the_trained_lora(lora_run, server, client, base_dir):
    """A fresh server has no cache: TrainLoRA runs, finds the file with the same training fingerprint, and reuses it
    instead of training again (no <name>_1.safetensors)."""
    record("server restart", server.restart())
    before = base_dir.files(base_dir.loras)
    result = client.run(lora_run["result"].prompt)
    record_run("LoRA graph after restart (reused)", result)
    assert result.status == "success", result.error_text()
    text = trainer_text(result)
    assert "reused" in text, text
    assert not result.events_of("personalize.loss"), "it trained again"
    assert base_dir.files(base_dir.loras) == before
    assert not (base_dir.loras / f"{lora_run['name']}_1.safetensors").exists()
    assert saved_images(result, base_dir.output)
