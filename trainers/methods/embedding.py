"""Textual Inversion (Gal et al. 2022): a new token whose N vectors are the only thing trained; the model stays frozen.

The token ``NAME`` with N vectors becomes the tokens ``NAME NAME_1 … NAME_{N-1}`` (diffusers' convention, which its
pipelines expand from ``NAME`` at prompt time). During training the new vectors live in their own Parameter,
spliced in by :class:`SplicedEmbedding`: the token table itself never reaches the optimizer, so not even AdamW's
weight decay can move another row. Export folds them into the table (the components then equal the base model
with the embedding loaded) and writes ``{"emb_params": [N, dim]}`` in fp32, which ComfyUI loads as
``embedding:<file name>``, A1111/Forge by file name, and diffusers with :func:`load_embedding`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..captions import compose, with_shuffling
from ..checkpoints import read_metadata
from ..components import Components
from ..config import TrainConfig
from ..errors import PersonalizeError
from ..export import IMPLEMENTATION_DIFFUSERS, modelspec_metadata, provenance_metadata, save_safetensors
from ..families import FAMILIES, TextEncoderSlot
from ..loop import TrainResult
from ..options import option
from .base import Method

# The paper's templates (ldm/data/personalized.py and personalized_style.py, duplicates removed).
TEMPLATES = {
    "object": [
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
        "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
        "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
        "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
        "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
        "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
        "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
    ],
    "style": [
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "the painting in the style of {}", "a clean painting in the style of {}",
        "a dirty painting in the style of {}", "a dark painting in the style of {}", "a picture in the style of {}",
        "a cool painting in the style of {}", "a close-up painting in the style of {}",
        "a bright painting in the style of {}", "a good painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
        "a weird painting in the style of {}", "a large painting in the style of {}",
    ],
}


def _not_applicable(default):
    return option(default, "not used by Textual Inversion", cli=False, node=False)


@dataclass
class EmbeddingConfig(TrainConfig):
    # Not a node input: in ComfyUI the file name is the word in prompts (embedding:<name>), so the node uses it.
    token: str = option("<subject>", "the new token (lowercase, no spaces, not a word the tokenizer already "
                        "knows); in ComfyUI the file is used as embedding:<file name>", node=False)
    init_word: str = option("object", "a coarse descriptor of the subject (e.g. 'cat', 'sculpture') the vectors "
                            "start from; a phrase of several tokens starts from the mean of their vectors")
    vectors: int = option(1, "vectors per token: more reproduce the subject more closely but follow prompts less "
                          "well; each takes one of the prompt's 75 token slots", min=1, max=16, advanced=True)
    templates: str = option("object", "training prompts: the paper's 'a photo of a {}' set for a subject, or its "
                            "'a painting in the style of {}' set for a style", choices=tuple(TEMPLATES), advanced=True)
    max_norm_ratio: float = option(2.0, "after each step, cap each new vector's length at this multiple of the "
                                   "mean length of the existing token vectors, so that the token cannot drown out "
                                   "the rest of a prompt (0 = no cap)",
                                   min=0.0, max=100.0, step=0.1, advanced=True)
    steps: int = option(2000, "optimizer steps (1500-3000 is typical)", min=1, max=100_000)
    lr: float = option(5e-3, "learning rate of the new vectors", min=0.0, max=1.0, step=1e-5)
    # Inherited options that do not apply: the prompts come from the templates, and the whole model (text encoder
    # included) stays frozen, so there is no text-encoder training and no prior to preserve.
    prompt: str = _not_applicable("")
    train_text_encoder: bool = _not_applicable(False)
    text_encoder_lr: float = _not_applicable(0.0)
    class_prompt: str = _not_applicable("")
    class_images: int = _not_applicable(0)
    prior_weight: float = _not_applicable(0.0)
    class_sampler_steps: int = _not_applicable(0)
    class_guidance: float = _not_applicable(1.0)


def token_names(token: str, vectors: int) -> list[str]:
    """``NAME NAME_1 … NAME_{N-1}``: one tokenizer entry per vector, as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_token_name(token: str) -> None:
    if not token or token.split() != [token]:
        raise PersonalizeError(f"token {token!r} must be one word without spaces, e.g. '<my-toy>'")
    if token != token.lower():
        # CLIP lowercases prompts, and diffusers' expansion of a multi-vector token only finds lowercase names.
        raise PersonalizeError(f"token {token!r} must be lowercase; use {token.lower()!r}")


