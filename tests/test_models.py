"""Offline model loading and the single-file ↔ diffusers conversion, checked against diffusers' own loaders."""

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from conftest import pack

models = pack("trainers.models")
families = pack("trainers.families")
checkpoints = pack("trainers.checkpoints")
convert = pack("trainers.families.ldm")
tiny = pack("trainers.testing.tiny")
errors = pack("trainers.errors")


def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_make_tiny_model_writes_both_layouts(tiny_model):
    single = load_file(tiny_model["single_file"])
    prefixes = {k.split(".")[0] for k in single}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.",
                             "cond_stage_model.transformer.text_model.")) for k in single)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert Path(tiny_model["diffusers"], part).is_dir()


def test_single_file_and_diffusers_folder_load_to_identical_components(tiny_model):
    from_file = models.load_base(tiny_model["single_file"])
    from_folder = models.load_base(tiny_model["diffusers"])
    for name in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict())
    assert from_file.fingerprint == from_folder.fingerprint


def test_conversion_back_to_the_original_layout_is_bit_exact(tiny_model):
    original = load_file(tiny_model["single_file"])
    assert state_dicts_equal(models.original_state_dict(models.load_base(tiny_model["single_file"])), original)


def test_our_conversion_agrees_with_diffusers_own_converters(tiny_model):
    """An independent implementation of original → diffusers: the library's single-file converters."""
    original = load_file(tiny_model["single_file"])
    components = models.load_base(tiny_model["single_file"])
    unet = convert_ldm_unet_checkpoint(original, dict(components.unet.config))
    vae = convert_ldm_vae_checkpoint(original, dict(components.vae.config))
    assert state_dicts_equal(unet, components.unet.state_dict())
    assert state_dicts_equal(vae, components.vae.state_dict())
    pipeline = StableDiffusionPipeline.from_single_file(tiny_model["single_file"], config=tiny_model["diffusers"],
                                                        safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(pipeline, name).state_dict(), getattr(components, name).state_dict())


def test_the_full_sd15_architecture_has_the_key_set_comfyui_recognises():
    """686 UNet, 196 text-encoder and 248 VAE keys, as in a real SD1.5 checkpoint (built on the meta device)."""
    unet_config = families.shipped_config("sd15_unet")
    vae_config = families.shipped_config("sd15_vae")
    text = families.shipped_config("sd15_text_encoder")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text.items()
                                                        if k not in ("architectures", "model_type")}))
    unet_keys = convert.unet_key_map(unet.config).to_original(unet.state_dict())
    vae_keys = convert.vae_key_map(vae.config).to_original(vae.state_dict())
    assert len(unet_keys) == 686 and len(vae_keys) == 248 and len(text_encoder.state_dict()) == 196
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in unet_keys
    assert "output_blocks.2.1.conv.weight" in unet_keys and "output_blocks.5.2.conv.weight" in unet_keys
    assert vae_keys["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


@pytest.mark.parametrize("keys, found", [
    (["conditioner.embedders.0.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"],
     "an SDXL refiner"),
    (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
      "model.diffusion_model.input_blocks.0.0.weight"], "a model with conditioner.embedders"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA"),
    (["encoder.conv_in.weight", "decoder.conv_out.weight"], "an unknown layout .*decoder, encoder"),
])
def test_unsupported_checkpoints_are_refused_naming_what_was_found(tmp_path, keys, found):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    with pytest.raises(errors.PersonalizeError, match=f"this checkpoint is {found}.*SDXL, SD2.x, SD1.x"):
        models.load_base(path)


def test_v_prediction_is_detected_from_the_v_pred_key_and_kept_on_export(tmp_path):
    model = tiny.make_tiny_model(tmp_path, prediction_type="v_prediction")
    assert "v_pred" in load_file(model["single_file"])
    components = models.load_base(model["single_file"])
    assert components.prediction_type == "v_prediction"
    assert "v_pred" in models.original_state_dict(components)
    assert models.load_base(model["diffusers"]).prediction_type == "v_prediction"


def test_a_ckpt_pickle_loads_with_weights_only(tiny_model, tmp_path):
    (tmp_path / "tokenizer").symlink_to(tiny_model["tokenizer"])
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_model["single_file"]), "global_step": 1}, ckpt)
    components = models.load_base(ckpt)
    reference = models.load_base(tiny_model["single_file"])
    assert state_dicts_equal(components.unet.state_dict(), reference.unet.state_dict())


