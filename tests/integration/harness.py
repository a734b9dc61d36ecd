"""The integration suite's machinery: find ComfyUI, build the base folder, run a server, talk to it.

Standard library only (the pack's venv has no aiohttp or websocket-client): HTTP with urllib, and ComfyUI's ``/ws``
event stream through tests/wsclient.py's small RFC 6455 client.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from wsclient import TEXT, WebSocket

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-personalize"
PACK_PYTHON_MODULE = f"custom_nodes.{PACK_FOLDER}"
CHECKPOINT = "personalize_full.safetensors"
SETUP_HINT = "set COMFYUI_DIR to a ComfyUI checkout whose Python has the pack's requirements installed"
START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", "180"))

# --------------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ComfySetup:
    comfy_dir: Path
    python: str


def comfyui_setup() -> ComfySetup | str:
    """The ComfyUI checkout and its interpreter from the environment, or why the suite cannot run (a skip reason)."""
    raw = os.environ.get("COMFYUI_DIR", "").strip()
    if not raw:
        return f"COMFYUI_DIR is not set: {SETUP_HINT}"
    comfy_dir = Path(raw).expanduser().resolve()
    missing = [name for name in ("main.py", "folder_paths.py", "comfy", "comfy_api") if not (comfy_dir / name).exists()]
    if missing:
        return f"COMFYUI_DIR={raw} is not a ComfyUI checkout (no {', '.join(missing)}): {SETUP_HINT}"
    python = os.environ.get("COMFYUI_PYTHON", "").strip()
    if python:
        if not os.access(python, os.X_OK):
            return f"COMFYUI_PYTHON={python} is not an executable: {SETUP_HINT} (COMFYUI_PYTHON optional)"
    else:
        venv_python = comfy_dir / ".venv" / "bin" / "python"
        python = str(venv_python) if venv_python.exists() else sys.executable
    return ComfySetup(comfy_dir, python)


def unit_conftest():
    """tests/conftest.py (``pack``, ``make_subject_images``), whichever conftest last took the name ``conftest``."""
    import importlib.util

    path = REPO / "tests" / "conftest.py"
    module = sys.modules.get("conftest")
    if module is not None and Path(getattr(module, "__file__", "")).resolve() == path:
        return module
    module = sys.modules.get("_personalize_unit_conftest")
    if module is None:
        spec = importlib.util.spec_from_file_location("_personalize_unit_conftest", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------- timings

TIMINGS: list[tuple[str, float]] = []


def record(label: str, seconds: float) -> None:
    TIMINGS.append((label, seconds))
    print(f"\n[integration] {label}: {seconds:.1f} s", flush=True)


def record_run(label: str, result) -> None:
    """A graph's wall time (queue → history entry), and its per-node split from the websocket."""
    record(label, result.seconds)
    breakdown = result.breakdown()
    if breakdown:
        print(f"[integration]   per node: {breakdown}", flush=True)


# --------------------------------------------------------------------------------------------------- test model


def cache_dir() -> Path:
    return Path(os.environ.get("PERSONALIZE_TEST_CACHE", "~/.cache/comfyui-personalize-tests")).expanduser()


