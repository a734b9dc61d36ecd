"""The pretrained toy model and the feature network: shipped in the repository, or built once and cached.

``trainers/testing/toy_model/`` holds the shipped pair (``model.safetensors`` + ``tokenizer/``,
``features.safetensors``, ``recipe.json``), written by ``python -m bench.quality pretrain --ship``; it is used when
its recipe matches the current code. Otherwise the cache folder (``$PERSONALIZE_QUALITY_CACHE`` or
``<repo>/.cache/quality``, git-ignored) is used, its entries keyed by the spec's fingerprint (spec, recipe version,
toy-world code), so a change rebuilds instead of reusing stale files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from . import features, toymodel
from .pack import REPO, trainer

FEATURES_RECIPE = "1"
SHIPPED = trainer("testing").TOY_MODEL
# The shipped model is the fp32 training result stored in fp16: half the size, and the toy model's samples and
# scores do not tell the two apart (recipe.json records the VAE's PSNR measured on the fp16 file).
SHIPPED_DTYPE = torch.float16


def cache_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("PERSONALIZE_QUALITY_CACHE") or REPO / ".cache" / "quality")


def features_key() -> str:
    """Changes with the feature network's code and recipe and the toy world's code."""
    return hashlib.sha256((FEATURES_RECIPE + Path(features.__file__).read_text() +
                           Path(toymodel.world.__file__).read_text()).encode()).hexdigest()[:12]


def shipped_recipe(folder: Path = SHIPPED, spec: toymodel.ToySpec = toymodel.TOY) -> dict | None:
    """The shipped files' recipe when they are all there and were built by the current code, else None."""
    recipe_path = folder / "recipe.json"
    needed = [folder / "model.safetensors", folder / "features.safetensors", folder / "tokenizer" / "vocab.json",
              folder / "tokenizer" / "merges.txt", recipe_path]
    if not all(p.is_file() for p in needed):
        return None
    recipe = json.loads(recipe_path.read_text())
    if recipe.get("model", {}).get("fingerprint") != spec.fingerprint() or recipe.get("features_key") != features_key():
        return None
    return recipe


def toy_model(cache: str | Path | None = None, spec: toymodel.ToySpec = toymodel.TOY, log=print,
              use_shipped: bool = True) -> dict:
    """``{"single_file", "tokenizer", "info"}`` of the pretrained toy model: the shipped one when it matches the
    current recipe (and ``use_shipped``), else the cached one, pretraining it if not cached."""
    recipe = shipped_recipe(spec=spec) if use_shipped else None
    if recipe:
        return {"single_file": str(SHIPPED / "model.safetensors"), "tokenizer": str(SHIPPED / "tokenizer"),
                "info": recipe["model"], "cached": True, "shipped": True}
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


def toy_embedder(cache: str | Path | None = None, log=print,
                 use_shipped: bool = True) -> tuple[features.ToyEmbedder, dict]:
    """The trained feature network and its check (nearest-neighbour identity accuracy, against the random ViT):
    the shipped one when it matches the current code (and ``use_shipped``), else the cached one, trained if not
    cached."""
    recipe = shipped_recipe() if use_shipped else None
    if recipe:
        return features.load_toy_embedder(SHIPPED / "features.safetensors"), recipe["features"]
    folder = cache_root(cache) / f"features-{features_key()}"
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


def content_sha256(path: Path) -> str:
    """sha256 of a file; of a safetensors file's names, dtypes, shapes, values and sorted metadata, since the
    safetensors writer puts its metadata in a different order from one process to the next."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key)
            digest.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def pretrain(cache: str | Path | None = None, ship: bool = False, folder: Path = SHIPPED,
             spec: toymodel.ToySpec = toymodel.TOY, log=print) -> dict:
    """Build (or reuse from the cache) the toy model and the feature network with the committed recipe, write the
    shipped files into a temporary folder, measure them, and compare them with the committed ones; with ``ship``,
    replace the committed ones. Returns the recipe and which files differ in content from the committed ones."""
    from .benchmark import prompt_following, toy_samples_grid

    started = time.perf_counter()
    toy = toy_model(cache, spec, log=log, use_shipped=False)
    embedder, feature_info = toy_embedder(cache, log=log, use_shipped=False)
    models = toymodel.models
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    components = models.load_base(toy["single_file"])
    models.save_single_file(components, staging / "model.safetensors", dtype=SHIPPED_DTYPE, metadata={
        "modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "v",
        "modelspec.title": f"personalize toy world {spec.name} ({toy['info']['fingerprint']})"})
    shutil.copytree(toy["tokenizer"], staging / "tokenizer")
    cached_features = cache_root(cache) / f"features-{features_key()}" / "toynet.safetensors"
    shutil.copyfile(cached_features, staging / "features.safetensors")
    log("measuring the shipped model (fp16 file): VAE PSNR and prompt following")
    shipped = models.load_base(staging / "model.safetensors")
    held_out, _ = toymodel.world.dataset(256, spec.resolution, seed=spec.seed + 1)
    pixels = toymodel.data.images_to_training_pixels(held_out, spec.resolution)
    previous = shipped_recipe(folder, spec)
    recipe = {
        "recipe": toymodel.RECIPE,
        "command": "python -m bench.quality pretrain --ship --threads 1",
        "seed": spec.seed,
        "model": toy["info"],
        "features_key": features_key(),
        "features": feature_info,
        "shipped_dtype": str(SHIPPED_DTYPE).removeprefix("torch."),
        "vae_psnr_db_shipped": round(toymodel.reconstruction_psnr(shipped.vae, pixels), 2),
        "prompt_following": prompt_following(shipped, embedder),
        "pretraining_wall_seconds": round(toy["info"]["seconds"] + feature_info["train_seconds"], 1),
        "machine": _machine(),
        "torch": torch.__version__,
        "files": {p.relative_to(staging).as_posix(): {"bytes": p.stat().st_size, "content_sha256": content_sha256(p)}
                  for p in sorted(staging.rglob("*")) if p.is_file()},
    }
    differs = sorted(name for name in set(recipe["files"]) | set(previous["files"] if previous else {})
                     if not previous or recipe["files"].get(name) != previous["files"].get(name))
    recipe["total_mb"] = round(sum(f["bytes"] for f in recipe["files"].values()) / 2**20, 2)
    grid = toy_samples_grid(shipped, REPO / "bench" / "results" / "toy_model_samples.png")
    recipe["samples_grid"] = str(grid.relative_to(REPO)) if grid.is_relative_to(REPO) else str(grid)
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    if ship:
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    else:
        shutil.rmtree(staging)
    # Not part of the shipped recipe: how this rebuild compares with the files committed before it.
    return recipe | {"differs_from_committed": differs if previous else "no committed files for this recipe",
                     "seconds_this_run": round(time.perf_counter() - started, 1)}
