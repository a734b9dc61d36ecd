"""The one training loop. LoRA, DreamBooth and Textual Inversion differ only in their ``Method``: what is trainable
(with which learning rates), how prompts are encoded, and what is exported; model families only in their
``Family``: how prompts become conditioning and how the UNet takes it.

Per step: pick images (seeded), sample latents from the cached VAE posterior, add noise at random timesteps, predict
with the UNet, MSE against the target of the model's prediction type (ε or v), optionally min-SNR weighted; with prior
preservation the batch also holds as many class images, whose loss is added with weight λ (the DreamBooth paper's
objective). Everything the frozen parts compute (latents, and prompt embeddings when the text encoder is frozen) is
computed once. The loop runs under ``inference_mode(False)`` + ``enable_grad()`` so that it also trains when called
from inside ``torch.inference_mode()``, which is how ComfyUI runs nodes.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from PIL import Image

from .buckets import LatentCache, PreparedImages, square_images
from .captions import choose
from .components import Components
from .config import TrainConfig
from .device import free_memory, resolve_device
from .distributed import DataParallel
from .divergence import check_divergence
from .errors import PersonalizeError, TrainingCancelled
from .methods.base import Method


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float


@dataclass
class Callbacks:
    on_step: Callable[[StepInfo], None] | None = None
    on_preview: Callable[[int, Image.Image], None] | None = None
    should_stop: Callable[[], bool] | None = None
    # Progress of preparation work (class-image generation): (done, total, what).
    on_prepare: Callable[[int, int, str], None] | None = None
    # Each validation: its row of the table ({step, dino, clip_t, ..., best_step}) and its samples side by side.
    on_validation: Callable[[dict, Image.Image], None] | None = None

    def stop_requested(self) -> bool:
        return bool(self.should_stop and self.should_stop())


@dataclass
class LiveRun:
    """What the loop trains with, handed once to its ``StepHooks`` (which may save and restore all of it)."""
    components: Components
    method: Method
    config: TrainConfig
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scaler: torch.amp.GradScaler | None
    generator: torch.Generator
    history: dict[str, list[float]]  # losses, lrs, instance_losses, prior_losses: extended in place
    amp_dtype: torch.dtype | None
    callbacks: Callbacks


class StepHooks:
    """What the loop tells checkpointing, resume and validation (``state.TrainingSession``) at step boundaries.
    These do nothing: a plain run."""
    samples = False  # whether the hooks sample images (then training keeps the VAE and the text encoders)

    def attach(self, live: LiveRun) -> int:
        """Restore what a resume continues from; return the last step already done (0: a fresh run)."""
        return 0

    def step_started(self) -> None:
        pass

    def updating(self) -> None:
        """The weights are about to change (the optimizer step, or a backward pass that updates as it goes)."""

    def step_finished(self, step: int) -> None:
        pass

    def finished(self) -> None:
        pass

    def interrupted(self) -> None:
        pass


@dataclass
class TrainResult:
    losses: list[float]
    lrs: list[float]
    steps: int
    seconds_per_step: float
    startup_seconds: float
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    training_seconds: float = 0.0  # the steps this call ran (not startup, checkpoints or validation)
    # Set by run.personalize: the hash of every training input, stored in the artifact for reuse.
    input_fingerprint: str = ""
    # Set by state.TrainingSession when validation ran: the per-step table, the step exported and why.
    validation: list[dict] = field(default_factory=list)
    best_step: int | None = None
    selection: str = ""
    validation_seconds: float = 0.0
    # Set by run.personalize: the aspect buckets used (buckets.PreparedImages.report).
    buckets: list[dict] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail) if tail else float("nan")


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "fp16" or (config.mixed_precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


@torch.no_grad()
def encode_latent_posterior(vae, pixels: torch.Tensor, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for [B,3,H,W] pixels in -1..1, computed once per run.

    One image at a time by default: this runs once, so batching saves little time, while the VAE's activations grow
    with the batch (SD1.5 at 512 px in fp32: about 0.5 GB more per image) and could set the run's peak memory."""
    means, stds = [], []
    for chunk in pixels.split(batch_size):
        dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def denoising_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise PersonalizeError(f"unsupported prediction type {prediction!r} in the model's scheduler config")


