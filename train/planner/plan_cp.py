"""Context parallelism in the planner (train/planner/plan.py): its attention work and its K/V traffic.

Under parallel.cp (train/parallel/context_parallel.py) the cp ranks of a group split each micro-batch's window
into 2 x cp chunks, rank r holding chunks r and 2cp-1-r, so that each rank's queries see the same number of causal
keys: every rank does 1/cp of the step's work, attention's quadratic part included. On CUDA attention runs as flex
attention with a BlockMask of the rank's (T/cp, T) tiles, which skips the tiles no query may see as the causal
kernels the efficiency was measured with do (Hardware.cp_mask_attention = 1; SDPA's dense mask would be 2).

Each block all-gathers its keys and values, (B, K/tp, T/cp, Hd) each, to the whole window's, and the backward
reduce-scatters their gradients; activation checkpointing (selective too: its policy keeps matmul and attention
outputs, not the all-gather's) gathers them again when it recomputes the block. A ring collective over cp GPUs
moves (cp - 1)/cp of the gathered tensor through each GPU's link; a group within a node's GPUs (cp x tp of them:
tp is innermost, cp next) runs at NVLink's bandwidth, one that spans nodes at the network's.
"""

from model import ModelConfig

from .memory import checkpointed_blocks


def cp_problem(seq_len: int, cp: int, tp: int) -> str | None:
    """Why cp ranks cannot split this window (train/config.py refuses it), or None."""
    if cp > 1 and seq_len % (2 * cp * tp):
        return (f"data.seq_len={seq_len} must be divisible by 2 x cp x tp = {2 * cp * tp} under context parallelism "
                f"(2 chunks per cp rank, each split again by tp); pick a cp that divides it")
    return None


def cp_bytes(model_cfg: ModelConfig, micro_batch: int, seq_len: int, ac_mode: str, ac_every: int, cp: int,
             tp: int) -> float:
    """Bytes one GPU sends for a micro-batch's K/V all-gathers and their gradients' reduce-scatters (bf16)."""
    if cp == 1:
        return 0.0
    gathered = 2 * micro_batch * seq_len * model_cfg.kv_heads * model_cfg.head_dim * 2 / tp  # K and V, one block
    # Per block: the forward's all-gather and the backward's reduce-scatter; the all-gather again in a
    # checkpointed block's recomputation.
    collectives = 2 * model_cfg.n_layers + checkpointed_blocks(model_cfg, ac_mode, ac_every)
    return collectives * gathered * (cp - 1) / cp


def cp_seconds(model_cfg: ModelConfig, micro_batch: int, seq_len: int, ac_mode: str, ac_every: int, layout,
               hw) -> float:
    """Time on the wire of a micro-batch's CP collectives: NVLink while cp x tp fits a node, the network beyond."""
    within = layout.cp * layout.tp <= hw.gpus_per_node
    bandwidth = hw.intra_node_gbs if within else hw.inter_node_gbs
    return cp_bytes(model_cfg, micro_batch, seq_len, ac_mode, ac_every, layout.cp, layout.tp) / (bandwidth * 1e9)


def attention_share(model_cfg: ModelConfig, seq_len: int, flops_per_token: int) -> float:
    """Attention's T x T matmuls as a share of the counted FLOPs (model/flops.py counts the full square)."""
    return 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_dim * seq_len / flops_per_token
