"""Stopping a run whose loss explodes. A non-finite loss stops the loop at once (loop.py); a finite one that climbs
far above where it started means the weights are being wrecked (too high a learning rate, clipping off), and an
artifact saved from it would be useless however long the run went on."""

from __future__ import annotations

from .errors import PersonalizeError

# The diffusion loss of one step swings with its random timestep (easily 10x between steps): only means of a window
# of steps are compared, and only once a run has two windows' worth of them.
WINDOW = 10
FACTOR = 10.0


def check_divergence(losses: list[float], lr: float) -> None:
    """Raise when the mean loss of the last ``WINDOW`` steps is above ``FACTOR`` times that of the first ones."""
    if len(losses) < 2 * WINDOW:
        return
    start = sum(losses[:WINDOW]) / WINDOW
    recent = sum(losses[-WINDOW:]) / WINDOW
    if recent > FACTOR * start:
        raise PersonalizeError(
            f"the loss diverged: over the last {WINDOW} steps (to step {len(losses)}) it averaged {recent:.4g}, more "
            f"than {FACTOR:g}x its start ({start:.4g}); training stopped and nothing was saved. Lower the learning "
            f"rate (lr is {lr:g}) or keep gradient clipping on (max_grad_norm); to train on and save such a run "
            "anyway, turn stop_on_divergence off (--no-stop-on-divergence).")
