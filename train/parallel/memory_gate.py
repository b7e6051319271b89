"""The start-up memory gate: refuse, before allocating anything, a run estimated not to fit."""

import logging
import os

import torch

from model import ModelConfig
from model.attention import default_kind

from ..config import BatchShape, ParallelSection
from ..planner.memory import estimate_memory, estimate_offload_memory, estimate_stage_memory, total_gib
from ..planner.plan_pp import Pipeline, in_flight, ranks, worst_ranks
from .distributed import Dist
from .parallelize import param_dtype
from .pipeline import virtual_stages

log = logging.getLogger("train")


def check_memory(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist,
                 document_masking: bool, memory_check: bool) -> None:
    """Refuse, before allocating anything, a run estimated (train/planner/memory.py) not to fit; with
    memory_check=False only warn."""
    est = rank_estimate(model_cfg, parallel_cfg, batch_shape, env, document_masking)
    need = total_gib(est)
    if env.device.type == "cuda":
        have = torch.cuda.get_device_properties(env.device).total_memory / 2**30
    else:  # the machine's memory, shared by the ranks on it
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / ranks_here
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in est.items())
    log.info("memory estimate per rank: %.2f GiB of %.1f GiB (%s)", need, have, parts)
    if need <= have:
        return
    if not memory_check:
        log.warning("the run needs about %.1f GiB per rank but a device has %.1f GiB; going on (memory_check=false)",
                    need, have)
        return
    raise MemoryError(f"the run needs about {need:.1f} GiB per rank but a device has {have:.1f} GiB; lower "
                      f"micro_batch_size or data.seq_len, set parallel.activation_checkpointing=full, or add GPUs "
                      f"(memory_check=false tries anyway)")


def rank_estimate(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist,
                  document_masking: bool, pp_rank: int | None = None) -> dict[str, float]:
    """The planner's peak bytes by kind for one rank of this run (train/planner/memory.py): under pipeline
    parallelism pp_rank's, or with pp_rank=None the fullest stage's. benchmarks/memory_check.py holds it against
    measured per-rank peaks."""
    # The ranks FSDP shards over: dp_shard x cp (a CP group's ranks hold one model between them).
    dp_shard = env.world_size // (parallel_cfg.dp_replicate * parallel_cfg.tp * parallel_cfg.pp)
    compute_bytes = 2 if param_dtype(parallel_cfg, env.device) == torch.bfloat16 else 4
    mask = default_kind(env.device) if document_masking else "none"
    if parallel_cfg.pp > 1:
        return _stage_estimate(model_cfg, parallel_cfg, batch_shape, dp_shard, compute_bytes, pp_rank)
    if parallel_cfg.cpu_offload:  # the fp32 state is on the host: the device holds what is in flight
        return estimate_offload_memory(model_cfg, batch_shape.micro_batch_size, batch_shape.seq_len,
                                       parallel_cfg.activation_checkpointing, compute_bytes, parallel_cfg.ac_every,
                                       document_mask=mask, tp=parallel_cfg.tp, cp=parallel_cfg.cp,
                                       cp_mask=default_kind(env.device))
    # Under context parallelism each rank holds seq_len / cp tokens, plus the CP mask and gathered K/V.
    return estimate_memory(model_cfg, batch_shape.micro_batch_size, batch_shape.seq_len, dp_shard,
                           parallel_cfg.activation_checkpointing, compute_bytes, parallel_cfg.ac_every,
                           document_mask=mask, tp=parallel_cfg.tp, cp=parallel_cfg.cp,
                           cp_mask=default_kind(env.device), compiled=parallel_cfg.compile,
                           accumulation=batch_shape.microbatches(env.dp_size))


def _stage_estimate(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, dp_shard: int,
                    compute_bytes: int, pp_rank: int | None) -> dict[str, float]:
    """The planner's estimate (train/planner/plan_pp.py) for pipeline rank pp_rank, or for the rank that holds
    the most (of plan_pp.worst_ranks) when pp_rank is None."""
    schedule, pp = parallel_cfg.pp_schedule, parallel_cfg.pp
    micro = batch_shape.microbatches(dp_shard // parallel_cfg.cp * parallel_cfg.dp_replicate)  # data-parallel ranks
    pipe = Pipeline(schedule, micro, virtual_stages(schedule, parallel_cfg.pp_virtual_stages))
    shapes = ranks(model_cfg.n_layers, pp, pipe)
    seq_len = batch_shape.seq_len // parallel_cfg.cp  # a CP rank's part of each micro-batch
    per_rank = {r: estimate_stage_memory(model_cfg, batch_shape.micro_batch_size, seq_len, dp_shard,
                                         parallel_cfg.activation_checkpointing, compute_bytes, parallel_cfg.ac_every,
                                         parallel_cfg.tp, shapes[r][0], in_flight(pipe, pp, r), shapes[r][1],
                                         shapes[r][2], pipe.virtual_stages, compiled=parallel_cfg.compile)
                for r in ([pp_rank] if pp_rank is not None else worst_ranks(shapes))}
    return max(per_rank.values(), key=total_gib)
