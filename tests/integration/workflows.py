"""The example workflows: UI format (LiteGraph 0.4, what the ComfyUI frontend loads) → API format (what POST /prompt
takes), checked against the live server's /object_info.

``example_workflows/personalize_<method>.json`` are the UI workflows ComfyUI offers as templates.
``example_workflows/api/personalize_<method>.json`` are their API-format twins: ComfyUI lists only
``example_workflows/*.json`` (a non-recursive glob in ``app/custom_node_manager.py``), so the twins in ``api/`` are not
offered as templates. A twin is always :func:`ui_to_api` of its UI file; the suite checks that, and rewrites the
twins when ``PERSONALIZE_WRITE_API_TWINS=1``.

The conversion does what the frontend's "Export (API)" does for these graphs: every widget input in
``/object_info``'s ``input_order`` (required, then optional) takes the next value of ``widgets_values``, an INT with
a control_after_generate widget (``seed``) is followed by one extra value that is not sent, and each linked input
becomes ``[source node id, output index]``. Frontend-only nodes (Note) are dropped. Anything it cannot place (too
few or too many values, a value of the wrong type, a link to a missing socket or of the wrong type) is reported —
the mistakes that would otherwise only show up as validation errors when the workflow is queued from the UI.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .harness import REPO

WORKFLOWS_DIR = REPO / "example_workflows"
API_DIR = WORKFLOWS_DIR / "api"
METHODS = ("lora", "embedding", "dreambooth")
# Every example: the SD1.x one of each method, and its SDXL twin (same graph, SDXL checkpoint and sizes).
WORKFLOWS = METHODS + tuple(f"sdxl_{m}" for m in METHODS)
WRITE_TWINS = os.environ.get("PERSONALIZE_WRITE_API_TWINS") == "1"

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes: in the UI file, never in the prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # the frontend adds control_after_generate to these INTs by name
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
# Combos whose options are the user's files: the example names a placeholder that need not be installed.
INSTALLATION_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoadSubjectImages", "folder")}


class WorkflowError(AssertionError):
    pass


def ui_path(method: str) -> Path:
    return WORKFLOWS_DIR / f"personalize_{method}.json"


def api_path(method: str) -> Path:
    return API_DIR / f"personalize_{method}.json"


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _spec(entry: list) -> tuple[str, dict]:
    """(type, options) of an /object_info input entry; an old-style combo's option list becomes COMBO."""
    kind = entry[0]
    options = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(kind, list):
        options.setdefault("options", kind)
        kind = "COMBO"
    return kind, options


