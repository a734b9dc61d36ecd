"""The same seed and inputs give the same artifacts, bit for bit, as the code before the engine was restructured.

The hashes below were recorded from files made by the pre-restructure tree (commit 3dc8c26) with exactly these
settings; a change to how any method trains or writes its weights changes them. Metadata is compared in the closing
note of that change, not here: new options legitimately add to it. Bit-exactness holds for the pinned torch on the
same CPU kind (the CI machine is the development machine's kind).
"""

import hashlib

import pytest
import torch
from safetensors import safe_open

from conftest import pack

models = pack("trainers.models")
run = pack("trainers.run")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
dreambooth = pack("trainers.methods.dreambooth")

PRIOR = dict(class_prompt="a photo of a toy", class_images=2, class_sampler_steps=2)
CASES = {
    "lora": (lambda: lora.LoRAConfig(steps=6, resolution=64, lr=1e-3, seed=3), lora.LoRAMethod,
             "4046bab20e89af8430640ac922912b09935bd20384d60141c00ffea9d8a68486"),
    "lora_text_encoder_prior": (
        lambda: lora.LoRAConfig(steps=4, resolution=64, lr=1e-3, seed=3, train_text_encoder=True, **PRIOR),
        lora.LoRAMethod, "322e0ae20565eaef0cefb3722c5a78caca9678add20cb131b38d5d3f05fecb5a"),
    "embedding": (lambda: embedding.EmbeddingConfig(token="<tok>", init_word="toy", steps=6, resolution=64, seed=3,
                                                    vectors=2),
                  embedding.EmbeddingMethod, "e2c5f3054b8659340ae771419299bb4505ac7f0594183b217d951506b8039cc3"),
    "dreambooth_prior": (lambda: dreambooth.DreamBoothConfig(steps=4, resolution=64, lr=1e-4, seed=3,
                                                             gradient_checkpointing=False, **PRIOR),
                         dreambooth.DreamBoothMethod,
                         "7557431df87b4cac3cf8e4a249e4a8ea89b27d92f3c84fdbddd9fff71f139b28"),
}


def tensor_hash(path) -> str:
    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel():
                digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_artifacts_are_bit_identical_to_the_pre_restructure_code(case, tiny_model, tmp_path):
    make_config, method_type, expected = CASES[case]
    config = make_config()
    photos = pack("trainers.testing.synthetic").subject_photos(4, 64, 0)
    artifact = run.personalize(models.load_base(tiny_model["single_file"]), method_type(config), photos, None,
                               config, tmp_path / f"{case}.safetensors", class_cache_dir=tmp_path / "class",
                               device=torch.device("cpu"), release_frozen=True)
    assert tensor_hash(artifact.path) == expected
