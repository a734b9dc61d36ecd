"""Every bad input gets a clear error, every fault loses nothing: a table of careless and unlucky uses of the CLI and
the nodes, each judged the same way.

A case builds its inputs (broken images, damaged models, odd options and output paths, faults such as a full disk, a
second run on the same output, SIGTERM while writing, a corrupt cache), runs the CLI in-process (a subprocess only
where a signal must hit a real process) or the code path a node takes, and is judged:

- ``traceback``: an exception other than PersonalizeError escaped, or stderr holds a traceback;
- ``silent``: a bad input was accepted (exit 0), or a run that should have succeeded gave a wrong result;
- ``partial``: a file was left at or beside the output (a failed run leaves none; no run leaves temporaries);
- ``unclear``: refused, but the message does not name the input (or suggests ``weights_only=False``);
- ``ok``: exit 2 with a message naming the input (or, for faults the pack should absorb, a correct run).

The judgement is the assertion message's first word, so ``pytest -rf`` output counts each kind.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import PACK_NAME, REPO, pack

cli = pack("cli")
errors = pack("trainers.errors")
options = pack("trainers.options")
lora = pack("trainers.methods.lora")
export = pack("trainers.export")
loop = pack("trainers.loop")
synthetic = pack("trainers.testing.synthetic")
dino = pack("trainers.testing.dino")

FAST = ["--steps", "1", "--resolution", "64", "--device", "cpu"]
SMALL_LORA = ["--rank", "2"]
OUT_NAME = "result.safetensors"


# ---------------------------------------------------------------------------------------------------- the machinery


@dataclass
class Result:
    rc: int | None
    out: str = ""
    err: str = ""
    exc: str = ""  # a traceback that escaped

    @property
    def json(self) -> dict:
        return json.loads(self.out.strip().splitlines()[-1])


@dataclass
class Setup:
    run: Callable[[], Result]
    names: tuple[str, ...] = ()  # what the message must mention (case-insensitive)
    expect: str = "error"  # or "ok": a fault the pack absorbs
    rc: int | tuple[int, ...] = 0  # the exit code(s) of an "ok" run
    check: Callable[[Result], bool] | None = None  # an "ok" run's result is right
    check_fails_as: str = "silent"  # what a failed check means
    ignore: frozenset[str] = frozenset()  # files other runs of the case may write
    forbid: tuple[str, ...] = ("weights_only=False",)
    patches: list = field(default_factory=list)  # (object, attribute, value) applied while it runs


@dataclass
class Ctx:
    tmp: Path
    model: dict
    photos: Path
    dino: Path
    out_dir: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.out_dir / OUT_NAME

    def work(self, name: str) -> Path:
        path = self.tmp / "work" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def run_cli(*argv) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as error:  # argparse's own usage errors: exit 2 and a message, no traceback
            rc = error.code if isinstance(error.code, int) else 2
        except BaseException:  # noqa: BLE001 - what the suite counts
            return Result(None, out.getvalue(), err.getvalue(), traceback.format_exc())
    return Result(rc, out.getvalue(), err.getvalue())


def run_call(function) -> Result:
    """The way a node's error reaches the user: a PersonalizeError's message on the node, anything else a trace."""
    try:
        value = function()
    except errors.PersonalizeError as error:
        return Result(2, err=f"error: {error}")
    except BaseException:  # noqa: BLE001
        return Result(None, exc=traceback.format_exc())
    return Result(0, out=repr(value))


def train(ctx: Ctx, *extra, command="train-lora", base=None, images=None, out=None) -> Callable[[], Result]:
    argv = [command, "--base", base or ctx.model["single_file"], "--images", images or ctx.photos,
            "--out", out or ctx.out, *FAST, *(SMALL_LORA if command == "train-lora" else []), *extra]
    return lambda: run_cli(*argv)


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def judge(setup: Setup, result: Result, left: set[str]) -> str:
    if result.exc or "Traceback" in result.err:
        return "traceback"
    left = {n for n in left if n not in setup.ignore}
    if setup.expect == "error":
        if result.rc == 0:
            return "silent"
        if left:
            return "partial"
        message = result.err.lower()
        if result.rc != 2 or not all(n.lower() in message for n in setup.names) or \
                any(f in result.err for f in setup.forbid):
            return "unclear"
        return "ok"
    if {n for n in left if Path(n).name.startswith(".")}:
        return "partial"
    if result.rc not in (setup.rc if isinstance(setup.rc, tuple) else (setup.rc,)):
        return "unclear" if result.rc == 2 else "silent"
    if setup.check and not setup.check(result):
        return setup.check_fails_as
    return "ok"


CASES: dict[str, Callable[[Ctx], Setup]] = {}


def case(kind: str, name: str):
    def register(builder):
        CASES[f"{kind}/{name}"] = builder
        return builder
    return register


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, image in enumerate(synthetic.subject_photos(2, 64)):
        Image.fromarray((image.numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def dino_model(tmp_path_factory) -> Path:
    return dino.make_random_dino(tmp_path_factory.mktemp("dino") / "dino-vits16")


@pytest.fixture
def ctx(tmp_path, tiny_model, photos, dino_model, monkeypatch) -> Ctx:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return Ctx(tmp_path, tiny_model, photos, dino_model, out_dir, monkeypatch)


# ---------------------------------------------------------------------------------------------------- file makers


def write_png(path: Path, seed: int = 0, size: int = 64) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def folder_with(ctx: Ctx, name: str, files: dict[str, bytes | None]) -> Path:
    """A folder holding ``files`` (None: a good PNG)."""
    folder = ctx.work(name)
    for file_name, content in files.items():
        if content is None:
            write_png(folder / file_name)
        else:
            (folder / file_name).write_bytes(content)
    return folder


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (32, 32)).save(buffer, "GIF")
    return buffer.getvalue()


def copy_diffusers(ctx: Ctx) -> Path:
    folder = ctx.tmp / "work" / "diffusers"
    shutil.copytree(ctx.model["diffusers"], folder)
    return folder


def edited_single_file(ctx: Ctx, edit) -> Path:
    """The tiny single file with ``edit(state_dict)`` applied (tokenizer folder beside it)."""
    folder = ctx.work("single")
    shutil.copytree(ctx.model["tokenizer"], folder / "tokenizer", dirs_exist_ok=True)
    state = load_file(ctx.model["single_file"])
    edit(state)
    save_file(state, folder / "model.safetensors")
    return folder / "model.safetensors"


def drop(prefix: str):
    def edit(state):
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
    return edit


def poison(key_part: str, value: float):
    def edit(state):
        key = next(k for k in state if key_part in k and state[k].is_floating_point())
        state[key] = state[key].clone()
        state[key].view(-1)[0] = value
    return edit


class NotAllowed:
    """Any class at all in a pickle: torch.load(weights_only=True) refuses to build it."""


def pickle_file(path: Path, content) -> Path:
    torch.save(content, path)
    return path


# ---------------------------------------------------------------------------------------------------- images


IMAGE_FILES = {
    "zero-byte jpg": {"a.jpg": b""},
    "random bytes jpg": {"a.jpg": os.urandom(2048)},
    "truncated png": {"a.png": truncated_png()},
    "gif named png": {"a.png": gif_bytes()},
    "text named jpg": {"a.jpg": b"not an image at all\n"},
    "only captions": {"a.txt": b"a caption"},
    "only a pdf": {"a.pdf": b"%PDF-1.4"},
}
for _name, _files in IMAGE_FILES.items():
    @case("images", _name)
    def _(ctx, files=_files):
        folder = folder_with(ctx, "images", files)
        return Setup(train(ctx, images=folder), names=(str(folder), next(iter(files))))


@case("images", "missing folder")
def _(ctx):
    return Setup(train(ctx, images=ctx.tmp / "no-such-folder"), names=("no-such-folder",))


@case("images", "folder is a file")
def _(ctx):
    file = write_png(ctx.work("x") / "photo.png")
    return Setup(train(ctx, images=file), names=("photo.png",))


@case("images", "empty folder")
def _(ctx):
    return Setup(train(ctx, images=ctx.work("empty")), names=("empty",))


@case("images", "only broken symlinks")
def _(ctx):
    folder = ctx.work("links")
    for name in ("a.jpg", "b.jpg"):
        (folder / name).symlink_to(ctx.tmp / "gone" / name)
    return Setup(train(ctx, images=folder), names=("a.jpg", "broken"))


@case("images", "only a folder named like an image")
def _(ctx):
    folder = ctx.work("dirs")
    (folder / "a.jpg").mkdir()
    return Setup(train(ctx, images=folder), names=("a.jpg",))


@case("images", "over the decompression-bomb limit")
def _(ctx):
    return Setup(train(ctx), names=("0.png", "limit"), patches=[(Image, "MAX_IMAGE_PIXELS", 1000)])


@case("images", "one corrupt photo among good ones")
def _(ctx):
    folder = folder_with(ctx, "mixed", {"a.png": None, "b.jpg": b"garbage"})
    return Setup(train(ctx, images=folder), expect="ok", check=lambda r: ctx.out.is_file() and "b.jpg" in r.out)


# ---------------------------------------------------------------------------------------------------- base models


@case("base", "missing path")
def _(ctx):
    return Setup(train(ctx, base=ctx.tmp / "nothing.safetensors"), names=("nothing.safetensors",))


@case("base", "wrong suffix")
def _(ctx):
    path = ctx.work("b") / "model.txt"
    path.write_text("hello")
    return Setup(train(ctx, base=path), names=("model.txt",))


for _name, _content in {"random bytes": os.urandom(4096), "zero bytes": b"", "a json header only":
                        struct.pack("<Q", 2) + b"{}", "a header promising more": struct.pack("<Q", 80) + b"{"}.items():
    @case("base", f"single file of {_name}")
    def _(ctx, content=_content):
        path = ctx.work("b") / "model.safetensors"
        path.write_bytes(content)
        return Setup(train(ctx, base=path), names=("model.safetensors",))


@case("base", "single file truncated")
def _(ctx):
    path = ctx.work("b") / "model.safetensors"
    data = Path(ctx.model["single_file"]).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Setup(train(ctx, base=path), names=("model.safetensors",))


SINGLE_FILE_EDITS = {
    "missing a UNet block": drop("model.diffusion_model.input_blocks.1."),
    "missing the UNet output": drop("model.diffusion_model.out."),
    "missing the token embedding": drop("cond_stage_model.transformer.text_model.embeddings.token_embedding"),
    "missing every text layer": drop("cond_stage_model.transformer.text_model.encoder.layers."),
    "missing the UNet's input blocks": drop("model.diffusion_model.input_blocks."),
    "missing the VAE encoder": drop("first_stage_model.encoder."),
    "missing the whole VAE": drop("first_stage_model."),
    "missing the time embedding": drop("model.diffusion_model.time_embed."),
    "a transposed weight": lambda s: s.__setitem__(
        "model.diffusion_model.out.2.weight", s["model.diffusion_model.out.2.weight"].transpose(0, 1).contiguous()),
    "NaN in the UNet": poison("model.diffusion_model.input_blocks.1", float("nan")),
    "infinity in the text encoder": poison("cond_stage_model.transformer.text_model.encoder", float("inf")),
    "NaN in the VAE": poison("first_stage_model.encoder", float("nan")),
    "a LoRA's keys": lambda s: (s.clear(), s.update({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)})),
    "SDXL's keys": lambda s: s.update({"conditioner.embedders.0.x": torch.zeros(1)}) or drop("cond_stage_model.")(s),
}
for _name, _edit in SINGLE_FILE_EDITS.items():
    @case("base", f"single file {_name}")
    def _(ctx, edit=_edit):
        return Setup(train(ctx, base=edited_single_file(ctx, edit)), names=("model",))


@case("base", "ckpt pickle with a class in it")
def _(ctx):
    path = pickle_file(ctx.work("b") / "model.ckpt", {"state_dict": {"x": torch.zeros(1)}, "obj": NotAllowed()})
    return Setup(train(ctx, base=path), names=("model.ckpt",))


@case("base", "ckpt of random bytes")
def _(ctx):
    path = ctx.work("b") / "model.ckpt"
    path.write_bytes(os.urandom(1000))
    return Setup(train(ctx, base=path), names=("model.ckpt",))


@case("base", "explicit tokenizer folder empty")
def _(ctx):
    return Setup(train(ctx, "--tokenizer", ctx.work("tok")), names=("tok",))


@case("base", "explicit tokenizer folder of garbage")
def _(ctx):
    folder = ctx.work("tok")
    (folder / "vocab.json").write_text("{not json")
    (folder / "merges.txt").write_text("#version\n")
    return Setup(train(ctx, "--tokenizer", folder), names=("tok",))


@case("base", "tokenizer with an empty vocabulary")
def _(ctx):
    folder = ctx.work("tok")
    (folder / "vocab.json").write_text("{}")
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return Setup(train(ctx, "--tokenizer", folder), names=("tok",))


@case("base", "no tokenizer beside a single file")
def _(ctx):
    path = ctx.work("alone") / "model.safetensors"
    shutil.copy(ctx.model["single_file"], path)
    return Setup(train(ctx, base=path), names=("tokenizer",))


@case("base", "folder without model_index.json")
def _(ctx):
    return Setup(train(ctx, base=ctx.work("plain")), names=("plain",))


def diffusers_case(edit, names=("diffusers",)):
    def build(ctx):
        folder = copy_diffusers(ctx)
        edit(folder)
        return Setup(train(ctx, base=folder), names=names)
    return build


def write(relative: str, content: bytes):
    return lambda folder: (folder / relative).write_bytes(content)


def remove(relative: str):
    return lambda folder: shutil.rmtree(folder / relative) if (folder / relative).is_dir() else \
        (folder / relative).unlink()


def to_pickle(relative: str, new_name: str):
    def edit(folder):
        weights = folder / relative
        torch.save(load_file(weights), weights.with_name(new_name))
        weights.unlink()
    return edit


def drop_tensors(relative: str, count: int):
    def edit(folder):
        state = load_file(folder / relative)
        for key in sorted(state)[:count]:
            del state[key]
        save_file(state, folder / relative)
    return edit


def empty_folder(relative: str):
    def edit(folder):
        shutil.rmtree(folder / relative)
        (folder / relative).mkdir()
    return edit


UNET = "unet/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
DIFFUSERS_EDITS = {
    "model_index.json not JSON": write("model_index.json", b"{nope"),
    "model_index.json of SDXL": write("model_index.json", json.dumps({"_class_name": "StableDiffusionXLPipeline"})
                                      .encode()),
    "empty tokenizer folder": empty_folder("tokenizer"),
    "tokenizer files not JSON": lambda folder: [write(f"tokenizer/{name}", b"{nope")(folder)
                                                for name in ("vocab.json", "tokenizer.json")],
    "UNet weights empty": write(UNET, b""),
    "UNet weights random bytes": write(UNET, os.urandom(5000)),
    "UNet config.json not JSON": write("unet/config.json", b"{nope"),
    "UNet config.json missing": remove("unet/config.json"),
    "UNet config.json of another shape": write("unet/config.json", json.dumps(
        {"_class_name": "UNet2DConditionModel", "block_out_channels": [8, 16], "cross_attention_dim": 8}).encode()),
    "UNet weights as a pickle .bin": to_pickle(UNET, "diffusion_pytorch_model.bin"),
    "UNet weights missing": remove(UNET),
    "UNet weights missing tensors": drop_tensors(UNET, 5),
    "VAE folder missing": remove("vae"),
    "VAE weights as a pickle .bin": to_pickle("vae/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text encoder weights as a pickle .bin": to_pickle(TEXT, "pytorch_model.bin"),
    "text encoder weights missing tensors": drop_tensors(TEXT, 3),
    "text encoder weights random bytes": write(TEXT, os.urandom(5000)),
    "text encoder config.json not JSON": write("text_encoder/config.json", b"{nope"),
    "scheduler config not JSON": write("scheduler/scheduler_config.json", b"{nope"),
}
for _name, _edit in DIFFUSERS_EDITS.items():
    case("base", f"diffusers {_name}")(diffusers_case(_edit))


# ---------------------------------------------------------------------------------------------------- options

FLOAT_OPTIONS = [f.name for f, spec in options.options_of(lora.LoRAConfig)
                 if spec.cli and isinstance(options.default_of(f), float)]
for _option in FLOAT_OPTIONS:
    for _value in ("nan", "inf", "-inf"):
        @case("options", f"--{_option} {_value}")
        def _(ctx, option=_option, value=_value):
            return Setup(train(ctx, f"--{option.replace('_', '-')}", value), names=(option,))

for _command, _flag in (("train-embedding", "--lr"), ("train-dreambooth", "--prior-weight")):
    @case("options", f"{_command} {_flag} nan")
    def _(ctx, command=_command, flag=_flag):
        prior = ["--class-images", "1", "--class-sampler-steps", "1"] if command == "train-dreambooth" else []
        return Setup(train(ctx, flag, "nan", *prior, command=command), names=(flag.strip("-").replace("-", "_"),))

for _flag, _value in (("--steps", "0"), ("--steps", "abc"), ("--resolution", "100000"), ("--lr", "-1"),
                      ("--rank", "0"), ("--mixed-precision", "fp8"), ("--seed", "-5")):
    @case("options", f"{_flag} {_value}")
    def _(ctx, flag=_flag, value=_value):
        return Setup(train(ctx, flag, value), names=(flag.strip("-").split("-")[0],))


# ---------------------------------------------------------------------------------------------------- output paths

BAD_NAMES = {"Windows device name CON": "CON.safetensors", "Windows device name nul": "nul.safetensors",
             "Windows device name COM1": "COM1.safetensors", "Windows device name LPT9": "lpt9.safetensors",
             "a colon": "a:b.safetensors", "a question mark": "what?.safetensors", "a pipe": "a|b.safetensors",
             "a trailing dot": "name.", "300 bytes": "x" * 289 + ".safetensors",
             "260 bytes of accents": "é" * 124 + ".safetensors"}
for _name, _file in BAD_NAMES.items():
    @case("output", f"name with {_name}")
    def _(ctx, file=_file):
        return Setup(train(ctx, out=ctx.out_dir / file), names=(file[:40],))


@case("output", "out is a folder")
def _(ctx):
    (ctx.out_dir / "folder").mkdir()
    return Setup(train(ctx, out=ctx.out_dir / "folder"), names=("folder",))


@case("output", "out's parent is a file")
def _(ctx):
    (ctx.out_dir / "file").write_text("x")
    return Setup(train(ctx, out=ctx.out_dir / "file" / OUT_NAME), names=("file",))


@case("output", "out in a folder nobody can write")
def _(ctx):
    return Setup(train(ctx, out=Path("/proc/personalize-test") / OUT_NAME), names=("/proc",))


@case("output", "out is the base model")
def _(ctx):
    base = ctx.out_dir / "base.safetensors"
    shutil.copy(ctx.model["single_file"], base)
    shutil.copytree(ctx.model["tokenizer"], ctx.out_dir / "tokenizer")
    return Setup(train(ctx, base=base, out=base), names=("base.safetensors",))


@case("output", "out exists, trained from other inputs")
def _(ctx):
    ctx.out.write_bytes(b"someone else's file")
    return Setup(train(ctx), names=(OUT_NAME, "overwrite"))


@case("output", "disk too small for the artifact")
def _(ctx):
    usage = types.SimpleNamespace(total=10**9, used=10**9 - 4096, free=4096)
    return Setup(train(ctx), names=(OUT_NAME, "free"), patches=[(shutil, "disk_usage", lambda _path: usage)])


@case("output", "out in folders that do not exist yet")
def _(ctx):
    out = ctx.out_dir / "new" / "deeper" / OUT_NAME
    return Setup(train(ctx, out=out), expect="ok", check=lambda r: out.is_file())


# ---------------------------------------------------------------------------------------------------- faults


def failing_write(error: Exception):
    """A save that writes half its file, then fails as a full disk does."""
    def save(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise error
    return save


@case("faults", "disk full while writing")
def _(ctx):
    import safetensors

    error = safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return Setup(train(ctx), names=(OUT_NAME, "space"), patches=[(export, "save_file", failing_write(error))])


@case("faults", "read-only file system while writing")
def _(ctx):
    return Setup(train(ctx), names=(OUT_NAME,),
                 patches=[(export, "save_file", failing_write(OSError(30, "Read-only file system")))])


@case("faults", "a killed run's temporary file beside the output")
def _(ctx):
    stale = ctx.out_dir / f".{OUT_NAME}.abc12_xy.tmp"
    stale.write_bytes(b"half of a killed run's file")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    return Setup(train(ctx), expect="ok", check=lambda r: ctx.out.is_file() and not stale.exists(),
                 check_fails_as="partial")


@case("faults", "a killed run's lock file beside the output")
def _(ctx):
    (ctx.out_dir / f".{OUT_NAME}.lock").write_text("999999")
    return Setup(train(ctx), expect="ok", check=lambda r: ctx.out.is_file())


def exploding_loss():
    """The loss of a run whose weights blow up: 1.2 at the start, doubling each step (finite all the way)."""
    real, calls = loop.per_sample_loss, []

    def per_sample_loss(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs) * 2.0 ** len(calls)
    return per_sample_loss


@case("faults", "the loss explodes")
def _(ctx):
    return Setup(train(ctx, "--steps", "25"), names=("diverged", "lr"),
                 patches=[(loop, "per_sample_loss", exploding_loss())])


for _damage in ("random bytes", "truncated", "zero bytes"):
    @case("faults", f"cached class image {_damage}")
    def _(ctx, damage=_damage):
        cache = ctx.work("class-cache")
        prior = ["--class-prompt", "a photo of a dog", "--class-images", "2", "--class-sampler-steps", "1",
                 "--class-cache", cache]
        first = train(ctx, *prior, out=ctx.tmp / "work" / "first.safetensors")()
        assert first.rc == 0, first.err + first.exc
        png = sorted(cache.rglob("00001.png"))[0]
        content = png.read_bytes()
        png.write_bytes({"random bytes": os.urandom(len(content)), "truncated": content[: len(content) // 3],
                         "zero bytes": b""}[damage])

        def regenerated(_result):
            with Image.open(png) as image:
                image.load()
            return ctx.out.is_file()
        return Setup(train(ctx, *prior), expect="ok", check=regenerated)


# ---------------------------------------------------------------------------------------------------- metrics


def dino_score(ctx: Ctx, generated, reference=None, model=None, *extra):
    return lambda: run_cli("dino-score", "--model", model or ctx.dino, "--generated", generated,
                           "--reference", reference or ctx.photos, "--device", "cpu", "--json", *extra)


@case("metrics", "16-bit grayscale PNG scores as its 8-bit twin")
def _(ctx):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint16), (64, 1))
    generated, reference = ctx.work("gen16"), ctx.work("ref8")
    Image.fromarray(gradient * 257).save(generated / "gray16.png")  # mode I;16
    Image.fromarray(gradient.astype(np.uint8)).save(reference / "gray8.png")
    assert Image.open(generated / "gray16.png").mode.startswith("I")
    return Setup(dino_score(ctx, generated, reference), expect="ok",
                 check=lambda r: r.json["dino"] > 0.999)


for _name, _files in {"corrupt image": {"a.png": os.urandom(500)}, "zero-byte image": {"a.jpg": b""},
                      "gif named png": {"a.png": gif_bytes()}, "truncated png": {"a.png": truncated_png()},
                      "no images": {"a.txt": b"x"}}.items():
    @case("metrics", f"generated folder with a {_name}")
    def _(ctx, files=_files):
        folder = folder_with(ctx, "generated", files)
        return Setup(dino_score(ctx, folder), names=(str(folder),))


@case("metrics", "generated folder missing")
def _(ctx):
    return Setup(dino_score(ctx, ctx.tmp / "nowhere"), names=("nowhere",))


@case("metrics", "images over the decompression-bomb limit")
def _(ctx):
    return Setup(dino_score(ctx, ctx.photos), names=("0.png", "limit"),
                 patches=[(Image, "MAX_IMAGE_PIXELS", 1000)])


@case("metrics", "model path missing")
def _(ctx):
    return Setup(dino_score(ctx, ctx.photos, model=ctx.tmp / "no-dino"), names=("no-dino",))


@case("metrics", "model .pth of random bytes")
def _(ctx):
    path = ctx.work("m") / "dino_deitsmall16_pretrain.pth"
    path.write_bytes(os.urandom(1000))
    return Setup(dino_score(ctx, ctx.photos, model=path), names=(path.name,))


@case("metrics", "model .pth pickle with a class in it")
def _(ctx):
    path = pickle_file(ctx.work("m") / "dino_deitsmall16_pretrain.pth", {"x": NotAllowed()})
    return Setup(dino_score(ctx, ctx.photos, model=path), names=(path.name,))


@case("metrics", "model folder without weights")
def _(ctx):
    folder = ctx.work("m") / "dino-vits16"
    shutil.copytree(ctx.dino, folder)
    (folder / "model.safetensors").unlink()
    return Setup(dino_score(ctx, ctx.photos, model=folder), names=("dino",))


@case("metrics", "--batch-size 0")
def _(ctx):
    return Setup(dino_score(ctx, ctx.photos, None, None, "--batch-size", "0"), names=("batch size",))


# ---------------------------------------------------------------------------------------------------- other commands


@case("tools", "make-tiny-model --out is a file")
def _(ctx):
    ctx.out.write_text("x")
    return Setup(lambda: run_cli("make-tiny-model", "--out", ctx.out), names=(OUT_NAME,))


@case("tools", "make-tiny-model --out below a file")
def _(ctx):
    ctx.out.write_text("x")
    return Setup(lambda: run_cli("make-tiny-model", "--out", ctx.out / "model"), names=(OUT_NAME,))


@case("tools", "demo --out is a file")
def _(ctx):
    ctx.out.write_text("x")
    return Setup(lambda: run_cli("demo", "--out", ctx.out, "--steps-scale", "0.01"), names=(OUT_NAME,))


@case("tools", "load-subject of only broken files")
def _(ctx):
    folder = folder_with(ctx, "broken", {"a.png": b"", "b.jpg": os.urandom(100)})
    return Setup(lambda: run_cli("load-subject", folder, "--resolution", "64"), names=("a.png", "b.jpg"))


# ---------------------------------------------------------------------------------------------------- nodes


def node_module(name: str, ctx: Ctx):
    """A node module under a stand-in ComfyUI (tests/fake_comfy) whose input directory is ``ctx.tmp/input``."""
    try:
        import comfy_api.latest  # noqa: F401  (a real ComfyUI on the path)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).parent / "fake_comfy"))
    ctx.monkeypatch.setitem(sys.modules, "folder_paths", types.SimpleNamespace(
        get_input_directory=lambda: str(ctx.tmp / "input"), get_input_subfolders=lambda: ["subject"]))
    return pack(f"nodes.{name}")


def subject_node(ctx, files: dict[str, Path | None]):
    """LoadSubjectImages on input/subject holding ``files`` (a Path: a symlink to it; None: a good photo)."""
    node = node_module("load_subject_images", ctx).LoadSubjectImages
    folder = ctx.tmp / "input" / "subject"
    folder.mkdir(parents=True)
    for name, target in files.items():
        if target is None:
            write_png(folder / name)
        else:
            (folder / name).symlink_to(target)
    return lambda: node.execute("subject", resolution=64, fit="crop")


@case("nodes", "a photo symlinked from outside the input folder")
def _(ctx):
    outside = write_png(ctx.work("outside") / "secret.png")
    return Setup(lambda: run_call(subject_node(ctx, {"a.png": outside})), names=("a.png", "outside"))


@case("nodes", "a photo symlinked from outside, beside a good one")
def _(ctx):
    outside = write_png(ctx.work("outside") / "secret.png")
    run = subject_node(ctx, {"a.png": None, "b.png": outside})
    return Setup(lambda: run_call(lambda: run().outputs[1]), expect="ok", check=lambda r: r.out == "1")


@case("nodes", "a folder name leading outside the input folder")
def _(ctx):
    node = node_module("load_subject_images", ctx).LoadSubjectImages
    (ctx.tmp / "input").mkdir()
    return Setup(lambda: run_call(lambda: node.execute("../work", resolution=64, fit="crop")), names=("../work",))


def node_training(ctx: Ctx, name: str, **inputs):
    """What a trainer node does with its name and inputs (nodes.bridge.train_in_comfy without ComfyUI's models):
    its config from the inputs, ``Output.named`` in its model folder, ``train_or_reuse``."""
    run, models, schema = pack("trainers.run"), pack("trainers.models"), node_module("schema", ctx)

    def train_node():
        schema_config = schema.config_from_inputs(lora.LoRAConfig, {"steps": 1, "resolution": 64, "rank": 2,
                                                                    **inputs})
        output = run.Output.named(ctx.out_dir, name, ".safetensors", "rename")
        artifact = run.train_or_reuse(run.BaseModel.loaded(models.load_base(ctx.model["single_file"])),
                                      lora.LoRAMethod(schema_config), synthetic.subject_photos(2, 64), None,
                                      schema_config, output, device=torch.device("cpu"))
        return artifact.path
    return train_node


def portable_inside(ctx: Ctx) -> bool:
    """One file was written, inside the model folder, under a name every OS accepts (with room for the temporary
    name made while writing it)."""
    files = list(ctx.out_dir.iterdir())
    return len(files) == 1 and files[0].name.split(".")[0].strip().upper() not in {"CON", "NUL", "COM1", "AUX"} \
        and len(files[0].name.encode()) <= 255 - len("..XXXXXXXX.tmp")


for _label, _name in {"CON": "CON", "nul.txt": "nul.txt", "COM1": "COM1", "aux with spaces": " aux ",
                      "300 characters": "y" * 300, "200 accents": "é" * 200, "path parts": "../../escape/me"}.items():
    @case("nodes", f"name {_label}")
    def _(ctx, name=_name):
        return Setup(lambda: run_call(node_training(ctx, name)), expect="ok", check=lambda r: portable_inside(ctx))


@case("nodes", "name empty once sanitised")
def _(ctx):
    return Setup(lambda: run_call(node_training(ctx, "///")), names=("///",))


for _option in ("lr", "max_grad_norm", "alpha"):
    @case("nodes", f"option {_option} NaN")
    def _(ctx, option=_option):
        return Setup(lambda: run_call(node_training(ctx, "n", **{option: math.nan})), names=(option,))


@case("nodes", "a second run on the same name while the first trains")
def _(ctx):
    """Run A trains in a thread and waits inside its first step; run B on the same name must be refused."""
    run, models = pack("trainers.run"), pack("trainers.models")
    config = lora.LoRAConfig(steps=2, resolution=64, rank=2)
    started, release = threading.Event(), threading.Event()
    outcome = {}

    def first():
        def on_step(_info):
            started.set()
            release.wait(120)
        outcome["a"] = run_call(lambda: run.train_or_reuse(
            run.BaseModel.loaded(models.load_base(ctx.model["single_file"])), lora.LoRAMethod(config),
            synthetic.subject_photos(2, 64), None, config, run.Output.named(ctx.out_dir, "shared"),
            device=torch.device("cpu"), callbacks=loop.Callbacks(on_step=on_step)))

    def second() -> Result:
        thread = threading.Thread(target=first)
        thread.start()
        try:
            assert started.wait(120), "the first run never started training"
            return run_call(node_training(ctx, "shared"))
        finally:
            release.set()
            thread.join(120)
    # The first run's file appears when it finishes: only the second run's leftovers count.
    return Setup(second, names=("shared", "another run"), ignore=frozenset({"shared.safetensors"}))


# ---------------------------------------------------------------------------------------------------- signals

SUBPROCESS = r"""
import importlib, importlib.util, os, sys, time
repo, name, marker = sys.argv[1:4]
spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
mode = sys.argv[4]
if mode == "startup":  # python -m comfyui_personalize, interrupted while it imports torch
    import runpy
    print("importing", file=sys.stderr, flush=True)
    sys.argv = ["comfyui_personalize", *sys.argv[5:]]
    runpy.run_module(name + ".__main__", run_name="__main__")
else:  # a training run whose write of its file takes a few seconds, half-way through
    import torch
    torch.set_num_threads(1)
    export = importlib.import_module(name + ".trainers.export")
    real_save = export.save_file

    def slow_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        open(marker, "w").close()
        time.sleep(5)
        real_save(tensors, path, metadata=metadata)
    export.save_file = slow_save
    cli = importlib.import_module(name + ".cli")
    sys.exit(cli.main(sys.argv[5:]))
"""


def spawn(ctx: Ctx, mode: str, *argv) -> tuple[subprocess.Popen, Path]:
    marker = ctx.tmp / "marker"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", SUBPROCESS, str(REPO), PACK_NAME, str(marker), mode,
                                *map(str, argv)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env)
    return process, marker


def finish(process: subprocess.Popen, send=None) -> Result:
    if send is not None:
        process.send_signal(send)
    out, err = process.communicate(timeout=120)
    return Result(process.returncode, out, err)


@case("signals", "SIGTERM while the artifact is written")
def _(ctx):
    argv = ["train-lora", "--base", ctx.model["single_file"], "--images", ctx.photos, "--out", ctx.out, *FAST,
            *SMALL_LORA]

    def run() -> Result:
        process, marker = spawn(ctx, "write", *argv)
        deadline = time.time() + 240
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        return finish(process, signal.SIGTERM)
    # Either the write is abandoned (exit 143, no file) or finished first (exit 0, a complete file): never half.
    return Setup(run, expect="ok", rc=(0, 128 + signal.SIGTERM), check=lambda r: complete_or_absent(ctx.out))


def complete_or_absent(path: Path) -> bool:
    if not path.exists():
        return True
    try:
        return bool(load_file(path))
    except Exception:  # noqa: BLE001 - a half-written file is what this looks for
        return False


@case("signals", "Ctrl-C while the CLI starts")
def _(ctx):
    def run() -> Result:
        process, _ = spawn(ctx, "startup", "demo", "--out", ctx.work("demo"))
        assert process.stderr.readline().strip() == "importing"
        time.sleep(0.3)  # importing torch takes seconds: the signal arrives inside the imports
        return finish(process, signal.SIGINT)
    return Setup(run, expect="ok", rc=130)


# ---------------------------------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, ctx, monkeypatch):
    setup = CASES[case_id](ctx)
    before = snapshot(ctx.out_dir)
    for target, attribute, value in setup.patches:
        monkeypatch.setattr(target, attribute, value)
    result = setup.run()
    monkeypatch.undo()
    left = snapshot(ctx.out_dir) - before
    verdict = judge(setup, result, left)
    assert verdict == "ok", (f"{verdict}: {case_id}: exit {result.rc}; left {sorted(left)}; "
                             f"stderr {result.err[-600:]!r}; {result.exc[-1500:]}")


def test_the_table_covers_every_kind():
    kinds = {}
    for case_id in CASES:
        kind = case_id.split("/")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    assert set(kinds) == {"images", "base", "options", "output", "faults", "metrics", "tools", "nodes", "signals"}
    assert len(CASES) >= 140, kinds
