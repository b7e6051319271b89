"""Each config section checks its own values once, at start-up, with one line naming the key (the
entry point's path for these errors is covered by tests/e2e/test_bad_inputs.py)."""

import pytest

from train.config import TrainConfig

ROWS = [
    ("steps", 0, "steps=0 must be >= 1"),
    ("val_batches", -1, "val_batches=-1"),
    ("data.seq_len", 0, "data.seq_len=0"),
    ("data.weights", [1.0, -1.0], "data.weights"),
    ("optim.decay_fraction", 1.5, "optim.decay_fraction=1.5"),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.eps", -1.0, "optim.eps=-1.0 must be > 0"),
    ("optim.beta1", 1.5, "optim.beta1=1.5 must be within [0, 1)"),
    ("collective_timeout_s", 0, "collective_timeout_s=0 must be >= 1"),
    ("sample_tokens", -1, "sample_tokens=-1 must be >= 0"),
    ("val_interval", -1, "val_interval=-1 must be >= 0"),
    ("parallel.activation_checkpointing", "sometimes", "parallel.activation_checkpointing='sometimes' is not one of"),
    ("parallel.dp_replicate", 3, "parallel.dp_replicate=3 must divide the world size 4"),
    ("parallel.tp", 3, "parallel.tp=3 must divide the world size 4"),
    ("parallel.tp", 0, "parallel.tp=0 must divide the world size 4"),
    ("checkpoint.interval", -2, "checkpoint.interval=-2"),
    ("checkpoint.keep_every", -1, "checkpoint.keep_every=-1"),
    ("stability.window", 1, "stability.window=1"),
    ("stability.min_history", 500, "stability.min_history=500"),
    ("stability.min_std", 0.0, "stability.min_std=0.0"),
    ("stability.spike_patience", 0, "stability.spike_patience=0"),
    ("wandb.mode", "sometimes", "wandb.mode='sometimes'"),
    ("eval.interval", -1, "eval.interval=-1 must be >= 0"),
    ("eval.limit", 0, "eval.limit=0 must be >= 1"),
    ("micro_batch_size", 3, "global_batch_size=16 must be divisible by micro_batch_size x ranks = 3 x 4 = 12"),
]


def with_value(key: str, value) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.shards = ["a", "b"]
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


@pytest.mark.parametrize("key, value, message", ROWS, ids=[r[0] for r in ROWS])
def test_a_bad_value_is_refused_naming_its_key(key, value, message):
    with pytest.raises(ValueError) as e:
        with_value(key, value).check(world_size=4)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_with_tp_the_batch_divides_over_data_parallel_ranks():
    """4 ranks as tp 2: 2 data-parallel ranks, so micro batch 8 x 2 fills a global batch of 16."""
    cfg = with_value("parallel.tp", 2)
    cfg.micro_batch_size = 8
    cfg.check(world_size=4)
    cfg.parallel.dp_replicate = 4
    with pytest.raises(ValueError, match="parallel.dp_replicate=4 x parallel.tp=2 must divide the world size 4"):
        cfg.check(world_size=4)


def test_the_defaults_pass():
    TrainConfig().check(world_size=1)


def test_cpu_offload_is_refused_under_pipeline_parallelism():
    cfg = with_value("parallel.cpu_offload", True)
    cfg.check(world_size=4)  # data parallel (and one device): accepted
    cfg.parallel.pp = 2
    with pytest.raises(ValueError) as e:
        cfg.check(world_size=4)
    assert str(e.value) == ("parallel.cpu_offload=True does not run under pipeline parallelism (parallel.pp=2); "
                            "set parallel.pp=1 or parallel.cpu_offload=false")


