"""What a checkpoint holds (TrainState) and how a run resumes from one.

TrainState is the whole checkpointed state of a run: the model and optimizer tensors (sharded DCP
files, see checkpoint_io.py) and, in train_state.json, the step and token counters, the schedule,
the loader's position, the spike detector's history, the W&B run id, the optimizer settings (which may
change across a resume), and a fingerprint of what must not (model shape, tokenizer, sequence length,
data, seed).
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config import CheckpointSection, OptimSection
from ..optim import apply_hyperparameters
from . import checkpoint_io
from .checkpoint_io import STATE_FILE, Checkpointer, is_complete, is_readable, saved_steps, step_dirname

log = logging.getLogger("train")
# train_state.json's key for the context of the model a run was initialised from (Llama 3.1's 131072), which
# its export carries on (train/interop/hf_import.py model_context).
CONTEXT_KEY = "model_context"

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
    def __init__(self, model, optimizer, scheduler, loader, stability, fingerprint: dict, optim_cfg: OptimSection,
                 mixing=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.mixing = mixing  # data.mixing=adaptive's controller (train/loop/mixing.py), else None
        self.loader, self.stability, self.fingerprint, self.optim_cfg = loader, stability, fingerprint, optim_cfg
        self.counters = Counters()
        self.wandb_id: str | None = None
        self.model_context: int | None = None  # the init_from source's context, for the export (hf_import)

    def to_json(self) -> dict:
        return {**asdict(self.counters), "scheduler": self.scheduler.state_dict(),
                "loader": self.loader.state_dict(), "stability": self.stability.state_dict(),
                "wandb_id": self.wandb_id, "fingerprint": self.fingerprint, "optim": asdict(self.optim_cfg),
                "world_size": dist.get_world_size(), CONTEXT_KEY: self.model_context,
                **({"mixing": self.mixing.state_dict()} if self.mixing else {})}

    def save(self, store: Checkpointer) -> Path:
        return store.save(self.counters.step, self.model, self.optimizer, self.to_json())

    def unfit_to_save(self, device: torch.device) -> str | None:
        """Why the weights must not become a checkpoint (a rollback would return to them), or None
        (collective): the last step's loss was non-finite, or a weight is."""
        if self.stability.non_finite_in_a_row:
            return f"the last {self.stability.non_finite_in_a_row} step(s) gave a non-finite loss"
        bad = torch.zeros((), device=device)
        with torch.no_grad():
            for p in self.model.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                bad += (~torch.isfinite(local)).any()
        dist.all_reduce(bad)
        return "some weights are non-finite" if bad.item() else None

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
            if self.mixing and not change:  # a changed mixture starts adaptive mixing afresh
                self.mixing.load_state_dict(saved.get("mixing", {}))
        self.stability.load_state_dict(saved.get("stability", {}))
        self.wandb_id = saved.get("wandb_id")
        self.model_context = saved.get(CONTEXT_KEY)
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
                                f"none, a step number of {store.folder}, a checkpoint folder or a run folder")
    if not is_complete(path) and (saved_steps(path) or (path / "checkpoints").is_dir()):
        path = _newest_of_run(resume, path)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume={resume}: {path} is not a complete checkpoint (no .metadata or "
                                f"{STATE_FILE}); pass a step_* folder of a finished save, or a run folder (its newest)")
    if not is_readable(path):
        raise ValueError(f"checkpoint.resume={resume}: {path / STATE_FILE} is damaged (not JSON); resume from "
                         f"another step")
    return path


# What a run writes of its own history in its folder: set aside together by checkpoint.overwrite=true.
RUN_RECORDS = ("checkpoints", "ledger", "metrics.jsonl", "tensorboard")


