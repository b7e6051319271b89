"""Typed configuration of a pretraining run (Hydra structured configs).

Every key a user can set lives here with its type and default; `conf/*.yaml` presets only change
values. Because the schema is a dataclass, a misspelt key or a wrong type fails at start-up with
the key's name.
"""

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

# The choices of the string-valued keys (checked at start-up by the sections below).
AC_MODES = ("none", "full", "every_k", "selective")
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
DTYPES = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "wsd")
PP_SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")
WANDB_MODES = ("auto", "online", "offline", "disabled")
HOOK_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # a `hooks` entry: module:factory (train/loop/hooks.py)


def _require(ok: bool, key: str, value, rule: str) -> None:
    """The one-line error for a config value that breaks a rule, naming its key."""
    if not ok:
        raise ValueError(f"{key}={value!r} {rule}")


def _world_in_words(world_size: int) -> str:
    """"the world size 6", and under SLURM how it came about, since there --nodes is what to change."""
    nodes, per_node = os.environ.get("SLURM_NNODES"), os.environ.get("LOCAL_WORLD_SIZE")
    if nodes and per_node and int(nodes) * int(per_node) == world_size:
        return (f"the world size {world_size} ({nodes} node(s) x {per_node} process(es): sbatch --nodes and "
                f"NPROC_PER_NODE)")
    return f"the world size {world_size}"


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, value, f"is not one of {', '.join(choices)}")


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
    # The embedding and head rows, with vocab_from_tokenizer=false: e.g. the tokenizer's padded to a multiple
    # of parallel.tp (rows past the tokenizer's are never a target). None: the preset's.
    vocab_size: int | None = None

    def check(self) -> None:
        if self.vocab_size is not None:
            _require(self.vocab_size >= 1, "model.vocab_size", self.vocab_size, "must be >= 1")
            _require(not self.vocab_from_tokenizer, "model.vocab_size", self.vocab_size,
                     "is replaced by the tokenizer's size unless model.vocab_from_tokenizer=false; add that, or leave "
                     "model.vocab_size out")


@dataclass
class AdaptiveMixing:
    """data.mixing=adaptive (docs/continued-pretraining.md): at each validation, a source whose watched validation
    loss rose more than max_drift above its first validation's gets its weight times (1 + step); one back at or
    under that reference gives it back toward its starting weight; then all are scaled into [floor, ceiling]."""
    max_drift: float = 0.02  # the relative rise of a watched loss over its reference that raises its weight
    step: float = 0.5  # each change multiplies (or divides) a source's weight by 1 + step
    floor: list[float] = field(default_factory=list)  # per data.shards entry; empty: none
    ceiling: list[float] = field(default_factory=list)  # per data.shards entry; empty: none
    watch: list[str] = field(default_factory=list)  # data.val_sets names per data.shards entry; empty: in order

    def check(self, shards: list[str], val_sets: dict) -> None:
        n = len(shards)
        _require(n >= 2, "data.mixing", "adaptive", f"moves weight between sources: data.shards has {n}; give "
                 f"the new domain and a replay set, or use data.mixing=fixed")
        _require(self.max_drift > 0, "data.adaptive.max_drift", self.max_drift, "must be > 0 (e.g. 0.02: 2%)")
        _require(self.step > 0, "data.adaptive.step", self.step, "must be > 0 (e.g. 0.5: weight x 1.5 a change)")
        watch = self.watch or list(val_sets)
        _require(len(watch) == n and all(w in val_sets for w in watch), "data.adaptive.watch", self.watch,
                 f"needs one data.val_sets name per data.shards entry ({n}, in order); data.val_sets has "
                 f"{list(val_sets) or 'none'}: add +data.val_sets.NAME=FOLDER for each source")
        for key in ("floor", "ceiling"):
            bounds = getattr(self, key)
            _require(not bounds or (len(bounds) == n and all(0 <= b <= 1 for b in bounds)), f"data.adaptive.{key}",
                     bounds, f"needs one weight in [0, 1] per data.shards entry ({n})")
        floor, ceiling = self.floor or [0.0] * n, self.ceiling or [1.0] * n
        _require(all(f <= c for f, c in zip(floor, ceiling)), "data.adaptive.floor", floor,
                 f"must be <= data.adaptive.ceiling={ceiling} source by source")
        _require(sum(floor) <= 1, "data.adaptive.floor", floor, "sums above 1: no mixture can give every source its "
                 "floor; lower them")
        _require(sum(ceiling) >= 1, "data.adaptive.ceiling", ceiling, "sums below 1: no mixture fits under them; "
                 "raise them")


