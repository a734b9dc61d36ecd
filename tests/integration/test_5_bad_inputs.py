"""Bad node inputs in a real ComfyUI: each prompt fails on its node with the pack's own message naming the input,
writes nothing under models/, and the server keeps serving (a small prompt runs to success after each error)."""

from __future__ import annotations

import math

import pytest

from .harness import lora_graph, record_run

pytestmark = pytest.mark.integration

TRAINER = "3"  # node id of TrainLoRA in lora_graph
SMALL = {"1": {"class_type": "LoadSubjectImages", "inputs": {"folder": "subject", "resolution": 32}},
         "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}


def trainer_only(unique: str, **inputs) -> dict:
    graph = {key: node for key, node in lora_graph(f"it_bad_{unique}", prefix="unused").items()
             if key in ("1", "2", "3")}
    graph[TRAINER]["inputs"].update(inputs)
    return graph


# (what, TrainLoRA inputs, what the message must name). NaN passes ComfyUI's own min/max check (every comparison
# with NaN is false; infinity ComfyUI refuses itself): the pack's validation is what refuses it.
CASES = [
    ("NaN learning rate", {"lr": math.nan}, "lr"),
    ("NaN gradient clipping", {"max_grad_norm": math.nan}, "max_grad_norm"),
    ("NaN alpha", {"alpha": math.nan}, "alpha"),
    ("NaN noise offset", {"noise_offset": math.nan}, "noise_offset"),
    ("a name that is only path characters", {"name": "///"}, "'///'"),
]


@pytest.mark.parametrize("what, inputs, named", CASES, ids=[c[0] for c in CASES])
def test_node_error_is_clear_and_the_server_keeps_serving(what, inputs, named, client, server, base_dir, unique):
    before = base_dir.files(base_dir.models)
    result = client.run(trainer_only(unique, **inputs), timeout=600)
    record_run(f"TrainLoRA with {what} (refused)", result)
    assert result.status == "error", f"{what} was accepted"
    [error] = result.messages("execution_error")
    assert error["node_id"] == TRAINER and error["exception_type"].endswith("PersonalizeError"), error
    assert named in error["exception_message"], error["exception_message"]
    assert base_dir.files(base_dir.models) == before, base_dir.files(base_dir.models) - before
    assert server.alive()
    after = client.run(SMALL, timeout=120)
    assert after.status == "success", after.error_text()
