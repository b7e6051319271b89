"""Parameter counts and training FLOPs per token, computed from the config alone (no weights)."""

from .config import ModelConfig


def num_params(cfg: ModelConfig, exclude_embedding: bool = False) -> int:
    """Parameter count. `exclude_embedding` drops the input embedding table (a lookup, not a matmul);
    the output projection stays: it is a real V x D matmul even when tied to the embedding."""
    d, hd = cfg.dim, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # wq, wo; wk, wv
    ffn = 3 * d * cfg.hidden_dim  # w1, w2, w3
    per_layer = attn + ffn + 2 * d  # + two RMSNorm weights
    embedding = cfg.vocab_size * d
    output = cfg.vocab_size * d
    total = cfg.n_layers * per_layer + d + embedding + (0 if cfg.tie_embeddings else output)
    if exclude_embedding:
        return total - embedding + (output if cfg.tie_embeddings else 0)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), as torchtitan and Megatron-LM count them:

        6 * N + 12 * n_layers * n_heads * head_dim * seq_len

    N is `num_params(cfg, exclude_embedding=True)`: each weight costs 2 FLOPs per token in the
    forward matmul and 4 in the backward. The second term is attention's two T x T matmuls
    (Q K^T and A V: 2 * 2 * T * head_dim per head and token forward, times 3 for the backward).
    Causal masking is NOT discounted: the full T x T square is counted, as torchtitan does, so our
    MFU compares with theirs; kernels that skip the masked half do about half that attention work.
    """
    n = num_params(cfg, exclude_embedding=True)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