@dataclass
class DataSection:
    # A SentencePiece .model, a Hugging Face tokenizer.json (or a folder holding one), or a tiktoken-format
    # tokenizer.model (Meta's Llama 3 release): the format is detected from the file itself.
    tokenizer: str = ""
    # The document markers, as token strings, where the tokenizer's own configuration is ambiguous or wrong
    # (e.g. bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"); "" takes them from the tokenizer.
    bos_token: str = ""
    eos_token: str = ""
    shards: list[str] = field(default_factory=list)  # shard-set folders (each with a manifest.json)
    # Named held-out sets validated at every val_interval: name -> shard-set folder (its val split), or
    # folder:split (e.g. moby=/data/moby:train, a set never trained on). Empty: the first set's val split, "val".
    val_sets: dict[str, str] = field(default_factory=dict)
    weights: list[float] | None = None  # mixture weights, one per shard set (None: by size)
    seq_len: int = 256
    # Build a tokenizer and shards from the public-domain sample corpus when they are missing
    # (the demo): they go to `demo_dir`.
    demo: bool = False
    demo_dir: str = "data/demo"
    demo_vocab_size: int = 4096
    document_positions: bool = False  # rope positions restart at each document
    # Attention is causal within each document of a packed window, never across (implies document_positions).
    document_masking: bool = False
    # With document_masking: ignore the loss on the token that predicts the next document's BOS.
    mask_boundary_loss: bool = False
    verify: bool = True  # hash every shard at start-up (set false for huge sets checked once with `verify`)
    unigram_baseline: bool = False  # report the unigram cross-entropy of the validation tokens
    # A resume refuses changed shard sets, order or weights (samples would repeat). True starts the new
    # mixture from the resumed step instead: each kept shard set continues where it stopped, new ones
    # start at their beginning (logged).
    allow_change: bool = False
    # chat: shard sets built with format=chat (conversations, docs/fine-tuning.md): whole conversations packed per
    # window, the loss on the assistant turns only. A text run refuses chat sets and a chat run text sets.
    format: str = "text"  # text | chat
    overlong: str = "drop"  # chat: a conversation longer than seq_len + 1 tokens is dropped or truncated (counted)
    template: str = ""  # chat: the template file the shards were built with (template=), for export and generate
    # fixed: data.weights throughout. adaptive: moved at each validation to keep each source's watched validation
    # loss near its first value, within data.adaptive's bounds (train/loop/mixing.py); data.weights start it.
    mixing: str = "fixed"  # fixed | adaptive
    adaptive: AdaptiveMixing = field(default_factory=AdaptiveMixing)

    def check(self) -> None:
        _require(self.seq_len >= 1, "data.seq_len", self.seq_len, "must be >= 1")
        _choice("data.format", self.format, ("text", "chat"))
        _choice("data.overlong", self.overlong, ("drop", "truncate"))
        _require(self.format == "chat" or not self.template, "data.template", self.template,
                 "renders conversations: set data.format=chat with it, or drop it")
        _require(self.format != "chat" or self.document_masking, "data.document_masking", self.document_masking,
                 "must be true with data.format=chat (packed conversations must not see each other)")
        if self.weights is not None:
            _require(all(w > 0 for w in self.weights), "data.weights", self.weights, "must all be > 0")
            _require(self.demo or len(self.weights) == len(self.shards), "data.weights", self.weights,
                     f"needs one weight per data.shards entry ({len(self.shards)})")
        # Ignoring the label at a document boundary goes with attention that stops there.
        _require(self.document_masking or not self.mask_boundary_loss, "data.mask_boundary_loss",
                 self.mask_boundary_loss, "needs data.document_masking=true (or set it false)")
        _choice("data.mixing", self.mixing, ("fixed", "adaptive"))
        if self.mixing == "adaptive":
            self.adaptive.check(self.shards, self.val_sets)


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

    def check(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be within [0, optim.lr={self.lr}]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        _require(0 <= self.decay_fraction <= 1, "optim.decay_fraction", self.decay_fraction, "must be within [0, 1]")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, f"optim.{key}", getattr(self, key), "must be within [0, 1)")
        _choice("optim.schedule", self.schedule, SCHEDULES)