def per_sample_loss(prediction, target, scheduler, timesteps, min_snr_gamma: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per sample; ``weights`` [b, 1, h, w] (masked loss) make it a weighted mean over the latent's pixels."""
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if weights is None:
        loss = squared.mean(dim=(1, 2, 3))
    else:
        weights = weights.expand_as(squared)
        loss = (squared * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    if min_snr_gamma > 0:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        # ε-prediction weights min(SNR, γ)/SNR; v-prediction's target already carries a factor SNR+1.
        weight = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
        loss = loss * weight
    return loss


@torch.no_grad()
def fixed_denoising_loss(components: Components, pixels: torch.Tensor, prompt: str, *, seed: int = 1234,
                         draws: int = 8) -> float:
    """The model's denoising loss on ``pixels`` ([B,3,R,R] in -1..1) over a fixed set of (timestep, noise) draws.

    The same seed gives the same draws, so before/after values of one run are directly comparable: a frozen model
    gives exactly the same number, and a trainer that learns the subject lowers it.
    """
    device = components.unet.device
    family = components.family
    generator = torch.Generator("cpu").manual_seed(seed)
    scheduler = components.noise_scheduler
    mean, _ = encode_latent_posterior(components.vae, pixels)
    latents = (mean * components.vae.config.scaling_factor).to(device)
    conditioning = family.encode(components, family.tokenize(components, [prompt]).to(device))
    conditioning = {k: v.expand(latents.shape[0], *v.shape[1:]) for k, v in conditioning.items()}
    total = 0.0
    for _ in range(draws):
        noise = torch.randn(latents.shape, generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator).to(device)
        prediction = family.denoise(components.unet, scheduler.add_noise(latents, noise, timesteps), timesteps,
                                    conditioning)
        target = denoising_target(scheduler, latents, noise, timesteps)
        total += F.mse_loss(prediction.float(), target.float()).item()
    return total / draws


def _cosine_or_constant(optimizer, config: TrainConfig):
    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.steps, num_cycles=config.lr_cycles, power=config.lr_power)


def train(components: Components, method: Method, instance_pixels: torch.Tensor | PreparedImages, captions: list[str],
          config: TrainConfig, *, class_pixels: torch.Tensor | None = None, device: torch.device | None = None,
          callbacks: Callbacks | None = None, release_frozen: bool = False,
          session: StepHooks | None = None) -> TrainResult:
    """Train ``components`` in place with ``method``. Pixels are [B,3,R,R] in -1..1 on any device, or photos in
    aspect buckets (``buckets.prepare_images``).

    ``release_frozen`` is for callers that discard the components after the export (the node, the CLI): once the
    latents (and, with a frozen text encoder, the prompt embeddings) are cached, training runs without the VAE and
    that text encoder (SD1.5 in fp32: ~0.8 GB). They are dropped from ``components``, or, when the export writes
    them (DreamBooth), moved off the GPU; previews and validation keep them where they are.

    ``session`` checkpoints, resumes and validates (``state.TrainingSession``)."""
    callbacks = callbacks or Callbacks()
    device = device or resolve_device()
    session = session or StepHooks()
    with torch.inference_mode(False), torch.enable_grad():
        hooks = []
        try:
            instances = square_images(instance_pixels.clone()) if torch.is_tensor(instance_pixels) \
                else instance_pixels
            return _train(components, method, instances, captions, config,
                          None if class_pixels is None else class_pixels.clone(), device, callbacks, release_frozen,
                          hooks, session)
        except torch.OutOfMemoryError:
            raise PersonalizeError(
                "out of GPU memory while training; turn on gradient_checkpointing, lower batch_size or resolution, "
                "install bitsandbytes for 8-bit AdamW, or train LoRA instead of the full model") from None
        except (TrainingCancelled, KeyboardInterrupt) as error:
            session.interrupted()  # saves the state to resume from
            error.__traceback__ = None
            raise error
        except PersonalizeError as error:
            # The traceback would keep the loop's frame, and with it the optimizer state, alive.
            error.__traceback__ = None
            raise error
        finally:
            for hook in hooks:
                hook.remove()
            free_memory()


def move_to(components: Components, device: torch.device) -> None:
    """UNet, VAE and text encoders to ``device``."""
    components.unet.to(device), components.vae.to(device)
    for _, encoder in components.family.text_encoders(components):
        encoder.to(device)


def _text_encoders_train(components: Components, training: bool, checkpointing: bool) -> None:
    for _, encoder in components.family.text_encoders(components):
        if checkpointing:
            # transformers 5 renamed it; older releases (ComfyUI installs vary) only have the old name.
            getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
        encoder.train(training)


def cast_frozen_weights(modules, dtype: torch.dtype) -> None:
    """Frozen weights only need to be read: keep them in half precision, trainable ones in fp32."""
    for module in modules:
        for parameter in module.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)


