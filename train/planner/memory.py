"""Per-rank memory estimate from the config alone: checked at start-up, before allocating.

Activations are what torch.compile keeps for the backward of each block, counted tensor by tensor
(tests/train/parallel/test_memory.py checks the count against a compiled block on the CPU). Measured peaks on one
H100 (torch 2.11, compile on; these runs kept a one-GPU residual stream in fp32, bf16 now: by the
same count about 1 GiB less at 1B and 0.5 GiB at 8B_L8): Llama-3.2-1B shape at 2 x 8192, 42.6 GiB
(estimated 42.0); Llama-3-8B layer shape with 8 layers at 1 x 8192, 50.9 (50.5) with no activation
checkpointing and 44.9 (46.0) with selective.

Under tensor parallelism (tp > 1, train/parallel/tensor_parallel.py) weights, gradients and optimizer state are
split over tp ranks and then sharded over dp_shard; activations are split too (heads and hidden units,
and the sequence-parallel residual stream and norms), except what each TP rank holds whole: see
replicated_bytes.

Under pipeline parallelism (estimate_stage_memory) a rank holds only its stages' layers, the embedding
on the first stage and the norm and head on the last, keeps several micro-batches' activations alive
(how many depends on the schedule: train/planner/plan_pp.py), and holds its weights gathered and its gradients
whole, in fp32, for the whole step: torch.distributed.pipelining turns off FSDP's resharding after
backward and its gradient reduction until the last micro-batch (PipelineStage.backward_maybe_with_nosync),
and FSDP2 accumulates unreduced gradients in its fp32 reduce dtype.

Under context parallelism (cp > 1, train/parallel/context_parallel.py) a rank holds T/cp of each sequence's tokens:
its activations and its loss are those of T/cp tokens, and FSDP shards the fp32 state over dp_shard x cp (the
caller's dp_shard counts both, as the trainer's mesh does). CP adds (context_parallel_bytes) the one mask of a
micro-batch's T/cp queries over T keys (a BlockMask on CUDA; on the CPU an additive (B, 1, T/cp, T) in the compute
dtype), which replaces the document mask, and each block's keys and
values all-gathered to the whole window, (B, K/tp, T, Hd) each, which SDPA's backward needs: a block that is not
recomputed keeps them (in place of its own T/cp rows of k and v, which the all-gather's backward does not need),
and under activation checkpointing (selective too: its policy saves matmul and attention outputs, not the
all-gather's) only the block being recomputed holds them.
"""

from dataclasses import replace

from model import ModelConfig, num_params
from model.attention import FLEX_BLOCK

GiB = 2**30


def block_saved_bytes(model_cfg: ModelConfig, ac_mode: str, compute_bytes: int) -> int:
    """Bytes one token keeps alive in one compiled block until its backward."""
    d, f, kv = model_cfg.dim, model_cfg.hidden_dim, model_cfg.kv_heads * model_cfg.head_dim
    if ac_mode == "none":
        # The block input, both norm outputs, the rotated q, the attention output and its (T, D)
        # copy; the rotated k and v; the w1 and w3 outputs and their product (w2's input); in fp32
        # two RMS factors and attention's log-sum-exp per head.
        return compute_bytes * (6 * d + 2 * kv + 3 * f) + 4 * (2 + model_cfg.n_heads)
    if ac_mode == "selective":
        # The block input and what the matmuls and attention produced (q, k, v, attention, wo, w1,
        # w3); norms, rope and SwiGLU's product are recomputed.
        return compute_bytes * (4 * d + 2 * kv + 2 * f) + 4 * model_cfg.n_heads
    return compute_bytes * d  # full: the block input only


def replicated_bytes(model_cfg: ModelConfig, ac_mode: str, compute_bytes: int) -> int:
    """Of block_saved_bytes, what tensor parallelism leaves whole on every TP rank: with no AC the two
    all-gathered norm outputs the column-wise matmuls keep for their weight gradients; with selective AC
    the row-wise o projection's (T, D) partial sums, an mm output it saves. Full AC keeps only the
    sequence-parallel block input."""
    if ac_mode == "none":
        return 2 * model_cfg.dim * compute_bytes
    return model_cfg.dim * compute_bytes if ac_mode == "selective" else 0


