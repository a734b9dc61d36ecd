"""ComfyUI-Personalize: teach a diffusion model a new subject from a few photos, inside a ComfyUI graph.

ComfyUI imports this folder as a package named after its path, and has a top-level ``nodes`` module of its own,
so everything inside the pack uses relative imports. Nothing from ComfyUI is imported here: the node classes load
only when ComfyUI asks for them through ``comfy_entrypoint``, so the pack also imports in plain Python.
"""


def __getattr__(name: str):
    # The pack's version lives in the engine; read on demand, so that this file also imports as a plain module
    # (pytest collecting a checkout whose folder name has a dot, e.g. one made by mktemp).
    if name == "__version__":
        from .trainers import __version__

        return __version__
    raise AttributeError(name)


WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PersonalizeExtension

    return PersonalizeExtension()
