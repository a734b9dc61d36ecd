"""Fixtures built by the pack itself, so that tests, the demo and benchmarks need nothing from outside: random-weight
models of the real architectures, a generated tokenizer, made-up subject photos and random DINO weights."""

from pathlib import Path

# The pretrained toy model shipped with the pack (written by ``python -m bench.quality pretrain --ship``): the demo's
# model and the learning checks' (model.safetensors + tokenizer/, the feature network, recipe.json).
TOY_MODEL = Path(__file__).resolve().parent / "toy_model"
