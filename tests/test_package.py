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
        yield from sorted((REPO / folder).glob("*.py")) if folder else [REPO / "__init__.py", REPO / "__main__.py"]


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


@pytest.mark.parametrize("folder", ["", "trainers", "nodes"])
def test_no_absolute_import_of_the_packs_own_modules(folder):
    own = {"nodes", "trainers", "comfyui_personalize", "web", "tests"}
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
    """A fresh interpreter, a folder called ComfyUI-Personalize, a top-level `nodes` module of ComfyUI's: the
    loading steps of ComfyUI's load_custom_node."""
    clone = tmp_path / "custom_nodes" / "ComfyUI-Personalize"
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
        trainers = importlib.import_module(name + ".trainers.lora")
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
    modules = [pack(f"trainers.{name}") for name in ("config", "data", "lora", "dreambooth", "embedding")
               if (REPO / "trainers" / f"{name}.py").exists()]
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
