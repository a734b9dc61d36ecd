"""The pack as ComfyUI and pip see it: import style, layout, metadata, option limits."""

import ast
import dataclasses
import inspect
import subprocess
import sys
import textwrap
import tomllib

import pytest

from conftest import PACK_NAME, REPO, pack

COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server",
                 "execution", "latent_preview", "node_helpers"}


def pack_sources(*folders):
    for folder in folders:
        yield from sorted((REPO / folder).rglob("*.py")) if folder else [REPO / "__init__.py", REPO / "__main__.py"]


def imported_modules(tree, top_level_only=False):
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def test_the_pack_imports_under_comfyuis_module_name_without_comfyui():
    module = pack()
    assert module.__name__ == PACK_NAME and PACK_NAME.startswith("/")  # ComfyUI names packages by their path
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    assert (REPO / module.WEB_DIRECTORY).is_dir()
    assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "ComfyUI ignores comfy_entrypoint when this is defined"


@pytest.mark.parametrize("folder", ["", "trainers", "nodes", "cli"])
def test_no_absolute_import_of_the_packs_own_modules(folder):
    own = {"nodes", "trainers", "cli", "comfyui_personalize", "web", "tests"}
    for path in pack_sources(folder):
        found = own & set(imported_modules(ast.parse(path.read_text())))
        assert not found, f"{path.relative_to(REPO)} imports {found} absolutely; use relative imports"


def test_trainers_never_import_comfyui():
    for path in pack_sources("trainers"):
        found = COMFY_MODULES & set(imported_modules(ast.parse(path.read_text())))
        assert not found, f"{path.relative_to(REPO)} imports {found}"


def test_nodes_import_comfyui_runtime_modules_only_inside_functions():
    """Node classes subclass comfy_api's io.ComfyNode, so nodes/ modules import that API at module level (and are
    imported only through comfy_entrypoint); comfy.*, folder_paths and server only inside functions."""
    runtime = COMFY_MODULES - {"comfy_api"}
    for path in pack_sources("nodes"):
        found = runtime & set(imported_modules(ast.parse(path.read_text()), top_level_only=True))
        assert not found, f"{path.relative_to(REPO)} imports {found} at module level"


def test_the_pack_loads_from_a_folder_named_like_a_clone_next_to_comfyuis_own_nodes_module(tmp_path):
    """A fresh interpreter, a folder named as the registry installs it, a top-level `nodes` module of ComfyUI's: the
    loading steps of ComfyUI's load_custom_node."""
    clone = tmp_path / "custom_nodes" / "comfyui-personalize"
    clone.parent.mkdir()
    clone.symlink_to(REPO, target_is_directory=True)
    (tmp_path / "nodes.py").write_text("COMFYUI_OWN_NODES = True\n")
    script = textwrap.dedent(f"""
        import asyncio, importlib.util, inspect, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import nodes
        path = {str(clone)!r}
        name = path.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, path + "/__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        trainers = importlib.import_module(name + ".trainers.methods.lora")
        assert sys.modules["nodes"].COMFYUI_OWN_NODES
        assert inspect.iscoroutinefunction(module.comfy_entrypoint)
        print("loaded", trainers.__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "loaded" in done.stdout


def project():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_requirements_match_the_pyproject_dependencies_and_leave_torch_to_the_user():
    listed = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    dependencies = project()["project"]["dependencies"]
    assert listed == dependencies
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in dependencies}
    assert not names & {"torch", "torchvision", "torchaudio"}


def test_pyproject_has_the_comfy_registry_fields():
    comfy = project()["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy, key
    assert (REPO / "LICENSE").is_file() and (REPO / "README.md").is_file()


def config_types():
    modules = [pack(f"trainers.{name}") for name in ("config", "data", "methods.lora", "methods.dreambooth",
                                                     "methods.embedding")]
    return [obj for module in modules for obj in vars(module).values()
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) and pack("trainers.options").options_of(obj)]


@pytest.mark.parametrize("config_type", config_types(), ids=lambda t: t.__name__)
def test_option_defaults_lie_within_their_limits(config_type):
    options = pack("trainers.options")
    instance = config_type()
    options.validate(instance)  # raises on a default outside its own min/max/choices
    for field, spec in options.options_of(config_type):
        assert spec.help.strip(), f"{field.name} has no help text"
        if spec.min is not None and spec.max is not None:
            assert spec.min <= spec.max, field.name


# --- the import graph ----------------------------------------------------------------------------------------------

def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_imports(tree):
    """Import statements that run (everywhere, functions included), not those under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0 and id(n) not in skipped]


def import_graph() -> dict[str, set[str]]:
    """The pack's own modules ('' is the root package) and the pack modules each one imports, with the packages
    that importing a submodule runs as well."""
    paths = [REPO / "__init__.py", REPO / "__main__.py"] + [p for folder in ("cli", "nodes", "trainers")
                                                            for p in sorted((REPO / folder).rglob("*.py"))]
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            anchor = package.split(".") if package else []
            anchor = anchor[: len(anchor) - (node.level - 1)]
            target = ".".join(anchor + ([node.module] if node.module else []))
            imported = [f"{target}.{alias.name}".lstrip(".") for alias in node.names
                        if f"{target}.{alias.name}".lstrip(".") in modules] or [target]
            own_packages = {".".join(name.split(".")[:i]) for i in range(len(name.split(".")))}
            for module in imported:
                # Importing a.b.c runs the packages a and a.b too, unless they are the importer's own (already
                # loading: the root package is every module's, and a submodule imports its siblings through its
                # package), so only an explicit import of one of those counts.
                parts = module.split(".") if module else []
                edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in own_packages)
                edges.add(module)
        edges.discard(name)
        graph[name] = {e for e in edges if e in modules}
    return graph


def test_the_import_graph_has_no_circle_and_each_face_stays_on_its_side():
    graph = import_graph()
    assert {"trainers.loop", "trainers.families.sd15", "cli.train", "nodes.bridge"} <= set(graph)
    # Circles: a module that reaches itself again along its imports.
    for start in graph:
        seen, stack = set(), list(graph[start])
        while stack:
            module = stack.pop()
            assert module != start, f"import circle through {start!r}"
            if module not in seen:
                seen.add(module)
                stack.extend(graph[module])
    for module, imported in graph.items():
        if module.startswith("trainers"):
            bad = {m for m in imported if m == "" or m.startswith(("cli", "nodes"))}
            assert not bad, f"the engine module {module} imports {bad}"
        if module.startswith("nodes"):
            assert not {m for m in imported if m.startswith("cli")}, f"{module} imports the CLI"
        if module.startswith("cli"):
            assert not {m for m in imported if m.startswith("nodes")}, f"{module} imports the nodes"