def block_bytes(model_cfg: ModelConfig, ac_mode: str, compute_bytes: int, tp: int = 1) -> float:
    """block_saved_bytes on one of tp ranks: the split part divided by tp, the replicated part whole."""
    saved = block_saved_bytes(model_cfg, ac_mode, compute_bytes)
    if tp == 1:
        return saved
    whole = replicated_bytes(model_cfg, ac_mode, compute_bytes)
    return (saved - whole) / tp + whole


def checkpointed_blocks(model_cfg: ModelConfig, ac_mode: str, ac_every: int) -> int:
    if ac_mode == "every_k":
        return (model_cfg.n_layers + ac_every - 1) // ac_every
    return 0 if ac_mode == "none" else model_cfg.n_layers


def activation_bytes_per_token(model_cfg: ModelConfig, ac_mode: str, compute_bytes: int, ac_every: int = 2,
                               tp: int = 1) -> float:
    """Bytes one token's activations keep alive across all blocks for the backward, on one of tp ranks
    (the mode is checked at start-up by ParallelSection.check)."""
    none = block_bytes(model_cfg, "none", compute_bytes, tp)
    if ac_mode == "none":
        return model_cfg.n_layers * none
    if ac_mode == "every_k":
        checkpointed = checkpointed_blocks(model_cfg, ac_mode, ac_every)
        full = block_bytes(model_cfg, "full", compute_bytes, tp)
        return checkpointed * full + (model_cfg.n_layers - checkpointed) * none
    # A checkpointed block's full set exists again while it is recomputed, one block at a time.
    return model_cfg.n_layers * block_bytes(model_cfg, ac_mode, compute_bytes, tp) + none


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