@dataclass
class ParallelSection:
    dp_replicate: int = 1  # HSDP: replicas (usually nodes); dp_shard = world_size / (dp_replicate x tp)
    tp: int = 1  # tensor parallel: each block's matmuls split over tp ranks (of one node), parallel/tensor_parallel.py
    async_tp: bool = False  # overlap TP's collectives with its matmuls (CUDA, compile; torch's symmetric memory)
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"  # none | full | every_k | selective
    ac_every: int = 2  # every_k: checkpoint every k-th block
    compile: bool = False  # torch.compile each transformer block
    dtype: str = "auto"  # bf16 | fp32 | auto (bf16 on CUDA, fp32 on CPU)
    fsdp_single_device: bool = False  # one bf16 device: FSDP (true) or plain autocast (false, faster)
    float8: str = "none"  # none | tensorwise | rowwise: the blocks' matmuls in float8 (torchao; H100 or newer)
    # FSDP2's CPUOffloadPolicy: fp32 parameters, gradients and AdamW state on the host, the optimizer step on the
    # CPU; the device holds only the blocks in flight (docs/parallelism.md). Runs under FSDP even on one device.
    cpu_offload: bool = False
    # Context parallel (train/parallel/context_parallel.py): each sequence split over cp ranks, which all-gather
    # every block's keys and values; for windows whose activations do not fit one device (32K-128K tokens).
    cp: int = 1
    # Pipeline parallel (train/parallel/pipeline.py): the layers split into pp x pp_virtual_stages stages.
    pp: int = 1
    pp_schedule: str = "1F1B"  # 1F1B | GPipe | Interleaved1F1B | InterleavedZeroBubble | ZBVZeroBubble
    pp_virtual_stages: int = 0  # stages per rank; 0: 2 for the interleaved and V schedules, else 1
    pp_layers_per_stage: list[int] | None = None  # e.g. [5, 6, 6, 5]; None: train/parallel/pipeline.py's even split

    def check(self, world_size: int) -> None:
        world = _world_in_words(world_size)
        _require(self.tp >= 1 and world_size % self.tp == 0, "parallel.tp", self.tp, f"must divide {world}")
        _require(self.pp >= 1 and world_size % (self.pp * self.tp) == 0, "parallel.pp", self.pp,
                 f"x parallel.tp={self.tp} must divide {world}")
        with_tp = f" x parallel.tp={self.tp}" if self.tp > 1 else ""
        with_pp = f" x parallel.pp={self.pp}" if self.pp > 1 else ""
        _require(self.dp_replicate >= 1 and world_size % (self.dp_replicate * self.tp * self.pp) == 0,
                 "parallel.dp_replicate", self.dp_replicate, f"{with_tp}{with_pp} must divide {world}".lstrip())
        self._check_cp(world_size)
        _choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        _require(self.pp_virtual_stages >= 0, "parallel.pp_virtual_stages", self.pp_virtual_stages, "must be >= 0")
        if self.async_tp:  # torch's symmetric-memory kernels: CUDA only
            import torch

            _require(torch.cuda.is_available(), "parallel.async_tp", self.async_tp,
                     "needs CUDA GPUs (symmetric memory); set parallel.async_tp=false")
        _require(not self.async_tp or self.tp > 1, "parallel.async_tp", self.async_tp, "needs parallel.tp > 1")
        _require(not self.async_tp or self.compile, "parallel.async_tp", self.async_tp,
                 "works through torch.compile: set parallel.compile=true")
        _choice("parallel.activation_checkpointing", self.activation_checkpointing, AC_MODES)
        _require(self.ac_every >= 1, "parallel.ac_every", self.ac_every, "must be >= 1")
        _choice("parallel.dtype", self.dtype, DTYPES)
        _choice("parallel.float8", self.float8, FLOAT8_RECIPES)
        # Untested under torch.distributed.pipelining, whose stages keep their gradients unreduced all step.
        _require(not self.cpu_offload or self.pp == 1, "parallel.cpu_offload", self.cpu_offload,
                 f"does not run under pipeline parallelism (parallel.pp={self.pp}); set parallel.pp=1 or "
                 "parallel.cpu_offload=false")

    def _check_cp(self, world_size: int) -> None:
        others = self.dp_replicate * self.tp * self.pp
        _require(self.cp >= 1 and world_size % (self.cp * others) == 0, "parallel.cp", self.cp,
                 f"x parallel.dp_replicate x parallel.tp x parallel.pp = {self.cp} x {others} must divide "
                 f"{_world_in_words(world_size)}")


