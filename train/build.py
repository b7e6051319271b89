"""The model a run trains: its config resolved from the preset, the overrides and the tokenizer, then
built and parallelized (initialised so that any number of ranks starts from the same weights)."""

from dataclasses import asdict

import torch

from model import Llama, ModelConfig, build_model, preset

from .config import TrainConfig
from .distributed import Dist
from .parallelize import parallelize
from .pipeline import PipelineRun, check_pipeline, merge, split
from .tensor_parallel import check_tp_layout


def resolve_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    not_shape = ("preset", "vocab_from_tokenizer")
    overrides = {k: v for k, v in asdict(cfg.model).items() if k not in not_shape and v is not None}
    if cfg.model.vocab_from_tokenizer:
        overrides["vocab_size"] = vocab_size
    model_cfg = preset(cfg.model.preset, **overrides)
    if vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
                         f"set model.vocab_from_tokenizer=true")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    check_tp_layout(model_cfg, cfg.data.seq_len, cfg.parallel.tp)
    return model_cfg


def build_parallel_model(model_cfg, cfg: TrainConfig, env: Dist) -> tuple[Llama, PipelineRun | None]:
    """The rank's model and, under pipeline parallelism, the schedule that runs its stages."""
    check_pipeline(cfg, model_cfg, env.dp_size)
    if env.device.type == "cpu":
        # Initialise the full model first, then shard it: the weights are then the same on any
        # number of ranks, which makes CPU runs on different world sizes comparable bit for bit.
        model = build_model(model_cfg, "cpu", seed=cfg.seed, document_masking=cfg.data.document_masking)
    else:
        # GPU: build on the meta device, shard, then allocate only this rank's shards and initialise
        # them (DTensor's RNG makes sharded init match the unsharded one).
        with torch.device("meta"):
            model = Llama(model_cfg, document_masking=cfg.data.document_masking)
    stages, ids, n_stages = split(model, cfg, env) if env.pp > 1 else ([model], [0], 1)
    for stage in stages:
        parallelize(stage, cfg.parallel, env)
    model = merge(stages) if env.pp > 1 else model
    if env.device.type != "cpu":
        for stage in stages:  # each stage is an FSDP root: it moves its own parameters
            stage.to_empty(device=env.device)
        torch.manual_seed(cfg.seed)
        model.init_weights()
        for stage in stages:
            stage.rope_cos, stage.rope_sin = model.rope_cos, model.rope_sin
    return model, PipelineRun(stages, ids, n_stages, cfg, env) if env.pp > 1 else None
