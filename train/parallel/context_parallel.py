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
no query of this rank may see (the kernel branch docs/gpu.md lists). The mask needs only this rank's own positions:
they count up by one from each document's first token (0), so a query at window position p and document position
d has its document's keys at p - d .. p. Hence a pipeline stage (parallel.pp, train/parallel/pipeline.py) builds it
from the positions it is handed, one micro-batch at a time, with no other rank's.

The model only offers the seams (Llama.sequence_mask, Attention.gather_kv, set on every pipeline stage); they act
while a split batch is in flight (`in_flight`: a micro-batch, or a pipeline step's micro-batches), so sampling and
other whole-window forwards run as without context parallelism. Under torch.compile (per block) the all-gather is
traced into each block's graph as a functional collective; the mask is built outside the blocks.
"""

from contextlib import contextmanager

import torch
import torch.distributed._functional_collectives as funcol
from torch.nn.attention.flex_attention import create_block_mask

from model.attention import FLEX_BLOCK, compiled_flex_attention, default_kind
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

    def __init__(self, models: Llama | list[Llama], env: Dist):
        """models: the rank's model, or its pipeline stages (each a Llama of its own blocks)."""
        models = models if isinstance(models, list) else [models]
        self.cp, self.rank, self.group = env.cp, env.cp_rank, env.cp_mesh.get_group()
        self.document_masking = models[0].document_masking
        self.kind = models[0].mask_kind or default_kind(env.device)
        self.state = None  # (this rank's window positions (T/cp,), the gathered keys' window order (T,))
        for model in models:
            model.sequence_mask = self.mask
            for module in model.modules():
                if isinstance(module, Attention):
                    module.gather_kv = self.gather_kv

    @contextmanager
    def in_flight(self, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None):
        """This rank's part (inputs, labels, positions) of micro-batches (B, T); the seams act until the block
        ends, the backward (and its recomputation under activation checkpointing) included."""
        B, T = inputs.shape
        here = local_positions(T, self.cp, self.rank, inputs.device)
        if positions is None:  # rope by window position, as without context parallelism
            positions = torch.arange(T, device=inputs.device).expand(B, T)
        gathered = torch.cat([local_positions(T, self.cp, r, inputs.device) for r in range(self.cp)])
        self.state = (here, torch.argsort(gathered))
        try:
            yield inputs[:, here], labels[:, here], positions[:, here]
        finally:
            self.state = None

    def mask(self, h: torch.Tensor, positions: torch.Tensor | None):
        """The mask of this rank's queries over the whole window (window_mask) for the micro-batch in flight, from
        its positions (B, T/cp) as in_flight split them; None with none in flight."""
        if self.state is None:
            return None
        here = self.state[0]
        if positions is None:
            positions = here.expand(h.shape[0], -1)
        return window_mask(here, positions, len(here) * self.cp, self.document_masking, self.kind, h.dtype)

    def gather_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, T/cp, Hd) each -> the whole window's (B, K, T, Hd), in window order."""
        if self.state is None:
            return k, v
        order = self.state[1]
        return tuple(ALL_GATHER(t.contiguous(), gather_dim=2, group=self.group).index_select(2, order) for t in (k, v))


def holder(position: int, seq_len: int, cp: int) -> tuple[int, int]:
    """The cp rank that holds window position `position`, and its index among that rank's positions."""
    c = seq_len // (2 * cp)
    chunk = position // c
    return (chunk, position % c) if chunk < cp else (2 * cp - 1 - chunk, c + position % c)


def window_mask(here: torch.Tensor, positions: torch.Tensor, seq_len: int, document_masking: bool, kind: str,
                dtype: torch.dtype):
    """Queries at window positions `here` (T/cp,) and document positions `positions` (B, T/cp) over the window's
    seq_len keys: a key at or before the query and (document_masking) in its document, which began at window
    position here - positions (before the window where that is below 0). "sdpa": an additive (B, 1, T/cp, T)
    tensor, 0 where allowed and -inf elsewhere; "flex": a BlockMask of the same rule."""
    B = positions.shape[0]
    first = here - positions if document_masking else torch.zeros_like(positions)  # (B, T/cp): the first key seen
    if kind == "flex":
        if positions.is_cuda:
            compiled_flex_attention()  # before any compiled block traces `attend`

        def causal_in_document(b, h, q, kv):
            return (here[q] >= kv) & (first[b, q] <= kv)

        return create_block_mask(causal_in_document, B, None, len(here), seq_len, device=positions.device,
                                 BLOCK_SIZE=FLEX_BLOCK, _compile=positions.is_cuda)
    keys = torch.arange(seq_len, device=positions.device)
    allowed = (keys[None, None, :] <= here[None, :, None]) & (keys[None, None, :] >= first[:, :, None])  # (B, T/cp, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill_(~allowed, float("-inf"))
    return mask[:, None]  # broadcast over heads