@dataclass
class CheckpointSection:
    interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step permanently (0: none)
    save_final: bool = True  # save when training ends
    async_save: bool = False
    resume: str = "auto"  # auto | none | a step number | a checkpoint folder | a run folder (its newest)
    # A start that would not continue the checkpoints already in <run>/checkpoints (resume=none, or another
    # folder's checkpoint) is refused, so that two runs' checkpoints never mix; true moves the earlier run's
    # checkpoints, ledger and metrics aside, into <run>/replaced-<time>/, and starts there.
    overwrite: bool = False
    init_from: str = ""  # weights only, for continued pretraining: a checkpoint or HF folder

    def check(self) -> None:
        _require(self.interval >= 0, "checkpoint.interval", self.interval, "must be >= 0 (0: only at the end)")
        _require(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        _require(self.keep_every >= 0, "checkpoint.keep_every", self.keep_every, "must be >= 0")
        _require(bool(self.resume), "checkpoint.resume", self.resume, "must be auto, none, a step number or a folder")


@dataclass
class StabilitySection:
    spike_z: float = 6.0  # a loss this many standard deviations above the recent mean is a spike (0: off)
    window: int = 100  # steps of loss history the spike test uses
    min_history: int = 20  # no spike test before this many healthy steps
    min_std: float = 0.01  # floor of the standard deviation, so a flat loss curve is not all spikes
    max_non_finite_in_a_row: int = 3  # this many skipped non-finite steps in a row trigger a rollback
    rollback: bool = True  # on a spike, restore the last checkpoint and skip the data since it
    # With no rollback possible (no checkpoint yet, or rollback=false), this many spikes in a row mean the
    # loss moved to a new level: the detector accepts it rather than skip every later update.
    spike_patience: int = 5
    # Rollbacks to one checkpoint within a job, and non-finite rollback verdicts in a row with no checkpoint
    # to go back to, before the run stops naming the likely cause (the learning rate, the data).
    max_rollbacks: int = 3

    def check(self) -> None:
        _require(self.spike_z >= 0, "stability.spike_z", self.spike_z, "must be >= 0 (0: off)")
        _require(self.window >= 2, "stability.window", self.window, "must be >= 2")
        _require(1 <= self.min_history <= self.window, "stability.min_history", self.min_history,
                 f"must be within [1, stability.window={self.window}]")
        _require(self.min_std > 0, "stability.min_std", self.min_std, "must be > 0")
        _require(self.max_non_finite_in_a_row >= 0, "stability.max_non_finite_in_a_row",
                 self.max_non_finite_in_a_row, "must be >= 0 (0: never roll back)")
        _require(self.spike_patience >= 1, "stability.spike_patience", self.spike_patience, "must be >= 1")
        _require(self.max_rollbacks >= 1, "stability.max_rollbacks", self.max_rollbacks, "must be >= 1")


@dataclass
class WandbSection:
    mode: str = "auto"  # auto (online with a key and network, else offline) | online | offline | disabled
    project: str = "llm-pretrain"
    entity: str | None = None

    def check(self) -> None:
        _choice("wandb.mode", self.mode, WANDB_MODES)


@dataclass
class TensorBoardSection:
    enabled: bool = False  # rank 0 writes every metrics.jsonl record's numbers as TensorBoard scalars
    dir: str = ""  # the event files' folder, relative to the run folder (or absolute); "" is <run>/tensorboard


@dataclass
class EvalSection:
    """lm-evaluation-harness tasks run on the training model itself during the run (train/loop/downstream.py)."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task names, or those of task_dir's YAMLs; [] is off
    task_dir: str = ""  # a folder of local task YAMLs (lm-eval's include_path); "" is lm-eval's own tasks only
    limit: int | None = None  # at most this many documents per task (None: all)
    interval: int = 0  # every N steps and at the end; 0: at each validation (val_interval) and at the end

    def check(self) -> None:
        _require(self.interval >= 0, "eval.interval", self.interval, "must be >= 0 (0: at each validation)")
        _require(self.limit is None or self.limit >= 1, "eval.limit", self.limit, "must be >= 1 (or null: all)")


@dataclass(frozen=True)
class BatchShape:
    """A step's batch, as the parallel and loop components take it (the trainer builds it from TrainConfig's
    micro_batch_size, global_batch_size and data.seq_len): no component needs the whole config for these."""

    micro_batch_size: int  # sequences per forward/backward on one rank
    global_batch_size: int  # sequences per optimizer step, across all ranks
    seq_len: int  # tokens per sequence

    def microbatches(self, dp_size: int) -> int:
        """Micro-batches per step on each data-parallel rank: accumulation steps, or a pipeline's micro-batches."""
        return self.global_batch_size // (self.micro_batch_size * dp_size)


