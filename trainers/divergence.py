"""Stopping a run whose loss explodes. A non-finite loss stops the loop at once (loop.py); a finite one that climbs
far above where it started means the weights are being wrecked (too high a learning rate, clipping off), and an
artifact saved from it would be useless however long the run went on."""

from __future__ import annotations

import statistics

from .errors import PersonalizeError

# The diffusion loss of one step swings with its random timestep (easily 10x between steps): only medians of a window
# of steps are compared (a climb must hold for most of a window; one spike is not one), and only once a run has two
# windows' worth of them.
WINDOW = 10
FACTOR = 10.0


def check_divergence(losses: list[float], lr: float) -> None:
    """Raise when the median loss of the last ``WINDOW`` steps is above ``FACTOR`` times that of the first ones."""
    if len(losses) < 2 * WINDOW:
        return
    start = statistics.median(losses[:WINDOW])
    recent = statistics.median(losses[-WINDOW:])
    if recent > FACTOR * start:
        raise PersonalizeError(
            f"the loss diverged: over the last {WINDOW} steps (to step {len(losses)}) its median was {recent:.4g}, "
            f"more than {FACTOR:g}x its start ({start:.4g}); training stopped and nothing was saved. Lower the "
            f"learning rate (lr is {lr:g}) or keep gradient clipping on (max_grad_norm); to train on and save such "
            "a run anyway, turn stop_on_divergence off (--no-stop-on-divergence).")
