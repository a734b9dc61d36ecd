"""Personalization quality benchmark on a toy world the project generates itself (see ``bench/quality/README.md``).

Kept import-free: the test suite imports ``world`` and ``toymodel`` from here without the benchmark's heavier parts.
"""
