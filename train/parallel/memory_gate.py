"""The start-up memory gate: refuse, before allocating anything, a run estimated not to fit."""

import logging
import os

import torch

from model import ModelConfig
from model.attention import default_kind

from ..config import BatchShape, ParallelSection
from ..planner.memory import estimate_memory, estimate_offload_memory, total_gib
from ..planner.plan import Layout
from ..planner.plan_pp import Pipeline, ranks, stage_memory
from .distributed import Dist
from .parallelize import param_dtype
from .pipeline import virtual_stages

log = logging.getLogger("train")


def check_memory(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist,
                 document_masking: bool, memory_check: bool) -> None:
    """Refuse, before allocating anything, a run estimated (train/planner/memory.py) not to fit; with
    memory_check=False only warn."""
    # The ranks FSDP shards over: dp_shard x cp (a CP group's ranks hold one model between them).
    dp_shard = env.world_size // (parallel_cfg.dp_replicate * parallel_cfg.tp * parallel_cfg.pp)
    compute_bytes = 2 if param_dtype(parallel_cfg, env.device) == torch.bfloat16 else 4
    mask = default_kind(env.device) if document_masking else "none"
    if parallel_cfg.pp > 1:
        est = _fullest_stage(model_cfg, parallel_cfg, batch_shape, dp_shard)
    elif parallel_cfg.cpu_offload:  # the fp32 state is on the host: the device holds what is in flight
        est = estimate_offload_memory(model_cfg, batch_shape.micro_batch_size, batch_shape.seq_len,
                                      parallel_cfg.activation_checkpointing, compute_bytes, parallel_cfg.ac_every,
                                      document_mask=mask, tp=parallel_cfg.tp, cp=parallel_cfg.cp,
                                      cp_mask=default_kind(env.device))
    else:  # under context parallelism each rank holds seq_len / cp tokens, plus the CP mask and gathered K/V
        est = estimate_memory(model_cfg, batch_shape.micro_batch_size, batch_shape.seq_len, dp_shard,
                              parallel_cfg.activation_checkpointing, compute_bytes, parallel_cfg.ac_every,
                              document_mask=mask, tp=parallel_cfg.tp, cp=parallel_cfg.cp,
                              cp_mask=default_kind(env.device))
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


def _fullest_stage(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape,
                   dp_shard: int) -> dict[str, float]:
    """The planner's estimate for the pipeline rank that holds the most (train/planner/plan_pp.py)."""
    schedule, pp = parallel_cfg.pp_schedule, parallel_cfg.pp
    micro = batch_shape.microbatches(dp_shard * parallel_cfg.dp_replicate)
    pipe = Pipeline(schedule, micro, virtual_stages(schedule, parallel_cfg.pp_virtual_stages))
    layout = Layout(parallel_cfg.dp_replicate, dp_shard, parallel_cfg.tp, pp)
    per_rank = stage_memory(model_cfg, layout, pipe, batch_shape.micro_batch_size, batch_shape.seq_len,
                            parallel_cfg.activation_checkpointing, parallel_cfg.ac_every,
                            ranks(model_cfg.n_layers, pp, pipe))
    return max(per_rank.values(), key=total_gib)
