"""Tensor parallelism in the planner (train/planner/plan.py): the traffic of its per-block collectives.

With sequence parallelism (train/parallel/tensor_parallel.py) each block's forward all-gathers the (tokens, dim)
norm output before attention's column-wise q/k/v and again before the feed-forward's w1/w3, and
reduce-scatters the row-wise o and w2 outputs back to sequence shards: 2 all-gathers and 2
reduce-scatters. The backward runs each one's transpose (4 more), and activation checkpointing re-runs
the forward's. A ring collective over tp GPUs moves (tp - 1)/tp of the tensor through each GPU's link.
"""

from model import ModelConfig


def recomputed_collectives(ac_mode: str, n_layers: int, ac_every: int, gather_bytes: int) -> float:
    """Bytes per activation element that recomputation adds per block (on average over the blocks)."""
    forward = 2 * gather_bytes + 2 * 2
    if ac_mode == "full":
        return forward
    if ac_mode == "every_k":
        return forward * ((n_layers + ac_every - 1) // ac_every) / n_layers
    if ac_mode == "selective":
        # The matmul outputs are kept, the norms are not: both norm outputs are gathered again, and the
        # o projection's output reduce-scattered again to rebuild the residual the second norm reads.
        return 2 * gather_bytes + 2
    return 0.0


def tp_bytes(model_cfg: ModelConfig, tokens: int, ac_mode: str, ac_every: int, tp: int, float8: bool) -> float:
    """Bytes one GPU sends for a micro-batch's TP collectives (its tp ranks share `tokens`)."""
    if tp == 1:
        return 0.0
    gather = 1 if float8 else 2  # float8 TP gathers the matmul inputs in float8 (torchao's TP styles)
    forward = 2 * gather + 2 * 2
    backward = 4 * 2  # the transposes carry bf16 gradients
    per_block = forward + backward + recomputed_collectives(ac_mode, model_cfg.n_layers, ac_every, gather)
    # Outside the blocks: the row-wise embedding's reduce-scatter and the loss's all-gather of the final
    # hidden states, and their transposes.
    outside = 4 * 2
    return (model_cfg.n_layers * per_block + outside) * tokens * model_cfg.dim * (tp - 1) / tp


def tp_seconds(model_cfg: ModelConfig, tokens: int, ac_mode: str, ac_every: int, tp: int, hw, float8: bool) -> float:
    """Time on the wire of a micro-batch's TP collectives: NVLink inside a node, the network beyond it."""
    bandwidth = hw.intra_node_gbs if tp <= hw.gpus_per_node else hw.inter_node_gbs
    return tp_bytes(model_cfg, tokens, ac_mode, ac_every, tp, float8) / (bandwidth * 1e9)


def split_problem(model_cfg: ModelConfig, seq_len: int, tp: int) -> str | None:
    """Why tp ranks cannot split this model and sequence evenly (train/parallel/tensor_parallel.py refuses it),
    or None."""
    for key, value in (("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.kv_heads),
                       ("model.vocab_size", model_cfg.vocab_size), ("hidden_dim", model_cfg.hidden_dim),
                       ("data.seq_len", seq_len)):
        if value % tp:
            return f"tp={tp} must divide {key}={value} (each TP rank takes an equal share); pick a tp that divides it"
    return None


def async_tp_share(model_cfg: ModelConfig, tp: int, hw, float8: bool, matmul_rate: float) -> float:
    """The share of TP's collective time async TP leaves exposed. It splits each collective into tp pieces and
    overlaps all but the first with the matmul that collective feeds (or is fed by): per block, forward, the first
    all-gather with q/k/v, the first reduce-scatter with o, the second all-gather with w1/w3, the second
    reduce-scatter with w2; backward, their transposes with the same matmuls' input gradients. A collective waits
    for max(its first piece (hw.async_tp_exposed), what the matmul is too short to hide). matmul_rate: FLOP/s."""
    if tp == 1:
        return 0.0
    d, f, kv = model_cfg.dim, model_cfg.hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    link = (hw.intra_node_gbs if tp <= hw.gpus_per_node else hw.inter_node_gbs) * 1e9
    gather = 1 if float8 else 2
    forward = ((gather, d + 2 * kv), (2, d), (gather, 2 * f), (2, f))  # (bytes an element, matmul width) per token
    comm = exposed = 0.0
    for element_bytes, width in forward + tuple((2, width) for _, width in forward):
        wire = element_bytes * d * (tp - 1) / tp / link
        matmul = 2 * d * width / tp / matmul_rate
        comm += wire
        exposed += max(wire * hw.async_tp_exposed, wire - matmul)
    return exposed / comm