def _taken(vocab: dict, token: str, vectors: int) -> bool:
    # CLIP spells a whole word with the end-of-word mark: "dog</w>".
    return any(name in vocab or f"{name}</w>" in vocab for name in token_names(token, vectors))


def refuse_known_token(tokenizer, token: str, vectors: int) -> None:
    """A name the tokenizer already knows would change the meaning of every prompt that contains that word."""
    vocab = tokenizer.get_vocab()
    if _taken(vocab, token, vectors):
        stem = token.strip("<>")
        free = next(c for c in itertools.chain([f"<{stem}>"], (f"<{stem}-{i}>" for i in itertools.count(2)))
                    if not _taken(vocab, c, vectors))
        raise PersonalizeError(f"token {token!r} is already a word or token in the tokenizer; choose a new name, "
                               f"e.g. {free!r}")


def init_vector(tokenizer, table: torch.Tensor, init_word: str) -> torch.Tensor:
    """The init word's token vector, or the mean of its token vectors when it is several tokens ("teddy bear", or a
    word this tokenizer splits into pieces): a mean stays among the token vectors, where the text encoder expects
    its inputs, and does not favour one piece. Refusing would make many natural descriptors unusable."""
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not ids:
        raise PersonalizeError(f"init word {init_word!r} has no tokens; give a coarse descriptor such as 'toy'")
    return table[ids].float().mean(dim=0)


class SplicedEmbedding(nn.Module):
    """The frozen token table, with ids from ``table.num_embeddings`` on read from a separate Parameter."""

    def __init__(self, table: nn.Embedding, vectors: nn.Parameter):
        super().__init__()
        self.table = table
        self.vectors = vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        known = self.table.num_embeddings
        new = input_ids >= known
        base = self.table(input_ids.masked_fill(new, 0))
        added = self.vectors.to(base.dtype)[(input_ids - known).clamp(min=0)]
        return torch.where(new.unsqueeze(-1), added, base)

    def folded(self) -> nn.Embedding:
        weight = torch.cat([self.table.weight.detach(), self.vectors.detach().to(self.table.weight.dtype)])
        return nn.Embedding.from_pretrained(weight, freeze=True)


