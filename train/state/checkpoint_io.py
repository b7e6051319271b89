"""Checkpoint folders on disk: sharded DCP writes (in the foreground or the background), atomic
renames, the `latest` pointer, retention, and recovery after a crash at any moment.

Layout of `<run>/checkpoints/`:
    step_00000100/          a complete checkpoint: DCP shards + `.metadata` + `train_state.json`
    .tmp-step_00000200/     being written (never loaded)
    .replaced-step_00000100/  an earlier save of a step being saved again, kept until the new one is in place
    latest                  the name of the most recent complete save (updated last, atomically)

Each rank writes its own shards (no rank gathers the model). `train_state.json` is written first and DCP's
`.metadata` last, so a temporary folder holding both is a whole checkpoint, however its rename was prevented
(a job killed after a background write finished is completed at the next start). The folder is renamed
from its temporary name only after every rank has finished writing, so a crash at any moment leaves the
previous checkpoint intact and `latest` pointing at it; and a complete checkpoint is never deleted
before its replacement is in place. Every rename and `latest` is made durable (fsync of the folder).
"""

import json
import logging
import os
import re
import resource
import shutil
from pathlib import Path

import torch
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
# The optimizer's state and settings keyed by parameter name ("state.layers.0.attention.wq.weight.exp_avg",
# "param_groups.layers.0.attention.wq.weight.lr"), not by param-group position: ranks that hold different
# parameters (pipeline stages) each save and load their own, and any layout can read any other's.
OPTIM_KEYS = StateDictOptions(flatten_optimizer_state_dict=True)


class DamagedCheckpoint(ValueError):
    """A complete-looking checkpoint whose files cannot be read back."""


def _cause(e: CheckpointException) -> str:
    """A failed DCP read or write in one line: the first failing rank's own error."""
    for failure in e.failures.values():
        err = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(err).__name__}: {err}".splitlines()[0] if str(err) else type(err).__name__
    return str(e).splitlines()[0]


# Only folders named exactly as the trainer names them are checkpoints: a user's copy such as
# `step_00000010_keep` or `step_00000020.bak` is never loaded, counted or deleted.
STEP_NAME = re.compile(r"step_\d{8}")


