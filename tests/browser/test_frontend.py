"""The web extension (web/personalize.js) in a real ComfyUI page, in headless Chromium.

Runs only when COMFYUI_DIR points at a ComfyUI checkout (with its Python at $COMFYUI_DIR/.venv/bin/python or
$COMFYUI_PYTHON) and a Chromium is installed (/usr/bin/chromium from Debian's `chromium` package, or $CHROMIUM);
otherwise every test here is skipped with the reason.

What it does: starts ComfyUI on a free port with this repository symlinked into a temporary custom_nodes folder
(through an extra_model_paths yaml, the way ComfyUI-Manager installs are found), opens the page, checks that the
extension registered, loads a UI-format workflow with a TrainLoRA node, feeds the page `personalize.loss` messages
through the websocket message path (the same code path the server's messages take), and screenshots the trainer
node with its chart. Screenshots go to $PERSONALIZE_SCREENSHOT_DIR if set, else to pytest's tmp dir; their paths
are printed (pytest -s, or -rA).

PERSONALIZE_BROWSER_REAL_RUN=1 adds one real, tiny training (3 steps at 64 px on CPU) of a full-size SD1.x
checkpoint: $PERSONALIZE_TEST_CHECKPOINT, or the first *.safetensors in $COMFYUI_DIR/models/checkpoints. Make one
with `python -m comfyui_personalize make-tiny-model --size full`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cdp import Browser, ConsoleEntry, die_with_parent, find_chromium  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-personalize"
EXTENSION_NAME = "personalize.training"
TRAINERS = ("TrainLoRA", "TrainDreamBooth", "TrainEmbedding")
CHART_WIDGET = "personalize_loss_chart"
METRICS_WIDGET = "personalize_metrics"

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
CHROMIUM = find_chromium()


def _comfy_python() -> str | None:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    if COMFYUI_DIR and os.access(Path(COMFYUI_DIR) / ".venv/bin/python", os.X_OK):
        return str(Path(COMFYUI_DIR) / ".venv/bin/python")
    return None


def _skip_reason() -> str | None:
    if not COMFYUI_DIR:
        return "browser test: set COMFYUI_DIR to a ComfyUI checkout to run it"
    if not (Path(COMFYUI_DIR) / "main.py").is_file():
        return f"browser test: COMFYUI_DIR={COMFYUI_DIR} has no main.py"
    if not _comfy_python():
        return "browser test: no ComfyUI Python ($COMFYUI_DIR/.venv/bin/python or $COMFYUI_PYTHON)"
    if not CHROMIUM:
        return "browser test: no Chromium found (apt-get install chromium, or set CHROMIUM)"
    return None


pytestmark = [pytest.mark.integration, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


# --- console noise that is not the extension's (each with its reason) ---------------------------------------------

def _is_ours(entry: ConsoleEntry) -> bool:
    haystack = " ".join([entry.text, entry.url, *entry.stack]).lower()
    return "personalize" in haystack


def _known_comfyui_noise(entry: ConsoleEntry) -> str | None:
    """Why an error that isn't ours may be ignored, or None. Anything else fails the test."""
    text, url = entry.text, entry.url
    if entry.source == "log" and "net::ERR_" in text and not url.startswith("http://127.0.0.1"):
        # No network in the sandbox: the frontend checks api.comfy.org for releases and probes model download URLs.
        return "no network for an external URL"
    if entry.source == "log" and "status of 404" in text and (
            url.endswith("/user.css") or url.endswith("/api/userdata/comfy.templates.json")):
        # Optional per-user files, absent in the fresh user directory this test starts ComfyUI with.
        return "optional user file absent in a fresh user directory"
    if entry.source == "console" and text == "ComfyApp graph accessed before initialization" and entry.stack \
            and all("/assets/" in frame for frame in entry.stack):
        # The frontend's own Vue code reads app.rootGraph during start-up (every frame is in its bundle).
        return "frontend start-up (ComfyUI's own bundle)"
    return None


def _problems(entries: list[ConsoleEntry]) -> list[str]:
    problems = []
    for entry in entries:
        if _is_ours(entry) and entry.level in ("error", "warning", "assert"):
            problems.append(f"from the extension: {entry}")
        elif entry.source == "exception" or entry.level in ("error", "assert"):
            if _known_comfyui_noise(entry) is None:
                problems.append(f"{entry}\n      " + "\n      ".join(entry.stack[:6]))
    return problems


