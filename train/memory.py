"""Per-rank memory estimate from the config alone: checked at start-up, before allocating.

Activations are what torch.compile keeps for the backward of each block, counted tensor by tensor
(tests/test_memory.py checks the count against a compiled block on the CPU). Measured peaks on one
H100 (torch 2.11, compile on; these runs kept a one-GPU residual stream in fp32, bf16 now: by the
same count about 1 GiB less at 1B and 0.5 GiB at 8B_L8): Llama-3.2-1B shape at 2 x 8192, 42.6 GiB
(estimated 42.0); Llama-3-8B layer shape with 8 layers at 1 x 8192, 50.9 (50.5) with no activation
checkpointing and 44.9 (46.0) with selective.
"""

from model import ModelConfig, num_params
from model.attention import FLEX_BLOCK

GiB = 2**30


def block_saved_bytes(cfg: ModelConfig, ac_mode: str, compute_bytes: int) -> int:
    """Bytes one token keeps alive in one compiled block until its backward."""
    d, f, kv = cfg.dim, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    if ac_mode == "none":
        # The block input, both norm outputs, the rotated q, the attention output and its (T, D)
        # copy; the rotated k and v; the w1 and w3 outputs and their product (w2's input); in fp32
        # two RMS factors and attention's log-sum-exp per head.
        return compute_bytes * (6 * d + 2 * kv + 3 * f) + 4 * (2 + cfg.n_heads)
    if ac_mode == "selective":
        # The block input and what the matmuls and attention produced (q, k, v, attention, wo, w1,
        # w3); norms, rope and SwiGLU's product are recomputed.
        return compute_bytes * (4 * d + 2 * kv + 2 * f) + 4 * cfg.n_heads
    return compute_bytes * d  # full: the block input only


def checkpointed_blocks(cfg: ModelConfig, ac_mode: str, ac_every: int) -> int:
    if ac_mode == "every_k":
        return (cfg.n_layers + ac_every - 1) // ac_every
    return 0 if ac_mode == "none" else cfg.n_layers


def activation_bytes_per_token(cfg: ModelConfig, ac_mode: str, compute_bytes: int, ac_every: int = 2) -> int:
    """Bytes one token's activations keep alive across all blocks for the backward (the mode is
    checked at start-up by ParallelSection.check)."""
    none = block_saved_bytes(cfg, "none", compute_bytes)
    if ac_mode == "none":
        return cfg.n_layers * none
    if ac_mode == "every_k":
        checkpointed = checkpointed_blocks(cfg, ac_mode, ac_every)
        return checkpointed * block_saved_bytes(cfg, "full", compute_bytes) + (cfg.n_layers - checkpointed) * none
    # A checkpointed block's full set exists again while it is recomputed, one block at a time.
    return cfg.n_layers * block_saved_bytes(cfg, ac_mode, compute_bytes) + none


def document_mask_bytes(micro_batch: int, seq_len: int, kind: str, compute_bytes: int = 2) -> int:
    """The one document mask of a micro-batch (model/attention.py), alive through its forward and
    backward and shared by every block: kind "none", "sdpa" or "flex"."""
    if kind == "sdpa":  # additive (B, 1, T, T) in the compute dtype
        return micro_batch * seq_len * seq_len * compute_bytes
    if kind == "flex":
        # BlockMask: per row and tile row, int32 tile counts (n) and indices (n x n), for the partial
        # and the full tiles, by query and (for the backward) by key.
        n = -(-seq_len // FLEX_BLOCK)
        return 4 * micro_batch * n * (n + 1) * 4
    return 0


def estimate_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                    compute_bytes: int = 2, ac_every: int = 2, document_mask: str = "none") -> dict[str, float]:
    """Peak bytes per rank by kind. Parameters, gradients and AdamW moments are fp32 and sharded over
    dp_shard. At the peak, late in the forward, activations are alive but only part of the gradients
    (a quarter, measured) exist yet. document_mask: the kind of mask document masking builds ("sdpa",
    "flex"), or "none"."""
    n = num_params(cfg)
    head = cfg.vocab_size * cfg.dim  # the output weight; the embedding is as large
    outside_blocks = head * (1 if cfg.tie_embeddings else 2)
    block = (n - outside_blocks) / cfg.n_layers
    tokens = micro_batch * seq_len
    if compute_bytes == 4:
        copies = 0.0
    elif dp_shard == 1:
        # Autocast casts each weight as it is used. A block's casts live until its backward unless the
        # block is checkpointed (its recompute casts again); the output head is cast once for the loss.
        kept = cfg.n_layers - checkpointed_blocks(cfg, ac_mode, ac_every)
        recomputing = 1 if kept < cfg.n_layers else 0
        copies = ((kept + recomputing) * block + head) * compute_bytes
    else:
        # FSDP: about two blocks gathered at a time, and the root (embedding, head) gathered all step.
        copies = (2 * block + outside_blocks) * compute_bytes
    # The fused cross-entropy holds one chunk of logits (~2**28 elements) in three forms, plus an
    # fp32 gradient of the output weight.
    cross_entropy = min(tokens * cfg.vocab_size, 2**28) * (2 * compute_bytes + 4) + 4 * head
    est = {
        "params": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "weight_copies": copies,
        "activations": tokens * activation_bytes_per_token(cfg, ac_mode, compute_bytes, ac_every),
        "cross_entropy": cross_entropy,
        "grads": 0.25 * 4 * n / dp_shard,
    }
    if document_mask != "none":
        est["document_mask"] = document_mask_bytes(micro_batch, seq_len, document_mask, compute_bytes)
    # After the backward all gradients exist while the activations are gone: take the larger peak.
    step_peak = (16 * n / dp_shard + cross_entropy) - sum(est.values())
    est["grads"] += max(0.0, step_peak)
    return est


def total_gib(estimate: dict[str, float]) -> float:
    return sum(estimate.values()) / GiB