def widget_inputs(node_info: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, has control_after_generate) of each widget, in the order of ``widgets_values``."""
    order = node_info.get("input_order") or {s: list(node_info["input"].get(s, {})) for s in ("required", "optional")}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            kind, options = _spec(node_info["input"][section][name])
            if kind not in WIDGET_TYPES or options.get("forceInput") or options.get("rawLink"):
                continue
            control = bool(options.get("control_after_generate")) or (kind == "INT" and name in SEED_NAMES)
            widgets.append((name, kind, options, control))
    return widgets


def all_inputs(node_info: dict) -> dict[str, tuple[str, dict]]:
    spec = node_info["input"]
    return {name: _spec(entry) for section in ("required", "optional") for name, entry in spec.get(section, {}).items()}


def _check_value(class_type: str, name: str, kind: str, options: dict, value) -> str | None:
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}: {value!r} is not an INT"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}: {value!r} is not a FLOAT"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: {value!r} is not a BOOLEAN"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{name}: {value!r} is not a STRING"
    elif kind == "COMBO":
        choices = options.get("options") or []
        if value not in choices and (class_type, name) not in INSTALLATION_COMBOS:
            return f"{name}: {value!r} is not one of {choices[:8]}"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{name}: {value!r} < min {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: {value!r} > max {options['max']}"
    return None


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format (0.4) workflow. Raises WorkflowError listing every problem found."""
    problems: list[str] = []
    if workflow.get("version") != 0.4:
        problems.append(f"version {workflow.get('version')!r}, expected 0.4")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}

    for node_id in sorted(nodes):
        node = nodes[node_id]
        class_type = node["type"]
        where = f"node {node_id} ({class_type})"
        if class_type in FRONTEND_ONLY:
            continue
        if class_type not in object_info:
            problems.append(f"{where}: no such node type on the server")
            continue
        if node.get("mode", 0) != 0:
            problems.append(f"{where}: mode {node['mode']} (muted/bypassed nodes are not converted)")
            continue
        info = object_info[class_type]
        inputs: dict = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            problems.append(f"{where}: widgets_values is a dict; this converter reads the list form")
            values = []
        widgets = widget_inputs(info)
        expected = len(widgets) + sum(control for *_, control in widgets)
        if len(values) != expected:
            names = [n for n, *_ in widgets]
            problems.append(f"{where}: {len(values)} widgets_values for {expected} slots ({names}, plus one "
                            f"control_after_generate value after each seed)")
        position = 0
        for name, kind, options, control in widgets:
            if position >= len(values):
                break
            value = values[position]
            position += 1
            problem = _check_value(class_type, name, kind, options, value)
            if problem:
                problems.append(f"{where}: {problem}")
            inputs[name] = value
            if control:
                if position < len(values) and values[position] not in CONTROL_VALUES:
                    problems.append(f"{where}: {values[position]!r} after {name} is not a control_after_generate "
                                    f"value {sorted(CONTROL_VALUES)}")
                position += 1

        declared = all_inputs(info)
        for slot, socket in enumerate(node.get("inputs") or []):
            link_id = socket.get("link")
            if link_id is None:
                continue
            link = links.get(link_id)
            if link is None:
                problems.append(f"{where}: input {socket['name']} names link {link_id}, which is not in links")
                continue
            _, origin, origin_slot, target, target_slot, link_type = link[:6]
            if (target, target_slot) != (node_id, slot):
                problems.append(f"{where}: link {link_id} targets node {target} slot {target_slot}, but is on slot "
                                f"{slot}")
            name = socket["name"]
            if name not in declared:
                problems.append(f"{where}: input {name!r} is not an input of {class_type}")
                continue
            source = nodes.get(origin)
            if source is None or source["type"] in FRONTEND_ONLY:
                problems.append(f"{where}: input {name} comes from node {origin}, which is missing or frontend-only")
                continue
            expected_type = declared[name][0]
            source_outputs = object_info.get(source["type"], {}).get("output", [])
            source_type = source_outputs[origin_slot] if origin_slot < len(source_outputs) else None
            if source_type is None:
                problems.append(f"{where}: link {link_id} from node {origin} output {origin_slot}, which "
                                f"{source['type']} does not have")
            elif source_type != expected_type and "*" not in (source_type, expected_type):
                problems.append(f"{where}: input {name} expects {expected_type}, link {link_id} brings {source_type} "
                                f"from node {origin} ({source['type']})")
            if link_type not in (expected_type, "*"):
                problems.append(f"{where}: link {link_id} is typed {link_type}, input {name} is {expected_type}")
            inputs[name] = [str(origin), origin_slot]

        required = info["input"].get("required", {})
        missing = [name for name in required if name not in inputs]
        if missing:
            problems.append(f"{where}: required inputs not set: {missing}")
        ordered = {name: inputs[name] for name in all_inputs(info) if name in inputs}
        title = node.get("title") or info.get("display_name") or class_type
        prompt[str(node_id)] = {"inputs": ordered, "class_type": class_type, "_meta": {"title": title}}

    if not any(object_info[n["class_type"]].get("output_node") for n in prompt.values()):
        problems.append("no output node")
    if problems:
        raise WorkflowError("workflow does not convert cleanly:\n  " + "\n  ".join(problems))
    return prompt


def dump_api(prompt: dict) -> str:
    """The twin's file text: indent 2, each link pair on one line."""
    text = json.dumps(prompt, indent=2, ensure_ascii=False)
    # [\n "3",\n 0\n ] -> ["3", 0]
    return re.sub(r'\[\s*\n\s*("[^"]*"),\s*\n\s*(\d+)\s*\n\s*\]', r'[\1, \2]', text) + "\n"


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