def _mixes_runs(store: Checkpointer, ckpt_cfg: CheckpointSection, path: Path | None) -> bool:
    """Whether starting at `path` (None: afresh) would put a second run's checkpoints beside those in the run's
    folder, where retention and the fallback to an older checkpoint would mix them: refused in one line, unless
    checkpoint.overwrite=true (True: move the folder's aside once the start is sure to go ahead)."""
    ours = saved_steps(store.folder)
    if not ours or (path is not None and path.resolve().parent == store.folder.resolve()):
        return False
    if ckpt_cfg.overwrite:
        return True
    held = f"{store.folder} holds {len(ours)} checkpoint(s), the newest {ours[-1].name}"
    if path is None and ckpt_cfg.resume == "auto":
        why = f"{held}, none of them readable; starting afresh there"
    else:
        why = f"{held}, of an earlier run; {'starting afresh' if path is None else f'continuing {path}'} there"
    raise ValueError(f"checkpoint.resume={ckpt_cfg.resume}: {why} would mix two runs' checkpoints: use a new run_name, "
                     f"checkpoint.resume=auto to continue the folder's run, or checkpoint.overwrite=true to move "
                     f"them aside")


def _set_aside(run_dir: Path) -> None:
    """Move the earlier run's checkpoints, ledger and metrics into <run>/replaced-<time>/ (checkpoint.overwrite)."""
    stamp, n = time.strftime("replaced-%Y%m%d-%H%M%S"), 1
    aside = run_dir / stamp
    while aside.exists():  # two starts in one second
        n += 1
        aside = run_dir / f"{stamp}-{n}"
    aside.mkdir()
    moved = [name for name in RUN_RECORDS if (run_dir / name).exists()]
    for name in moved:
        os.replace(run_dir / name, aside / name)
    log.warning("checkpoint.overwrite=true: moved the earlier run's %s to %s (delete it when it is no longer "
                "needed)", ", ".join(moved), aside)


def _newest_of_run(resume: str, folder: Path) -> Path:
    """A run folder's (or its checkpoints folder's) newest usable checkpoint, as launch/eval.py takes it."""
    checkpoints = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    newest = Checkpointer(checkpoints).latest()
    if newest is None:
        raise FileNotFoundError(f"checkpoint.resume={resume}: {checkpoints} holds no complete checkpoint; pass a "
                                f"step_* folder of a finished save")
    log.info("checkpoint.resume=%s: a run folder, resuming its newest checkpoint %s", resume, newest.name)
    return newest


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


def resume(state: TrainState, store: Checkpointer, ckpt_cfg: CheckpointSection, allow_data_change: bool,
           init_from: Callable[[Path], int] | None = None) -> Path | None:
    """Load the checkpoint `checkpoint.resume` names into `state`, or, with none, the weights of
    `checkpoint.init_from` through `init_from(path) -> the source's context` (the caller's: interop reads
    the other formats). Returns the checkpoint resumed from (None for a fresh start)."""
    store.recover()
    dist.barrier()
    path = resume_point(store, ckpt_cfg.resume)
    set_aside = _mixes_runs(store, ckpt_cfg, path)
    path = _load_newest_intact(state, store, ckpt_cfg, path, allow_data_change)
    if path is not None:
        if path.resolve().parent == store.folder.resolve():
            store.last_saved_step = state.counters.step  # ending at this step must not save it again
        log.info("resumed from %s at step %d (%d tokens seen)", path, state.counters.step, state.counters.tokens_seen)
    elif ckpt_cfg.init_from:
        # A DCP checkpoint, an HF or a Meta folder; its context (Llama 3.1's 131072) goes on to the export.
        state.model_context = init_from(Path(ckpt_cfg.init_from))
        log.info("initialised weights from %s (fresh optimizer, schedule and data; a context of %d positions)",
                 ckpt_cfg.init_from, state.model_context)
    if set_aside:  # only now that the start is sure: a refused one leaves the folder as it was
        if store.is_main:
            _set_aside(store.folder.parent)
        dist.barrier()
    return path


def _load_newest_intact(state: TrainState, store: Checkpointer, ckpt_cfg: CheckpointSection, path: Path | None,
                        allow_data_change: bool) -> Path | None:
    """Load `path`; with resume=auto, a damaged one is passed over for the one before. Returns the one loaded."""
    while path is not None:
        try:
            _load(state, path, allow_data_change)
            return path
        except checkpoint_io.DamagedCheckpoint as e:
            older = store.before(path) if ckpt_cfg.resume == "auto" else None
            if older is None:
                raise
            log.warning("%s; resuming from the one before, %s", e, older.name)
            path = older
    return None
