"""What every artifact carries besides its weights (provenance, kohya's and the model spec's metadata), and writing
it atomically."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import __version__
from .files import atomic_path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: readers only ever see a complete file."""
    path = Path(path)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def provenance_metadata(method: str, base_name: str, base_hash: str, config, result=None) -> dict[str, str]:
    """Keys every artifact carries, whatever its format; with the run's ``TrainResult``, also the fingerprint of
    every training input (what lets a rerun reuse the file) and the loss history (what redraws its curve)."""
    metadata = {
        "personalize.method": method,
        "personalize.version": __version__,
        "personalize.base_model": base_name,
        "personalize.base_model_hash": base_hash,
        "personalize.config": repr(config),
    }
    if result is not None:
        metadata["personalize.fingerprint"] = result.input_fingerprint
        metadata["personalize.losses"] = json.dumps([round(x, 5) for x in result.losses])
        metadata["ss_steps"] = str(result.steps)
        if result.validation:
            metadata["personalize.validation"] = json.dumps(result.validation)
            metadata["personalize.best_step"] = str(result.best_step)
            metadata["personalize.selection"] = result.selection
    return metadata


SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# What kohya's sai_model_spec writes: full checkpoints in the original layout name Stability AI's implementation,
# SD1.x LoRAs "diffusers".
IMPLEMENTATION_ORIGINAL = "https://github.com/Stability-AI/generative-models"
IMPLEMENTATION_DIFFUSERS = "diffusers"


def modelspec_metadata(architecture: str, implementation: str, title: str, resolution: int, trigger_phrase: str,
                       prediction_type: str) -> dict[str, str]:
    """The ``modelspec.*`` keys (Stability AI's model spec 1.0) that ComfyUI, A1111 and kohya read."""
    return {
        "sai_model_spec": "1.0.0",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.date": iso_date(),
    }


def iso_date() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention), so a rerun can give the same file."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return moment.replace(microsecond=0).isoformat()


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya precomputes them for A1111's additional-networks index:
    the sha256 of the tensor data (header skipped) of the file serialised with only its ``ss_*`` metadata."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(blob[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]}
