"""The start-up memory gate: refuse, before allocating anything, a run estimated not to fit."""

import logging
import os

import torch

from model import ModelConfig
from model.attention import default_kind

from ..config import TrainConfig
from ..planner.memory import estimate_memory, total_gib
from ..planner.plan import Layout
from ..planner.plan_pp import Pipeline, ranks, stage_memory
from .distributed import Dist
from .parallelize import param_dtype
from .pipeline import virtual_stages

log = logging.getLogger("train")


def check_memory(model_cfg: ModelConfig, cfg: TrainConfig, env: Dist) -> None:
    """Refuse, before allocating anything, a run estimated (train/planner/memory.py) not to fit."""
    dp_shard = env.world_size // (cfg.parallel.dp_replicate * cfg.parallel.tp * cfg.parallel.pp)
    compute_bytes = 2 if param_dtype(cfg.parallel, env.device) == torch.bfloat16 else 4
    mask = default_kind(env.device) if cfg.data.document_masking else "none"
    if cfg.parallel.pp > 1:
        est = _fullest_stage(model_cfg, cfg, dp_shard)
    else:
        est = estimate_memory(model_cfg, cfg.micro_batch_size, cfg.data.seq_len, dp_shard,
                              cfg.parallel.activation_checkpointing, compute_bytes, cfg.parallel.ac_every,
                              document_mask=mask, tp=cfg.parallel.tp)
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
    if not cfg.memory_check:
        log.warning("the run needs about %.1f GiB per rank but a device has %.1f GiB; going on (memory_check=false)",
                    need, have)
        return
    raise MemoryError(f"the run needs about {need:.1f} GiB per rank but a device has {have:.1f} GiB; lower "
                      f"micro_batch_size or data.seq_len, set parallel.activation_checkpointing=full, or add GPUs "
                      f"(memory_check=false tries anyway)")


def _fullest_stage(model_cfg: ModelConfig, cfg: TrainConfig, dp_shard: int) -> dict[str, float]:
    """The planner's estimate for the pipeline rank that holds the most (train/planner/plan_pp.py)."""
    par = cfg.parallel
    micro = cfg.global_batch_size // (cfg.micro_batch_size * dp_shard * par.dp_replicate)
    pipe = Pipeline(par.pp_schedule, micro, virtual_stages(par.pp_schedule, par.pp_virtual_stages))
    layout = Layout(par.dp_replicate, dp_shard, par.tp, par.pp)
    per_rank = stage_memory(model_cfg, layout, pipe, cfg.micro_batch_size, cfg.data.seq_len,
                            par.activation_checkpointing, par.ac_every, ranks(model_cfg.n_layers, par.pp, pipe))
    return max(per_rank.values(), key=total_gib)
