"""Does each trainer learn the subject? The learning check, and proof that it catches broken trainers.

The check: the denoising loss on the subject photos at a fixed set of (timestep, noise) draws
(``loop.fixed_denoising_loss``), after / before a short training run, must be clearly below 1; for the full
fine-tune and LoRA, the same loss on photos of *other* toys in *other* scenes must drop much less (the model learned
this subject, not "images"). A frozen trainer gives exactly 1.000.

The model is the toy world's ``MINI`` (``bench/quality/toymodel.py``): the tiny SD1.x architecture, v-prediction, a
random VAE encoder scaled so that its latents carry the image at unit variance, and a few seconds of pretraining on
captioned toy photos, so that the losses start from a model that already denoises in general. (On the random-weight
tiny model every photo looks alike to the UNet: its VAE posterior is almost pure noise, and subject and other photos
then drop by the same amount.) It is built once per module (~8 s) and loaded through the pack's own loader (a
diffusers folder) for every run.

Each broken variant is made here, in the test, and only while training runs (the measurement after it uses the real
code): frozen parameters (a Method whose prepare freezes everything and hands the optimizer a dummy), the wrong
target for the prediction type (``loop.denoising_target``), timesteps stuck at 0 (the scheduler config the loop
draws timesteps from), and no noise (``add_noise`` adds none). Each must fail the check.

Textual Inversion moves one token vector, and so little text reaches this tiny UNet that its ratio is only just
below 1 (about 0.9996): its check here is that ratio together with structural checks (the token table grew by one row,
every other weight is bit-identical, the new row moved), and only the frozen variant is asserted to fail.

On the pretrained toy model shipped with the pack (``trainers/testing/toy_model/``) the checks measure what the
trainers are for: samples of the trained prompt must look like the subject to the toy world's feature network
(``metrics.dino_score`` against the subject photos) clearly more than the base model's samples do, for each trainer;
a frozen trainer gives the base model's samples (Textual Inversion's frozen "toy" vector: those of "a photo of a
toy") and fails. (The denoising-loss ratio does not tell Textual Inversion from its broken variants on this model:
timesteps pinned at 0 give 0.9985, no noise 0.9997, against 0.965 working.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from torch import nn

from conftest import pack

loop = pack("trainers.loop")
run = pack("trainers.run")
data = pack("trainers.data")
models = pack("trainers.models")
dreambooth = pack("trainers.methods.dreambooth")
lora = pack("trainers.methods.lora")
embedding = pack("trainers.methods.embedding")
metrics = pack("trainers.metrics")
sampling = pack("trainers.sampling")
testing = pack("trainers.testing")
world = pack("trainers.testing.toyworld")
toyfeatures = pack("trainers.testing.toyfeatures")
toymodel = pack("bench.quality.toymodel")

CPU = torch.device("cpu")
RESOLUTION = 32
PROMPT = "a photo of sks toy"
TOKEN = "<tok>"
TI_PROMPT = f"a photo of a {TOKEN}"
TI_BEFORE_PROMPT = "a photo of a toy"  # the new vector starts as "toy"'s: the same conditioning before training

SUBJECT = world.instance_photos(4, RESOLUTION, seed=0)[0]
OTHER = world.other_photos(4, RESOLUTION, seed=0)[0]  # other toys, none sharing its shape or colour, other scenes

# Limits of the check, per trainer: the after/before ratio on the subject must be below MAX_RATIO; and, where given,
# the drop on the other photos may be at most OTHER_SHARE of the drop on the subject.
# Textual Inversion: any drop on MINI (with the structural checks; its fidelity check is on the shipped toy model).
MAX_RATIO = {"dreambooth": 0.95, "lora": 0.96, "embedding": 1.0}
OTHER_SHARE = {"dreambooth": 0.5, "lora": 0.5}


def configs():
    common = dict(resolution=RESOLUTION, seed=0, steps=40, batch_size=4, mixed_precision="no")
    return {
        "dreambooth": (dreambooth.DreamBoothMethod,
                       dreambooth.DreamBoothConfig(prompt=PROMPT, class_prompt="", lr=3e-4,
                                                   gradient_checkpointing=False, save_precision="fp32", **common)),
        "lora": (lora.LoRAMethod, lora.LoRAConfig(prompt=PROMPT, lr=1e-2, rank=8, alpha=8.0,
                                                  unet_targets="attention+projections+feedforward",
                                                  save_precision="fp32", **common)),
        "embedding": (embedding.EmbeddingMethod,
                      embedding.EmbeddingConfig(token=TOKEN, init_word="toy", lr=5e-2, **common)),
    }


@pytest.fixture(scope="module")
def mini_model(tmp_path_factory) -> str:
    return toymodel.make_toy_model(tmp_path_factory.mktemp("mini-toy"), toymodel.MINI, log=lambda *_: None)["path"]


@dataclass
class Learning:
    subject: float  # after / before, subject photos
    other: float  # after / before, other photos
    components: object
    before: object
    artifact: object

    def failures(self, trainer: str) -> list[str]:
        """Why the learning check fails ([] when it passes)."""
        problems = []
        if not self.subject < MAX_RATIO[trainer]:
            problems.append(f"subject loss ratio {self.subject:.3f} is not below {MAX_RATIO[trainer]}")
        share = OTHER_SHARE.get(trainer)
        if share is not None and (1 - self.other) > share * (1 - self.subject):
            problems.append(f"the loss on other photos dropped too ({self.other:.3f} vs {self.subject:.3f} on the "
                            "subject): it learned images, not this subject")
        return problems


def learn(model, tmp_path, trainer: str, method_class=None, breakage=contextlib.nullcontext,
          **overrides) -> Learning:
    method_type, config = configs()[trainer]
    config = dataclasses.replace(config, **overrides)
    method = (method_class or method_type)(config)
    components = models.load_base(model)
    before = models.load_base(model) if trainer == "embedding" else None
    subject = data.images_to_training_pixels(SUBJECT, RESOLUTION)
    other = data.images_to_training_pixels(OTHER, RESOLUTION)
    before_prompt, after_prompt = (TI_BEFORE_PROMPT, TI_PROMPT) if trainer == "embedding" else (PROMPT, PROMPT)
    subject_before = loop.fixed_denoising_loss(components, subject, before_prompt)
    other_before = loop.fixed_denoising_loss(components, other, before_prompt)
    with breakage(components):
        artifact = run.personalize(components, method, SUBJECT, None, config, tmp_path / f"{trainer}.safetensors",
                                   device=CPU)
    learning = Learning(subject=loop.fixed_denoising_loss(components, subject, after_prompt) / subject_before,
                        other=loop.fixed_denoising_loss(components, other, after_prompt) / other_before,
                        components=components, before=before, artifact=artifact)
    variant = "frozen" if method_class else getattr(breakage, "__name__", "")
    print(f"learning check {trainer} {variant}: subject {learning.subject:.4f}, other {learning.other:.4f}")
    return learning


# ---------------------------------------------------------------------------------------------------- breakages

def frozen(method_type):
    """The method, except that its prepare freezes everything and hands the optimizer a dummy parameter (which
    the loss touches, times zero, so that backward still runs)."""

    class Frozen(method_type):
        def prepare(self, components, config):
            super().prepare(components, config)
            for module in (components.unet, components.vae, components.text_encoder):
                module.requires_grad_(False)
            self.dummy = nn.Parameter(torch.zeros(()))
            self.trains_conditioning = True  # prompts encoded each step, so the dummy is in the graph
            return [{"params": [self.dummy], "lr": config.lr}]

        def encode(self, components, input_ids):
            return {k: v + 0 * self.dummy for k, v in super().encode(components, input_ids).items()}

    return Frozen


@contextlib.contextmanager
def wrong_target(components):
    """ε as the target of a v-prediction model (and v for an ε model)."""
    original = loop.denoising_target

    def swapped(scheduler, latents, noise, timesteps):
        if scheduler.config.prediction_type == "v_prediction":
            return noise
        return scheduler.get_velocity(latents, noise, timesteps)

    loop.denoising_target = swapped
    try:
        yield
    finally:
        loop.denoising_target = original


@contextlib.contextmanager
def timesteps_at_zero(components):
    """The loop draws timesteps from [0, num_train_timesteps): make that range [0, 1)."""
    scheduler = components.noise_scheduler
    original = scheduler._internal_dict
    scheduler._internal_dict = FrozenDict({**original, "num_train_timesteps": 1})
    seen = []
    hook = components.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    try:
        yield
    finally:
        scheduler._internal_dict = original
        hook.remove()
    assert seen and all((t == 0).all() for t in seen), "the patch should have pinned every timestep to 0"


@contextlib.contextmanager
def no_noise(components):
    """``add_noise`` scales the latents but adds no noise (the target still expects it)."""
    scheduler = components.noise_scheduler
    original = scheduler.add_noise
    scheduler.add_noise = lambda latents, noise, timesteps: original(latents, torch.zeros_like(noise), timesteps)
    try:
        yield
    finally:
        del scheduler.add_noise


BREAKAGES = {"wrong_target": wrong_target, "timesteps_at_zero": timesteps_at_zero, "no_noise": no_noise}


# ---------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("trainer", ["dreambooth", "lora"])
def test_fine_tuning_learns_this_subject_not_just_images(mini_model, tmp_path, trainer):
    learning = learn(mini_model, tmp_path, trainer)
    assert learning.failures(trainer) == [], (learning.subject, learning.other)


def test_textual_inversion_lowers_the_subject_loss_by_changing_only_the_new_row(mini_model, tmp_path):
    learning = learn(mini_model, tmp_path, "embedding")
    assert learning.failures("embedding") == [], learning.subject
    assert learning.artifact.path.is_file()
    # Structure: the token table grew by exactly one row, the old rows and every other weight are untouched, and
    # the new row moved away from its initial value (the "toy" vector).
    trained, base = learning.components, learning.before
    old_table = base.text_encoder.get_input_embeddings().weight
    new_table = trained.text_encoder.get_input_embeddings().weight
    assert new_table.shape[0] == old_table.shape[0] + 1
    assert torch.equal(new_table[:-1], old_table)
    toy_row = old_table[base.tokenizer.convert_tokens_to_ids("toy</w>")]
    assert not torch.allclose(new_table[-1], toy_row)
    for name in ("unet", "vae", "text_encoder"):
        before = {k: v for k, v in getattr(base, name).state_dict().items() if "token_embedding" not in k}
        after = getattr(trained, name).state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items()), f"{name} weights changed"


@pytest.mark.parametrize("trainer", ["dreambooth", "lora", "embedding"])
def test_a_frozen_trainer_fails_the_check_with_a_ratio_of_exactly_one(mini_model, tmp_path, trainer):
    method_type, _ = configs()[trainer]
    learning = learn(mini_model, tmp_path, trainer, method_class=frozen(method_type))
    assert learning.subject == 1.0 and learning.other == 1.0
    assert learning.failures(trainer)


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("trainer", ["dreambooth", "lora"])
def test_a_broken_trainer_fails_the_check(mini_model, tmp_path, trainer, breakage):
    learning = learn(mini_model, tmp_path, trainer, breakage=BREAKAGES[breakage])
    assert learning.failures(trainer), (learning.subject, learning.other)


# ---------------------------------------------------------------------------------------------------- toy model

@pytest.fixture(scope="module")
def toy_model():
    """The pretrained toy model shipped with the pack (``trainers/testing/toy_model/``)."""
    return testing.TOY_MODEL / "model.safetensors"


# ---------------------------------------------------------------------------------------------------- fidelity

# The quality benchmark's settings for the toy model (bench/quality/benchmark.py), with fewer steps and no prior
# preservation, so that each check fits in well under a minute on one core.
TOY_FIDELITY = {
    "dreambooth": dict(lr=5e-4, steps=50),
    "lora": dict(lr=3e-3, rank=16, alpha=16.0, steps=80),
    "embedding": dict(lr=0.2, steps=100),
}
FIDELITY_SEEDS = [11, 12, 13, 14, 15, 16]
MIN_FIDELITY_GAIN = 0.1  # over the base model, in cosine of the feature network's embeddings


@pytest.fixture(scope="module")
def toy_embedder():
    return toyfeatures.load_toy_embedder(testing.TOY_MODEL / "features.safetensors")


def subject_fidelity(components, prompt: str, embedder) -> float:
    """The DINO score, with the toy feature network, of samples of ``prompt`` against the subject photos."""
    samples = sampling.sample_images(components, [prompt] * len(FIDELITY_SEEDS), FIDELITY_SEEDS,
                                     resolution=RESOLUTION, steps=10, guidance=5.0)
    return metrics.dino_score(embedder, samples, SUBJECT).score


@pytest.fixture(scope="module")
def base_fidelity(toy_model, toy_embedder) -> float:
    return subject_fidelity(models.load_base(toy_model), PROMPT, toy_embedder)


# A frozen full fine-tune samples exactly what a frozen LoRA does (the base model): one of the two is enough.
@pytest.mark.parametrize("trainer, variant", [("dreambooth", "working"), ("lora", "working"), ("lora", "frozen"),
                                              ("embedding", "working"), ("embedding", "frozen")])
def test_each_trainer_raises_subject_fidelity_over_the_base(toy_model, toy_embedder, base_fidelity, tmp_path,
                                                            trainer, variant):
    """Samples of the trained prompt look like the subject (to the feature network) clearly more than the base
    model's do; a frozen trainer's are the base model's own samples."""
    method_type, _ = configs()[trainer]
    learning = learn(toy_model, tmp_path, trainer, method_class=frozen(method_type) if variant == "frozen" else None,
                     **TOY_FIDELITY[trainer])
    fidelity = subject_fidelity(learning.components, TI_PROMPT if trainer == "embedding" else PROMPT, toy_embedder)
    print(f"fidelity {trainer} {variant}: {fidelity:.3f} (base {base_fidelity:.3f})")
    if variant == "working":
        assert fidelity > base_fidelity + MIN_FIDELITY_GAIN, (fidelity, base_fidelity)
    else:
        assert fidelity <= base_fidelity + MIN_FIDELITY_GAIN, (fidelity, base_fidelity)


