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


def test_trainer_nodes_show_only_the_options_a_user_changes(node_classes):
    """Everything else is behind ComfyUI's advanced-inputs toggle (the input's ``advanced`` flag)."""
    sockets = {"model", "clip", "vae", "images", "captions", "masks"}
    expected = {"TrainLoRA": {"name", "prompt", "steps", "lr", "rank", "resolution", "class_prompt"},
                "TrainDreamBooth": {"name", "prompt", "steps", "lr", "resolution", "class_prompt"},
                "TrainEmbedding": {"name", "steps", "lr", "resolution", "init_word"}}
    by_id = {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in node_classes}
    for node_id, shown in expected.items():
        schema = by_id[node_id]
        visible = {i.id for i in schema.inputs if not i.advanced and not i.optional} - sockets
        assert visible == shown, node_id
        assert schema.is_input_list, f"{node_id} takes LoadSubjectImages' photos list whole"
        assert any(i.id == "masks" and i.io_type == "MASK" and i.optional for i in schema.inputs), node_id


def test_list_inputs_become_single_values_and_lists_of_single_images(node_classes):
    import torch

    trainer_node = pack("nodes.trainer_node")
    model = object()
    inputs = {"model": [model], "name": ["x"], "steps": [5],
              "images": [torch.zeros(2, 8, 8, 3), torch.zeros(1, 16, 8, 3)],
              "masks": [torch.ones(2, 8, 8), torch.ones(16, 8)]}
    images, masks, values = trainer_node.single_inputs(inputs)
    assert [tuple(i.shape) for i in images] == [(1, 8, 8, 3), (1, 8, 8, 3), (1, 16, 8, 3)]
    assert [tuple(m.shape) for m in masks] == [(8, 8), (8, 8), (16, 8)]
    assert values == {"model": model, "name": "x", "steps": 5}


def test_load_subject_images_also_gives_the_photos_at_their_own_sizes(node_classes, tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "subject").mkdir()
    Image.new("RGB", (300, 100), (200, 0, 0)).save(tmp_path / "subject" / "a.png")
    Image.new("RGB", (100, 200), (0, 200, 0)).save(tmp_path / "subject" / "b.png")
    node = pack("nodes.load_subject_images")
    monkeypatch.setattr(node, "_input_dir", lambda: str(tmp_path))
    schema = node.LoadSubjectImages.GET_SCHEMA()
    assert [o.is_output_list for o in schema.outputs] == [False, False, False, True]
    images, count, _, photos = node.LoadSubjectImages.execute("subject", resolution=64, fit="crop").outputs
    assert tuple(images.shape) == (2, 64, 64, 3) and count == 2
    assert [tuple(p.shape) for p in photos] == [(1, 37, 111, 3), (1, 91, 45, 3)]
