"""The sample ledger: which global samples each step consumed on this rank, one JSON line per step
in `<run>/ledger/rank<r>.jsonl`. A run starting from step S first removes the records of steps after S
from every file (a run before it went past its last checkpoint, or S is an older one), so that steps
re-done on fewer data-parallel ranks are not counted twice. A rollback to step S removes them too (their
samples are skipped, as checkpoints/rollbacks.json records), so each file stays in step order and is only
ever read from its end. Files written before that may repeat a step; the last line of a step counts."""

import json
import logging
import re
from pathlib import Path

from data_pipeline.disk import writing

from ..observe.jsonl import drop_records_after, open_to_append
from ..parallel.distributed import Dist

log = logging.getLogger("train")


class SampleLedger:
    """One file per data-parallel rank, written by the first rank of its TP and CP groups and pipeline (the others
    read the same samples); the main rank also trims the files of ranks the run no longer has. A loop hook
    (train/loop/hooks.py): each step's samples recorded before it runs, forgotten when a rollback undoes it."""

    def __init__(self, run_dir: Path, env: Dist, start_step: int, mixture_of=None):
        # mixture_of: () -> the loader's mixture in force, for a run of several sources: each row then also says
        # which source (its index in data.shards) gave each sample, and which sample of that source's own stream
        self.mixture_of = mixture_of
        folder = run_dir / "ledger"
        folder.mkdir(exist_ok=True)
        self.path = folder / f"rank{env.dp_rank}.jsonl"
        self.file = None
        if env.is_main:
            for path in folder.glob("rank*.jsonl"):
                rank = re.fullmatch(r"rank(\d+)\.jsonl", path.name)
                if rank and int(rank[1]) >= env.dp_size:
                    _forget_after(path, start_step)
        if env.tp_rank == 0 and env.pp_rank == 0 and env.cp_rank == 0:
            _forget_after(self.path, start_step)
            self.file = open_to_append(self.path)

    def on_rollback(self, to_step: int) -> None:
        """Remove this rank's records of the steps after `to_step`, the step a rollback returned to."""
        if self.file is not None:
            self.file.flush()
            _forget_after(self.path, to_step, "the step rolled back to")

    def before_step(self, step: int, batch: dict) -> dict:
        """Record the global samples of the step's batch."""
        if self.file is not None:
            with writing(self.path):  # a full disk: one line naming the file
                self.file.write(json.dumps(self._row(step, batch["sample_index"])) + "\n")
                self.file.flush()
        return batch

    def _row(self, step: int, samples) -> dict:
        row = {"step": step, "samples": samples.tolist()}
        if self.mixture_of is not None:
            source, index = self.mixture_of().locate(samples.numpy())
            row |= {"sources": source.tolist(), "source_samples": index.tolist()}
        return row

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # what a failed record left in the buffer: that record raised already, naming the file
                pass


def _forget_after(path: Path, step: int, why: str = "the step this run starts from") -> None:
    removed = drop_records_after(path, step)
    if removed:
        log.info("%s: removed %d records of steps after %d, %s", path, removed, step, why)
