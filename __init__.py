"""ComfyUI-Personalize: teach a diffusion model a new subject from a few photos, inside a ComfyUI graph.

ComfyUI imports this folder as a package named after its path, and has a top-level ``nodes`` module of its own,
so everything inside the pack uses relative imports. Nothing from ComfyUI is imported here: the node classes load
only when ComfyUI asks for them through ``comfy_entrypoint``, so the pack also imports in plain Python.
"""

from .trainers import __version__  # noqa: F401 - the pack's version, kept in the engine

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()
