"""Per-rank memory estimate from the config alone: checked at start-up, before allocating.

Calibrated on one H100 (torch 2.11, compile on) against measured peaks: Llama-3.2-1B shape at
2 x 8192 (42.6 GiB measured, 42.0 estimated) and the Llama-3-8B layer shape with 8 layers at
1 x 8192 (50.9 measured, 51.4 estimated). Those runs kept a one-GPU residual stream in fp32; it is
bf16 now, so these estimates should run high there by a few percent until re-measured.
"""

from model import ModelConfig, num_params

GiB = 2**30


def activation_bytes_per_token(cfg: ModelConfig, ac_mode: str, compute_bytes: int, ac_every: int = 2) -> float:
    """Bytes one token's activations keep alive across all blocks for the backward."""
    # Checked here as well as in parallelize(), which runs later: a bad value must not crash this first.
    if ac_mode not in ("none", "full", "selective", "every_k"):
        raise ValueError(f"parallel.activation_checkpointing={ac_mode!r}; choose none, full, selective or every_k")
    if ac_every < 1:
        raise ValueError(f"parallel.ac_every={ac_every} must be >= 1")
    d, f, kv = cfg.dim, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    full = compute_bytes * (6 * d + 2 * kv + 2 * f)  # norm outputs, q/k/v, attention out, w1 and w3 outputs
    kept = {"none": full, "full": compute_bytes * d, "selective": compute_bytes * (3 * d + 2 * kv + 2 * f)}
    if ac_mode == "every_k":
        checkpointed = (cfg.n_layers + ac_every - 1) // ac_every
        return checkpointed * kept["full"] + (cfg.n_layers - checkpointed) * full
    per_block = kept[ac_mode] * cfg.n_layers
    return per_block + (full if ac_mode != "none" else 0)  # a checkpointed block recomputes one at a time


def estimate_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                    compute_bytes: int = 2, ac_every: int = 2) -> dict[str, float]:
    """Peak bytes per rank by kind. Parameters, gradients and AdamW moments are fp32 and sharded over
    dp_shard; compute copies of the weights are unsharded (all of them under single-device autocast,
    about two blocks' worth under FSDP). At the peak, late in the forward, activations are alive but
    only part of the gradients (a quarter, measured) exist yet."""
    n = num_params(cfg)
    block = (n - cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)) / cfg.n_layers
    tokens = micro_batch * seq_len
    copies = 0 if compute_bytes == 4 else (n if dp_shard == 1 else 2 * block) * compute_bytes
    # The fused cross-entropy holds one chunk of logits (~2**28 elements) in three forms, plus an
    # fp32 gradient of the output weight.
    cross_entropy = min(tokens * cfg.vocab_size, 2**28) * (2 * compute_bytes + 4) + 4 * cfg.vocab_size * cfg.dim
    est = {
        "params": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "weight_copies": copies,
        "activations": 1.25 * tokens * activation_bytes_per_token(cfg, ac_mode, compute_bytes, ac_every),
        "cross_entropy": cross_entropy,
        "grads": 0.25 * 4 * n / dp_shard,
    }
    # After the backward all gradients exist while the activations are gone: take the larger peak.
    step_peak = (16 * n / dp_shard + cross_entropy) - sum(est.values())
    est["grads"] += max(0.0, step_peak)
    return est


def total_gib(estimate: dict[str, float]) -> float:
    return sum(estimate.values()) / GiB