def test_bad_files_and_a_missing_tokenizer_give_clear_errors(tiny_model, tmp_path):
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(open(tiny_model["single_file"], "rb").read())
    with pytest.raises(errors.PersonalizeError, match="no CLIP tokenizer .* 'tokenizer' folder .*ComfyUI"):
        models.load_base(lonely)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lonely.read_bytes()[: lonely.stat().st_size // 2])
    with pytest.raises(errors.PersonalizeError, match="truncated"):
        checkpoints.read_checkpoint(truncated)
    with pytest.raises(errors.PersonalizeError, match="does not exist"):
        models.load_base(tmp_path / "missing.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(errors.PersonalizeError, match="expected a diffusers folder or a single file"):
        models.load_base(tmp_path / "notes.txt")


def test_the_streaming_reader_matches_safetensors(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "conv": torch.randn(4, 3, 3, 3), "i64": torch.arange(6), "flag": torch.tensor([True, False]),
               "empty": torch.tensor([]), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"a": "b"})
    assert state_dicts_equal(checkpoints.read_safetensors(path), load_file(str(path)))
    as_fp32 = checkpoints.read_safetensors(path, torch.float32)
    assert as_fp32["f16"].dtype == torch.float32 and torch.equal(as_fp32["f16"], tensors["f16"].float())
    assert as_fp32["i64"].dtype == torch.int64
    assert as_fp32["conv"].is_contiguous(memory_format=torch.channels_last)
    as_stored = checkpoints.read_safetensors(path, torch.float32, channels_last_prefix=None)
    assert state_dicts_equal({k: v for k, v in as_stored.items() if k != "f16"},
                             {k: v for k, v in load_file(str(path)).items() if k != "f16"})
    assert as_stored["conv"].is_contiguous()


def test_tensors_kept_as_stored_are_private_views_of_the_file(tmp_path):
    """What needs no conversion maps the file (read when used, as diffusers loads); writes stay in the process."""
    tensors = {"a_odd_f16": torch.randn(3).half(), "b_f32": torch.randn(5, 7), "c_conv": torch.randn(4, 3, 3, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    original = path.read_bytes()
    loaded = checkpoints.read_safetensors(path, torch.float32, channels_last_prefix="c_")
    mapped = {k for k, v in loaded.items() if v.untyped_storage().nbytes() == len(original)}
    assert mapped == {"b_f32"}, "fp16 is converted, the conv is laid out channels_last"
    loaded["b_f32"].add_(1.0)
    assert path.read_bytes() == original
    assert torch.equal(checkpoints.read_safetensors(path)["b_f32"], tensors["b_f32"])


def test_an_fp32_model_maps_what_it_does_not_convert(tiny_model):
    """From an fp32 file the VAE and the UNet's non-conv weights are views of the file (so the VAE decoder is never
    read while training); the UNet's conv weights are copies laid out channels_last."""
    components = models.load_base(tiny_model["single_file"])
    file_size = Path(tiny_model["single_file"]).stat().st_size

    def is_mapped(tensor):
        return tensor.untyped_storage().nbytes() == file_size

    assert all(is_mapped(p) and p.is_contiguous() for p in components.vae.parameters())
    unet = dict(components.unet.named_parameters())
    assert all(not is_mapped(p) and p.is_contiguous(memory_format=torch.channels_last)
               for p in unet.values() if p.ndim == 4)
    assert all(is_mapped(p) for p in unet.values() if p.ndim < 4)


def test_components_never_alias_the_callers_tensors(tiny_model):
    """ComfyUI hands over its live weights: training must not write into them."""
    state_dict = load_file(tiny_model["single_file"])
    before = {k: v.clone() for k, v in state_dict.items()}
    components = models.components_from_original(state_dict, tiny_model["tokenizer"])
    with torch.no_grad():
        for parameter in components.unet.parameters():
            parameter.add_(1.0)
    assert state_dicts_equal(state_dict, before)
