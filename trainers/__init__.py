"""The engine: model families, one training loop, the methods, exports and metrics. Plain Python; it never imports
ComfyUI, the CLI or the pack root (``tests/test_package.py`` walks the import graph to keep it so)."""

__version__ = "0.1.0"
