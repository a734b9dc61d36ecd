"""Integration tests against a real ComfyUI (``COMFYUI_DIR``); see conftest.py.

A package, so that this folder's conftest.py is imported as ``integration.conftest`` and does not replace the
top-level ``conftest`` module that the unit tests import (``from conftest import pack``).
"""
