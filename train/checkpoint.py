"""What a checkpoint holds (TrainState) and how a run resumes from one.

TrainState is the whole checkpointed state of a run: the model and optimizer tensors (sharded DCP
files, see checkpoint_io.py) and, in train_state.json, the step and token counters, the schedule,
the loader's position, the spike detector's history, the W&B run id, the optimizer settings (which may
change across a resume), and a fingerprint of what must not (model shape, tokenizer, sequence length,
data, seed).
"""

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch.distributed as dist

from . import checkpoint_io
from .checkpoint_io import STATE_FILE, Checkpointer, is_complete, is_readable, step_dirname
from .config import CheckpointSection, OptimSection
from .hf_import import init_from
from .optim import apply_hyperparameters

log = logging.getLogger("train")

# Fingerprint keys a user may change on purpose with data.allow_change=true (the loader then starts
# the new mixture at the resumed step).
DATA_KEYS = ("data.shards", "data.weights")


@dataclass
class Counters:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates dropped (non-finite or spike)
    rollbacks: int = 0


class TrainState:
    def __init__(self, model, optimizer, scheduler, loader, stability, fingerprint: dict, optim_cfg: OptimSection):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.stability, self.fingerprint, self.optim_cfg = loader, stability, fingerprint, optim_cfg
        self.counters = Counters()
        self.wandb_id: str | None = None

    def to_json(self) -> dict:
        return {**asdict(self.counters), "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(), "stability": self.stability.state_dict(),
                "wandb_id": self.wandb_id, "fingerprint": self.fingerprint, "optim": asdict(self.optim_cfg),
                "world_size": dist.get_world_size()}

    def save(self, store: Checkpointer) -> Path:
        return store.save(self.counters.step, self.model, self.optimizer, self.to_json())

    def load(self, path: Path, loader: bool = True, allow_data_change: bool = False) -> dict:
        """The checkpoint at `path` (collective); returns its train_state.json. loader=False keeps the
        loader where it is (a rollback goes on with the data after the skipped range)."""
        saved = checkpoint_io.load(path, self.model, self.optimizer)
        self.counters = Counters(**{f.name: saved.get(f.name, 0) for f in fields(Counters)})
        self.scheduler.load_state_dict(saved["scheduler"])
        self._apply_optim_settings(saved.get("optim", {}))
        if loader:
            change = self.loader.load_state_dict(saved["loader"], allow_change=allow_data_change)
            if change:
                log.warning("%s (data.allow_change=true)", change)
        self.stability.load_state_dict(saved.get("stability", {}))
        self.wandb_id = saved.get("wandb_id")
        return saved

    def _apply_optim_settings(self, saved: dict) -> None:
        """Optimizer settings may change across a resume: they apply from the resumed step on."""
        now = asdict(self.optim_cfg)
        for key in [k for k in now if k in saved and saved[k] != now[k]]:
            log.info("optim.%s: %s -> %s from step %d", key, saved[key], now[key], self.counters.step + 1)
        apply_hyperparameters(self.optimizer, self.scheduler, self.optim_cfg)


def resume_point(store: Checkpointer, resume: str) -> Path | None:
    """The checkpoint `checkpoint.resume` names: auto (the latest, if any), none, a step, or a folder."""
    if resume == "none":
        return None
    if resume == "auto":
        return store.latest()
    path = store.folder / step_dirname(int(resume)) if resume.isdigit() else Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint.resume={resume}: no checkpoint folder {path}; use auto (the latest), "
                                f"none, a step number of {store.folder}, or a checkpoint folder")
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume={resume}: {path} is not a complete checkpoint (no .metadata or "
                                f"{STATE_FILE}); resume from another step")
    if not is_readable(path):
        raise ValueError(f"checkpoint.resume={resume}: {path / STATE_FILE} is damaged (not JSON); resume from "
                         f"another step")
    return path


def check_fingerprint(saved: dict, now: dict, path: Path, allow_data_change: bool) -> None:
    """Refuse, in one line naming the key, a resume across a change that would make it wrong. Keys an
    older checkpoint lacks are not checked."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    for key, value in flat_now.items():
        if key not in flat_saved or flat_saved[key] == value:
            continue
        if key in DATA_KEYS:
            if allow_data_change:
                continue
            raise ValueError(f"cannot resume from {path}: {key} changed since the checkpoint (samples already "
                             f"seen would repeat); pass data.allow_change=true to start the new mixture at this "
                             f"step, or use a new run_name")
        raise ValueError(f"cannot resume from {path}: {key} was {flat_saved[key]} and is now {value}; "
                         f"use a new run_name")


def _flatten(fingerprint: dict) -> dict:
    """{"model": {"dim": 64}, "seed": 0} -> {"model.dim": 64, "seed": 0}."""
    flat = {}
    for key, value in fingerprint.items():
        if key == "model":
            flat.update({f"model.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _load(state: TrainState, path: Path, allow_data_change: bool) -> None:
    saved = checkpoint_io.read_train_state(path).get("fingerprint", {})
    check_fingerprint(saved, state.fingerprint, path, allow_data_change)
    state.load(path, allow_data_change=allow_data_change)


def resume(state: TrainState, store: Checkpointer, cfg: CheckpointSection, allow_data_change: bool,
           tokenizer=None) -> Path | None:
    """Load the checkpoint `checkpoint.resume` names into `state`, or, with none, the weights of
    `checkpoint.init_from` (checked against `tokenizer`, the shards'). Returns the checkpoint resumed
    from (None for a fresh start)."""
    store.recover()
    dist.barrier()
    path = resume_point(store, cfg.resume)
    while path is not None:
        try:
            _load(state, path, allow_data_change)
            break
        except checkpoint_io.DamagedCheckpoint as e:
            older = store.before(path) if cfg.resume == "auto" else None
            if older is None:
                raise
            log.warning("%s; resuming from the one before, %s", e, older.name)
            path = older
    if path is not None:
        store.last_saved_step = state.counters.step  # ending at this step must not save it again
        log.info("resumed from %s at step %d (%d tokens seen)", path, state.counters.step, state.counters.tokens_seen)
    elif cfg.init_from:
        init_from(Path(cfg.init_from), state.model, tokenizer)  # a DCP checkpoint, an HF or a Meta folder
        log.info("initialised weights from %s (fresh optimizer, schedule and data)", cfg.init_from)
    return path
