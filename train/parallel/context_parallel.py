"""Context parallelism (parallel.cp): each micro-batch's sequence split over the cp ranks, attention over all of it.

The split is balanced for causal attention: the window of T tokens is cut into 2 x cp chunks and cp rank r holds
chunks r and 2cp-1-r, so every rank's queries, summed, see the same number of keys (a plain split would leave the
last rank all the work). Inputs, labels and positions are split alike; positions are the window's (or its
documents'), so rope and the masks use each token's place in the whole window.

Attention is Meta's Llama 3 recipe: each block's keys and values (B, K, T/cp, Hd) are all-gathered over the cp
group (funcol's autograd all-gather: the backward reduce-scatters their gradients), put back in window order, and
this rank's queries attend to all T keys under one mask per micro-batch: a key at or before the query in the window
and, with document masking, in the same document. The mask's kind is the model's (attention.default_kind): an
additive (B, 1, T/cp, T) tensor for SDPA on the CPU, a BlockMask for flex attention on CUDA, which skips the tiles
no query of this rank may see (the kernel branch docs/gpu.md lists).

The model only offers the seams (Llama.sequence_mask, Attention.gather_kv); they act while a split micro-batch is
in flight (`in_flight`), so sampling and other whole-window forwards run as without context parallelism.
"""

from contextlib import contextmanager

import torch
import torch.distributed._functional_collectives as funcol
from torch.nn.attention.flex_attention import create_block_mask

from model.attention import FLEX_BLOCK, compiled_flex_attention, default_kind, document_ids
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
        self.document_masking, self.kind = model.document_masking, model.mask_kind or default_kind(env.device)
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

    def mask(self, h: torch.Tensor):
        """The mask of this rank's queries over the whole window (window_mask), for the micro-batch in flight;
        None with none in flight."""
        if self.state is None:
            return None
        here, positions, _ = self.state
        return window_mask(here, positions, self.document_masking, self.kind, h.dtype)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T/cp, Hd) each -> the whole window's (B, K, T, Hd), in window order."""
        if self.state is None:
            return k, v
        order = self.state[2]
        return tuple(ALL_GATHER(t.contiguous(), gather_dim=2, group=self.group).index_select(2, order) for t in (k, v))


def window_mask(here: torch.Tensor, positions: torch.Tensor, document_masking: bool, kind: str, dtype: torch.dtype):
    """Queries at window positions `here` (T/cp,) over the whole window's keys: a key at or before the query and
    (document_masking) in its document, whose starts the window's positions (B, T) mark. "sdpa": an additive
    (B, 1, T/cp, T) tensor, 0 where allowed and -inf elsewhere; "flex": a BlockMask of the same rule."""
    B, T = positions.shape
    docs = document_ids(positions) if document_masking else torch.zeros_like(positions)
    if kind == "flex":
        if docs.is_cuda:
            compiled_flex_attention()  # before any compiled block traces `attend`

        def causal_in_document(b, h, q, kv):
            return (here[q] >= kv) & (docs[b, here[q]] == docs[b, kv])

        return create_block_mask(causal_in_document, B, None, len(here), T, device=docs.device,
                                 BLOCK_SIZE=FLEX_BLOCK, _compile=docs.is_cuda)
    allowed = torch.arange(T, device=docs.device)[None, None, :] <= here[None, :, None]  # (1, T/cp, T)
    allowed = allowed & (docs[:, here, None] == docs[:, None, :])  # (B, T/cp, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill_(~allowed, float("-inf"))
    return mask[:, None]  # broadcast over heads
