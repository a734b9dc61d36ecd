"""Built once, cached: the pretrained toy model and the feature network (with its nearest-neighbour check).

The cache folder is ``$PERSONALIZE_QUALITY_CACHE`` or ``<repo>/.cache/quality`` (git-ignored); entries are keyed by
the spec's fingerprint (spec, recipe version, toy-world code), so a change rebuilds instead of reusing stale files.
``python -m bench.quality pretrain`` builds both without running the benchmark.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import features, toymodel
from .pack import REPO

FEATURES_RECIPE = "1"


def cache_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("PERSONALIZE_QUALITY_CACHE") or REPO / ".cache" / "quality")


def toy_model(cache: str | Path | None = None, spec: toymodel.ToySpec = toymodel.TOY, log=print) -> dict:
    """``{"single_file", "tokenizer", "info"}`` of the pretrained toy model, pretraining it if not cached."""
    folder = cache_root(cache) / f"{spec.name}-{spec.fingerprint()}"
    info_path = folder / "info.json"
    if info_path.is_file() and (folder / "model.safetensors").is_file():
        return {"single_file": str(folder / "model.safetensors"), "tokenizer": str(folder / "tokenizer"),
                "info": json.loads(info_path.read_text()), "cached": True}
    log(f"pretraining the toy model {spec.name} into {folder} (once; cached afterwards)")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    built = toymodel.make_toy_model(partial, spec, log=log)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return {"single_file": str(folder / "model.safetensors"), "tokenizer": str(folder / "tokenizer"),
            "info": built["info"], "cached": False}


def toy_embedder(cache: str | Path | None = None, log=print) -> tuple[features.ToyEmbedder, dict]:
    """The trained feature network and its check (nearest-neighbour identity accuracy, against the random ViT)."""
    import hashlib

    key = hashlib.sha256((FEATURES_RECIPE + Path(features.__file__).read_text() +
                          Path(toymodel.world.__file__).read_text()).encode()).hexdigest()[:12]
    folder = cache_root(cache) / f"features-{key}"
    weights, info_path = folder / "toynet.safetensors", folder / "info.json"
    if weights.is_file() and info_path.is_file():
        return features.load_toy_embedder(weights), json.loads(info_path.read_text())
    started = time.perf_counter()
    log("training the feature network (once; cached afterwards)")
    net = features.train_toy_net(log=log)
    trained_seconds = time.perf_counter() - started
    embedder = features.ToyEmbedder(net)
    images, labels = features.identity_gallery(identities=12, photos_per=4, seed=1)
    blurred, _ = features.identity_gallery(identities=12, photos_per=4, seed=1, blur=1.2)
    log("checking the random-weight ViT-S/16 on the same gallery")
    vit = features.random_vit(folder / "random-vit-s16", seed=0)
    info = {
        "gallery": "12 toys x 4 photos (random scenes and poses), leave-one-out 1-NN on identity",
        "toynet_nn_accuracy": features.nearest_neighbour_accuracy(embedder, images, labels),
        "toynet_nn_accuracy_blurred": features.nearest_neighbour_accuracy(embedder, blurred, labels),
        "random_vit_s16_nn_accuracy": features.nearest_neighbour_accuracy(vit, images, labels),
        "random_vit_s16_nn_accuracy_blurred": features.nearest_neighbour_accuracy(vit, blurred, labels),
        "toynet_cosine": features.similarity_spread(embedder, images, labels),
        "random_vit_s16_cosine": features.similarity_spread(vit, images, labels),
        "train_seconds": round(trained_seconds, 1),
    }
    shutil.rmtree(folder / "random-vit-s16", ignore_errors=True)
    features.save_toy_net(net, weights)
    info_path.write_text(json.dumps(info, indent=2))
    log(f"  feature check: {info}")
    return features.load_toy_embedder(weights), info