def cancel_checks(unet, callbacks: Callbacks, in_backward: bool = True) -> list:
    """Ask ``should_stop`` at every UNet block, in the forward pass and (through a hook on the block's output) in
    the backward pass, not only between steps: a step of a full model on a slow device can take many seconds, and
    Cancel should not wait for it. Not in a backward pass that updates weights as it goes (``in_backward`` off):
    stopping there would leave a half-updated model that no saved state could resume."""
    if callbacks.should_stop is None:
        return []

    def check(*_) -> None:
        if callbacks.stop_requested():
            raise TrainingCancelled()

    def watch_backward(_module, _args, output) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(tensor) and tensor.requires_grad:
            tensor.register_hook(check)  # returns None: the gradient passes unchanged

    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [hook for block in blocks for hook in (block.register_forward_pre_hook(check),
                                                  *([block.register_forward_hook(watch_backward)] if in_backward
                                                    else []))]


def _train(components, method, instance_pixels, captions, config, class_pixels, device, callbacks,
           release_frozen, hooks: list, session: StepHooks) -> TrainResult:
    """The run itself; hooks it registers go into ``hooks``, which ``train`` removes however the run ends."""
    started = time.perf_counter()
    if class_pixels is None and config.prior_preservation:
        raise PersonalizeError("prior preservation is on (class_prompt is set) but no class images were given")
    use_prior = class_pixels is not None and config.prior_preservation
    generator = torch.Generator("cpu").manual_seed(config.seed)
    scheduler = components.noise_scheduler
    family, unet = components.family, components.unet
    parallel = DataParallel(device)  # under accelerate launch; with one process every hook is the identity

    # Before prepare, so that a method can see where it trains (DreamBooth's bf16 needs CUDA). No local names for
    # the VAE and text encoders (loop variables included): one left bound would keep a module alive after
    # release_frozen drops it.
    move_to(components, device)
    torch.manual_seed(config.seed)  # adapters and new vectors are initialised from the global generator
    groups = method.prepare(components, config)
    trainable = [p for g in groups for p in g["params"]]
    if not trainable:
        raise PersonalizeError(f"{method.name}: nothing to train (every parameter is frozen)")
    if device.type == "cpu" and any(p.requires_grad and p.ndim == 4 for p in unet.parameters()):
        # Loading lays conv weights out channels_last, which speeds up frozen convolutions (LoRA, TI) on CPU; but
        # there the weight-gradient convolution is slower in that layout (SD1.5 DreamBooth at 64 px, measured:
        # 4.75 → 3.77 s/step, with prior preservation 10.0 → 7.3). GPUs keep channels_last.
        unet.to(memory_format=torch.contiguous_format)
    amp_dtype = autocast_dtype(config, device)
    if amp_dtype is not None:
        cast_frozen_weights([unet, components.vae] + [e for _, e in family.text_encoders(components)], amp_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    _text_encoders_train(components, method.trains_conditioning,
                         config.gradient_checkpointing and method.trains_conditioning)

    # Cached once: the frozen VAE's posterior of every image (and of its mirror image when flips are on).
    def posterior(pixels: torch.Tensor):
        mean, std = encode_latent_posterior(components.vae, pixels)
        if config.flip:
            flipped = encode_latent_posterior(components.vae, pixels.flip(-1))
            return torch.stack([mean, flipped[0]]), torch.stack([std, flipped[1]])
        return mean.unsqueeze(0), std.unsqueeze(0)

    instances = LatentCache(instance_pixels, posterior, config.flip, config.mask_floor)
    class_mean = class_std = None
    if use_prior:
        class_mean, class_std = posterior(class_pixels)
    scaling = components.vae.config.scaling_factor

    prompt_options = method.prompts(config, captions)
    uncaptioned = method.prompts(config, [""] * len(captions)) if config.caption_dropout else None
    all_prompts = sorted({p for options in prompt_options + (uncaptioned or []) for p in options} |
                         ({config.class_prompt} if use_prior else set()))
    prompt_index = {p: i for i, p in enumerate(all_prompts)}
    all_ids = family.tokenize(components, all_prompts)
    cached_conditioning = None
    if not method.trains_conditioning:
        with torch.no_grad():
            cached_conditioning = {k: v.detach() for k, v in method.encode(components, all_ids.to(device)).items()}
    if release_frozen and not (callbacks.on_preview and config.preview_every) and not session.samples:
        method.release_frozen(components, text_encoders=cached_conditioning is not None)
        free_memory()

    optimizer = method.make_optimizer(groups, config, device)
    lr_schedule = _cosine_or_constant(optimizer, config)
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    fused = method.attach_optimizer(optimizer, config, device, loss_scaled=scaler is not None)
    hooks += fused + cancel_checks(unet, callbacks, in_backward=not fused)
    parallel.refuse_fused_backward(fused)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext

    def predict(noisy, timesteps, prompt_ids):
        if cached_conditioning is not None:
            conditioning = {k: v[prompt_ids] for k, v in cached_conditioning.items()}
        else:
            conditioning = method.encode(components, all_ids[prompt_ids].to(device))
        return family.denoise(unet, noisy, timesteps, conditioning)

    predict = parallel.wrap(predict, [unet] + [encoder for _, encoder in family.text_encoders(components)])
    global_batch = parallel.global_batch(config.batch_size)

    def denoising_losses(mean, std, prompt_ids, weights, parts: int) -> torch.Tensor:
        """Per-sample losses of this process's rows of one UNet batch of ``parts`` equal groups (instance rows, then
        class rows)."""
        count = mean.shape[0]
        latents = (mean + std * torch.randn(mean.shape, generator=generator).to(device)) * scaling
        noise = torch.randn(latents.shape, generator=generator).to(device)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn((count, latents.shape[1], 1, 1),
                                                              generator=generator).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator).to(device)
        rows = parallel.local_rows(parts, latents, noise, timesteps, prompt_ids,
                                   *([] if weights is None else [weights]))
        latents, noise, timesteps, prompt_ids = rows[:4]
        weights = rows[4].to(device) if weights is not None else None
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = denoising_target(scheduler, latents, noise, timesteps)
        with autocast():
            prediction = predict(noisy, timesteps, prompt_ids)
        return per_sample_loss(prediction, target, scheduler, timesteps, config.min_snr_gamma, weights)

    losses, lrs, instance_losses, prior_losses, step_times = [], [], [], [], []
    history = dict(losses=losses, lrs=lrs, instance_losses=instance_losses, prior_losses=prior_losses)
    done = session.attach(LiveRun(components, method, config, trainable, optimizer, lr_schedule, scaler, generator,
                                  history, amp_dtype, callbacks))
    startup = time.perf_counter() - started
    for step in range(done + 1, config.steps + 1):
        if callbacks.stop_requested():
            raise TrainingCancelled()
        session.step_started()
        step_started = time.perf_counter()
        step_loss = step_instance = step_prior = 0.0
        for micro_batch in range(config.gradient_accumulation):
            parallel.sync_gradients(micro_batch == config.gradient_accumulation - 1)
            batch = instances.draw(generator, global_batch)
            mean, std, weights = batch.mean, batch.std, batch.weights
            prompt_ids = [prompt_index[choose(prompt_options[i], uncaptioned and uncaptioned[i],
                                              config.caption_dropout, generator)] for i in batch.indices]
            parts, groups = [], 1
            if use_prior:
                c_index = torch.randint(0, class_mean.shape[1], (global_batch,), generator=generator)
                c_view = torch.randint(0, class_mean.shape[0], (global_batch,), generator=generator)
                c_mean, c_std = class_mean[c_view, c_index], class_std[c_view, c_index]
                c_ids = [prompt_index[config.class_prompt]] * global_batch
                if c_mean.shape == mean.shape:  # one UNet batch
                    weights = None if weights is None else torch.cat([weights, torch.ones_like(weights)])
                    mean, std, prompt_ids = torch.cat([mean, c_mean]), torch.cat([std, c_std]), prompt_ids + c_ids
                    groups = 2
                else:  # a bucket of another size than the (square) class images: a second pass
                    parts.append((c_mean, c_std, c_ids, None, 1))
            per_sample = torch.cat([denoising_losses(*part)
                                    for part in [(mean, std, prompt_ids, weights, groups)] + parts])
            instance_term = per_sample[: config.batch_size].mean()
            loss = instance_term
            if use_prior:
                prior_term = per_sample[config.batch_size:].mean()
                loss = instance_term + config.prior_weight * prior_term
                step_prior += prior_term.detach() / config.gradient_accumulation
            loss = loss / config.gradient_accumulation
            if fused:
                session.updating()
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.detach()
            step_instance += instance_term.detach() / config.gradient_accumulation
        session.updating()
        if scaler:
            scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(components, step, config)
        if ema is not None:
            ema.step(trainable)
        parallel.after_step()
        step_loss, step_instance, step_prior = parallel.average(step_loss, step_instance, step_prior)

        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise PersonalizeError(f"the loss became {loss_value} at step {step}; training stopped and nothing was "
                                   f"saved. Lower the learning rate (lr is {config.lr:g}) or turn mixed precision "
                                   "off.")
        losses.append(loss_value)
        if config.stop_on_divergence:
            check_divergence(losses, config.lr)
        instance_losses.append(float(step_instance))
        if use_prior:
            prior_losses.append(float(step_prior))
        lrs.append(lr_schedule.get_last_lr()[0])
        step_times.append(time.perf_counter() - step_started)
        if callbacks.on_step:
            callbacks.on_step(StepInfo(step, config.steps, loss_value, lrs[-1]))
        if callbacks.on_preview and config.preview_every and step % config.preview_every == 0:
            callbacks.on_preview(step, preview(components, method.preview_prompt(config), config, amp_dtype))
        session.step_finished(step)
    if ema is not None:
        ema.copy_to(trainable)  # the averaged weights are the ones exported (a best step chosen below wins)
    session.finished()
    unet.eval()
    _text_encoders_train(components, False, False)
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    measured = step_times[1:] or step_times
    return TrainResult(losses=losses, lrs=lrs, steps=config.steps,
                       seconds_per_step=statistics.median(measured) if measured else 0.0,
                       startup_seconds=startup, instance_losses=instance_losses, prior_losses=prior_losses,
                       training_seconds=sum(step_times))


def preview(components: Components, prompt: str, config: TrainConfig, amp_dtype: torch.dtype | None) -> Image.Image:
    """A quick sample from the model as it is now (then back to training mode)."""
    from .sampling import sample_images

    was_training = components.unet.training
    components.unet.eval()
    try:
        with torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else nullcontext():
            return sample_images(components, [prompt], [config.seed], resolution=config.resolution, steps=20)[0]
    finally:
        components.unet.train(was_training)