class EmbeddingMethod(Method):
    """Only the new vectors (one set per text encoder of the family) are trained. The text encoders run every step,
    since their output depends on the vectors, but all their weights stay frozen."""

    name = "embedding"
    trains_conditioning = True

    def __init__(self, config: EmbeddingConfig):
        check_token_name(config.token)  # before any model is loaded
        # Per text encoder: its slot, the splice holding its new vectors, and their length cap.
        self.splices: list[tuple[TextEncoderSlot, SplicedEmbedding, float]] = []

    def prepare(self, components: Components, config: EmbeddingConfig) -> list[dict]:
        encoders = components.family.text_encoders(components)
        for module in (components.unet, components.vae, *(encoder for _, encoder in encoders)):
            module.requires_grad_(False)
        names = token_names(config.token, config.vectors)
        self.splices = []
        for slot, encoder in encoders:
            tokenizer = getattr(components, slot.tokenizer)
            refuse_known_token(tokenizer, config.token, config.vectors)
            table = encoder.get_input_embeddings()
            weight = table.weight.detach()
            start = init_vector(tokenizer, weight, config.init_word)
            tokenizer.add_tokens(names)
            # The splice reads ids from the table's end on; a tokenizer out of step with the table would misplace
            # them.
            first = table.num_embeddings
            if tokenizer.convert_tokens_to_ids(names) != list(range(first, first + config.vectors)):
                raise PersonalizeError(f"the tokenizer ({len(tokenizer)} tokens) does not match the text encoder's "
                                       f"token table ({first} rows); load the model afresh")
            spliced = SplicedEmbedding(table, nn.Parameter(start.repeat(config.vectors, 1)))
            encoder.set_input_embeddings(spliced)
            # Real token vectors have similar lengths. At lr 5e-3 Adam moves every coordinate by up to ~lr per step
            # (a length change of up to lr·√768 ≈ 0.14 per step for SD1.5), and weight decay is far too weak to stop
            # it: unchecked, the vectors grow until they drown out the rest of the prompt in cross-attention (the
            # "overtrained embedding" that ignores prompts). 2× the mean leaves room for a subject more specific
            # than any one word while keeping the token at the scale of the words around it.
            max_norm = config.max_norm_ratio * float(weight.float().norm(dim=1).mean())
            self.splices.append((slot, spliced, max_norm))
        return [{"params": [spliced.vectors for _, spliced, _ in self.splices], "lr": config.lr}]

    def after_step(self, components: Components, step: int, config: EmbeddingConfig) -> None:
        with torch.no_grad():
            for _, spliced, max_norm in self.splices:
                if max_norm > 0:
                    spliced.vectors.renorm_(2, 0, max_norm)

    def prompts(self, config: EmbeddingConfig, captions: list[str]) -> list[list[str]]:
        placeholder = " ".join(token_names(config.token, config.vectors))
        options = [t.format(placeholder) for t in TEMPLATES[config.templates]]
        return with_shuffling([[compose(p, c) for p in options] for c in captions], config)

    def preview_prompt(self, config: EmbeddingConfig) -> str:
        return compose(TEMPLATES[config.templates][0].format(" ".join(token_names(config.token, config.vectors))), "")

    def export(self, components: Components, config: EmbeddingConfig, result: TrainResult,
               path: Path) -> tuple[Path, dict[str, str]]:
        written = self.checkpoint(components, config, result, path)
        for slot, spliced, _ in self.splices:
            # From here on the components are the base model with this embedding loaded, as load_embedding gives it.
            encoder = getattr(components, slot.encoder)
            encoder.set_input_embeddings(spliced.folded())
            encoder.config.vocab_size = encoder.get_input_embeddings().num_embeddings
        return written

    def checkpoint(self, components: Components, config: EmbeddingConfig, result: TrainResult,
                   path: Path) -> tuple[Path, dict[str, str]]:
        tensors = {slot.embedding_key: spliced.vectors.detach().float().cpu() for slot, spliced, _ in self.splices}
        metadata = embedding_metadata(components, config, result, path)
        return save_safetensors(tensors, path, metadata), metadata


def embedding_metadata(components: Components, config: EmbeddingConfig, result: TrainResult,
                       path: Path) -> dict[str, str]:
    return {
        **provenance_metadata("embedding", components.name, components.fingerprint, config, result),
        "personalize.token": config.token,
        "personalize.init_word": config.init_word,
        "personalize.vectors": str(config.vectors),
        "personalize.steps": str(result.steps),
        "personalize.templates": config.templates,
        **modelspec_metadata(f"{components.family.modelspec(components.prediction_type)}/textual-inversion",
                             IMPLEMENTATION_DIFFUSERS, path.stem, config.resolution, config.token,
                             components.prediction_type),
    }


def load_embedding(pipeline, path: str | Path, token: str | None = None):
    """Load an embedding file into a diffusers pipeline (outside ComfyUI: tests, demo, benchmarks).

    ``token`` defaults to the one the file was trained with. An N-vector file adds ``token token_1 …``; the
    pipeline expands ``token`` in prompts to all of them (``pipeline.maybe_convert_prompt``), so prompts name only
    ``token`` — a tokenizer used directly must be given the expanded form. A file with vectors for several text
    encoders (SDXL's ``clip_l`` and ``clip_g``) loads each set into its encoder.
    """
    from safetensors.torch import load_file

    token = token or read_metadata(path).get("personalize.token") or Path(path).stem
    tensors = load_file(str(path))
    if len(tensors) == 1:
        pipeline.load_textual_inversion(str(path), token=token)
        return pipeline
    slots = {slot.embedding_key: slot for family in FAMILIES for slot in family.text_encoder_slots}
    for key, vectors in tensors.items():
        slot = slots[key]
        pipeline.load_textual_inversion(vectors, token=token, text_encoder=getattr(pipeline, slot.encoder),
                                        tokenizer=getattr(pipeline, slot.tokenizer))
    return pipeline
