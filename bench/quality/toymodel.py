"""A small SD1.x-shaped model pretrained on the toy world, built and trained with the pack's own code.

* The shapes come from the pack's shipped SD1.5 configs with only the sizes the single-file loader reads back from
  the weights changed, so ``models.save_single_file`` + ``models.load_base`` round-trip it, and every trainer of the
  pack trains it unchanged.
* The VAE is trained to reconstruct toy photos (2x downsampling: a 32 px photo is a 4x16x16 latent; ~25.6 dB PSNR),
  then its latent is rescaled exactly (encoder output and decoder input) so that SD1's fixed ``scaling_factor``
  0.18215 gives unit-variance latents, as the loader and trainers assume.
* UNet and CLIP text encoder are trained together from scratch on captioned toy photos, **v-prediction** (briefly
  trained ε-prediction models sample noise; v works), with an exponential moving average of the weights. Three
  things make a model trained for minutes follow words: token vectors initialised ~1 long (CLIP's 0.02 init left
  "a photo of sks toy" and "a photo of a toy" 99% alike after training), cross-attention outputs initialised 3x
  larger, and half of the timesteps drawn from the noisiest 60%, where the caption is what the model has to go on.
  That last part needs its own loop (``pretrain_biased``: the pack's loop draws timesteps uniformly); ``MINI`` uses
  the pack's loop (``loop.train`` with ``PretrainMethod``).

``MINI`` is the test suite's version: the tiny architecture, a random encoder (group norm over all channels, so that
colour survives) scaled to carry the image at unit variance (no decoder needed: the learning checks never decode),
and ~8 s of pretraining. It is written as a diffusers folder (its VAE's group count differs from SD1.5's, which a
single file cannot carry); ``TOY`` as a single file.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import world
from .pack import trainer

loop = trainer("loop")
models = trainer("models")
base = trainer("methods.base")
clip = trainer("families.clip")
components_module = trainer("components")
families = trainer("families")
sd15 = trainer("families.sd15")
config_module = trainer("config")
data = trainer("data")
tokenizer_module = trainer("testing.tokenizer")


RECIPE = "4"  # the pretraining recipe's version: part of the cache key


@dataclass(frozen=True)
class ToySpec:
    name: str
    resolution: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_attention: tuple[bool, ...]  # cross-attention per level
    text_hidden: int  # a multiple of 12 (SD1.5's head count, which the loader keeps)
    text_layers: int
    text_positions: int
    vae_channels: tuple[int, ...]  # 2 ** (len - 1) is the downsampling factor
    vae_layers: int
    latent_channels: int
    vae_norm_groups: int
    caption_keep: float  # probability that a caption names each attribute
    cross_attention_gain: float  # initial scale of the cross-attention outputs
    high_noise: float  # share of steps drawing timesteps from the noisier 60% (0: the pack's loop)
    # Pretraining
    images: int
    steps: int
    batch_size: int
    lr: float
    ema: float
    vae_steps: int  # 0: random encoder rescaled to carry the image (no decoder training)
    seed: int = 0

    def fingerprint(self) -> str:
        """Changes with the spec, the toy world's code and ``RECIPE`` (bump it when the training code changes)."""
        import hashlib

        payload = json.dumps(asdict(self), sort_keys=True) + RECIPE + Path(world.__file__).read_text()
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


TOY = ToySpec(name="toy-sd15", resolution=32, unet_channels=(32, 64, 128), unet_layers=1,
              unet_attention=(False, True, True), text_hidden=96, text_layers=3, text_positions=24,
              vae_channels=(32, 32), vae_layers=1, latent_channels=4, vae_norm_groups=32, caption_keep=0.8,
              cross_attention_gain=3.0, high_noise=0.5, images=10000, steps=4000, batch_size=32, lr=1e-3,
              ema=0.999, vae_steps=1600)
MINI = ToySpec(name="mini-toy-sd15", resolution=32, unet_channels=(32, 64), unet_layers=1,
               unet_attention=(True, False), text_hidden=48, text_layers=2, text_positions=16,
               vae_channels=(32, 32, 32, 32), vae_layers=1, latent_channels=4, vae_norm_groups=1, caption_keep=1.0,
               cross_attention_gain=10.0, high_noise=0.0, images=256, steps=150, batch_size=16, lr=2e-3, ema=0.0,
               vae_steps=0)


