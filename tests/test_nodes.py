"""Node schemas, checked without ComfyUI through a stand-in of its node API (tests/fake_comfy); the integration
suite checks the same schemas in a real ComfyUI through /object_info."""

import asyncio
import sys
import types
from pathlib import Path

import pytest

from conftest import pack

EXPECTED_NODES = {"LoadSubjectImages", "TrainDreamBooth", "TrainEmbedding", "TrainLoRA", "ApplyLoRA", "DINOScore"}


@pytest.fixture(scope="module")
def node_classes():
    try:
        import comfy_api.latest  # noqa: F401  (a real ComfyUI on the path)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent / "fake_comfy"))
    sys.modules.setdefault("folder_paths", types.SimpleNamespace(
        get_input_subfolders=lambda: ["subject"], get_filename_list=lambda kind: [],
        get_folder_paths=lambda kind: [], models_dir="/nonexistent", folder_names_and_paths={},
        supported_pt_extensions=set()))
    extension = asyncio.run(pack().comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


def test_the_extension_registers_the_six_nodes(node_classes):
    assert {cls.GET_SCHEMA().node_id for cls in node_classes} == EXPECTED_NODES


def test_schemas_are_recognisable_and_their_widgets_consistent(node_classes):
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("personalize/"), schema.node_id
        assert "(Personalize)" in schema.display_name, schema.node_id
        assert schema.description, schema.node_id
        ids = [i.id for i in schema.inputs]
        assert len(ids) == len(set(ids)), f"{schema.node_id}: duplicate inputs"
        for widget in schema.inputs:
            where = f"{schema.node_id}.{widget.id}"
            if widget.io_type in ("INT", "FLOAT"):
                assert widget.min <= widget.default <= widget.max, where
                assert widget.step and widget.step > 0, where
                if widget.io_type == "INT":
                    assert all(isinstance(v, int) for v in (widget.default, widget.min, widget.max)), where
            if widget.io_type == "COMBO" and widget.default is not None:
                assert widget.default in widget.options, where
        assert schema.outputs, schema.node_id


def test_trainer_nodes_expose_every_option_of_their_config(node_classes):
    options = pack("trainers.options")
    configs = {"TrainLoRA": ("lora", "LoRAConfig"), "TrainDreamBooth": ("dreambooth", "DreamBoothConfig"),
               "TrainEmbedding": ("embedding", "EmbeddingConfig")}
    by_id = {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in node_classes}
    for node_id, (module, name) in configs.items():
        config = getattr(pack(f"trainers.methods.{module}"), name)
        inputs = {i.id for i in by_id[node_id].inputs}
        expected = {f.name for f, spec in options.options_of(config) if spec.node}
        assert expected <= inputs, f"{node_id} lacks {sorted(expected - inputs)}"


def test_node_inputs_build_a_validated_config(node_classes):
    schema = pack("nodes.schema")
    errors = pack("trainers.errors")
    LoRAConfig = pack("trainers.methods.lora").LoRAConfig
    config = schema.config_from_inputs(LoRAConfig, {"rank": 16, "steps": 10, "model": object()})
    assert config.rank == 16 and config.steps == 10 and config.lr == LoRAConfig().lr
    with pytest.raises(errors.PersonalizeError, match="rank must be at least 1"):
        schema.config_from_inputs(LoRAConfig, {"rank": 0})


def test_trainer_seeds_stay_fixed_between_queues(node_classes):
    """A seed the frontend randomised after each queue would retrain on every run."""
    for cls in node_classes:
        for widget in cls.GET_SCHEMA().inputs:
            if widget.id == "seed":
                assert widget.extra.get("control_after_generate") == "fixed", cls.GET_SCHEMA().node_id
