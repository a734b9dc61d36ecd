"""The server starts with the pack, and /object_info shows its nodes the way the pack declares them."""

from __future__ import annotations

import ast
import re

import pytest

from .harness import PACK_FOLDER, PACK_PYTHON_MODULE, REPO

pytestmark = pytest.mark.integration

EXPECTED = ["LoadSubjectImages", "TrainDreamBooth", "TrainEmbedding", "TrainLoRA", "ApplyLoRA", "DINOScore"]


def registered_in_source() -> list[str]:
    """The node classes nodes/__init__.py returns from get_node_list (read from its source)."""
    tree = ast.parse((REPO / "nodes" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "get_node_list":
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, (ast.List, ast.Tuple)):
                    return [e.id for e in ret.value.elts if isinstance(e, ast.Name)]
    raise AssertionError("nodes/__init__.py has no get_node_list returning a literal list")


def test_server_starts_with_the_pack_and_no_import_error(server):
    log = server.log_text().split("Starting server")[0]  # start-up only (later prompts may log tracebacks)
    assert "IMPORT FAILED" not in log, "\n".join(l for l in log.splitlines() if "IMPORT FAILED" in l)
    import_lines = [l for l in log.splitlines() if "seconds" in l and l.rstrip().endswith(PACK_FOLDER)]
    assert import_lines, f"the pack is not in the 'Import times for custom nodes' list:\n{server.log_tail()}"
    for marker in ("Traceback", "Cannot import", "Error while calling comfy_entrypoint",
                   "did not return a ComfyExtension", "did not return a list of nodes"):
        assert marker not in log, f"{marker!r} in the server log:\n{log[-6000:]}"


def test_the_trainers_write_into_the_test_folders(client, base_dir):
    """is_default in the yaml puts our folders first: folder_paths.get_folder_paths(kind)[0] is where the pack
    writes (nodes/bridge.py model_folder); without it, it would be ComfyUI's own models/<kind>."""
    paths = client.get("/personalize_it/folder_paths?kinds=checkpoints,loras,embeddings,dino")
    for kind, folder in [("checkpoints", base_dir.checkpoints), ("loras", base_dir.loras),
                         ("embeddings", base_dir.embeddings), ("dino", base_dir.dino)]:
        assert paths[kind] and paths[kind][0] == str(folder), f"{kind}: {paths[kind]}"


def test_object_info_lists_the_packs_nodes(client):
    info = client.object_info(refresh=True)
    ours = {name: entry for name, entry in info.items() if entry.get("python_module") == PACK_PYTHON_MODULE}
    in_source = registered_in_source()
    missing = [name for name in in_source if name not in ours]
    assert not missing, f"registered in nodes/__init__.py but not in /object_info: {missing}"
    for name in ("LoadSubjectImages", "TrainLoRA", "ApplyLoRA"):
        assert name in ours
    unexpected = sorted(set(ours) - set(EXPECTED))
    assert not unexpected, f"nodes this suite does not know yet (add tests): {unexpected}"
    print(f"\n[integration] pack nodes in /object_info: {sorted(ours)}; "
          f"not registered yet: {sorted(set(EXPECTED) - set(ours))}")

    for name, entry in ours.items():
        assert entry["category"].startswith("personalize/"), (name, entry["category"])
        assert "(Personalize)" in (entry.get("display_name") or ""), (name, entry.get("display_name"))
        spec = entry["input"]
        for section in ("required", "optional"):
            for input_name, declared in spec.get(section, {}).items():
                kind = declared[0]
                options = declared[1] if len(declared) > 1 else {}
                if kind not in ("INT", "FLOAT"):
                    continue
                where = f"{name}.{input_name}"
                assert "default" in options, f"{where} has no default"
                low, high, default = options.get("min"), options.get("max"), options["default"]
                assert low is not None and high is not None, f"{where}: min/max missing: {options}"
                assert low <= default <= high, f"{where}: default {default} outside [{low}, {high}]"
                if kind == "INT":
                    assert all(isinstance(v, int) for v in (low, high, default)), f"{where}: {options}"
    for name in ("TrainLoRA", "TrainDreamBooth", "TrainEmbedding"):
        if name in ours:
            assert re.fullmatch(r"personalize/\w+", ours[name]["category"])
