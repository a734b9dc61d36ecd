"""The one error type for "the user gave us something wrong".

Anything raised as ``PersonalizeError`` carries a message meant for a person: it names the input and the fix.
The CLI prints it without a traceback; the nodes let ComfyUI show it on the node. Every other exception is a bug.
"""


class PersonalizeError(ValueError):
    pass


class TrainingCancelled(Exception):
    """Raised inside the training loop when the caller's ``should_stop`` says so; no artifact is written."""
