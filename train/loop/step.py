"""One optimizer step: forward and backward over the accumulation micro-batches, one all-reduce that
carries every decision, and the token-weighted update.

The loss of a step is the mean over every labelled token of the global batch (labels of -100 are
ignored), so the update is the one big batch's whatever each rank's share of labelled tokens.
Gradients accumulate as loss *sums*; the global count of labelled tokens is known only after the
step's all-reduce, and the fused AdamW step divides by it as it reads each gradient
(optim.scale_in_next_step).

How the rank's model runs is a StepRunner: LocalStep here (data parallel and TP), or the pipeline schedule
(train/parallel/pipeline.py PipelineRun); build_runner picks it once, and the trainer, validation and the
sample call it without asking which.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig
from model.loss import IGNORE_INDEX

from ..config import BatchShape, ParallelSection
from ..optim import gradient_norm, scale_in_next_step
from ..parallel.build import build_parallel_model
from ..parallel.context_parallel import ContextParallel
from ..parallel.distributed import Dist, whole
from ..parallel.parallelize import single_device_autocast
from ..state.stability import Verdict

# on_loss(loss) -> loss: what a loop hook does to each micro-batch's summed loss before its backward (hooks.py).
LossHook = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    loss: float  # global mean loss per labelled token
    tokens: int  # global labelled tokens
    grad_norm: torch.Tensor  # of the mean loss, before clipping (a device scalar: read it only when logging)
    non_finite: bool  # the loss or a gradient is inf/nan on some rank
    stop: bool  # some rank was asked to stop
    verdict: Verdict = Verdict.OK  # the stability monitor's, set by the trainer
    data_wait_s: float = 0.0  # this rank's wait for the step's batch, set by the trainer


class StepRunner(Protocol):
    """How the rank's model runs: a training step's forward and backward, validation, and the sample's next
    token. LocalStep (below) and the pipeline schedule (train/parallel/pipeline.py PipelineRun) implement it;
    a context-parallel runner would too. Every rank calls every method (they may be collective)."""

    model: torch.nn.Module  # the rank's model: what the optimizer, the checkpoints and generate() see
    holds_loss: bool  # this rank computes the loss: every rank, or under PP the ranks of the last stage

    def forward_backward(self, batch: dict, on_loss: LossHook | None = None) -> torch.Tensor:
        """Accumulate the gradients of this rank's summed loss over its rows of the step; returns that sum
        (zero where the rank holds no loss). on_loss, if given, sees each micro-batch's summed loss first."""
        ...

    def loss_sums(self, batches: Iterable[dict]) -> Iterator[tuple[dict, torch.Tensor]]:
        """Validation, under no_grad: each batch as it was run (PP joins micro-batches into whole steps) and
        this rank's summed loss over it."""
        ...

    def next_logits(self, window: torch.Tensor) -> torch.Tensor:
        """The logits (1, V) of the token after window (1, T <= data.seq_len), the same on every rank."""
        ...


class LocalStep:
    """The step as the rank runs it alone (FSDP and TP inside the model): gradient accumulation over micro-batches
    of micro_batch_size rows, the whole model on every rank."""

    holds_loss = True

    def __init__(self, model: torch.nn.Module, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist):
        self.model, self.micro_batch_size, self.device = model, batch_shape.micro_batch_size, env.device
        self.autocast = single_device_autocast(parallel_cfg, env)
        # TP's sequence split needs a length divisible by tp: the sample's window is padded to data.seq_len,
        # the shape the model was built for (causal attention keeps the last real position blind to the padding).
        self.pad_to = batch_shape.seq_len if env.tp > 1 else 0
        # parallel.cp: each micro-batch's sequence split over the cp group (train/parallel/context_parallel.py)
        self.split = ContextParallel(model, env).in_flight if env.cp > 1 else whole_sequence

    def forward_backward(self, batch: dict, on_loss: LossHook | None = None) -> torch.Tensor:
        return forward_backward(self.model, batch, self.micro_batch_size, self.device, self.autocast, on_loss,
                                split=self.split)

    def loss_sums(self, batches: Iterable[dict]) -> Iterator[tuple[dict, torch.Tensor]]:
        for batch in batches:
            positions = batch["position_ids"].to(self.device) if "position_ids" in batch else None
            with self.split(batch["input_ids"].to(self.device), batch["labels"].to(self.device),
                            positions) as (inputs, labels, positions):
                loss = loss_sum(self.model, inputs, labels, positions, autocast=self.autocast)
            yield batch, loss

    def next_logits(self, window: torch.Tensor) -> torch.Tensor:
        if not self.pad_to:
            return self.model(window)[:, -1, :]  # what generate() does with a model it can call as it is
        padded = F.pad(window, (0, self.pad_to - window.shape[1]))  # id 0 after the window
        return whole(self.model(padded)[:, window.shape[1] - 1, :])  # TP's logits are a DTensor