def build_components(spec: ToySpec, tokenizer_dir: str | Path):
    """Random-weight components of ``spec``'s shape (the pack's tokenizer written to ``tokenizer_dir``)."""
    vocab_size = tokenizer_module.write_tokenizer(tokenizer_dir, model_max_length=spec.text_positions)
    levels = len(spec.unet_channels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.unet_attention]
    unet_config = families.shipped_config("sd15_unet") | dict(
        block_out_channels=list(spec.unet_channels), layers_per_block=spec.unet_layers, down_block_types=down,
        in_channels=spec.latent_channels, out_channels=spec.latent_channels,
        up_block_types=[t.replace("Down", "Up") for t in reversed(down)], cross_attention_dim=spec.text_hidden,
        sample_size=spec.resolution // 2 ** (len(spec.vae_channels) - 1))
    assert len(down) == levels
    vae_config = families.shipped_config("sd15_vae") | dict(
        block_out_channels=list(spec.vae_channels), layers_per_block=spec.vae_layers,
        latent_channels=spec.latent_channels, norm_num_groups=spec.vae_norm_groups,
        down_block_types=["DownEncoderBlock2D"] * len(spec.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(spec.vae_channels), sample_size=spec.resolution)
    text_values = families.shipped_config("sd15_text_encoder") | dict(
        vocab_size=vocab_size, hidden_size=spec.text_hidden, intermediate_size=4 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, max_position_embeddings=spec.text_positions,
        projection_dim=spec.text_hidden)
    text_config = CLIPTextConfig(**{k: v for k, v in text_values.items() if k not in ("architectures", "model_type")})
    scheduler_config = families.shipped_config("sd15_scheduler") | {"prediction_type": "v_prediction"}
    with torch.inference_mode(False):
        torch.manual_seed(spec.seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        if spec.cross_attention_gain != 1.0:
            with torch.no_grad():
                for name, parameter in unet.named_parameters():
                    if ".attn2.to_out.0." in name:
                        parameter.mul_(spec.cross_attention_gain)
        torch.manual_seed(spec.seed + 1)
        vae = AutoencoderKL.from_config(vae_config)
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(text_config)
        # CLIP's init (std 0.02) makes every token vector ~0.2 long in this width: after a short training the text
        # encoder's output then barely depends on which word it was given ("a photo of sks toy" and "a photo of a
        # toy" came out 99% alike), so the UNet cannot learn to follow words. Unit-length token vectors make words
        # distinct from the start, as the token vectors of a trained CLIP are.
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.normal_(0.0, spec.text_hidden ** -0.5)
    return components_module.Components(family=sd15.FAMILY, unet=unet.eval(), vae=vae.eval(),
                                        text_encoder=text_encoder.eval(),
                                        tokenizer=clip.tokenizer_for(text_encoder, tokenizer_dir),
                                        noise_scheduler=DDPMScheduler.from_config(scheduler_config), name=spec.name,
                                        tokenizer_dir=str(tokenizer_dir))


# ---------------------------------------------------------------------------------------------------- VAE

@torch.no_grad()
def calibrate_latents(vae: AutoencoderKL, pixels: torch.Tensor, deterministic: bool = False) -> float:
    """Rescale the latent space exactly so that posterior means times ``scaling_factor`` have unit std.

    The mean rows of ``quant_conv`` are multiplied by k and the log-variance rows shifted by 2 ln k (the same
    distribution, k times wider); ``post_quant_conv`` divides its input by k, so decoding is unchanged. With
    ``deterministic`` the posterior std is set to ~0 (log-variance -30) instead. Returns k.
    """
    mean, _ = loop.encode_latent_posterior(vae, pixels)
    k = 1.0 / (float(mean.std()) * vae.config.scaling_factor)
    q, post = vae.quant_conv, vae.post_quant_conv
    c = q.out_channels // 2
    q.weight[:c] *= k
    q.bias[:c] *= k
    if deterministic:
        q.weight[c:] = 0
        q.bias[c:] = -30.0
    else:
        q.bias[c:] += 2 * torch.log(torch.tensor(k))
    post.weight.mul_(1 / k)
    return k


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 1e-3,
              seed: int = 0, kl_weight: float = 1e-7, crop: int = 0, crop_fraction: float = 0.0, log=print) -> dict:
    """Plain autoencoder training (MSE + L1 + a tiny KL term) on [N,3,R,R] pixels in -1..1. The first
    ``crop_fraction`` of the steps see random ``crop``-pixel crops (a conv net learns the same local job ~4x
    cheaper), the rest whole images."""
    generator = torch.Generator().manual_seed(seed)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    started = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(1, steps + 1):
            batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
            if crop and step <= crop_fraction * steps:
                top, left = (int(v) * 2 for v in torch.randint(0, (pixels.shape[-1] - crop) // 2 + 1, (2,),
                                                               generator=generator))
                batch = batch[..., top:top + crop, left:left + crop]
            posterior = vae.encode(batch).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            recon = vae.decode(z).sample
            mse = F.mse_loss(recon, batch)
            loss = mse + 0.5 * F.l1_loss(recon, batch) + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 100 == 0 or step == steps:
                log(f"  vae step {step}/{steps}: mse {mse.item():.5f} ({time.perf_counter() - started:.0f}s)")
    vae.eval().requires_grad_(False)
    return {"vae_steps": steps, "vae_seconds": round(time.perf_counter() - started, 1)}


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    mean, _ = loop.encode_latent_posterior(vae, pixels)
    recon = torch.cat([vae.decode(chunk).sample for chunk in mean.split(32)]).clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (pixels + 1) / 2).item()
    return 10 * torch.log10(torch.tensor(1.0 / mse)).item()


# ---------------------------------------------------------------------------------------------------- pretraining

class PretrainMethod(base.Method):
    """Train the whole UNet and text encoder (the pack's loop with every denoising weight trainable). Each image
    has several captions to draw from, one of them empty (caption dropout, for classifier-free guidance)."""

    name = "pretrain"
    trains_conditioning = True

    def __init__(self, caption_options: list[list[str]], ema: float = 0.0):
        self.caption_options = caption_options
        self.ema = ema
        self.shadow: dict[str, torch.Tensor] = {}

    def _weights(self, components):
        return {f"unet.{k}": p for k, p in components.unet.named_parameters()} | \
            {f"text.{k}": p for k, p in components.text_encoder.named_parameters()}

    def prepare(self, components, config) -> list[dict]:
        components.vae.requires_grad_(False)
        components.unet.requires_grad_(True)
        components.text_encoder.requires_grad_(True)
        if self.ema:
            self.shadow = {k: p.detach().clone() for k, p in self._weights(components).items()}
        return [{"params": list(components.unet.parameters()) + list(components.text_encoder.parameters()),
                 "lr": config.lr}]

    def prompts(self, config, captions: list[str]) -> list[list[str]]:
        return self.caption_options

    def after_step(self, components, step: int, config) -> None:
        if not self.ema:
            return
        decay = min(self.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self._weights(components).items():
                self.shadow[k].lerp_(p.detach(), 1 - decay)

    def use_ema(self, components) -> None:
        if self.ema:
            with torch.no_grad():
                for k, p in self._weights(components).items():
                    p.copy_(self.shadow[k])


def caption_options(photos: list[world.Photo], seed: int = 0, per_image: int = 6,
                    keep: float = 0.5) -> list[list[str]]:
    rng = random.Random(f"captions-{seed}")
    return [sorted({world.caption(p, rng, keep) for _ in range(per_image)}) + [""] for p in photos]


def pretrain(components, spec: ToySpec, images: torch.Tensor, photos: list[world.Photo], log=print) -> dict:
    """Train UNet + text encoder on the toy photos with the pack's loop (in place); returns timings and losses."""
    if spec.high_noise:
        return pretrain_biased(components, spec, images, photos, log=log)
    method = PretrainMethod(caption_options(photos, spec.seed, keep=spec.caption_keep), ema=spec.ema)
    config = config_module.TrainConfig(prompt="", steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size,
                                       resolution=spec.resolution, seed=spec.seed, lr_scheduler="cosine",
                                       warmup_steps=min(50, spec.steps // 10), max_grad_norm=1.0)

    def on_step(info) -> None:
        if info.step % 100 == 0 or info.step == info.total:
            log(f"  unet step {info.step}/{info.total}: loss {info.loss:.4f}")

    pixels = data.images_to_training_pixels(images, spec.resolution)
    result = loop.train(components, method, pixels, [""] * len(pixels), config, device=torch.device("cpu"),
                        callbacks=loop.Callbacks(on_step=on_step))
    method.use_ema(components)
    components.unet.requires_grad_(False)
    components.text_encoder.requires_grad_(False)
    head, tail = result.losses[:20], result.losses[-50:]
    return {"unet_steps": spec.steps, "unet_seconds_per_step": round(result.seconds_per_step, 4),
            "loss_start": round(sum(head) / len(head), 4), "loss_end": round(sum(tail) / len(tail), 4)}


def pretrain_biased(components, spec: ToySpec, images: torch.Tensor, photos: list[world.Photo], log=print) -> dict:
    """The same training as ``pretrain`` (v-prediction MSE, AdamW, cosine schedule, clipping, EMA), written out so
    that a share ``spec.high_noise`` of the timesteps comes from the noisiest 60%: there the image is mostly noise
    and the caption is what the model has to go on, which is where a briefly trained model learns to follow words."""
    from diffusers.optimization import get_scheduler

    generator = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    unet, text_encoder, scheduler = components.unet, components.text_encoder, components.noise_scheduler
    pixels = data.images_to_training_pixels(images, spec.resolution)
    mean, std = loop.encode_latent_posterior(components.vae, pixels)
    options = caption_options(photos, spec.seed, keep=spec.caption_keep)
    prompts = sorted({p for o in options for p in o})
    index = {p: i for i, p in enumerate(prompts)}
    ids = clip.tokenize(components.tokenizer, prompts)
    method = PretrainMethod(options, ema=spec.ema)
    config = config_module.TrainConfig(steps=spec.steps, lr=spec.lr)
    with torch.inference_mode(False), torch.enable_grad():
        groups = method.prepare(components, config)
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=min(50, spec.steps // 10),
                                 num_training_steps=spec.steps)
        unet.train(), text_encoder.train()
        total_steps = scheduler.config.num_train_timesteps
        losses, started = [], time.perf_counter()
        for step in range(1, spec.steps + 1):
            batch = torch.randint(0, len(mean), (spec.batch_size,), generator=generator)
            choice = [index[options[i][int(torch.randint(0, len(options[i]), (1,), generator=generator))]]
                      for i in batch.tolist()]
            latents = (mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=generator)) \
                * components.vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            uniform = torch.randint(0, total_steps, (spec.batch_size,), generator=generator)
            noisy_half = torch.randint(int(0.4 * total_steps), total_steps, (spec.batch_size,), generator=generator)
            biased = torch.rand(spec.batch_size, generator=generator) < spec.high_noise
            timesteps = torch.where(biased, noisy_half, uniform)
            prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                              text_encoder(ids[choice])[0]).sample
            loss = F.mse_loss(prediction, loop.denoising_target(scheduler, latents, noise, timesteps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            method.after_step(components, step, config)
            losses.append(loss.item())
            if step % 100 == 0 or step == spec.steps:
                log(f"  unet step {step}/{spec.steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                    f"({time.perf_counter() - started:.0f}s)")
    method.use_ema(components)
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return {"unet_steps": spec.steps, "unet_seconds_per_step": round((time.perf_counter() - started) / spec.steps, 4),
            "loss_start": round(sum(losses[:20]) / 20, 4), "loss_end": round(sum(losses[-50:]) / 50, 4)}


def make_toy_model(out: str | Path, spec: ToySpec = TOY, log=print, vae_from: str | Path | None = None) -> dict:
    """Build, pretrain and write ``out/model.safetensors`` (+ ``out/tokenizer/``, ``out/info.json``). ``vae_from``:
    reuse the VAE of a toy model built with the same VAE settings instead of training it again."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    components = build_components(spec, out / "tokenizer")
    images, photos = world.dataset(spec.images, spec.resolution, spec.seed)
    pixels = data.images_to_training_pixels(images, spec.resolution)
    info: dict = {"spec": asdict(spec), "fingerprint": spec.fingerprint()}
    if vae_from:
        components.vae.load_state_dict(models.load_base(vae_from).vae.state_dict())
        info["vae_from"] = str(vae_from)
    elif spec.vae_steps:
        log(f"training the VAE ({spec.vae_steps} steps)")
        info |= train_vae(components.vae, pixels, spec.vae_steps, batch_size=32, lr=3e-3, seed=spec.seed,
                          crop=spec.resolution // 2, crop_fraction=0.7, log=log)
        info["latent_scale"] = calibrate_latents(components.vae, pixels[:512])
        info["vae_psnr_db"] = round(reconstruction_psnr(components.vae, pixels[-256:]), 2)
        log(f"  reconstruction PSNR {info['vae_psnr_db']} dB")
    else:
        info["latent_scale"] = calibrate_latents(components.vae, pixels[:256], deterministic=True)
    log(f"pretraining UNet + text encoder ({spec.steps} steps of {spec.batch_size})")
    info |= pretrain(components, spec, images, photos, log=log)
    if spec.vae_norm_groups == 32:  # the shipped SD1.5 configs' value, which the single-file loader assumes
        path = models.save_single_file(components, out / "model.safetensors", dtype=None, metadata={
            "modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "v",
            "modelspec.title": f"personalize toy world {spec.name} ({spec.fingerprint()})"})
    else:
        path = models.save_diffusers(components, out / "diffusers")
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["parameters"] = sum(p.numel() for m in (components.unet, components.vae, components.text_encoder)
                             for p in m.parameters())
    info["file_mb"] = round(sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*"))) / 2**20, 2)
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return {"path": str(path), "single_file": str(path) if path.is_file() else None,
            "tokenizer": str(out / "tokenizer"), "info": info}
