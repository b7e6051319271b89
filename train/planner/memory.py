"""Per-rank memory estimate from the config alone: checked at start-up, before allocating.

Activations are what torch.compile keeps for the backward of each block, counted tensor by tensor
(tests/train/parallel/test_memory.py checks the count against a compiled block on the CPU). Measured peaks on one
H100 (torch 2.11, compile on; these runs kept a one-GPU residual stream in fp32, bf16 now: by the
same count about 1 GiB less at 1B and 0.5 GiB at 8B_L8): Llama-3.2-1B shape at 2 x 8192, 42.6 GiB
(estimated 42.2); Llama-3-8B layer shape with 8 layers at 1 x 8192, 50.9 (50.8) with no activation
checkpointing and 44.9 (45.6) with selective.

Multi-rank peaks, measured on the CPU over gloo (benchmarks/memory_check.py: the trainer's build and step, each
rank's peak of live tensor bytes; tests/e2e/test_memory_check.py): dp_shard 2, tp 2, pp 2 (1F1B), cp 2 and
dp_shard 2 x tp 2, AC none and full, 4 layers of dim 256 at 2 x 512 tokens, every rank within -8%..+2% of its
estimate. Terms that matter on the CPU only: eager_activations (parallel.compile false, the CPU's default;
GPU presets compile), and fp32 weight copies (FSDP gathers fp32 where the GPU gathers bf16). The allocator's
reserve that CUDA adds beyond these allocated bytes: allocator_reserve_bytes, reserved_gib.

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


def eager_bytes(model_cfg: ModelConfig, compute_bytes: int, tp: int = 1) -> float:
    """What one token's block keeps beyond block_saved_bytes("none") when the block runs eager (parallel.compile
    false, the CPU's default), on one of tp ranks: each RMSNorm's normalized input before its weight (autograd's
    mul keeps it for the weight's gradient) and SwiGLU's silu output (the product's backward keeps both factors),
    which compile recomputes. Counted tensor by tensor with saved-tensor hooks on an eager block (torch 2.13, CPU;
    benchmarks/memory_check.py), all split over tp (the norms run on the sequence shard, the hidden units are
    split)."""
    return (2 * norm_bytes(model_cfg, compute_bytes) + model_cfg.hidden_dim * compute_bytes) / tp


def norm_bytes(model_cfg: ModelConfig, compute_bytes: int) -> int:
    """What an eager RMSNorm (model/llama.py) keeps per token beyond its input: the normalized input before the
    weight in the compute dtype, and under bf16 the fp32 copy of its input it normalizes from (in fp32 that copy is
    the input itself)."""
    return model_cfg.dim * (compute_bytes + (4 if compute_bytes != 4 else 0))


def final_norm_bytes(model_cfg: ModelConfig, compute_bytes: int, tp: int = 1) -> float:
    """The final norm runs eager outside the (compiled) blocks: per token it keeps the last block's output, which
    no block counts, and norm_bytes; under TP on the sequence shard (measured on the CPU in fp32,
    benchmarks/memory_check.py)."""
    return (model_cfg.dim * compute_bytes + norm_bytes(model_cfg, compute_bytes)) / tp


def checkpointed_blocks(model_cfg: ModelConfig, ac_mode: str, ac_every: int) -> int:
    if ac_mode == "every_k":
        return (model_cfg.n_layers + ac_every - 1) // ac_every
    return 0 if ac_mode == "none" else model_cfg.n_layers


def activation_bytes_per_token(model_cfg: ModelConfig, ac_mode: str, compute_bytes: int, ac_every: int = 2,
                               tp: int = 1, recomputing: bool = True) -> float:
    """Bytes one token's activations keep alive across all blocks for the backward, on one of tp ranks
    (the mode is checked at start-up by ParallelSection.check); recomputing: with selective or full AC, with the
    whole set of the block being recomputed."""
    none = block_bytes(model_cfg, "none", compute_bytes, tp)
    if ac_mode == "none":
        return model_cfg.n_layers * none
    if ac_mode == "every_k":
        checkpointed = checkpointed_blocks(model_cfg, ac_mode, ac_every)
        full = block_bytes(model_cfg, "full", compute_bytes, tp)
        return checkpointed * full + (model_cfg.n_layers - checkpointed) * none
    # A checkpointed block's full set exists again while it is recomputed, one block at a time.
    return model_cfg.n_layers * block_bytes(model_cfg, ac_mode, compute_bytes, tp) + none * recomputing


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
    if dp_shard == 1 and (tp > 1 or compute_bytes == 4):
        # FSDP over one rank (fp32 runs under FSDP even on one device: parallelize.single_device_autocast) still
        # copies every weight into unsharded storage, and with nothing to reshard keeps them all step (measured on
        # the CPU, benchmarks/memory_check.py tp2: FSDP::pre_forward allocates each block's fp32 weights).
        return n / tp * compute_bytes  # FSDP over one rank: nothing to reshard, every gathered block stays
    if dp_shard == 1:
        # Autocast casts each weight as it is used. A block's casts live until its backward unless the
        # block is checkpointed (its recompute casts again); the output head is cast once for the loss.
        kept = model_cfg.n_layers - checkpointed_blocks(model_cfg, ac_mode, ac_every)
        recomputing = 1 if kept < model_cfg.n_layers else 0
        return ((kept + recomputing) * block + head) * compute_bytes
    # FSDP: about two blocks gathered at a time, and the root (embedding, head) gathered all step. In fp32 too
    # (the CPU): FSDP2 all-gathers into unsharded storage of its own whatever the dtype (measured,
    # benchmarks/memory_check.py dp2: +4 MiB for the root, +3 MiB a block, at all_gather_copy_out).
    return (2 * block + outside_blocks) * compute_bytes / tp


def loss_bytes(model_cfg: ModelConfig, tokens: int, compute_bytes: int, tp: int = 1, weight_grad: bool = True) -> float:
    """The fused cross-entropy holds one chunk of logits (~2**28 elements; under TP, of its V/tp
    vocabulary rows) in three forms, plus an fp32 gradient of its output weight rows. Under TP it also
    holds every position's hidden state, all-gathered, and that state's gradient."""
    head = model_cfg.vocab_size * model_cfg.dim
    gathered = 2 * tokens * model_cfg.dim * compute_bytes if tp > 1 else 0
    return logit_bytes(model_cfg, tokens, compute_bytes, tp) + 4 * head / tp * weight_grad + gathered


def logit_bytes(model_cfg: ModelConfig, tokens: int, compute_bytes: int, tp: int = 1) -> float:
    """loss_bytes' chunk of logits in its three forms: alive only inside the loss's forward."""
    return min(tokens * model_cfg.vocab_size / tp, 2**28) * (2 * compute_bytes + 4)


def estimate_memory(model_cfg: ModelConfig, micro_batch: int, seq_len: int, dp_shard: int, ac_mode: str,
                    compute_bytes: int = 2, ac_every: int = 2, document_mask: str = "none",
                    tp: int = 1, cp: int = 1, cp_mask: str = "flex", compiled: bool = True,
                    accumulation: int = 1) -> dict[str, float]:
    """Peak bytes per rank by kind. Parameters, gradients and AdamW moments are fp32, split over tp
    ranks and sharded over dp_shard (the ranks FSDP shards over: dp_shard x cp under context parallelism). At the
    peak, late in the forward, activations are alive but only part of the gradients (a quarter, measured) exist
    yet. document_mask: the kind of mask document masking builds ("sdpa", "flex"), or "none"; seq_len: the whole
    window, of which each of cp ranks holds seq_len / cp tokens. compiled: parallel.compile (eager blocks keep
    more: eager_bytes). accumulation: micro-batches per step and rank; from the second on, all of the rank's
    gradient shards exist in the forward: the trainer reduce-scatters every micro-batch's (train/loop/step.py
    forward_backward). Left unreduced, FSDP2 would hold them whole in fp32 (benchmarks/memory_check.py
    --microbatches 2 at dp2 on the CPU: +16.0 MiB, the whole model's; reduced each micro-batch: +8.0 MiB)."""
    n = num_params(model_cfg) / tp  # this rank's share of every weight before FSDP shards it
    tokens = micro_batch * seq_len // cp
    cross_entropy = loss_bytes(model_cfg, tokens, compute_bytes, tp)
    est = {
        "params": 4 * n / dp_shard,
        "optimizer": 8 * n / dp_shard,
        "weight_copies": weight_copy_bytes(model_cfg, ac_mode, ac_every, dp_shard, compute_bytes, tp),
        "activations": tokens * activation_bytes_per_token(model_cfg, ac_mode, compute_bytes, ac_every, tp,
                                                           recomputing=False),
        "final_norm": tokens * final_norm_bytes(model_cfg, compute_bytes, tp),
        "cross_entropy": cross_entropy,
        "grads": (1.0 if accumulation > 1 else 0.25) * 4 * n / dp_shard,
    }
    eager = 0.0 if compiled else eager_bytes(model_cfg, compute_bytes, tp)
    if eager:
        est["eager_activations"] = tokens * (model_cfg.n_layers - checkpointed_blocks(model_cfg, ac_mode, ac_every)
                                             ) * eager
    if ac_mode in ("selective", "full"):
        # The backward recomputes a checkpointed block's whole set after the loss's forward has freed its logits:
        # the peak holds the larger of the two, not both (measured on the CPU, benchmarks/memory_check.py: counting
        # both put full AC 24% over; on one H100, 8B_L8 selective, the module docstring's 44.9 GiB).
        recompute = tokens * (block_bytes(model_cfg, "none", compute_bytes, tp) + eager)
        est["recompute"] = max(0.0, recompute - logit_bytes(model_cfg, tokens, compute_bytes, tp))
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
                          first: bool, last: bool, local_stages: int = 1, compiled: bool = True) -> dict[str, float]:
    """Peak bytes by kind on one pipeline rank holding `layers` blocks in local_stages stages, with
    in_flight micro-batches' activations alive at its peak (see the module docstring); compiled as in
    estimate_memory."""
    n = stage_params(model_cfg, layers, first, last) / tp
    tokens = micro_batch * seq_len
    boundary = tokens * model_cfg.dim * compute_bytes / tp  # one micro-batch's (sequence-parallel) stage input
    copies = compute_bytes * n  # gathered all step (in fp32 too, on one rank too: weight_copy_bytes)
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
        est["final_norm"] = tokens * final_norm_bytes(model_cfg, compute_bytes, tp) * in_flight
        if ac_mode in ("selective", "full"):  # the recomputed block (in activations) and the logits take turns
            recompute = tokens * block_bytes(model_cfg, "none", compute_bytes, tp)
            est["cross_entropy"] -= min(recompute, logit_bytes(model_cfg, tokens, compute_bytes, tp))
    if not compiled:  # the blocks that keep their whole set, in flight, and the one being recomputed
        checkpointed = checkpointed_blocks(replace(model_cfg, n_layers=layers), ac_mode, ac_every)
        held = (layers - checkpointed) * in_flight + (1 if checkpointed else 0)
        est["eager_activations"] = tokens * held * eager_bytes(model_cfg, compute_bytes, tp)
    return est


def total_gib(estimate: dict[str, float]) -> float:
    return sum(estimate.values()) / GiB


# NCCL's staging buffer per channel and peer, each way (NCCL docs, environment variables: NCCL_BUFFSIZE, default 4 MiB).
NCCL_BUFFSIZE = 4 * 2**20


def allocator_reserve_bytes(model_cfg: ModelConfig, dp_shard: int, tp: int = 1, compute_bytes: int = 2,
                            in_flight: int = 2) -> dict[str, float]:
    """What CUDA's caching allocator holds reserved beyond the estimate's peak of allocated bytes (torch.cuda's
    max_memory_reserved, torchtitan's reported memory, vs max_memory_allocated): a freed block is cached and reused
    only on the stream that allocated it (PyTorch docs, CUDA semantics, memory management; CUDACachingAllocator), and
    FSDP2 allocates its collectives' buffers on streams of their own. So on the all-gather stream the flat outputs of
    in_flight blocks' all-gathers (the block running and the one prefetched; the estimate counts their copies
    into the parameters, not the flat buffers), and on the reduce-scatter stream in_flight blocks' unsharded fp32
    gradients in and their shards out, stay reserved after they are freed. Not modelled: fragmentation (a
    segment split by live blocks cannot serve a larger request), which the caching allocator's docs name but do not
    size; rounding (2 MiB for blocks over 1 MiB) is small at these sizes. Without FSDP sharding (dp_shard 1) there
    are no such buffers."""
    if dp_shard == 1:
        return {}
    n = num_params(model_cfg)
    outside = model_cfg.vocab_size * model_cfg.dim * (1 if model_cfg.tie_embeddings else 2) + model_cfg.dim
    block = (n - outside) / model_cfg.n_layers / tp
    return {"all_gather_stream": in_flight * block * compute_bytes,
            "reduce_scatter_stream": in_flight * block * 4 * (1 + 1 / dp_shard)}


def reserved_gib(estimate: dict[str, float], model_cfg: ModelConfig, dp_shard: int, tp: int = 1,
                 compute_bytes: int = 2) -> float:
    """The planned peak as torch.cuda.max_memory_reserved reports it (comparable with torchtitan's published
    memory): the estimate's allocated bytes plus allocator_reserve_bytes. NCCL's own buffers (nccl_buffer_bytes) are
    device memory outside the caching allocator, in neither figure."""
    reserve = allocator_reserve_bytes(model_cfg, dp_shard, tp, compute_bytes)
    return (sum(estimate.values()) + sum(reserve.values())) / GiB


def nccl_buffer_bytes(communicators: int, channels: int = 32, peers: int = 2) -> float:
    """Device memory NCCL allocates itself (cudaMalloc, outside torch's allocator and its reserved figure): per
    communicator and channel a send and a receive buffer of NCCL_BUFFSIZE to each ring peer. channels: up to 32 on
    NVLink H100s (NCCL picks; NCCL_MAX_NCHANNELS caps it). E.g. a 3D layout's dp, tp and pp communicators: about
    3 x 32 x 2 x 2 x 4 MiB = 1.5 GiB, plus the CUDA context (~0.5 GiB), beside what torch reports."""
    return communicators * channels * peers * 2 * NCCL_BUFFSIZE