_MAKE_FULL_MODEL = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("personalize_it_pack", sys.argv[1])
pack = importlib.util.module_from_spec(spec)
sys.modules["personalize_it_pack"] = pack
spec.loader.exec_module(pack)
from personalize_it_pack import cli
sys.exit(cli.main(["make-tiny-model", "--out", sys.argv[2], "--size", "full", "--seed", "0", "--arch", sys.argv[3]]))
"""


def full_checkpoint(arch: str = "sd15") -> tuple[Path, float]:
    """The full-size random checkpoint of ``arch`` (SD1.5 by default) from the pack's ``make-tiny-model --size
    full``, cached across sessions under ``$PERSONALIZE_TEST_CACHE`` keyed by the content of trainers/testing/tiny.py.
    Returns (path, seconds spent making it; 0 when cached)."""
    key = hashlib.sha256((REPO / "trainers" / "testing" / "tiny.py").read_bytes()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{arch}-full-seed0-{key}.safetensors"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions at once: one makes it, the other waits and reuses it
        if target.is_file():
            return target, 0.0
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=folder, prefix=".make-") as tmp:
            proc = subprocess.run([sys.executable, "-c", _MAKE_FULL_MODEL, str(REPO / "__init__.py"), tmp, arch],
                                  capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"make-tiny-model --size full failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            os.replace(Path(tmp) / "model.safetensors", target)  # the diffusers/ copy is not needed
        return target, time.perf_counter() - started


# --------------------------------------------------------------------------------------------------- base folder


@dataclass
class BaseDir:
    """Everything the server reads and writes, under one temporary folder."""
    root: Path

    @property
    def custom_nodes(self) -> Path: return self.root / "custom_nodes"
    @property
    def models(self) -> Path: return self.root / "models"
    @property
    def checkpoints(self) -> Path: return self.models / "checkpoints"
    @property
    def loras(self) -> Path: return self.models / "loras"
    @property
    def embeddings(self) -> Path: return self.models / "embeddings"
    @property
    def dino(self) -> Path: return self.models / "dino"
    @property
    def input(self) -> Path: return self.root / "input"
    @property
    def output(self) -> Path: return self.root / "output"
    @property
    def temp(self) -> Path: return self.root / "temp"
    @property
    def user(self) -> Path: return self.root / "user"
    @property
    def logs(self) -> Path: return self.root / "logs"
    @property
    def yaml(self) -> Path: return self.root / "extra_model_paths.yaml"

    def create(self, checkpoint: Path, subject_images) -> None:
        for folder in (self.custom_nodes, self.checkpoints, self.loras, self.embeddings, self.dino, self.input,
                       self.output, self.temp, self.user, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        (self.custom_nodes / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
        (self.custom_nodes / "personalize_it_probe.py").symlink_to(Path(__file__).with_name("probe_node.py"))
        (self.checkpoints / CHECKPOINT).symlink_to(checkpoint)
        # is_default: these folders come first in their kinds, so the trainers write here and not into the
        # checkpoint's own models/ folder.
        self.yaml.write_text(
            "personalize_integration:\n"
            f"    base_path: {self.root}\n"
            "    is_default: true\n"
            "    custom_nodes: custom_nodes\n"
            "    checkpoints: models/checkpoints\n"
            "    loras: models/loras\n"
            "    embeddings: models/embeddings\n"
            "    dino: models/dino\n")
        subject = self.input / "subject"
        subject.mkdir()
        from PIL import Image
        import numpy as np
        for i, image in enumerate(subject_images):
            array = (image.numpy() * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(array).save(subject / f"photo_{i}.png")

    def files(self, folder: Path) -> set[str]:
        """Every file under ``folder`` (relative paths, hidden ones included)."""
        return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


# --------------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNNING: set[int] = set()


@atexit.register
def _kill_leftovers() -> None:  # Ctrl-C or a crash of pytest itself: never leave a server behind
    for pid in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


class ComfyServer:
    """``python main.py --cpu`` in its own process group, with every folder under the base dir."""

    def __init__(self, setup: ComfySetup, base: BaseDir):
        self.setup, self.base = setup, base
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_paths: list[Path] = []
        self.start_seconds: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_paths[-1]

    def log_text(self) -> str:
        """The current server's log (each start writes a new file)."""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def start(self, timeout: float = START_TIMEOUT) -> float:
        assert self.proc is None, "already running"
        self.port = free_port()
        log_path = self.base.logs / f"comfyui-{len(self.log_paths) + 1}-port{self.port}.log"
        self.log_paths.append(log_path)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PYTHONUNBUFFERED"] = "1"
        command = [self.setup.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--extra-model-paths-config", str(self.base.yaml),
                   "--output-directory", str(self.base.output), "--temp-directory", str(self.base.temp),
                   "--input-directory", str(self.base.input), "--user-directory", str(self.base.user),
                   "--database-url", "sqlite:///:memory:"]
        started = time.perf_counter()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=self.setup.comfy_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _RUNNING.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._forget()
                raise RuntimeError(f"ComfyUI exited with {code} before answering on port {self.port}; "
                                   f"log {log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ComfyUI did not answer GET /object_info within {timeout:.0f} s; "
                                   f"log {log_path}:\n{tail}")
            time.sleep(0.25)
        seconds = time.perf_counter() - started
        self.start_seconds.append(seconds)
        return seconds

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL if it has not exited after ``grace`` seconds."""
        if self.proc is None:
            return
        pid = self.proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # Children that outlived the main process (none expected): the group gets SIGKILL too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self._forget()

    def _forget(self) -> None:
        if self.proc is not None:
            _RUNNING.discard(self.proc.pid)
        self.proc = None

    def restart(self) -> float:
        self.stop()
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --------------------------------------------------------------------------------------------------- websocket

class WSListener:
    """ComfyUI's ``/ws?clientId=…`` event stream (tests/wsclient.py's client): collects JSON events in a background
    thread."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 15.0):
        self.client_id = client_id
        self.events: list[dict] = []
        self.binary: list[tuple[int, int, float]] = []  # (ComfyUI binary type, size, time) of previews etc.
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.ws = WebSocket(f"ws://{host}:{port}/ws?clientId={urllib.parse.quote(client_id)}", timeout=timeout)
        self.ws.sock.settimeout(None)
        self._thread = threading.Thread(target=self._read_loop, name=f"ws-{client_id}", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        try:
            while (message := self.ws.recv_message()) is not None:  # None: the server closed
                self._deliver(*message)
        except (OSError, ValueError) as error:
            if not self._closed:
                self.error = error
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _deliver(self, opcode: int, data: bytes) -> None:
        now = time.monotonic()
        with self._cond:
            if opcode == TEXT:
                event = json.loads(data.decode("utf-8"))
                event["_t"] = now
                self.events.append(event)
            else:
                kind = struct.unpack("!I", data[:4])[0] if len(data) >= 4 else -1
                self.binary.append((kind, len(data), now))
            self._cond.notify_all()

    # -- queries
    def of_type(self, event_type: str, prompt_id: str | None = None) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("type") == event_type
                    and (prompt_id is None or (e.get("data") or {}).get("prompt_id") in (prompt_id, None))]

    def wait_for(self, predicate, timeout: float, what: str = "event") -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    types = [e.get("type") for e in self.events][-30:]
                    raise TimeoutError(f"no {what} within {timeout:.0f} s (websocket "
                                       f"{'closed: ' + repr(self.error) if self._closed else 'open'}); last event "
                                       f"types: {types}")
                self._cond.wait(min(remaining, 1.0))

    def wait_prompt_end(self, prompt_id: str, timeout: float) -> dict:
        """ComfyUI's end-of-prompt marker: ``executing`` with ``node: null`` (sent after success, error and
        interrupt alike)."""
        return self.wait_for(lambda e: e.get("type") == "executing" and e["data"].get("node") is None
                             and e["data"].get("prompt_id") == prompt_id, timeout, "end of prompt")

    def close(self) -> None:
        self._closed = True
        self.ws.close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------- HTTP client


