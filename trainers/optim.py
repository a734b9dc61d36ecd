"""Optimizers: the AdamW every method uses by default, the fused backward pass, and AdamW for bf16 weights.

``StochasticAdamW`` is for weights stored in bf16 (DreamBooth's ``weights_dtype=bf16``).

bf16 keeps 8 significant bits: a weight of 0.02 moves only in steps of 2^-13 ≈ 1.2e-4. Adam's update is about the
learning rate, and DreamBooth's 5e-6 is 1/24 of that step, so round-to-nearest (what ``torch.optim.AdamW`` does when
it writes bf16) puts almost every weight back where it was: the run silently learns almost nothing (measured on
random N(0, 0.02) weights: 5% of the fp32 update survives 100 steps). Here each update is computed in fp32 and
written back with stochastic rounding (Zamirai et al. 2020, "Revisiting BFloat16 Training"): a weight moves one bf16
step with probability update/step, so it follows the fp32 trajectory on average. The moments are stored in bf16 the
same way, so the optimizer needs 4 bytes per parameter.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .errors import PersonalizeError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
# The optional packages behind some optimizers: (module, pip name).
_OPTIONAL = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}


def check_optimizer(config) -> None:
    """Before any work: the chosen optimizer's package is there (never a silent fallback to another optimizer)."""
    if config.optimizer in _OPTIONAL:
        module, package = _OPTIONAL[config.optimizer]
        try:
            importlib.import_module(module)
        except ImportError:
            raise PersonalizeError(f"optimizer {config.optimizer} needs the {package} package, which is not "
                                   f"installed: pip install {package}, or choose another optimizer "
                                   f"({', '.join(OPTIMIZERS)})") from None


def make_optimizer(groups: list[dict], config, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer ``config.optimizer`` names, over parameter groups that carry their own learning rates."""
    check_optimizer(config)
    if config.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed (scheduled) learning rate, as kohya's and diffusers' scripts use it for fine-tuning.
        return Adafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False, warmup_init=False)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Prodigy estimates the step size itself; lr multiplies its estimate (1.0 is the authors' setting).
        return Prodigy(groups, lr=groups[0]["lr"], weight_decay=1e-2)
    return make_adamw(groups, config, device)


def make_adamw(groups: list[dict], config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the training examples' settings: 8-bit (bitsandbytes) on CUDA when asked for and installed, else
    torch's fused AdamW."""
    if config.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        except ImportError:
            pass
    # Fused AdamW (CUDA, and CPU since torch 2.4) updates each tensor in one pass with no temporaries: on CPU it
    # is ~1.7x faster than foreach, which also needs a transient copy of all parameters (+3.4 GB for SD1.5's UNet).
    try:
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=True)
    except (RuntimeError, ValueError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, foreach=True)


def fuse_optimizer_into_backward(optimizer: torch.optim.Optimizer, max_grad_norm: float,
                                 make_optimizer: Callable[[list[dict]], torch.optim.Optimizer]) -> list:
    """Move the optimizer step into the backward pass (PyTorch's recipe, kohya's fused backward pass): each weight is
    clipped to ``max_grad_norm`` on its own, updated as soon as its gradient is complete, and its gradient freed, so
    a whole set of gradients never exists (for SD1.5's UNet in fp32: 3.4 GB). Each weight gets an optimizer of the
    same kind (``make_optimizer``); ``optimizer`` keeps the groups and the lr schedule, whose current rate each
    update reads, and its own step then finds no gradient left. Returns the hook handles; the per-weight optimizers
    are ``optimizer.per_weight_optimizers`` (their moments are what a saved training state must hold)."""
    handles = []
    optimizer.per_weight_optimizers = []
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            own = make_optimizer([{"params": [parameter], "lr": group["lr"]}])
            own.fused_backward_part = True  # not a training step of its own (bench/_child.py counts steps)
            optimizer.per_weight_optimizers.append(own)

            def update(weight, own=own, group=group) -> None:
                if max_grad_norm > 0:  # clip_grad_norm_ for one tensor, without its 3x overhead per call
                    norm = torch.linalg.vector_norm(weight.grad)
                    weight.grad.mul_(torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0))
                own.param_groups[0]["lr"] = group["lr"]
                own.step()
                weight.grad = None

            handles.append(parameter.register_post_accumulate_grad_hook(update))
    return handles


def round_stochastic_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 ``value`` into ``target``; into a bf16 ``target`` with stochastic rounding."""
    if target.dtype != torch.bfloat16:
        target.copy_(value)
        return
    # bf16 is the upper half of an fp32's bits: add a random lower half, then cut it off. The carry into the upper
    # half happens with probability (lower half)/2^16, i.e. the value rounds up in proportion to its distance.
    bits = value.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    target.copy_(((bits + noise) & -(1 << 16)).view(torch.float32))


class StochasticAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose parameters and moments may be bf16 (fp32 ones are updated exactly)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                # One parameter at a time in fp32: the temporaries are the size of the largest tensor, not the model.
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                denominator = (exp_avg_sq / bias2).sqrt_().add_(eps)
                weight = p.float().mul_(1 - lr * group["weight_decay"]).addcdiv_(exp_avg, denominator,
                                                                                 value=-lr / bias1)
                round_stochastic_(p, weight)
                round_stochastic_(state["exp_avg"], exp_avg)
                round_stochastic_(state["exp_avg_sq"], exp_avg_sq)
