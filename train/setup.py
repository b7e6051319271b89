"""Everything a run builds and checks before its first step: logging, the resolved model config,
the batch layout, the sharded model, and the memory check."""

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from model import Llama, build_model, preset

from .config import TrainConfig
from .distributed import Dist
from .memory import estimate_memory, total_gib
from .parallelize import param_dtype, parallelize

log = logging.getLogger("train")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Every rank logs to run_dir/logs/rank<r>.log; rank 0 also to the console."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stdout))
    log.handlers.clear()
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def resolve_model_config(cfg: TrainConfig, vocab_size: int):
    overrides = {k: v for k, v in asdict(cfg.model).items() if k not in ("preset", "vocab_from_tokenizer") and v is not None}
    if cfg.model.vocab_from_tokenizer:
        overrides["vocab_size"] = vocab_size
    model_cfg = preset(cfg.model.preset, **overrides)
    if vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
                         f"set model.vocab_from_tokenizer=true")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    return model_cfg


def validate_batch(cfg: TrainConfig, world: int) -> int:
    """Gradient accumulation steps: global = micro x accumulation x data-parallel size."""
    for key in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}={getattr(cfg, key)} must be >= 1")
    per_step = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size={cfg.global_batch_size} must be divisible by micro_batch_size x "
                         f"ranks = {cfg.micro_batch_size} x {world} = {per_step}")
    return cfg.global_batch_size // per_step


def build_parallel_model(model_cfg, cfg: TrainConfig, env: Dist) -> Llama:
    if env.device.type == "cpu":
        # Initialise the full model first, then shard it: the weights are then the same on any
        # number of ranks, which makes CPU runs on different world sizes comparable bit for bit.
        model = build_model(model_cfg, "cpu", seed=cfg.seed)
        return parallelize(model, cfg.parallel, env)
    # GPU: build on the meta device, shard, then allocate only this rank's shards and initialise
    # them (DTensor's RNG makes sharded init match the unsharded one).
    with torch.device("meta"):
        model = Llama(model_cfg)
    parallelize(model, cfg.parallel, env)
    model.to_empty(device=env.device)
    torch.manual_seed(cfg.seed)
    model.init_weights()
    return model


def check_memory(model_cfg, cfg: TrainConfig, env: Dist) -> None:
    """Refuse, before allocating anything, a run estimated (train/memory.py) not to fit."""
    dp_shard = env.world_size // cfg.parallel.dp_replicate
    compute_bytes = 2 if param_dtype(cfg.parallel, env.device) == torch.bfloat16 else 4
    est = estimate_memory(model_cfg, cfg.micro_batch_size, cfg.data.seq_len, dp_shard,
                          cfg.parallel.activation_checkpointing, compute_bytes, cfg.parallel.ac_every)
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
