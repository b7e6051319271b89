"""Per-rank memory estimate from the config alone: checked at start-up, before allocating."""

from model import ModelConfig, num_params

GiB = 2**30


def estimate_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                    compute_bytes: int = 2, ac_every: int = 2) -> dict[str, float]:
    """Bytes per rank by kind. Parameters, gradients and AdamW moments are fp32 and sharded over
    dp_shard; two blocks' parameters are unsharded in the compute dtype at any time (prefetch);
    activations are what each block saves for the backward (rough, calibrated on the H100)."""
    n = num_params(cfg)
    d, f, T, L = cfg.dim, cfg.hidden_dim, seq_len, cfg.n_layers
    kv = cfg.kv_heads * cfg.head_dim
    block_params = (num_params(cfg) - cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) - d) / L
    tokens = micro_batch * T
    # Saved per block per token, in elements: norm inputs and outputs, q, k, v, attention output,
    # the attention projection's input, w1/w3 outputs, silu, their product; fp32 norm copies.
    full = tokens * (compute_bytes * (6 * d + 2 * kv + 4 * f) + 4 * 2 * d)
    boundary = tokens * d * compute_bytes  # a checkpointed block keeps only its input
    selective = tokens * (compute_bytes * (3 * d + 2 * kv + 2 * f))  # matmul outputs kept
    per_block = {"none": [full] * L, "full": [boundary] * L, "selective": [selective] * L,
                 "every_k": [boundary if i % ac_every == 0 else full for i in range(L)]}[ac_mode]
    # Activations: all saved blocks, plus one block being recomputed in the backward.
    activations = sum(per_block) + (full if ac_mode != "none" else 0)
    logits = tokens * cfg.vocab_size * (compute_bytes + 4 + 4)  # logits, fp32 copy, its gradient
    return {
        "params": 4 * n / dp_shard,
        "grads": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "unsharded_blocks": 2 * block_params * compute_bytes * (dp_shard > 1),
        "activations": activations,
        "logits": logits,
    }


def total_gib(estimate: dict[str, float]) -> float:
    return sum(estimate.values()) / GiB