def _write_failure(tmp: Path, e: CheckpointException, when: str) -> OSError:
    """The one-line error for a failed save. A full disk shows in DCP only as a short write deep in
    torch.save ("unexpected pos ..."), so the folder's free space and the file-size limit are looked at."""
    free = shutil.disk_usage(tmp.parent).free
    soft_limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < max(64 * 2**20, shutil.disk_usage(tmp.parent).total // 100):
        why = f"no space left on {_mount_of(tmp)} ({free / 2**20:.0f} MiB free) while writing {tmp}"
    elif soft_limit != resource.RLIM_INFINITY:
        why = f"the file-size limit (ulimit -f: {soft_limit} bytes) stopped writing {tmp}"
    else:
        why = f"{tmp}: writing the checkpoint{when} failed ({_cause(e)})"
    return OSError(f"{why}; the previous checkpoint and `latest` are untouched")


def _mount_of(path: Path) -> Path:
    path = path.resolve().parent if not path.exists() else path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def is_readable(path: Path) -> bool:
    """Complete, and its train_state.json parses (a truncated one makes the checkpoint unusable)."""
    try:
        return is_complete(path) and isinstance(read_train_state(path), dict)
    except (OSError, DamagedCheckpoint):
        return False


def _named(folder: Path, prefix: str = "") -> list[Path]:
    """Folders in `folder` named prefix + a checkpoint name, oldest step first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(prefix) and STEP_NAME.fullmatch(p.name[len(prefix):]))


def saved_steps(folder: Path) -> list[Path]:
    """The complete checkpoints in `folder`, oldest step first."""
    return [p for p in _named(folder) if is_complete(p)]


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
        # The ranks' vote on whether the background write is done (the async group is busy with that write).
        self.vote_group = dist.new_group(backend="gloo") if async_save else None
        self._pending = None  # (future, tmp folder, final folder) of an async save
        self.last_saved_step = None

    def recover(self) -> None:
        """Finish or undo what a crash interrupted (rank 0; call before any rank saves or loads): a
        save whose files were all written but not yet renamed is put in place; a half-written one is
        removed; an earlier save set aside for a replacement comes back if the replacement is not in place."""
        if not self.is_main or not self.folder.is_dir():
            return
        for tmp in _named(self.folder, ".tmp-"):
            if is_complete(tmp):
                log.warning("completing checkpoint %s (written in full; the job ended before its rename)", tmp)
                self._put_in_place(tmp, self.folder / tmp.name.removeprefix(".tmp-"))
            else:
                log.warning("removing incomplete checkpoint %s (a save was interrupted)", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        for old in _named(self.folder, ".replaced-"):
            final = self.folder / old.name.removeprefix(".replaced-")
            if is_complete(final):
                shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning("restoring %s (its replacement was not written)", final)
                os.replace(old, final)
                _fsync_dir(self.folder)

    def latest(self) -> Path | None:
        """The most recent usable checkpoint: the one `latest` names, else (with a warning) the highest
        readable step."""
        named = self._named_by_latest()
        if named is not None and is_readable(named):
            return named
        readable = [p for p in saved_steps(self.folder) if is_readable(p)]
        if named is not None:
            log.warning("%s names %s, which is missing or damaged; using %s", self.folder / "latest", named.name,
                        readable[-1].name if readable else "no checkpoint (none is complete)")
        return readable[-1] if readable else None

    def before(self, path: Path) -> Path | None:
        """The newest readable checkpoint of a lower step than `path` (the fallback for a damaged one)."""
        older = [p for p in saved_steps(self.folder) if p.name < path.name and is_readable(p)]
        return older[-1] if older else None

    def _named_by_latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        return self.folder / (name if STEP_NAME.fullmatch(name) else "(unreadable name)")

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        """Write a checkpoint collectively; returns its final folder. With async saving this returns
        once the state is staged in host memory; the files are written in the background and the
        checkpoint becomes visible once every rank's write is done (`finish_if_written`, each step) or at
        the next `wait()`. train_state.json goes in first: a finished write is a whole checkpoint on disk."""
        self.wait()
        final = self.folder / step_dirname(step)
        if step == self.last_saved_step:  # e.g. the end of a run resumed at its last step: already on disk
            return final
        tmp = self.folder / f".tmp-{step_dirname(step)}"
        if self.is_main:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            write_atomic(tmp / STATE_FILE, json.dumps(train_state, indent=1))
        dist.barrier()
        state = {
            "model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer, options=OPTIM_KEYS),
        }
        if self.async_group is not None:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group)
            self._pending = (future, tmp, final)
            return final
        try:
            dcp.save(state, checkpoint_id=str(tmp))
        except CheckpointException as e:  # e.g. a full disk: one line, not a traceback per rank
            raise _write_failure(tmp, e, "") from None
        self._finalize(tmp, final)
        return final

    def finish_if_written(self) -> None:
        """Make a pending async save visible as soon as every rank's write is done (collective: every rank
        calls it at each step while a save is pending; one small vote then)."""
        if self._pending is None:
            return
        written = torch.tensor([float(self._pending[0].done())])
        dist.all_reduce(written, op=dist.ReduceOp.MIN, group=self.vote_group)
        if written.item():
            self.wait()

    def wait_written(self) -> None:
        """Wait until this rank's background write is on disk, without making it visible (fault drills)."""
        if self._pending is not None:
            self._pending[0].result()

    def wait(self) -> None:
        """Finish a pending async save and make it visible (collective)."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        try:
            future.result()
        except CheckpointException as e:
            raise _write_failure(tmp, e, " in the background") from None
        self._finalize(tmp, final)
        if self.is_main:
            log.info("checkpoint %s written in the background", final)

    def _finalize(self, tmp: Path, final: Path) -> None:
        """Rename the finished folder into place and point `latest` at it, once every rank is done."""
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
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
        """Keep the newest keep_last checkpoints, every keep_every-th step, and the one `latest` names."""
        latest = self._named_by_latest()
        for old in saved_steps(self.folder)[: -self.keep_last]:
            if old == latest or (self.keep_every and _step_of(old) % self.keep_every == 0):
                continue
            log.info("removing checkpoint %s (checkpoint.keep_last=%d)", old, self.keep_last)
            shutil.rmtree(old, ignore_errors=True)


def read_train_state(path: Path) -> dict:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"{path / STATE_FILE} is damaged ({e}); use another checkpoint") from None


def load(path: Path, model, optimizer=None) -> dict:
    """Load model (and optimizer) state in place from a checkpoint folder, resharding to the current
    world size; returns the saved train state."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata or {STATE_FILE})")
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=OPTIM_KEYS)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # a truncated or damaged shard file
        raise DamagedCheckpoint(f"{path}: cannot read the checkpoint ({_cause(e)}); it is damaged: resume from an "
                                f"earlier one with checkpoint.resume=STEP") from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=OPTIM_KEYS)
    return read_train_state(path)


def load_weights_only(path: Path, model) -> None:
    """Model weights from a checkpoint, for continued pretraining (fresh optimizer and data)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
