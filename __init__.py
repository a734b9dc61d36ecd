"""ComfyUI-Personalize: teach a diffusion model a new subject from a few photos, inside a ComfyUI graph.

ComfyUI imports this folder as a package named after its path, and has a top-level ``nodes`` module of its own,
so everything inside the pack uses relative imports. Nothing from ComfyUI is imported here: the node classes load
only when ComfyUI asks for them through ``comfy_entrypoint``, so the pack also imports in plain Python.
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()
