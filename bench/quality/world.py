"""The toy world lives in the pack (``trainers/testing/toyworld.py``), so that the installed demo draws from it too;
this name stays for the benchmark's imports and is that same module, not a copy."""

import sys

from .pack import trainer

sys.modules[__name__] = trainer("testing.toyworld")
