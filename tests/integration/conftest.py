"""Integration suite: the pack inside a real ComfyUI server, driven over HTTP and the websocket.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout) whose Python (``COMFYUI_PYTHON``, default ``$COMFYUI_DIR/.venv/bin/python``
if it exists, else this interpreter) has the pack's requirements installed; without it every test here skips.

One server per session, started on a free port with every folder (custom_nodes, models, input, output, temp, user)
under a temporary base dir and an in-memory database; it is always stopped (SIGTERM, then SIGKILL, to its process
group). The full-size random SD1.5 checkpoint is cached in ``$PERSONALIZE_TEST_CACHE``
(default ~/.cache/comfyui-personalize-tests).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from .harness import (BaseDir, ComfyClient, ComfyServer, ComfySetup, TIMINGS, comfyui_setup, full_checkpoint, record,
                      unit_conftest)

SETUP = comfyui_setup()
_SESSION_START = time.perf_counter()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.integration)
            if not isinstance(SETUP, ComfySetup):
                item.add_marker(pytest.mark.skip(reason=SETUP))


def pytest_terminal_summary(terminalreporter):
    if not TIMINGS:
        return
    terminalreporter.section("ComfyUI integration timings")
    for label, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:8.1f} s  {label}")
    terminalreporter.write_line(f"{time.perf_counter() - _SESSION_START:8.1f} s  total (pytest session)")


@pytest.fixture(scope="session")
def comfy_setup() -> ComfySetup:
    if not isinstance(SETUP, ComfySetup):
        pytest.skip(SETUP)
    return SETUP


@pytest.fixture(scope="session")
def base_dir(comfy_setup, tmp_path_factory) -> BaseDir:
    checkpoint, seconds = full_checkpoint()
    record(f"full-size test checkpoint ({'made' if seconds else 'cached'}: {checkpoint})", seconds)
    base = BaseDir(tmp_path_factory.mktemp("comfyui-it"))
    base.create(checkpoint, unit_conftest().make_subject_images(count=4, size=64))
    return base


@pytest.fixture(scope="session")
def server(comfy_setup, base_dir):
    server = ComfyServer(comfy_setup, base_dir)
    try:
        record("server start", server.start())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def client(server) -> ComfyClient:
    return ComfyClient(server)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names written by one test."""
    return uuid.uuid4().hex[:8]
