"""One optimizer step: forward and backward over the accumulation micro-batches, one all-reduce that
carries every decision, and the token-weighted update.

The loss of a step is the mean over every labelled token of the global batch (labels of -100 are
ignored), so the update is the one big batch's whatever each rank's share of labelled tokens.
Gradients accumulate as loss *sums*; the global count of labelled tokens is known only after the
step's all-reduce, and the fused AdamW step divides by it as it reads each gradient
(optim.scale_in_next_step). A pipeline schedule (train/parallel/pipeline.py) replaces `forward_backward` and
nothing else.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.loss import IGNORE_INDEX

from ..optim import gradient_norm, scale_in_next_step
from ..parallel.distributed import Dist
from ..state.stability import Verdict


@dataclass
class StepResult:
    loss: float  # global mean loss per labelled token
    tokens: int  # global labelled tokens
    grad_norm: torch.Tensor  # of the mean loss, before clipping (a device scalar: read it only when logging)
    non_finite: bool  # the loss or a gradient is inf/nan on some rank
    stop: bool  # some rank was asked to stop
    verdict: Verdict = Verdict.OK  # the stability monitor's, set by the trainer


def loss_sum(model, input_ids, labels, position_ids=None, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Sum of token cross-entropies in fp32 (-100 labels ignored)."""
    with torch.autocast(input_ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return model(input_ids, position_ids, labels=labels)


def micro_batches(batch: dict, micro_batch_size: int, device: torch.device):
    """This rank's rows of a step, micro_batch_size at a time, on the device: (inputs, labels, positions)."""
    for start in range(0, batch["input_ids"].shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        positions = batch["position_ids"][rows].to(device) if "position_ids" in batch else None
        yield (batch["input_ids"][rows].to(device, non_blocking=True),
               batch["labels"][rows].to(device, non_blocking=True), positions)


def forward_backward(model, batch: dict, micro_batch_size: int, device: torch.device,
                     autocast: torch.dtype | None, poison_loss: bool = False) -> torch.Tensor:
    """Accumulate the gradients of this rank's summed loss over its micro-batches; returns that sum.
    Under FSDP the gradients are reduced once, after the last micro-batch."""
    total = torch.zeros((), device=device)
    parts = list(micro_batches(batch, micro_batch_size, device))
    for i, (inputs, labels, positions) in enumerate(parts):
        if autocast is None:  # FSDP (one bf16 device trains under autocast, without FSDP)
            model.set_requires_gradient_sync(i == len(parts) - 1)
        loss = loss_sum(model, inputs, labels, positions, autocast)
        if poison_loss:  # a fault drill
            loss = loss * float("nan")
        loss.backward()
        total += loss.detach()
    return total


def reduce_step(model, optimizer, local_loss: torch.Tensor, local_tokens: int, stop: bool, grad_clip: float,
                env: Dist, last_stage: bool = True) -> StepResult:
    """The step's one all-reduce and host sync: global loss, labelled tokens, gradient norm, non-finite and
    stop flags. Then the next optimizer step is set to divide the gradients by the labelled tokens and clip
    them. Each figure is counted once: the loss and the tokens by the first TP rank of each pipeline's last
    stage (a TP group's ranks hold the same batch; only the rank with the last stage, `last_stage`, has the
    loss: the pipeline's last rank, or its first under ZBVZeroBubble's V), the squared gradient
    norm by the first data-parallel and TP rank of each pipeline stage (it is whole over those ranks)."""
    stage_norm = gradient_norm(list(model.parameters()))
    zero = torch.zeros((), dtype=torch.float64, device=local_loss.device)
    holds_loss = env.tp_rank == 0 and last_stage
    holds_norm = env.tp_rank == 0 and env.dp_rank == 0
    host = torch.tensor([local_tokens if holds_loss else 0, stop], dtype=torch.float64)
    host = host.to(local_loss.device, non_blocking=True)
    flags = torch.stack([local_loss.double() if holds_loss else zero, host[0],
                         stage_norm.double().square() if holds_norm else zero,
                         (~torch.isfinite(stage_norm)).double(), host[1]])
    dist.all_reduce(flags)
    loss_total, tokens, _, non_finite, stop_votes = flags.tolist()
    tokens = max(int(tokens), 1)
    # FSDP averaged the data-parallel ranks' gradient sums: times dp_size / tokens is the gradient of the mean.
    grad_norm = scale_in_next_step(optimizer, flags[2].sqrt().float(), tokens / env.dp_size, grad_clip)
    return StepResult(loss_total / tokens, tokens, grad_norm, non_finite > 0, stop_votes > 0)


def labelled_tokens(batch: dict) -> int:
    """Labels that count towards the loss on this rank (counted on the host: no device sync)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
