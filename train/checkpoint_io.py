"""Checkpoint folders on disk: sharded DCP writes (in the foreground or the background), atomic
renames, the `latest` pointer, retention, and recovery after a crash at any moment.

Layout of `<run>/checkpoints/`:
    step_00000100/          a complete checkpoint: DCP shards + `.metadata` + `train_state.json`
    .tmp-step_00000200/     being written (never loaded)
    .replaced-step_00000100/  an earlier save of a step being saved again, kept until the new one is in place
    latest                  the name of the most recent complete save (updated last, atomically)

Each rank writes its own shards (no rank gathers the model). The folder is renamed from its
temporary name only after every rank has finished writing, so a crash at any moment leaves the
previous checkpoint intact and `latest` pointing at it; and a complete checkpoint is never deleted
before its replacement is in place. Every rename and `latest` is made durable (fsync of the folder).
"""

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger("train")

STATE_FILE = "train_state.json"


def _cause(e: CheckpointException) -> str:
    """A failed DCP read or write in one line: the first failing rank's own error."""
    for failure in e.failures.values():
        err = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
    return str(e).splitlines()[0]


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def _fsync_dir(path: Path) -> None:
    """Make the renames and new names inside `path` durable (a rename lives in its folder's entry)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


class Checkpointer:
    def __init__(self, folder: Path, keep_last: int = 2, keep_every: int = 0, is_main: bool = True,
                 async_save: bool = False):
        self.folder, self.keep_last, self.keep_every, self.is_main = folder, keep_last, keep_every, is_main
        # Async saves run their collectives from a background thread: they get a gloo group of
        # their own so they never interleave with the training's collectives.
        self.async_group = dist.new_group(backend="gloo") if async_save else None
        self._pending = None  # (future, tmp folder, final folder, train_state) of an async save
        self.last_saved_step = None

    def recover(self) -> None:
        """Finish or undo what a crash interrupted (rank 0; call before any rank saves or loads): a
        save whose files were all written but not yet renamed is put in place; a half-written one is
        removed; an earlier save set aside for a replacement comes back if the replacement is not in place."""
        if not self.is_main or not self.folder.is_dir():
            return
        for tmp in sorted(self.folder.glob(".tmp-step_*")):
            if is_complete(tmp):
                log.warning("completing checkpoint %s (written in full; the job ended before its rename)", tmp)
                self._put_in_place(tmp, self.folder / tmp.name.removeprefix(".tmp-"))
            else:
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        for old in self.folder.glob(".replaced-step_*"):
            final = self.folder / old.name.removeprefix(".replaced-")
            if is_complete(final):
                shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning("restoring %s (its replacement was not written)", final)
                os.replace(old, final)
                _fsync_dir(self.folder)

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer, else the highest complete step."""
        pointer = self.folder / "latest"
        if pointer.is_file():
            candidate = self.folder / pointer.read_text().strip()
            if is_complete(candidate):
                return candidate
            log.warning("%s names %s, which is not a complete checkpoint; scanning", pointer, candidate)
        complete = sorted(p for p in self.folder.glob("step_*") if is_complete(p))
        return complete[-1] if complete else None

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        """Write a checkpoint collectively; returns its final folder. With async saving this returns
        once the state is staged in host memory; the files are written in the background and the
        checkpoint becomes visible at the next `wait()` (called by the next save and at the end)."""
        self.wait()
        final = self.folder / step_dirname(step)
        if step == self.last_saved_step:  # e.g. the end of a run resumed at its last step: already on disk
            return final
        tmp = self.folder / f".tmp-{step_dirname(step)}"
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
        }
        if self.async_group is not None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group)
            self._pending = (future, tmp, final, train_state)
            return final
        try:
            dcp.save(state, checkpoint_id=str(tmp))
        except CheckpointException as e:  # e.g. a full disk: one line, not a traceback per rank
            raise OSError(f"{tmp}: writing the checkpoint failed ({_cause(e)}); the previous checkpoint and "
                          f"`latest` are untouched") from None
        self._finalize(tmp, final, train_state)
        return final

    def wait(self) -> None:
        """Finish a pending async save and make it visible (collective)."""
        if self._pending is None:
            return
        future, tmp, final, train_state = self._pending
        self._pending = None
        try:
            future.result()
        except CheckpointException as e:
            raise OSError(f"{tmp}: writing the checkpoint in the background failed ({_cause(e)}); the previous "
                          f"checkpoint and `latest` are untouched") from None
        self._finalize(tmp, final, train_state)

    def _finalize(self, tmp: Path, final: Path, train_state: dict) -> None:
        """Rename the finished folder into place and point `latest` at it, once every rank is done."""
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            write_atomic(tmp / STATE_FILE, json.dumps(train_state, indent=1))
            self._put_in_place(tmp, final)
            self._apply_retention()
        self.last_saved_step = _step_of(final)
        dist.barrier()

    def _put_in_place(self, tmp: Path, final: Path) -> None:
        """Rename a complete save into place and point `latest` at it. A save of the same step from
        an earlier attempt is set aside first and deleted only once the new one is in place."""
        replaced = final.with_name(f".replaced-{final.name}")
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            _fsync_dir(self.folder)
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        write_atomic(self.folder / "latest", final.name)
        shutil.rmtree(replaced, ignore_errors=True)

    def _apply_retention(self) -> None:
        complete = sorted(p for p in self.folder.glob("step_*") if is_complete(p))
        latest = (self.folder / "latest").read_text().strip()
        for old in complete[: -self.keep_last]:
            step = _step_of(old)
            if old.name == latest or (self.keep_every and step % self.keep_every == 0):
                continue
            shutil.rmtree(old, ignore_errors=True)


def read_train_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def load(path: Path, model, optimizer=None) -> dict:
    """Load model (and optimizer) state in place from a checkpoint folder, resharding to the current
    world size; returns the saved train state."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata or {STATE_FILE})")
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # a truncated or damaged shard file
        raise ValueError(f"{path}: cannot read the checkpoint ({_cause(e)}); it is damaged: resume from an "
                         f"earlier one with checkpoint.resume=STEP") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    return read_train_state(path)


def load_weights_only(path: Path, model) -> None:
    """Model weights from a checkpoint, for continued pretraining (fresh optimizer and data)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
