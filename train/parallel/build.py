"""The model a run trains: its config resolved from the preset, the overrides and the tokenizer, then
built and parallelized, each rank initialising only what it holds (any layout starts from the same weights)."""

import logging
import time
from dataclasses import asdict

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from model import Llama, ModelConfig, preset
from model.llama import rope_cos_sin
from model.init import Shard

from ..config import BatchShape, ModelSection, ParallelSection
from .distributed import Dist
from .parallelize import parallelize, parameter_device
from .pipeline import PipelineRun, check_pipeline, merge, split
from .tensor_parallel import check_tp_layout

log = logging.getLogger("train")


def resolve_model_config(model_section: ModelSection, vocab_size: int, seq_len: int, tp: int) -> ModelConfig:
    """The config's `model` section made a ModelConfig: the preset with its overrides and the tokenizer's
    vocab_size, checked against the run's data.seq_len and parallel.tp."""
    not_shape = ("preset", "vocab_from_tokenizer")
    overrides = {k: v for k, v in asdict(model_section).items() if k not in not_shape and v is not None}
    if model_section.vocab_from_tokenizer:
        overrides["vocab_size"] = vocab_size
    model_cfg = preset(model_section.preset, **overrides)
    if vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
                         f"set model.vocab_from_tokenizer=true")
    if seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    check_tp_layout(model_cfg, seq_len, tp)
    return model_cfg


def build_parallel_model(model_cfg: ModelConfig, parallel_cfg: ParallelSection, batch_shape: BatchShape, env: Dist, *,
                         seed: int, document_masking: bool, evaluates: bool) -> tuple[Llama, PipelineRun | None]:
    """The rank's model and, under pipeline parallelism, the schedule that runs its stages. One path on
    every device: built on the meta device, split into stages and parallelized there (no memory), then
    only this rank's shards are allocated and initialised, to the values the whole model has there.
    `evaluates`: the run validates or samples (pipeline.check_pipeline)."""
    check_pipeline(parallel_cfg, model_cfg, batch_shape, env.dp_size, evaluates)
    with torch.device("meta"):
        model = Llama(model_cfg, document_masking=document_masking)
    stages, ids, n_stages = split(model, parallel_cfg, env) if env.pp > 1 else ([model], [0], 1)
    for stage in stages:
        parallelize(stage, parallel_cfg, env)
    model = merge(stages) if env.pp > 1 else model
    t0 = time.perf_counter()
    for stage in stages:  # each stage is an FSDP root: it moves its own parameters
        stage.to_empty(device=parameter_device(parallel_cfg, env.device))
    model.init_weights(seed, shard_of=local_shard)
    # The rope tables on the compute device, wherever the parameters live (the host under cpu_offload).
    model.rope_cos, model.rope_sin = rope_cos_sin(model_cfg, device=env.device)
    for stage in stages:
        stage.rope_cos, stage.rope_sin = model.rope_cos, model.rope_sin
    log.info("weights of this rank's shards initialised in %.1f s (seed %d)", time.perf_counter() - t0, seed)
    if env.pp == 1:
        return model, None
    return model, PipelineRun(model, stages, ids, n_stages, parallel_cfg.pp_schedule, batch_shape, env)


def local_shard(p: torch.Tensor) -> Shard:
    """The part of the whole parameter that p holds on this rank: a DTensor's local box of rows and columns
    (FSDP's row shards, tensor parallelism's row or column shards, replicas whole), or all of a plain tensor."""
    if not isinstance(p, DTensor):
        return Shard(p, tuple(p.shape))
    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(local.shape) != tuple(shape) or p.dim() > 2:
        raise RuntimeError(f"cannot tell which part of a {tuple(p.shape)} parameter ({p.placements}) this rank "
                           f"holds: its local tensor is {tuple(local.shape)}, expected {tuple(shape)}")
    return Shard(local, tuple(p.shape), (offset[0] if offset else 0, offset[1] if len(offset) > 1 else 0))