def test_the_shipped_toy_model_is_the_one_the_current_code_describes():
    """The benchmark uses the shipped files only while their recipe matches the code (else it pretrains for an hour
    and a half): a change to the toy model's spec, the toy world or the feature network must ship new files, or at
    least a recipe.json that says they still fit."""
    assert pack("bench.quality.assets").shipped_recipe() is not None


def test_validation_dino_rises_over_the_steps_on_the_pretrained_toy_model(toy_model, toy_embedder, base_fidelity,
                                                                         tmp_path):
    """Validation during a DreamBooth run scores the subject ever more like the photos (the toy feature network as
    its DINO model), and the best step it picks is a late one, well above the base model."""
    method_type, config = configs()["dreambooth"]
    config = dataclasses.replace(config, **TOY_FIDELITY["dreambooth"], validate_every=5, validation_images=2,
                                 validation_sampler_steps=10)
    artifact = run.personalize(models.load_base(toy_model), method_type(config), SUBJECT, None, config,
                               tmp_path / "validated.safetensors", device=CPU, dino=toy_embedder)
    table = artifact.result.validation
    dino = [row["dino"] for row in table]
    print("validation DINO by step:", [(row["step"], round(row["dino"], 3)) for row in table])
    assert [row["step"] for row in table] == list(range(5, 55, 5))
    early, late = sum(dino[:3]) / 3, sum(dino[-3:]) / 3
    assert late > early + 0.05, (early, late)
    assert artifact.result.best_step >= 25 and max(dino) > base_fidelity + MIN_FIDELITY_GAIN