class PromptRejected(AssertionError):
    pass


@dataclass
class RunResult:
    prompt_id: str
    prompt: dict
    history: dict
    events: list[dict]
    seconds: float
    log: str  # the server log written while the prompt ran
    binary: list = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.history["status"]["status_str"]

    def messages(self, kind: str) -> list[dict]:
        return [data for name, data in self.history["status"].get("messages", []) if name == kind]

    def events_of(self, kind: str) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == kind]

    def node_seconds(self) -> dict[str, float]:
        """Seconds per executed node, from the websocket ``executing`` events' arrival times."""
        marks = [(e["data"].get("node"), e["_t"]) for e in self.events if e.get("type") == "executing"]
        return {node: round(t_next - t, 1) for (node, t), (_, t_next) in zip(marks, marks[1:]) if node is not None}

    def breakdown(self) -> str:
        types = {k: v["class_type"] for k, v in self.prompt.items()}
        return ", ".join(f"{types.get(n, n)} {s:.1f}s" for n, s in self.node_seconds().items())

    def error_text(self) -> str:
        parts = []
        for data in self.messages("execution_error"):
            parts.append(f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                         f"{data.get('exception_message')}\n" + "".join(data.get("traceback", [])))
        return "\n".join(parts) or json.dumps(self.history.get("status"), indent=1)[:3000]


class ComfyClient:
    def __init__(self, server: ComfyServer):
        self.server = server
        self._object_info: dict | None = None
        self._object_info_port: int | None = None

    @property
    def url(self) -> str:
        return self.server.url  # follows a restart onto a new port

    def request(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 60.0):
        status, body = self.request("GET", path, timeout=timeout)
        assert status == 200, f"GET {path}: HTTP {status}: {body}"
        return body

    def object_info(self, refresh: bool = False) -> dict:
        if refresh or self._object_info is None or self._object_info_port != self.server.port:
            self._object_info = self.get("/object_info")
            self._object_info_port = self.server.port
        return self._object_info

    def fill_defaults(self, prompt: dict) -> dict:
        """API-format prompts need every required input: add the missing ones from /object_info defaults."""
        info = self.object_info()
        prompt = copy.deepcopy(prompt)
        for node in prompt.values():
            spec = info[node["class_type"]]["input"]
            for name, entry in spec.get("required", {}).items():
                options = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if name not in node["inputs"] and "default" in options:
                    node["inputs"][name] = options["default"]
        return prompt

    def queue(self, prompt: dict, client_id: str) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": self.fill_defaults(prompt), "client_id": client_id})
        if status != 200:
            raise PromptRejected(f"POST /prompt: HTTP {status}: {json.dumps(body, indent=1)[:4000]}")
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry:
                return entry
            if not self.server.alive():
                raise AssertionError(f"ComfyUI died while running {prompt_id}:\n{self.server.log_tail()}")
            if time.monotonic() > deadline:
                queue = self.get("/queue")
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f} s; /queue: "
                                   f"{len(queue.get('queue_running', []))} running, "
                                   f"{len(queue.get('queue_pending', []))} pending; log tail:\n"
                                   f"{self.server.log_tail(30)}")
            time.sleep(0.5)

    def interrupt(self, prompt_id: str | None = None) -> None:
        status, body = self.request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        assert status == 200, f"POST /interrupt: HTTP {status}: {body}"

    def listen(self, client_id: str) -> WSListener:
        return WSListener("127.0.0.1", self.server.port, client_id)

    def run(self, prompt: dict, timeout: float = 900.0, client_id: str | None = None) -> RunResult:
        """Queue ``prompt`` with a websocket listening, wait for its history entry and its end-of-prompt event."""
        client_id = client_id or f"it-{os.urandom(6).hex()}"
        full = self.fill_defaults(prompt)
        log_start = self.server.log_path.stat().st_size
        with self.listen(client_id) as ws:
            started = time.perf_counter()
            prompt_id = self.queue(full, client_id)
            history = self.wait(prompt_id, timeout)
            seconds = time.perf_counter() - started
            with contextlib.suppress(TimeoutError):
                ws.wait_prompt_end(prompt_id, 30)
            events = [e for e in list(ws.events) if (e.get("data") or {}).get("prompt_id") in (prompt_id, None)]
            binary = list(ws.binary)
        with open(self.server.log_path, "rb") as f:
            f.seek(log_start)
            log = f.read().decode(errors="replace")
        return RunResult(prompt_id, full, history, events, seconds, log, binary)