# --- ComfyUI server -----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoint() -> Path | None:
    explicit = os.environ.get("PERSONALIZE_TEST_CHECKPOINT")
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    folder = Path(COMFYUI_DIR or ".") / "models" / "checkpoints"
    found = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return found[0] if found else None


def _write_subject_photos(folder: Path, count: int = 3) -> None:
    """Tiny PNGs with the standard library only (solid colours are enough for a smoke run)."""
    import struct
    import zlib

    folder.mkdir(parents=True, exist_ok=True)
    size = 64
    for i in range(count):
        colour = bytes([60 + 60 * i, 120, 200 - 50 * i])
        raw = b"".join(b"\x00" + colour * size for _ in range(size))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
               + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
        (folder / f"photo_{i}.png").write_bytes(png)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui-browser")
    packs = root / "custom_nodes"
    packs.mkdir()
    (packs / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    # An empty placeholder checkpoint, so that the loader's widget holds a listed name (a missing model would be
    # flagged on the node) when no real checkpoint is configured; the synthetic tests never execute it.
    placeholder = root / "checkpoints" / "browser-test-placeholder.safetensors"
    placeholder.parent.mkdir()
    placeholder.touch()
    checkpoint = _checkpoint()
    folders = [placeholder.parent] + ([checkpoint.parent] if checkpoint else [])
    # is_default puts these folders first, so a trained file goes to the temporary loras folder (not the checkout's
    # models/loras, where a file from an earlier run would be reused instead of trained).
    (root / "loras").mkdir()
    yaml_lines = ["personalize_browser_test:", "    is_default: true", f"    custom_nodes: {packs}",
                  f"    loras: {root / 'loras'}", "    checkpoints: |", *(f"        {folder}" for folder in folders)]
    (root / "extra_model_paths.yaml").write_text("\n".join(yaml_lines) + "\n")
    for sub in ("output", "temp", "input", "user/default/workflows", "user/default/subgraphs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # A returning user: no first-run template browser over the canvas, no minimap over the screenshot.
    (root / "user/default/comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    _write_subject_photos(root / "input" / "subject")

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "comfyui.log"
    args = [_comfy_python(), "main.py", "--listen", "127.0.0.1", "--port", str(port),
            "--extra-model-paths-config", str(root / "extra_model_paths.yaml"),
            "--output-directory", str(root / "output"), "--temp-directory", str(root / "temp"),
            "--input-directory", str(root / "input"), "--user-directory", str(root / "user"),
            "--database-url", "sqlite:///:memory:"]
    if os.environ.get("COMFYUI_CPU", "1") != "0":
        args.append("--cpu")
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        deadline = started + float(os.environ.get("COMFYUI_START_TIMEOUT", "180"))
        while True:
            try:
                urllib.request.urlopen(url + "/object_info/TrainLoRA", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                pytest.fail(f"ComfyUI did not start (exit {process.poll()}); log tail:\n{tail}")
            time.sleep(0.25)
        log_text = log_path.read_text(errors="replace")
        assert "IMPORT FAILED" not in log_text, log_text[-4000:]
        print(f"\nComfyUI up on {url} after {time.monotonic() - started:.1f} s (log {log_path})")
        yield {"url": url, "root": root, "log": log_path, "checkpoint": checkpoint,
               "checkpoint_name": checkpoint.name if checkpoint else placeholder.name}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


# --- the page -----------------------------------------------------------------------------------------------------

APP = "window.comfyAPI.app.app"
API = "window.comfyAPI.api.api"


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    explicit = os.environ.get("PERSONALIZE_SCREENSHOT_DIR")
    folder = Path(explicit) if explicit else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(comfy, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    with Browser(CHROMIUM, profile, width=1600, height=1300) as browser:
        started = time.monotonic()
        browser.navigate(comfy["url"] + "/")
        browser.wait_for(f"!!(window.comfyAPI?.app?.app?.isGraphReady && {API}?.socket?.readyState === 1)", 120,
                         "the ComfyUI app and its websocket")
        browser.pump(1.5)  # let start-up settle (its console output is collected too)
        print(f"page ready after {time.monotonic() - started:.1f} s")
        yield browser
        print("\n--- browser console (all entries) ---")
        for entry in browser.console:
            print(f"  {entry}")


def _workflow(checkpoint_name: str, extra_nodes: list[dict] = ()) -> dict:
    """A small LiteGraph (version 0.4) workflow: checkpoint + subject photos -> TrainLoRA."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 80], "size": [320, 100], "flags": {}, "order": 0,
         "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [2]},
                     {"name": "VAE", "type": "VAE", "links": [3]}],
         "properties": {"Node name for S&R": "CheckpointLoaderSimple"}, "widgets_values": [checkpoint_name]},
        {"id": 2, "type": "LoadSubjectImages", "pos": [40, 260], "size": [320, 130], "flags": {}, "order": 1,
         "mode": 0, "inputs": [],
         "outputs": [{"name": "images", "type": "IMAGE", "links": [4]}, {"name": "count", "type": "INT", "links": []},
                     {"name": "captions", "type": "STRING", "links": [5]}],
         "properties": {"Node name for S&R": "LoadSubjectImages"}, "widgets_values": ["subject", 64, "crop"]},
        {"id": 3, "type": "TrainLoRA", "pos": [420, 80], "size": [380, 400], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 1}, {"name": "clip", "type": "CLIP", "link": 2},
                    {"name": "vae", "type": "VAE", "link": 3}, {"name": "images", "type": "IMAGE", "link": 4},
                    {"name": "captions", "type": "STRING", "link": 5}],
         "outputs": [], "properties": {"Node name for S&R": "TrainLoRA"}},
        *extra_nodes,
    ]
    links = [[1, 1, 0, 3, 0, "MODEL"], [2, 1, 1, 3, 1, "CLIP"], [3, 1, 2, 3, 2, "VAE"], [4, 2, 0, 3, 3, "IMAGE"],
             [5, 2, 2, 3, 4, "STRING"]]
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": 5, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _load(page: Browser, workflow: dict) -> None:
    page.evaluate(f"(async () => {{ await {APP}.loadGraphData({json.dumps(workflow)}); return true; }})()")
    page.pump(0.5)


def _ws_message(page: Browser, type_: str, data: dict) -> None:
    """Deliver a message as if the server had sent it: through the socket's message listener, so the frontend's
    own dispatch (including its 'Unknown message type' check) runs."""
    message = json.dumps({"type": type_, "data": data})
    page.evaluate(f"{API}.socket.dispatchEvent(new MessageEvent('message', {{data: {json.dumps(message)}}})), true")


def _node_info(page: Browser, node_id) -> dict:
    return page.evaluate(f"""(() => {{
        const node = {APP}.graph.getNodeById({json.dumps(node_id)});
        if (!node) return null;
        const widget = (node.widgets || []).find(w => w.name === {json.dumps(CHART_WIDGET)} ||
                                                      w.name === {json.dumps(METRICS_WIDGET)});
        const el = widget?.element;
        const rect = el?.getBoundingClientRect();
        const canvas = el?.querySelector('canvas');
        return {{
            type: node.comfyClass, size: [node.size[0], node.size[1]],
            inputs: (node.inputs || []).map(i => [i.name, i.link]),
            widget: widget ? {{name: widget.name, serialize: widget.serialize,
                               optionSerialize: widget.options?.serialize,
                               height: widget.computedHeight ?? null}} : null,
            element: rect ? {{x: rect.x, y: rect.y, width: rect.width, height: rect.height,
                              connected: el.isConnected,
                              visible: getComputedStyle(el).display !== 'none' && rect.width > 0 && rect.height > 0,
                              text: el.textContent}} : null,
            canvas: canvas ? {{width: canvas.width, height: canvas.height}} : null,
        }};
    }})()""")


def _frame_node(page: Browser, node_id, scale: float = 1.0) -> dict:
    """Zoom the canvas to `scale` with the node near the top left; return the node's box on the page (title incl.)."""
    return page.evaluate(f"""(async () => {{
        const app = {APP};
        const node = app.graph.getNodeById({json.dumps(node_id)});
        const ds = app.canvas.ds;
        const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
        ds.scale = {scale};
        ds.offset[0] = 120 / ds.scale - node.pos[0];
        ds.offset[1] = (110 + title) / ds.scale - node.pos[1];
        app.canvas.setDirty(true, true);
        app.canvas.draw?.(true, true);
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        await new Promise(r => setTimeout(r, 300));
        const box = app.canvas.canvas.getBoundingClientRect();
        return {{x: box.left + (node.pos[0] + ds.offset[0]) * ds.scale - 6,
                 y: box.top + (node.pos[1] + ds.offset[1]) * ds.scale - title * ds.scale - 6,
                 width: node.size[0] * ds.scale + 12, height: (node.size[1] + title) * ds.scale + 12}};
    }})()""")


def _chart_pixels(page: Browser, node_id) -> dict:
    """Count the chart canvas' pixels in the smoothed-line colour (#ff9f43) and in the raw-line blue."""
    return page.evaluate(f"""(() => {{
        const node = {APP}.graph.getNodeById({json.dumps(node_id)});
        const canvas = node.widgets.find(w => w.name === {json.dumps(CHART_WIDGET)}).element.querySelector('canvas');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let orange = 0, blue = 0;
        for (let i = 0; i < data.length; i += 4) {{
            const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
            if (r > 200 && g > 120 && g < 190 && b < 110) orange++;
            if (b > 110 && b > r + 40 && g > r) blue++;
        }}
        return {{orange, blue, width: canvas.width, height: canvas.height}};
    }})()""")


def _run_state(page: Browser, node_id: str):
    return page.evaluate(f"""(() => {{
        const run = window.personalizeExtension?.runs.get({json.dumps(node_id)});
        return run ? {{n: run.steps.length, last: run.lastStep, total: run.total, status: run.status,
                       stale: run.stale, report: run.report, smooth: run.smooth.at(-1), loss: run.losses.at(-1)}}
                   : null;
    }})()""")


def _synthetic_losses(total: int, upto: int) -> list[float]:
    values = []
    for step in range(1, upto + 1):
        noise = 0.06 * math.sin(step * 12.9898) * math.cos(step * 4.1414)
        values.append(0.11 + 0.22 * math.exp(-step / 60) + noise + (0.05 if step % 37 == 0 else 0.0))
    return values


# --- tests ----------------------------------------------------------------------------------------------------------

def test_extension_is_served_and_registered(comfy, page):
    listed = _get_json(comfy["url"] + "/extensions")
    assert f"/extensions/{PACK_FOLDER}/personalize.js" in listed
    names = page.evaluate(f"{APP}.extensions.map(e => e.name)")
    assert EXTENSION_NAME in names
    # The listeners are registered in setup(), so the frontend knows the message types.
    assert page.evaluate(f"['personalize.loss', 'personalize.metrics'].every(t => {API}._registered?.has(t) ?? true)")
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_trainer_workflow_loads_with_an_empty_chart(comfy, page):
    checkpoint = comfy["checkpoint_name"]
    _load(page, _workflow(checkpoint))
    info = _node_info(page, 3)
    assert info["type"] == "TrainLoRA"
    names = [name for name, _ in info["inputs"]]
    assert [link for _, link in info["inputs"][:5]] == [1, 2, 3, 4, 5], info["inputs"]
    assert names[:5] == ["model", "clip", "vae", "images", "captions"], names
    assert info["widget"] == {"name": CHART_WIDGET, "serialize": False, "optionSerialize": False,
                              "height": info["widget"]["height"]}
    assert info["element"]["connected"], "the chart's DOM element is not in the page"
    assert info["element"]["height"] >= 150, info
    assert info["size"][0] >= 340
    # The chart widget is neither in the saved workflow nor in the prompt.
    saved = page.evaluate(f"(() => {{ const n = {APP}.graph.serialize().nodes.find(n => n.id === 3);"
                          f" return n.widgets_values; }})()")
    widget_count = page.evaluate(f"{APP}.graph.getNodeById(3).widgets.length")
    assert len(saved) == widget_count - 1 and all(value is not None for value in saved), saved
    prompt = page.evaluate(f"(async () => (await {APP}.graphToPrompt()).output)()")
    assert CHART_WIDGET not in prompt["3"]["inputs"]
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_loss_events_draw_the_chart(page, screenshot_dir):
    node_id, total = "3", 500
    # An earlier run on the node, then a new prompt: the chart must start over at step 1.
    _ws_message(page, "execution_start", {"prompt_id": "old", "timestamp": 0})
    for step, loss in enumerate(_synthetic_losses(40, 40), start=1):
        _ws_message(page, "personalize.loss", {"node": node_id, "step": step, "total": 40, "loss": loss, "lr": 1e-4})
    assert _run_state(page, node_id)["n"] == 40
    _ws_message(page, "execution_start", {"prompt_id": "new", "timestamp": 1})
    assert _run_state(page, node_id)["stale"] is True
    losses = _synthetic_losses(total, 320)
    batch = [{"type": "personalize.loss", "data": {"node": node_id, "step": step, "total": total, "loss": loss,
                                                   "lr": 1e-4}} for step, loss in enumerate(losses, start=1)]
    page.evaluate(f"""(() => {{ for (const m of {json.dumps(batch)})
        {API}.socket.dispatchEvent(new MessageEvent('message', {{data: JSON.stringify(m)}})); return true; }})()""")
    # A non-finite loss (sent as null: JSON has no NaN) is counted, not drawn.
    _ws_message(page, "personalize.loss", {"node": node_id, "step": 321, "total": total, "loss": None, "lr": 1e-4})
    state = _run_state(page, node_id)
    assert state["n"] == 320 and state["last"] == 321 and state["total"] == total, state
    assert state["status"] == "running" and not state["stale"], state
    assert abs(state["loss"] - losses[-1]) < 1e-9
    assert min(losses) < state["smooth"] < max(losses)
    page.pump(0.5)
    pixels = _chart_pixels(page, 3)
    assert pixels["orange"] > 200 and pixels["blue"] > 200, pixels

    box = _frame_node(page, 3, scale=1.0)
    whole = page.screenshot(screenshot_dir / "page_trainer_chart.png")
    node_shot = page.screenshot(screenshot_dir / "trainer_node_chart.png", clip=box)
    chart_box = page.evaluate(f"""(() => {{ const n = {APP}.graph.getNodeById(3);
        const r = n.widgets.find(w => w.name === {json.dumps(CHART_WIDGET)}).element.getBoundingClientRect();
        return {{x: r.x - 8, y: r.y - 8, width: r.width + 16, height: r.height + 16}}; }})()""")
    chart_shot = page.screenshot(screenshot_dir / "trainer_chart_closeup.png", clip=chart_box)
    print(f"\nscreenshots: {node_shot}\n             {chart_shot}\n             {whole}")
    assert node_shot.stat().st_size > 10_000

    # The node finishes: its ui text shows under the chart and the status becomes "done".
    _ws_message(page, "executed", {"node": node_id, "display_node": node_id, "prompt_id": "new",
                                   "output": {"text": ["LoRA my_subject_lora.safetensors: 500 steps, "
                                                       "final loss 0.1234"]}})
    state = _run_state(page, node_id)
    assert state["status"] == "done" and state["report"].startswith("LoRA my_subject_lora"), state
    page.pump(0.3)
    assert "final loss 0.1234" in _node_info(page, 3)["element"]["text"]

    # A run that sends no loss events (reused file, cached node) but whose ui output carries the whole history
    # (the `personalize_loss` key the extension asks the Python side for): drawn from that.
    _ws_message(page, "execution_start", {"prompt_id": "cached", "timestamp": 2})
    history = _synthetic_losses(60, 60)
    _ws_message(page, "executed", {"node": node_id, "display_node": node_id, "prompt_id": "cached",
                                   "output": {"text": ["LoRA my_subject_lora.safetensors: reused"],
                                              "personalize_loss": history}})
    state = _run_state(page, node_id)
    assert state["n"] == 60 and state["status"] == "done" and state["report"].endswith("reused"), state
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_other_trainers_and_metrics_nodes(comfy, page, screenshot_dir):
    """Every trainer the server has gets a chart; DINOScore (the real one, or a stand-in while it isn't written)
    shows its metrics, from the `executed` text and from a `personalize.metrics` event."""
    object_info = _get_json(comfy["url"] + "/object_info")
    present = [name for name in TRAINERS if name in object_info]
    assert "TrainLoRA" in present
    extra = [{"id": 10 + i, "type": name, "pos": [900 + 420 * i, 80], "size": [380, 400], "flags": {}, "order": 3 + i,
              "mode": 0, "inputs": [], "outputs": [], "properties": {}} for i, name in enumerate(present)
             if name != "TrainLoRA"]
    if "DINOScore" not in object_info:
        # Not written yet: register a stand-in definition in the page, through the same path the frontend takes for
        # the server's definitions (so beforeRegisterNodeDef and nodeCreated run as for the real node).
        stand_in = {"name": "DINOScore", "display_name": "DINO Score (stand-in)", "category": "personalize/metrics",
                    "description": "", "python_module": object_info["TrainLoRA"]["python_module"],
                    "input": {"required": {}}, "input_order": {"required": []}, "output": ["FLOAT"],
                    "output_name": ["dino"], "output_is_list": [False], "output_node": True}
        page.evaluate(f"(async () => {{ await {APP}.registerNodeDef('DINOScore', {json.dumps(stand_in)});"
                      f" return true; }})()")
    extra.append({"id": 30, "type": "DINOScore", "pos": [40, 500], "size": [320, 200], "flags": {}, "order": 9,
                  "mode": 0, "inputs": [], "outputs": [], "properties": {}})
    checkpoint = comfy["checkpoint_name"]
    _load(page, _workflow(checkpoint, extra))
    for node in extra:
        info = _node_info(page, node["id"])
        expected = METRICS_WIDGET if node["type"] == "DINOScore" else CHART_WIDGET
        assert info["widget"] and info["widget"]["name"] == expected, (node["type"], info)
        if expected == CHART_WIDGET:
            for step in (1, 2, 3):
                _ws_message(page, "personalize.loss", {"node": str(node["id"]), "step": step, "total": 3,
                                                       "loss": 0.3 / step, "lr": 5e-6})
            assert _run_state(page, str(node["id"]))["n"] == 3
    _ws_message(page, "executed", {"node": "30", "display_node": "30", "prompt_id": "p",
                                   "output": {"text": ["DINO 0.612 over 12 pairs"]}})
    page.pump(0.2)
    assert "DINO 0.612" in _node_info(page, 30)["element"]["text"]
    _ws_message(page, "personalize.metrics", {"node": "30", "metrics": {"dino": 0.6543, "pairs": 12}})
    page.pump(0.2)
    text = _node_info(page, 30)["element"]["text"]
    assert "DINO 0.654" in text and "\npairs 12\n" in text and "DINO 0.612 over 12 pairs" in text, text
    box = _frame_node(page, 30)
    page.screenshot(screenshot_dir / "dino_metrics_node.png", clip=box)
    # A loss event for a node id that isn't in the graph is ignored quietly, and one that names a node of another
    # kind (an id from another workflow, or a broadcast) never puts a chart on it.
    _ws_message(page, "personalize.loss", {"node": "999", "step": 1, "total": 1, "loss": 0.1, "lr": 0})
    _ws_message(page, "personalize.loss", {"node": "1", "step": 1, "total": 1, "loss": 0.1, "lr": 0})
    assert _node_info(page, 1)["widget"] is None
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_example_workflows_load(page, comfy):
    folder = REPO / "example_workflows"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        pytest.skip("no example_workflows/*.json in the repository yet")
    object_info = _get_json(comfy["url"] + "/object_info")
    for path in files:
        workflow = json.loads(path.read_text())
        _load(page, workflow)
        for node in workflow.get("nodes", []):
            if node.get("type") in TRAINERS and node["type"] in object_info:
                info = _node_info(page, node["id"])
                assert info and info["widget"] and info["widget"]["name"] == CHART_WIDGET, (path.name, info)
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_chart_in_the_modern_node_design(comfy, page, screenshot_dir):
    """The same DOM widget with the frontend's Vue-rendered nodes ("Nodes 2.0", off by default in 1.49)."""
    setting = "Comfy.VueNodes.Enabled"
    get = f"{APP}.extensionManager.setting.get({json.dumps(setting)})"
    before = page.evaluate(get)
    page.evaluate(f"(async () => {{ await {APP}.extensionManager.setting.set({json.dumps(setting)}, true);"
                  f" return true; }})()")
    try:
        assert page.evaluate(get) is True
        checkpoint = comfy["checkpoint_name"]
        _load(page, _workflow(checkpoint))
        for step, loss in enumerate(_synthetic_losses(200, 150), start=1):
            _ws_message(page, "personalize.loss", {"node": "3", "step": step, "total": 200, "loss": loss, "lr": 2e-4})
        page.pump(1.0)
        info = _node_info(page, 3)
        assert info["element"]["connected"] and info["element"]["visible"], info
        assert info["element"]["height"] >= 100, info
        pixels = _chart_pixels(page, 3)
        assert pixels["orange"] > 100 and pixels["blue"] > 100, pixels
        box = page.evaluate(f"""(() => {{ const n = {APP}.graph.getNodeById(3);
            const r = n.widgets.find(w => w.name === {json.dumps(CHART_WIDGET)}).element.getBoundingClientRect();
            return {{x: r.x - 8, y: r.y - 8, width: r.width + 16, height: r.height + 16}}; }})()""")
        shot = page.screenshot(screenshot_dir / "trainer_chart_vue_nodes.png", clip=box)
        print(f"\nscreenshot (Nodes 2.0): {shot}")
    finally:
        page.evaluate(f"(async () => {{ await {APP}.extensionManager.setting.set({json.dumps(setting)},"
                      f" {json.dumps(bool(before))}); return true; }})()")
        page.pump(0.5)
    assert not _problems(page.console), "\n".join(_problems(page.console))


@pytest.mark.skipif(os.environ.get("PERSONALIZE_BROWSER_REAL_RUN") != "1",
                    reason="set PERSONALIZE_BROWSER_REAL_RUN=1 for a real 3-step training (about a minute on CPU)")
def test_real_training_run_draws_the_chart(comfy, page, screenshot_dir):
    if not comfy["checkpoint"]:
        pytest.skip("no checkpoint: set PERSONALIZE_TEST_CHECKPOINT (make-tiny-model --size full)")
    _load(page, _workflow(comfy["checkpoint"].name))
    settings = {"steps": 3, "resolution": 64, "class_prompt": "", "use_8bit_adam": False, "preview_every": 0,
                "overwrite": True, "name": "browser_test_lora", "seed": 1}
    page.evaluate(f"""(() => {{
        const node = {APP}.graph.getNodeById(3);
        for (const [name, value] of Object.entries({json.dumps(settings)})) {{
            const w = node.widgets.find(w => w.name === name); if (w) w.value = value;
        }}
        const seedControl = node.widgets.find(w => w.name === 'control_after_generate'); if (seedControl) seedControl.value = 'fixed';
        return true; }})()""")
    page.evaluate(f"""(() => {{ window.__personalizeTestErrors = [];
        {API}.addEventListener('execution_error', e => window.__personalizeTestErrors.push(e.detail));
        return true; }})()""")
    page.evaluate(f"(async () => {{ await {APP}.queuePrompt(0, 1); return true; }})()")
    started = time.monotonic()
    page.wait_for("""(() => window.__personalizeTestErrors.length > 0 ||
        !!window.personalizeExtension.runs.get('3')?.report)()""", 600, "the training node's executed message")
    errors = page.evaluate("window.__personalizeTestErrors")
    assert not errors, errors
    state = _run_state(page, "3")
    print(f"\nreal run finished in {time.monotonic() - started:.1f} s: {state}")
    assert "browser_test_lora" in state["report"] and "reused" not in state["report"], state
    assert state["n"] == 3 and state["last"] == 3 and state["status"] == "done", state
    page.pump(0.5)
    box = _frame_node(page, 3)
    shot = page.screenshot(screenshot_dir / "trainer_node_chart_real_run.png", clip=box)
    print(f"screenshot: {shot}")
    assert not _problems(page.console), "\n".join(_problems(page.console))


def test_no_console_errors(page):
    """Last: nothing from the extension at warning level or above, and no unexplained error at all."""
    problems = _problems(page.console)
    assert not problems, "console problems:\n" + "\n".join(problems)
