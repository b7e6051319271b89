"""AdamW with weight decay on weight matrices only, and the learning-rate schedule."""

import logging
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import OptimSection


def _not_the_norms_two_reductions(record: logging.LogRecord) -> bool:
    """Logging filter for DTensor's redistribution logger: drop its warning that the gradient norm's
    `_NormPartial` over the (dp_shard, tp) mesh is reduced by 2 sequential all_reduce operations, which every
    TP run printed once per rank. Harmless here: it is one scalar per step (the latency is nothing beside the
    step's), and each rank runs the same reductions in the same order, so every rank gets the same norm. Other
    redistribution warnings (of tensors, not this scalar) still show."""
    source = record.args[0] if isinstance(record.args, tuple) and record.args else None  # the placements before
    return not ("sequential" in str(record.msg) and "_NormPartial" in str(source))


logging.getLogger("torch.distributed.tensor._redistribute").addFilter(_not_the_norms_two_reductions)


def build_optimizer(model: nn.Module, optim_cfg: OptimSection) -> torch.optim.AdamW:
    """AdamW. Weight decay applies to the attention and feed-forward matrices and the untied output
    head; not to RMSNorm weights (scales) nor the token embedding (decaying rows of rare tokens
    towards zero only because they are seldom seen hurts them), as in OLMo and nanoGPT."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "tok_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused: one kernel per step on CUDA, and about 6x faster than the foreach kernels on CPU.
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             fused=True)


def gradient_norm(params) -> torch.Tensor:
    """The global norm of the parameters' gradients as they are (one collective under FSDP), on the device of
    the mesh: gradients offloaded to the host (parallel.cpu_offload) give a host scalar, which NCCL cannot
    reduce, so it goes to the mesh's device first (on a CPU mesh it stays where it is)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    if isinstance(norm, DTensor):  # FSDP: a partial DTensor, all-reduced here
        mesh = norm.device_mesh
        local = norm.to_local().to(mesh.device_type)
        norm = DTensor.from_local(local, mesh, norm.placements, run_check=False).full_tensor()
    return norm


def scale_in_next_step(optimizer: torch.optim.AdamW, raw_norm: torch.Tensor, divisor: torch.Tensor | float,
                       max_norm: float) -> torch.Tensor:
    """Have the next fused AdamW step divide every gradient by `divisor` (the gradients hold loss
    sums, the update needs the mean) and clip the result to `max_norm` (if > 0). Both are done as the
    kernel reads each gradient, through `grad_scale` (the hook GradScaler uses): the same result as
    dividing and clip_grad_norm_, without their passes over the fp32 gradients. Returns the norm of
    the divided gradients. The scale goes where the parameters are (the host under parallel.cpu_offload): the
    fused step would copy a device scale to the host without waiting for it (non_blocking)."""
    norm = raw_norm / divisor
    scale = torch.as_tensor(divisor, dtype=torch.float32, device=raw_norm.device)
    if max_norm > 0:
        scale = scale * ((norm + 1e-6) / max_norm).clamp(min=1.0)  # clip_grad_norm_'s coefficient, inverted
    optimizer.grad_scale = scale.to(optimizer.param_groups[0]["params"][0].device)
    return norm


def lr_at(step: int, total_steps: int, optim_cfg: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the decay."""
    if step < optim_cfg.warmup_steps:
        return optim_cfg.lr * (step + 1) / optim_cfg.warmup_steps
    if optim_cfg.schedule == "wsd":
        decay_steps = max(1, int(optim_cfg.decay_fraction * total_steps))
        decay_start = max(optim_cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return optim_cfg.lr
        progress = (step - decay_start) / max(1, total_steps - decay_start)
    else:
        progress = (step - optim_cfg.warmup_steps) / max(1, total_steps - optim_cfg.warmup_steps)
    progress = min(1.0, progress)
    if optim_cfg.schedule == "cosine":
        weight = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # linear, and wsd's decay phase
        weight = 1 - progress
    return optim_cfg.min_lr + (optim_cfg.lr - optim_cfg.min_lr) * weight


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, optim_cfg: OptimSection):
    """A LambdaLR over `lr_at` (its state is just the step, saved with checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total_steps, optim_cfg) / optim_cfg.lr)


def apply_hyperparameters(optimizer: torch.optim.AdamW, scheduler, optim_cfg: OptimSection) -> None:
    """The configured values over what a loaded checkpoint brought back (its optimizer state holds the
    old run's lr, betas, eps and weight decay, its schedule the old peak lr): a resume continues the
    schedule at its step with the values given now. Groups are build_optimizer's: decay, then none."""
    for group, weight_decay in zip(optimizer.param_groups, (optim_cfg.weight_decay, 0.0)):
        group.update(betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps, weight_decay=weight_decay,
                     initial_lr=optim_cfg.lr)
    scheduler.base_lrs = [optim_cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas)):
        group["lr"] = optim_cfg.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
