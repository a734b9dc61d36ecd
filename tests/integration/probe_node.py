"""Test-only file the integration suite drops next to the pack in its temporary custom_nodes folder.

It registers no node; it only lets the tests read the running server's ``folder_paths`` (where the pack will write
its artifacts: ``folder_paths.get_folder_paths(kind)[0]``). It is never part of the pack.
"""

import folder_paths
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}  # present (and empty) so that ComfyUI counts this file as loaded, not as failed


@PromptServer.instance.routes.get("/personalize_it/folder_paths")
async def _folder_paths(request):
    kinds = [k for k in request.query.get("kinds", "checkpoints,loras,embeddings").split(",") if k]
    result = {}
    for kind in kinds:
        try:
            result[kind] = folder_paths.get_folder_paths(kind)
        except KeyError:
            result[kind] = None
    return web.json_response(result)
