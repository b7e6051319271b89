"""Typed configuration of a pretraining run (Hydra structured configs).

Every key a user can set lives here with its type and default; `conf/*.yaml` presets only change
values. Because the schema is a dataclass, a misspelt key or a wrong type fails at start-up with
the key's name.
"""

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError


@dataclass
class ModelSection:
    preset: str = "debug"  # a name from model.PRESETS
    vocab_from_tokenizer: bool = True  # replace the preset's vocab size with the tokenizer's
    # Optional overrides of the preset's shape (None keeps the preset's value).
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_hidden_dim: int | None = None
    max_seq_len: int | None = None
    tie_embeddings: bool | None = None
    rope_theta: float | None = None


@dataclass
class DataSection:
    tokenizer: str = ""  # a SentencePiece .model file
    shards: list[str] = field(default_factory=list)  # shard-set folders (each with a manifest.json)
    weights: list[float] | None = None  # mixture weights, one per shard set (None: by size)
    seq_len: int = 256
    # Build a tokenizer and shards from the public-domain sample corpus when they are missing
    # (the demo): they go to `demo_dir`.
    demo: bool = False
    demo_dir: str = "data/demo"
    demo_vocab_size: int = 4096
    document_positions: bool = False  # rope positions restart at each document
    verify: bool = True  # hash every shard at start-up (set false for huge sets checked once with `verify`)
    unigram_baseline: bool = False  # report the unigram cross-entropy of the validation tokens


@dataclass
class OptimSection:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5
    weight_decay: float = 0.1  # on weight matrices only, see train/optim.py
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays to min_lr


@dataclass
class ParallelSection:
    dp_replicate: int = 1  # HSDP: replicas (usually nodes); dp_shard = world_size / dp_replicate
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"  # none | full | every_k | selective
    ac_every: int = 2  # every_k: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block
    dtype: str = "auto"  # bf16 | fp32 | auto (bf16 on CUDA, fp32 on CPU)
    fsdp_single_device: bool = False  # one bf16 device: FSDP (true) or plain autocast (false, faster)
    float8: str = "none"  # none | tensorwise | rowwise: the blocks' matmuls in float8 (torchao; H100 or newer)


@dataclass
class CheckpointSection:
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step permanently (0: none)
    save_final: bool = True  # save when training ends
    async_save: bool = False
    resume: str = "auto"  # auto | none | a step number | a checkpoint folder
    init_from: str = ""  # weights only, for continued pretraining: a checkpoint or HF folder


@dataclass
class StabilitySection:
    spike_z: float = 6.0  # a loss this many standard deviations above the recent mean is a spike (0: off)
    window: int = 100  # steps of loss history the spike test uses
    min_history: int = 20  # no spike test before this many healthy steps
    min_std: float = 0.01  # floor of the standard deviation, so a flat loss curve is not all spikes
    max_non_finite_in_a_row: int = 3  # this many skipped non-finite steps in a row trigger a rollback
    rollback: bool = True  # on a spike, restore the last checkpoint and skip the data since it


@dataclass
class FaultSection:
    """Deliberate faults, for tests and drills of the recovery paths (empty in real runs)."""

    nan_loss_steps: list[int] = field(default_factory=list)  # make these steps' loss NaN (once each)
    spike_data_steps: list[int] = field(default_factory=list)  # feed random tokens at these steps (once each)


@dataclass
class WandbSection:
    mode: str = "auto"  # auto (online with a key and network, else offline) | online | offline | disabled
    project: str = "llm-pretrain"
    entity: str | None = None


@dataclass
class TrainConfig:
    run_name: str = "debug"
    output_dir: str = "outputs"  # the run lives in output_dir/run_name unless hydra.run.dir says otherwise
    seed: int = 0
    steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    log_interval: int = 10
    val_interval: int = 0  # 0: validate only at the end
    val_batches: int = 8  # per validation; 0 disables validation
    peak_tflops: float | None = None  # per device, for MFU; None: look the GPU up
    sample_prompt: str = ""  # if set, print a sample continuation at the end
    sample_tokens: int = 48
    collective_timeout_s: int = 600
    memory_check: bool = True  # refuse at start-up a run whose memory estimate exceeds the device
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    faults: FaultSection = field(default_factory=FaultSection)
    wandb: WandbSection = field(default_factory=WandbSection)


def register() -> None:
    """Register the schema and the primary config `pretrain` (used by launch/pretrain.py)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=TrainConfig)
    primary: dict[str, Any] = {
        "defaults": [
            "pretrain_schema",
            "_self_",
            # We configure logging ourselves (one file per rank); Hydra's would collide across ranks.
            {"override hydra/job_logging": "none"},
            {"override hydra/hydra_logging": "none"},
        ],
        # Derived from the run name only, so every rank, node and restart finds the same folder.
        "hydra": {"run": {"dir": "${output_dir}/${run_name}"}, "output_subdir": None},
    }
    cs.store(name="pretrain", node=primary)


def check_overrides(argv: list[str], conf_dir: Path) -> str | None:
    """The one-line error for a command line naming a preset or key that does not exist, or a value of
    the wrong type; None when it is fine. Hydra would reject these too, but with several lines and
    advice ("use +key=") that does not apply to a typed schema."""
    words = [w for w in argv if not w.startswith("-")]  # Hydra's own flags (--multirun, --cfg ...)
    try:
        overrides = OverridesParser.create().parse_overrides(words)
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's message shows where
        return None
    schema = OmegaConf.structured(TrainConfig)
    for o in overrides:
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete() or o.is_sweep_override():
            continue
        if key == "conf":
            if not o.is_add():
                return f"{o.input_line}: write +conf={o.value()} (a preset is added to the config, hence the +)"
            presets = sorted(p.stem for p in conf_dir.glob("*.yaml"))
            if o.value() not in presets:
                return f"+conf={o.value()}: there is no {conf_dir.name}/{o.value()}.yaml; presets: {', '.join(presets)}"
            continue
        try:
            OmegaConf.update(schema, key, o.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError):
            close = difflib.get_close_matches(key, _all_keys(TrainConfig), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown key {key!r}{hint}; every key and its default is in train/config.py"
        except ValidationError as e:
            return f"{o.input_line}: {str(e).splitlines()[0]}"
    return None


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = f.default_factory if is_dataclass(f.default_factory) else None
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return keys