def build_runner(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist, *,
                 seed: int, document_masking: bool, evaluates: bool) -> StepRunner:
    """The rank's model built and parallelized (train/parallel/build.py build_parallel_model, which says what
    the keywords are for) and what runs it: the pipeline schedule under parallel.pp > 1, else LocalStep. The
    one place that tells them apart."""
    model, pipeline = build_parallel_model(model_cfg, parallel_cfg, batch_shape, env, seed=seed,
                                           document_masking=document_masking, evaluates=evaluates)
    return pipeline or LocalStep(model, parallel_cfg, batch_shape, env)


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


@contextmanager
def whole_sequence(inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
    """A micro-batch as it is: without context parallelism each rank holds its rows' whole sequences."""
    yield inputs, labels, positions


def forward_backward(model, batch: dict, micro_batch_size: int, device: torch.device,
                     autocast: torch.dtype | None, on_loss: LossHook | None = None,
                     split=whole_sequence) -> torch.Tensor:
    """Accumulate the gradients of this rank's summed loss over its micro-batches; returns that sum.
    Under FSDP every micro-batch's gradients are reduce-scattered as its backward runs (as torchtitan does), so
    they stay sharded: left unreduced until the last micro-batch, FSDP2 would hold every gradient whole in fp32
    (an 8B: 32 GB a GPU). HSDP's all-reduce over the replicas waits for the last micro-batch.
    split: this rank's part of each micro-batch's sequence (context parallelism), its backward included."""
    total = torch.zeros((), device=device)
    parts = list(micro_batches(batch, micro_batch_size, device))
    for i, part in enumerate(parts):
        if autocast is None:  # FSDP (one bf16 device trains under autocast, without FSDP)
            model.set_requires_all_reduce(i == len(parts) - 1)
        with split(*part) as (inputs, labels, positions):
            loss = loss_sum(model, inputs, labels, positions, autocast)
            if on_loss is not None:  # a loop hook's (a test's fault drill poisons it)
                loss = on_loss(loss)
            loss.backward()
        total += loss.detach()
    return total


def reduce_step(model, optimizer, local_loss: torch.Tensor, local_tokens: int, stop: bool, grad_clip: float,
                env: Dist, holds_loss: bool = True) -> StepResult:
    """The step's one all-reduce and host sync: global loss, labelled tokens, gradient norm, non-finite and
    stop flags. Then the next optimizer step is set to divide the gradients by the labelled tokens and clip
    them. Each figure is counted once: the loss and the tokens by the first TP rank of each pipeline's last
    stage (a TP group's ranks hold the same batch; only the ranks with the last stage, `holds_loss`
    (StepRunner.holds_loss), have the loss: the pipeline's last rank, or its first under ZBVZeroBubble's V), the
    squared gradient norm by the first data-parallel and TP rank of each pipeline stage (it is whole over those
    ranks)."""
    stage_norm = gradient_norm(list(model.parameters()))
    zero = torch.zeros((), dtype=torch.float64, device=local_loss.device)
    counts_loss = env.tp_rank == 0 and holds_loss
    counts_tokens = counts_loss and env.cp_rank == 0  # a CP group's ranks hold parts of one batch's loss
    holds_norm = env.tp_rank == 0 and env.dp_rank == 0 and env.cp_rank == 0
    host = torch.tensor([local_tokens if counts_tokens else 0, stop], dtype=torch.float64)
    host = host.to(local_loss.device, non_blocking=True)
    # (The norm is on the mesh's device: optim.gradient_norm reduces it there, even of gradients on the host.)
    flags = torch.stack([local_loss.double() if counts_loss else zero, host[0],
                         stage_norm.double().square() if holds_norm else zero,
                         (~torch.isfinite(stage_norm)).double(), host[1]])
    dist.all_reduce(flags)
    loss_total, tokens, _, non_finite, stop_votes = flags.tolist()
    tokens = max(int(tokens), 1)
    # FSDP averaged its ranks' gradient sums (data-parallel x cp): times their number / tokens is the gradient of
    # the mean.
    grad_norm = scale_in_next_step(optimizer, flags[2].sqrt().float(), tokens / env.fsdp_size, grad_clip)
    return StepResult(loss_total / tokens, tokens, grad_norm, non_finite > 0, stop_votes > 0)


def labelled_tokens(batch: dict) -> int:
    """Labels that count towards the loss on this rank (counted on the host: no device sync)."""
    return int((batch["labels"] != IGNORE_INDEX).sum())
