"""The options every trainer shares. Each method's config subclasses ``TrainConfig`` and overrides defaults.

Field names are the CLI flags (``batch_size`` → ``--batch-size``) and the node inputs; ``help`` is both the CLI help
and the node tooltip.
"""

from __future__ import annotations

from dataclasses import dataclass

from .optim import OPTIMIZERS
from .options import option

MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    prompt: str = option("a photo of sks dog", "instance prompt: a rare identifier (sks) followed by the subject's "
                         "class noun; a caption file next to an image is appended to it")
    steps: int = option(800, "optimizer steps", min=1, max=100_000)
    lr: float = option(1e-4, "learning rate", min=0.0, max=1.0, step=1e-6)
    batch_size: int = option(1, "images per step", min=1, max=64, advanced=True)
    resolution: int = option(512, "training resolution in pixels: the side of the square, and the area of the "
                             "aspect buckets", min=64, max=2048, step=8)
    seed: int = option(0, "seed for noise, timesteps and image order; the same seed repeats a run exactly on CPU",
                       min=0, max=MAX_SEED, advanced=True)
    optimizer: str = option("adamw", "adamw (8-bit from bitsandbytes on CUDA when use_8bit_adam is on and it is "
                            "installed); adamw8bit (needs bitsandbytes); adafactor (transformers); prodigy (needs "
                            "prodigyopt; it sets the step size itself: use lr 1.0)", choices=OPTIMIZERS, advanced=True)
    lr_scheduler: str = option("constant", "learning-rate schedule",
                               choices=("constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                        "polynomial"), advanced=True)
    lr_cycles: int = option(1, "hard restarts of the cosine_with_restarts schedule", min=1, max=100, advanced=True)
    lr_power: float = option(1.0, "power of the polynomial schedule (1 = linear decay)", min=0.1, max=10.0,
                             step=0.1, advanced=True)
    ema_decay: float = option(0.0, "exponential moving average of the trained weights, saved instead of the last "
                              "ones (0 = off; 0.999 is usual; warms up over the first steps; one more copy of the "
                              "trained weights in memory)", min=0.0, max=0.99999, step=0.0001, advanced=True)
    warmup_steps: int = option(0, "warm-up steps for the constant_with_warmup and cosine schedules",
                               min=0, max=100_000, advanced=True)
    gradient_accumulation: int = option(1, "micro-batches accumulated per optimizer step", min=1, max=64,
                                        advanced=True)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: much less memory, "
                                          "about 15-30% slower", advanced=True)
    mixed_precision: str = option("auto", "autocast on CUDA (auto = bf16 where supported, else fp16); CPU always "
                                  "trains in fp32", choices=("auto", "no", "fp16", "bf16"), advanced=True)
    use_8bit_adam: bool = option(True, "8-bit AdamW from bitsandbytes when it is installed and training runs on "
                                 "CUDA (plain AdamW otherwise)", advanced=True)
    min_snr_gamma: float = option(0.0, "min-SNR-gamma loss weighting (0 = off, 5 = the paper's value)",
                                  min=0.0, max=100.0, step=0.5, advanced=True)
    noise_offset: float = option(0.0, "noise offset (0.05-0.1 helps very dark or bright images)",
                                 min=0.0, max=1.0, step=0.01, advanced=True)
    bucketing: bool = option(True, "aspect-ratio buckets: each photo keeps its shape (cropped only to the nearest "
                             "size in multiples of 64 of about the resolution's area); off = center-cropped squares",
                             advanced=True)
    mask_floor: float = option(0.05, "masked loss: weight of the background (mask 0) relative to the subject "
                               "(mask 1); only used when masks are given", min=0.0, max=1.0, step=0.01,
                               advanced=True)
    caption_dropout: float = option(0.0, "share of steps that train on the prompt without the image's caption, so "
                                    "the trigger alone carries the subject", min=0.0, max=1.0, step=0.05,
                                    advanced=True)
    shuffle_tags: bool = option(False, "shuffle the comma-separated tags of prompt + caption, keeping the first "
                                "keep_tags in place", advanced=True)
    keep_tags: int = option(1, "tags that stay first when shuffling (1 = the prompt with the trigger, when it has "
                            "no comma)", min=0, max=100, advanced=True)
    flip: bool = option(False, "random horizontal flips (off: many subjects are not symmetric)", advanced=True)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 = off)", min=0.0, max=100.0, advanced=True)
    stop_on_divergence: bool = option(True, "stop the run, saving nothing, when its loss climbs above 10x where it "
                                      "started (averaged over 10 steps); off: train on and save it anyway",
                                      advanced=True)
    class_prompt: str = option("", "class prompt for prior preservation, e.g. 'a photo of a dog' "
                               "(empty = no prior preservation)")
    class_images: int = option(100, "number of class images generated with the base model for prior "
                               "preservation (the DreamBooth paper used about 1000)", min=1, max=10_000, advanced=True)
    prior_weight: float = option(1.0, "weight of the prior-preservation loss (the paper's lambda)",
                                 min=0.0, max=100.0, step=0.05, advanced=True)
    class_sampler_steps: int = option(25, "sampler steps per generated class image", min=1, max=200,
                                      advanced=True)
    class_guidance: float = option(7.5, "classifier-free guidance of the generated class images",
                                   min=1.0, max=30.0, step=0.5, advanced=True)
    train_text_encoder: bool = option(False, "also train the text encoder", advanced=True)
    text_encoder_lr: float = option(5e-5, "learning rate of the text encoder", min=0.0, max=1.0, step=1e-6,
                                    advanced=True)
    preview_every: int = option(0, "generate a preview image every N steps (0 = never)", min=0, max=100_000,
                                advanced=True)
    save_every: int = option(0, "every N steps, write a checkpoint <name>-step<N> (the result's format) and the "
                             "training state a resume continues from (0 = no checkpoints; the state is still saved "
                             "on cancel)", min=0, max=100_000, advanced=True)
    keep_last: int = option(0, "keep only this run's newest K checkpoints (0 = keep all)", min=0, max=10_000,
                            advanced=True)
    validate_every: int = option(0, "every N steps (and at the last), sample the validation prompts at fixed seeds "
                                 "and score them against the photos: DINO, CLIP-I and CLIP-T with their models, PRES "
                                 "with a class prompt (0 = no validation)", min=0, max=100_000, advanced=True)
    validation_prompts: str = option("", "validation prompts, one per line (empty: the instance prompt, and it 'on "
                                     "the beach' and 'in the jungle', as in the DreamBooth paper)", multiline=True,
                                     advanced=True)
    validation_images: int = option(2, "validation images per prompt (seeds seed, seed+1, ...)", min=1, max=16,
                                    advanced=True)
    validation_sampler_steps: int = option(25, "sampler steps per validation image", min=1, max=200, advanced=True)
    select_best: str = option("dino", "which validated step becomes the result: the highest DINO (subject "
                              "fidelity), CLIP-T (prompt following), balanced (DINO x CLIP-T, the paper's trade-off), "
                              "or the last step; dino falls back to last without a DINO model",
                              choices=("dino", "clip_t", "balanced", "last"), advanced=True)

    @property
    def prior_preservation(self) -> bool:
        return bool(self.class_prompt.strip()) and self.prior_weight > 0