@dataclass
class TrainConfig:
    run_name: str = "debug"
    output_dir: str = "outputs"  # the run lives in output_dir/run_name unless hydra.run.dir says otherwise
    seed: int = 0
    steps: int = 100
    # > 0: train this many passes over the training windows instead of `steps` (steps = epochs x windows /
    # global_batch_size, rounded down; logged): how fine-tuning is usually sized
    epochs: float = 0.0
    global_batch_size: int = 16  # sequences per optimizer step, across all ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    log_interval: int = 10
    val_interval: int = 0  # 0: validate only at the end
    val_batches: int = 8  # per validation; 0 disables validation
    peak_tflops: float | None = None  # per device, for MFU; None: look the GPU up
    sample_prompt: str = ""  # if set, print a sample continuation at the end
    sample_tokens: int = 48
    report: bool = True  # draw <run>/report.png (train/observe/report.py) at the end of the run
    collective_timeout_s: int = 600
    memory_check: bool = True  # refuse at start-up a run whose memory estimate exceeds the device
    profile_step: int = 0  # >0: run this step under torch.profiler (train/observe/profiler.py writes <run>/profile/)
    # More loop hooks: module:factory names of importable callables that return one (train/loop/hooks.py).
    hooks: list[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    stability: StabilitySection = field(default_factory=StabilitySection)
    wandb: WandbSection = field(default_factory=WandbSection)
    tensorboard: TensorBoardSection = field(default_factory=TensorBoardSection)
    eval: EvalSection = field(default_factory=EvalSection)  # lm-eval tasks in the loop

    def check(self, world_size: int) -> None:
        """Every value checked once, at start-up, each naming its key when it is wrong. The global batch
        is micro batch x accumulation steps x data-parallel ranks."""
        for key in ("steps", "global_batch_size", "micro_batch_size", "log_interval", "collective_timeout_s"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        for key in ("val_interval", "val_batches", "sample_tokens", "profile_step", "epochs"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for section in (self.model, self.data, self.optim, self.checkpoint, self.stability, self.wandb):
            section.check()
        for spec in self.hooks:
            _require(HOOK_SPEC.fullmatch(spec) is not None, "hooks", spec, "is not module:factory (an importable "
                     "callable that returns a loop hook, see train/loop/hooks.py)")
        self.parallel.check(world_size)
        self.eval.check()
        split = self.parallel.tp * self.parallel.pp * self.parallel.cp  # a TP, CP group, a pipeline read one batch
        dp_size = world_size // split
        per_step = self.micro_batch_size * dp_size
        ranks = "data-parallel ranks" if split > 1 else "ranks"
        _require(self.global_batch_size % per_step == 0, "global_batch_size", self.global_batch_size,
                 f"must be divisible by micro_batch_size x {ranks} = {self.micro_batch_size} x {dp_size} = {per_step}")
        # Each cp rank holds 2 of 2 x cp chunks (load balance); TP's sequence parallel splits each again by tp.
        chunks = 2 * self.parallel.cp * self.parallel.tp
        _require(self.parallel.cp == 1 or self.data.seq_len % chunks == 0, "data.seq_len", self.data.seq_len,
                 f"must be divisible by 2 x parallel.cp x parallel.tp = {chunks} under context parallelism")


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
            problem = _check_preset(o, conf_dir)
            if problem:
                return problem
            continue
        if key.split(".")[:2] == ["data", "val_sets"] and not (o.is_add() or o.is_force_add()):
            return f"{o.input_line}: write +{o.input_line} (a validation set is added to the config, hence the +)"
        try:
            OmegaConf.update(schema, key, o.value(), merge=True)
        except (ConfigAttributeError, ConfigKeyError):
            return _unknown_key(key)
        except ValidationError as e:
            return f"{o.input_line}: {str(e).splitlines()[0]}"
    return _unresolved_interpolation(schema, overrides)


# Keys that no longer exist, and what sets what they set.
REMOVED_KEYS = {
    "parallel.pp_microbatches": "a pipeline runs global_batch_size / (micro_batch_size x data-parallel ranks) "
                                "micro-batches per step; set micro_batch_size or global_batch_size",
    **dict.fromkeys(("faults.nan_loss_steps", "faults.spike_data_steps", "faults.crash_after_steps",
                     "faults.stop_at_step"),
                    "fault drills are the tests' (tests/support/fault_drills.py), injected as a loop hook: "
                    "hooks=[fault_drills:FaultDrills]"),
}


def _unknown_key(key: str) -> str:
    if key in REMOVED_KEYS:
        return f"{key} was removed: {REMOVED_KEYS[key]}"
    close = difflib.get_close_matches(key, _all_keys(TrainConfig), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; every key and its default is in train/config.py"


def _check_preset(o, conf_dir: Path) -> str | None:
    """The one-line error for a `+conf=` that does not name a preset: +conf takes a name from conf/, not a path."""
    if not o.is_add():
        return f"{o.input_line}: write +conf={o.value()} (a preset is added to the config, hence the +)"
    presets = sorted(p.stem for p in conf_dir.glob("*.yaml"))
    name = str(o.value())
    if name in presets:
        return None
    stem = Path(name).name.removesuffix(".yaml")
    if stem != name:  # a path or file name, e.g. ../conf/debug or conf/debug.yaml
        hint = f" (+conf={stem})" if stem in presets else ""
        return (f"+conf={name}: +conf takes the name of a preset, a file {conf_dir.name}/NAME.yaml, not a path{hint}; "
                f"presets: {', '.join(presets)}")
    return f"+conf={name}: there is no {conf_dir.name}/{name}.yaml; presets: {', '.join(presets)}"


# Resolvers Hydra registers only when it runs (hydra/core/utils.py setup_globals): not checkable here.
_HYDRA_RESOLVERS = ("now", "hydra", "python_version")


def _unresolved_interpolation(schema, overrides: list) -> str | None:
    """The one-line error for a `${...}` in a value that does not resolve (a key that does not exist, or
    a value of the wrong type); Hydra would stop with a traceback, often while naming the run folder."""
    from omegaconf.errors import InterpolationResolutionError, UnsupportedInterpolationType

    try:
        OmegaConf.to_container(schema, resolve=True)
    except InterpolationResolutionError as e:
        message = str(e).splitlines()[0]
        if isinstance(e, UnsupportedInterpolationType) and message.split()[-1] in _HYDRA_RESOLVERS:
            return None
        key = e.full_key.split("[")[0]  # data.shards[0] is given as data.shards=[...]
        given = next((o.input_line for o in reversed(overrides) if o.key_or_group == key), e.full_key)  # the last wins
        return (f"{given}: {message}; ${{key}} takes the value of another config key "
                f"(e.g. run_name='${{model.preset}}-a'); write \\${{ for a literal ${{")
    return None


def _all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        sub = f.default_factory if is_dataclass(f.default_factory) else None
        keys += _all_keys(sub, f"{prefix}{f.name}.") if sub else [prefix + f.name]
    return keys
