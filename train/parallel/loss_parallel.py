"""Cross-entropy over a vocabulary split across tensor-parallel ranks, fused with the output projection
and chunked over tokens: the tensor-parallel twin of model/loss.py's linear_cross_entropy.

Under tensor parallelism the output weight (V, D) is split by vocabulary rows: each TP rank holds V/tp
of them. torchtitan's loss_parallel lets the head produce its local logits (B*T, V/tp) and runs the
cross-entropy on them, so a rank still keeps B*T x V/tp logits (and their gradient) alive; for a 128k
vocabulary over 2 ranks at 16k tokens that is 4 GiB in fp32. Here each chunk of tokens makes its local
logits (n, V/tp), and three numbers per token cross the TP group instead of the logits: the row's max
(all-reduce MAX), then its sum of exponentials and its target logit (one all-reduce SUM of both). That
gives each rank the exact log-sum-exp, hence its slice of the softmax, hence the gradients, computed right
away in the forward as model/loss.py does; the chunk's logits are then dropped.

The chunk loop and its autograd.Function are model/loss.py's; this file gives it the chunk kernel, whose
collectives run in that forward on plain tensors (nothing to differentiate through). DTensor's own
autograd carries the rest: the hidden states are all-gathered over the sequence,
and the per-rank partial gradient of the hidden states (each rank saw only its vocabulary slice) is
reduce-scattered back to the sequence shards by the redistribute's backward. This lives in train/, not
model/, because the model stays free of distributed code.
"""

from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from model.loss import IGNORE_INDEX, linear_cross_entropy


class LossParallelInputError(ValueError):
    """Inputs laid out other than the vocabulary-parallel loss expects (one line, naming the fix)."""


def _sumexp_and_target(logits: torch.Tensor, row_max: torch.Tensor, column: torch.Tensor,
                       owned: torch.Tensor) -> torch.Tensor:
    """This rank's share of each row's sum of exp(logit - max) and of its target logit (0 where
    another rank owns the target), stacked (2, n); logits (n, V/tp) in fp32."""
    sumexp = torch.exp(logits - row_max[:, None]).sum(-1)  # (n,)
    target = logits.gather(1, column[:, None]).squeeze(1)  # (n,)
    return torch.stack([sumexp, torch.where(owned, target, torch.zeros_like(target))])


def _softmax_grad(logits: torch.Tensor, lse: torch.Tensor, column: torch.Tensor, owned: torch.Tensor,
                  valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d(sum CE)/d(local logits) (n, V/tp) in dtype: this rank's slice of the softmax, minus the one-hot
    target on the rank that owns it; ignored tokens get none."""
    grad = torch.exp(logits - lse[:, None])  # (n, V/tp)
    grad.scatter_add_(1, column[:, None], -owned.to(grad.dtype)[:, None])
    return (grad * valid[:, None]).to(dtype)


_compiled = {}


def compiled(fn):
    """fn through torch.compile: one fused pass over (n, V/tp) instead of several."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def _kernel(fn, device: torch.device):
    """fn compiled on CUDA, eager on the CPU, as model/loss.py's chunk kernel (tests/train/parallel/
    test_loss_parallel.py checks
    the compiled kernels against eager on the CPU)."""
    return compiled(fn) if device.type == "cuda" else fn


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, needs_grad: bool, *, vocab_start: int,
                         group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed CE of one chunk over the whole vocabulary, and d(sum CE)/d(local logits) in the logits'
    dtype (None without needs_grad); logits (n, V/tp) this rank's columns, labels (n,) global ids."""
    dtype, logits = logits.dtype, logits.float()
    valid = labels != IGNORE_INDEX
    column = labels - vocab_start  # the target's column on this rank, when it is this rank's
    owned = valid & (column >= 0) & (column < logits.shape[1])
    column = torch.where(owned, column, torch.zeros_like(column))
    row_max = logits.amax(dim=-1)  # (n,)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    stats = _kernel(_sumexp_and_target, logits.device)(logits, row_max, column, owned)  # (2, n)
    dist.all_reduce(stats, group=group)  # one collective for both sums
    lse = row_max + stats[0].log()  # (n,)
    loss = ((lse - stats[1]) * valid).sum()
    if not needs_grad:
        return loss, None
    return loss, _kernel(_softmax_grad, logits.device)(logits, lse, column, owned, valid, dtype)


def _check_layout(hidden, weight) -> None:
    """One-line errors for inputs this loss cannot read (the caller's TP plan is at fault)."""
    if not isinstance(hidden, DTensor) or not isinstance(weight, DTensor):
        raise LossParallelInputError("vocab_parallel_linear_cross_entropy needs DTensor hidden states and weight; "
                                     "use model/loss.py's linear_cross_entropy without tensor parallelism")
    if weight.device_mesh.ndim != 1 or hidden.device_mesh != weight.device_mesh:
        raise LossParallelInputError("vocab_parallel_linear_cross_entropy needs hidden and weight on one 1-D TP "
                                     "mesh; pass the TP submesh's DTensors")
    if tuple(weight.placements) != (Shard(0),) or tuple(hidden.placements) not in ((Shard(1),), (Replicate(),)):
        raise LossParallelInputError(f"vocab_parallel_linear_cross_entropy needs weight Shard(0) and hidden "
                                     f"Shard(1) or Replicate(), got {weight.placements} and {hidden.placements}; "
                                     f"fix the TP plan")


def vocab_parallel_linear_cross_entropy(hidden: DTensor, weight: DTensor, labels: torch.Tensor,
                                        chunk_size: int | None = None) -> torch.Tensor:
    """Sum over all B*T tokens of cross_entropy(hidden @ weight.T, labels) as a plain fp32 scalar, the same
    on every TP rank; hidden a DTensor (B, T, D) Shard(1) or Replicate(), weight a DTensor (V, D) Shard(0)
    on the same 1-D TP mesh, labels (B, T) global token ids on every rank (-100 ignored). No rank ever
    holds more than one chunk's logits (chunk, V/tp)."""
    _check_layout(hidden, weight)
    mesh = weight.device_mesh
    # Every position on every rank; its gradient comes back partial and is reduce-scattered (or all-reduced
    # for Replicate) to hidden's placement by DTensor.
    full_hidden = hidden.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    local_weight = weight.to_local()  # (V/tp, D): rows [rank * V/tp, (rank + 1) * V/tp)
    vocab_start = mesh.get_local_rank() * local_weight.shape[0]
    # The fused loop of model/loss.py over this rank's vocabulary rows, with the chunk kernel that makes
    # each chunk's log-sum-exp and target logit whole over the TP group. Same chunk default: local rows.
    kernel = partial(_chunk_loss_and_grad, vocab_start=vocab_start, group=mesh.get_group())
    return linear_cross_entropy(full_hidden, local_weight, labels, chunk_size, chunk_kernel=kernel)
