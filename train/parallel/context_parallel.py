"""Context parallelism (parallel.cp): each micro-batch's sequence split over the cp ranks, attention over all of it.

The split is balanced for causal attention: the window of T tokens is cut into 2 x cp chunks and cp rank r holds
chunks r and 2cp-1-r, so every rank's queries, summed, see the same number of keys (a plain split would leave the
last rank all the work). Inputs, labels and positions are split alike; positions are the window's (or its
documents'), so rope and the masks use each token's place in the whole window.

Attention is Meta's Llama 3 recipe: each block's keys and values (B, K, T/cp, Hd) are all-gathered over the cp
group (funcol's autograd all-gather: the backward reduce-scatters their gradients), put back in window order, and
this rank's queries attend to all T keys under one additive mask per micro-batch: a key at or before the query in
the window and, with document masking, in the same document. SDPA with that mask on every device; a BlockMask for
flex attention on CUDA is still to come (docs/gpu.md).

The model only offers the seams (Llama.sequence_mask, Attention.gather_kv); they act while a split micro-batch is
in flight (`in_flight`), so sampling and other whole-window forwards run as without context parallelism.
"""

from contextlib import contextmanager

import torch
import torch.distributed._functional_collectives as funcol

from model.attention import document_ids
from model.llama import Attention, Llama

from .distributed import Dist

# The all-gather whose backward reduce-scatters the gradients: all_gather_single_autograd from torch 2.13 on, where
# the older name warns that it is deprecated; torch 2.11 has only the older.
ALL_GATHER = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def local_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The window positions (seq_len / cp,) cp rank `rank` holds: chunks rank and 2cp-1-rank of 2cp."""
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


class ContextParallel:
    """Splits micro-batches over the cp group and, while one is in flight, gives the model its mask and K/V."""

    def __init__(self, model: Llama, env: Dist):
        self.cp, self.rank, self.group = env.cp, env.cp_rank, env.cp_mesh.get_group()
        self.document_masking = model.document_masking
        self.state = None  # (this rank's window positions (T/cp,), the window's positions (B, T), window order)
        model.sequence_mask = self.mask
        for module in model.modules():
            if isinstance(module, Attention):
                module.gather_kv = self.gather_kv

    @contextmanager
    def in_flight(self, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
        """This rank's part (inputs, labels, positions) of a micro-batch (B, T); the seams act until the block
        ends, the backward (and its recomputation under activation checkpointing) included."""
        B, T = inputs.shape
        here = local_positions(T, self.cp, self.rank, inputs.device)
        if positions is None:  # rope by window position, as without context parallelism
            positions = torch.arange(T, device=inputs.device).expand(B, T)
        gathered = torch.cat([local_positions(T, self.cp, r, inputs.device) for r in range(self.cp)])
        self.state = (here, positions, torch.argsort(gathered))  # the gathered keys' window order
        try:
            yield inputs[:, here], labels[:, here], positions[:, here]
        finally:
            self.state = None

    def mask(self, h: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T/cp, T): 0 where this rank's query may see the key (at or before it in the window, and in
        its document under document masking), -inf elsewhere; None with no split micro-batch in flight."""
        if self.state is None:
            return None
        here, positions, _ = self.state
        T = positions.shape[1]
        allowed = torch.arange(T, device=h.device)[None, :] <= here[:, None]  # (T/cp, T)
        allowed = allowed.expand(positions.shape[0], -1, -1)  # (B, T/cp, T)
        if self.document_masking:
            docs = document_ids(positions)
            allowed = allowed & (docs[:, here, None] == docs[:, None, :])
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill_(~allowed, float("-inf"))
        return mask[:, None]  # broadcast over heads

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T/cp, Hd) each -> the whole window's (B, K, T, Hd), in window order."""
        if self.state is None:
            return k, v
        order = self.state[2]
        return tuple(ALL_GATHER(t.contiguous(), gather_dim=2, group=self.group).index_select(2, order) for t in (k, v))