def context_parallel_bytes(model_cfg: ModelConfig, micro_batch: int, seq_len: int, cp: int, ac_mode: str,
                           compute_bytes: int, ac_every: int = 2, tp: int = 1,
                           mask_kind: str = "flex") -> dict[str, float]:
    """What context parallelism adds on one rank (module docstring): "cp_mask", the micro-batch's mask of T/cp
    queries over T keys (mask_kind: the device's; "flex", CUDA's BlockMask, 1/cp of a whole window's; "sdpa", the
    CPU's additive (B, 1, T/cp, T)), and "cp_kv", the gathered keys and values beyond the T/cp rows block_bytes
    counts."""
    if cp == 1:
        return {}
    if mask_kind == "flex":  # a BlockMask's tile rows are the query tiles, 1/cp of the window's
        mask = document_mask_bytes(micro_batch, seq_len, "flex") / cp
    else:
        mask = micro_batch * (seq_len // cp) * seq_len * compute_bytes
    gathered = 2 * micro_batch * seq_len * model_cfg.kv_heads * model_cfg.head_dim * compute_bytes / tp  # K and V
    checkpointed = checkpointed_blocks(model_cfg, ac_mode, ac_every)
    holding = model_cfg.n_layers - checkpointed + (1 if checkpointed else 0)  # kept blocks, one recomputed
    return {"cp_mask": mask, "cp_kv": holding * gathered * (1 - 1 / cp)}


def weight_copy_bytes(model_cfg: ModelConfig, ac_mode: str, ac_every: int, dp_shard: int, compute_bytes: int,
                      tp: int = 1) -> float:
    """The compute-dtype copies of the fp32 weights alive at the peak, on one of tp ranks."""
    n = num_params(model_cfg)
    head = model_cfg.vocab_size * model_cfg.dim  # the output weight; the embedding is as large
    outside_blocks = head * (1 if model_cfg.tie_embeddings else 2)
    block = (n - outside_blocks) / model_cfg.n_layers
    if compute_bytes == 4:
        return 0.0
    if dp_shard == 1 and tp > 1:
        return n / tp * compute_bytes  # FSDP over one rank: nothing to reshard, every gathered block stays
    if dp_shard == 1:
        # Autocast casts each weight as it is used. A block's casts live until its backward unless the
        # block is checkpointed (its recompute casts again); the output head is cast once for the loss.
        kept = model_cfg.n_layers - checkpointed_blocks(model_cfg, ac_mode, ac_every)
        recomputing = 1 if kept < model_cfg.n_layers else 0
        return ((kept + recomputing) * block + head) * compute_bytes
    # FSDP: about two blocks gathered at a time, and the root (embedding, head) gathered all step.
    return (2 * block + outside_blocks) * compute_bytes / tp


def loss_bytes(model_cfg: ModelConfig, tokens: int, compute_bytes: int, tp: int = 1, weight_grad: bool = True) -> float:
    """The fused cross-entropy holds one chunk of logits (~2**28 elements; under TP, of its V/tp
    vocabulary rows) in three forms, plus an fp32 gradient of its output weight rows. Under TP it also
    holds every position's hidden state, all-gathered, and that state's gradient."""
    head = model_cfg.vocab_size * model_cfg.dim
    gathered = 2 * tokens * model_cfg.dim * compute_bytes if tp > 1 else 0
    logits = min(tokens * model_cfg.vocab_size / tp, 2**28) * (2 * compute_bytes + 4)
    return logits + 4 * head / tp * weight_grad + gathered


def estimate_memory(model_cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                    compute_bytes: int = 2, ac_every: int = 2, document_mask: str = "none",
                    tp: int = 1, cp: int = 1, cp_mask: str = "flex") -> dict[str, float]:
    """Peak bytes per rank by kind. Parameters, gradients and AdamW moments are fp32, split over tp
    ranks and sharded over dp_shard (the ranks FSDP shards over: dp_shard x cp under context parallelism). At the
    peak, late in the forward, activations are alive but only part of the gradients (a quarter, measured) exist
    yet. document_mask: the kind of mask document masking builds ("sdpa", "flex"), or "none"; seq_len: the whole
    window, of which each of cp ranks holds seq_len / cp tokens."""
    n = num_params(model_cfg) / tp  # this rank's share of every weight before FSDP shards it
    tokens = micro_batch * seq_len // cp
    cross_entropy = loss_bytes(model_cfg, tokens, compute_bytes, tp)
    est = {
        "params": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "weight_copies": weight_copy_bytes(model_cfg, ac_mode, ac_every, dp_shard, compute_bytes, tp),
        "activations": tokens * activation_bytes_per_token(model_cfg, ac_mode, compute_bytes, ac_every, tp),
        "cross_entropy": cross_entropy,
        "grads": 0.25 * 4 * n / dp_shard,
    }
    if document_mask != "none" and cp == 1:  # under CP its own mask replaces the document mask
        est["document_mask"] = document_mask_bytes(micro_batch, seq_len, document_mask, compute_bytes)
    est.update(context_parallel_bytes(model_cfg, micro_batch, seq_len, cp, ac_mode, compute_bytes, ac_every, tp,
                                      cp_mask))
    # After the backward all gradients exist while the activations are gone: take the larger peak.
    step_peak = (16 * n / dp_shard + cross_entropy) - sum(est.values())
    est["grads"] += max(0.0, step_peak)
    return est


def gathered_params(model_cfg: ModelConfig, tp: int = 1) -> float:
    """Parameters FSDP holds gathered on one of tp ranks at a time: two blocks (the one running and the one
    prefetched) and the root (embedding, head and final norm: gathered all step)."""
    n = num_params(model_cfg)
    outside = model_cfg.vocab_size * model_cfg.dim * (1 if model_cfg.tie_embeddings else 2) + model_cfg.dim
    return (2 * (n - outside) / model_cfg.n_layers + outside) / tp


def host_state_bytes(model_cfg: ModelConfig, dp_shard: int, tp: int = 1) -> float:
    """Host memory of one rank under parallel.cpu_offload: its shard of the fp32 parameters and gradients and
    of AdamW's two fp32 moments, 16 bytes a parameter (the ranks of a node each hold theirs)."""
    return 16 * num_params(model_cfg) / tp / dp_shard


def estimate_offload_memory(model_cfg: ModelConfig, micro_batch: int, seq_len: int, ac_mode: str,
                            compute_bytes: int = 2, ac_every: int = 2, document_mask: str = "none",
                            tp: int = 1, cp: int = 1, cp_mask: str = "flex") -> dict[str, float]:
    """Peak device bytes per rank under parallel.cpu_offload (FSDP2's CPUOffloadPolicy): the fp32 parameters,
    gradients and optimizer state are on the host (host_state_bytes), whatever dp_shard. The device holds the
    gathered blocks in the compute dtype (FSDP reshards after each forward), their unsharded gradients in the
    compute dtype and in fp32 for the reduce-scatter (before the copy to the host; the trainer reduces every
    micro-batch, so none accumulate on the device), and the activations and the loss as without offloading (of
    seq_len / cp tokens, with what context parallelism adds)."""
    tokens = micro_batch * seq_len // cp
    gathered = gathered_params(model_cfg, tp)
    est = {
        "weight_copies": gathered * compute_bytes,
        "grads": gathered * (compute_bytes + (4 if compute_bytes != 4 else 0)),
        "activations": tokens * activation_bytes_per_token(model_cfg, ac_mode, compute_bytes, ac_every, tp),
        "cross_entropy": loss_bytes(model_cfg, tokens, compute_bytes, tp),
    }
    if document_mask != "none" and cp == 1:
        est["document_mask"] = document_mask_bytes(micro_batch, seq_len, document_mask, compute_bytes)
    est.update(context_parallel_bytes(model_cfg, micro_batch, seq_len, cp, ac_mode, compute_bytes, ac_every, tp,
                                      cp_mask))
    return est


def stage_params(model_cfg: ModelConfig, layers: int, first: bool, last: bool) -> float:
    """Parameters of a pipeline rank's share: its layers, the embedding on the first stage, the final norm
    and the output head on the last (a tied embedding is held by both)."""
    d, head = model_cfg.dim, model_cfg.vocab_size * model_cfg.dim
    per_layer = (num_params(model_cfg) - d - head * (1 if model_cfg.tie_embeddings else 2)) / model_cfg.n_layers
    return layers * per_layer + head * (first + last) + d * last


def stage_activation_bytes(model_cfg: ModelConfig, tokens: int, ac_mode: str, compute_bytes: int, ac_every: int,
                           tp: int, layers: int, in_flight: float) -> float:
    """Activations of `layers` blocks kept for in_flight micro-batches of `tokens`, plus one block's
    whole set while it is recomputed (checkpointed modes)."""
    recomputing = block_bytes(model_cfg, "none", compute_bytes, tp) if ac_mode in ("selective", "full") else 0.0
    if ac_mode == "every_k":  # which blocks are checkpointed depends on how many there are
        kept = activation_bytes_per_token(replace(model_cfg, n_layers=layers), ac_mode, compute_bytes, ac_every, tp)
    else:
        kept = layers * block_bytes(model_cfg, ac_mode, compute_bytes, tp)
    return tokens * (kept * in_flight + recomputing)


def estimate_stage_memory(model_cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                          compute_bytes: int, ac_every: int, tp: int, layers: int, in_flight: float,
                          first: bool, last: bool, local_stages: int = 1) -> dict[str, float]:
    """Peak bytes by kind on one pipeline rank holding `layers` blocks in local_stages stages, with
    in_flight micro-batches' activations alive at its peak (see the module docstring)."""
    n = stage_params(model_cfg, layers, first, last) / tp
    tokens = micro_batch * seq_len
    boundary = tokens * model_cfg.dim * compute_bytes / tp  # one micro-batch's (sequence-parallel) stage input
    copies = 0.0 if compute_bytes == 4 and dp_shard == 1 else compute_bytes * n  # gathered all step
    est = {
        "params": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "weight_copies": copies,
        "activations": stage_activation_bytes(model_cfg, tokens, ac_mode, compute_bytes, ac_every, tp, layers,
                                              in_flight),
        "grads": 4 * n,  # unreduced fp32 gradients, accumulated over the micro-batches
        # Each stage's receive buffers (input and output gradient) and its outputs kept for the backward.
        "pp_buffers": boundary * (2 * local_stages + in_flight),
    }
    if last:
        est["cross_entropy"] = loss_bytes(model_cfg, tokens, compute_bytes, tp, weight_grad=False)
    return est


def total_gib(estimate: dict[str, float]) -> float:
    return sum(estimate.values()) / GiB