# --------------------------------------------------------------------------------------------------- graphs


def lora_graph(name: str, prefix: str, steps: int = 3) -> dict:
    """CheckpointLoaderSimple + LoadSubjectImages → TrainLoRA → ApplyLoRA (same MODEL/CLIP) → CLIPTextEncode →
    KSampler → VAEDecode → SaveImage. Node "3" is the trainer."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "LoadSubjectImages", "inputs": {"folder": "subject", "resolution": 64, "fit": "crop"}},
        "3": {"class_type": "TrainLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "captions": ["2", 2],
            "name": name, "overwrite": False, "steps": steps, "resolution": 64, "rank": 4, "alpha": 4.0,
            "prompt": "a photo of sks toy", "train_text_encoder": True}},
        "4": {"class_type": "ApplyLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora": ["3", 0], "lora_name": "(use the lora input)",
            "strength_model": 1.0, "strength_clip": 1.0}},
        **sampling_nodes(model=["4", 0], clip=["4", 1], vae=["1", 2], text="a photo of sks toy", prefix=prefix,
                         first_id=5),
    }


def sampling_nodes(model, clip, vae, text: str, prefix: str, first_id: int, steps: int = 2) -> dict:
    """Positive/negative CLIPTextEncode, a 64×64 EmptyLatentImage, KSampler, VAEDecode, SaveImage."""
    i = first_id
    return {
        str(i): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}},
        str(i + 1): {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        str(i + 2): {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        str(i + 3): {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [str(i), 0], "negative": [str(i + 1), 0], "latent_image": [str(i + 2), 0],
            "seed": 1, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        str(i + 4): {"class_type": "VAEDecode", "inputs": {"samples": [str(i + 3), 0], "vae": vae}},
        str(i + 5): {"class_type": "SaveImage", "inputs": {"images": [str(i + 4), 0], "filename_prefix": prefix}},
    }


def saved_images(result: RunResult, output_dir: Path) -> list[Path]:
    paths = []
    for output in result.history.get("outputs", {}).values():
        for image in output.get("images", []):
            if image.get("type") == "output":
                paths.append(output_dir / image.get("subfolder", "") / image["filename"])
    return paths


def node_inputs(info: dict, class_type: str) -> dict[str, list]:
    """name → /object_info entry, required and optional together."""
    spec = info[class_type]["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def adaptive_node(info: dict, class_type: str, links_by_type: dict[str, list], values: dict) -> dict:
    """A node for a schema this suite did not write: ``values`` for the inputs that exist, links by socket type
    for the required ones (e.g. MODEL → the loader's MODEL)."""
    inputs = {}
    required = info[class_type]["input"].get("required", {})
    for name, entry in node_inputs(info, class_type).items():
        kind = entry[0]
        if name in values:
            inputs[name] = values[name]
        elif name in required and isinstance(kind, str) and kind in links_by_type:
            inputs[name] = links_by_type[kind]
    return {"class_type": class_type, "inputs": inputs}


def output_index(info: dict, class_type: str, io_type: str) -> int | None:
    outputs = info[class_type].get("output", [])
    return outputs.index(io_type) if io_type in outputs else None
