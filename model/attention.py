"""Causal self-attention, optionally within documents: in a packed window a token then attends to the
earlier tokens of its own document only, never to the tail of an unrelated one before it.

The document mask is built once per micro-batch (Llama.forward) from the rope positions, which
restart at 0 at each document's first token, and handed to every block: built per layer it would
cost more than the attention itself. Two kinds, picked by device (`default_kind`):

- "sdpa" (CPU, and the reference the GPU path is tested against): scaled_dot_product_attention with
  an explicit additive (B, 1, T, T) mask, 0 where allowed and -inf elsewhere.
- "flex" (CUDA): compiled flex_attention with a BlockMask, which skips the tiles that lie wholly
  outside a document. (It has no backward on the CPU in torch 2.13; its forward runs there.)

A varlen kernel would be a third kind: torch.nn.attention.varlen.varlen_attn over the (B*T, heads, Hd)
tokens with cumulative document lengths from the same starts (causal is is_causal=True in torch 2.10,
window_size=(-1, 0) after). Which GPU kind is faster is to be measured on the GPU; `default_kind`
is where the choice is made.

Shape letters as in llama.py: B batch, T sequence length, heads H (queries) or K (keys/values), Hd.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# cuDNN's attention is the fastest on Hopper (about 1.55x flash attention 2 forward + backward at
# seq 8192, GQA included) but PyTorch does not try it first; the others remain as fallbacks.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]
MASK_KINDS = ("sdpa", "flex")
FLEX_BLOCK = 128  # the BlockMask's tile (create_block_mask's default)

_compiled_flex = None


def compiled_flex_attention():
    """flex_attention compiled, made at first use (torch.compile costs seconds at import): eager, it is a
    slow reference that materialises every score; compiled, a fused kernel."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def default_kind(device: torch.device) -> str:
    """The document-mask kind a device uses: flex on CUDA (to be checked against varlen by measurement)."""
    return "flex" if device.type == "cuda" else "sdpa"


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) rope positions that restart at 0 at each document -> (B, T) document numbers 1, 2, ...
    A window's first token starts a document even when its BOS lies in the window before."""
    return (position_ids == 0).cumsum(dim=-1)


def document_mask(position_ids: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor | BlockMask:
    """The causal, block-diagonal-by-document mask of a micro-batch, for `attend`; dtype is the
    attention's compute dtype (the sdpa mask is added to its scores)."""
    docs = document_ids(position_ids)
    if kind == "sdpa":
        return _additive_mask(docs, dtype)
    if kind == "flex":
        return _block_mask(docs)
    raise ValueError(f"document mask kind {kind!r} is not one of {', '.join(MASK_KINDS)}")


def _additive_mask(docs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T): 0 where query t may see key s (s <= t, same document), -inf elsewhere. Additive in
    the compute dtype rather than boolean: SDPA would turn a boolean mask into this in every layer
    and keep each copy for the backward; this one tensor is shared by all of them."""
    T = docs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal  # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=docs.device).masked_fill_(~allowed, float("-inf"))
    return mask[:, None]  # broadcast over heads


def _block_mask(docs: torch.Tensor) -> BlockMask:
    """flex_attention's BlockMask for the same rule (tiles of FLEX_BLOCK x FLEX_BLOCK, one per row of
    the batch, shared by the heads); compiled on CUDA so that no (B, T, T) tensor is ever made."""
    B, T = docs.shape
    if docs.is_cuda:
        compiled_flex_attention()  # here, before any compiled block traces `attend`

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv])

    return create_block_mask(same_document_causal, B, None, T, T, device=docs.device, BLOCK_SIZE=FLEX_BLOCK,
                             _compile=docs.is_cuda)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | BlockMask | None = None,
           enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd)) v for q (B, H, T, Hd), k and v (B, K, T, Hd): causal, and within
    documents when given a `document_mask`. GQA: each group of H/K query heads shares one k/v head."""
    if isinstance(mask, BlockMask):
        flex = compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=enable_gqa)
    with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
        if mask is None:  # no documents: the causal kernel, no mask tensor
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
