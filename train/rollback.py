"""Rolling back after a loss spike or repeated non-finite steps: restore the last checkpoint and
skip the data read since it.

Each rollback is recorded in `<run>/checkpoints/rollbacks.json` (written atomically) before training
goes on: a job that dies before its next checkpoint resumes from the same checkpoint, and the
record makes it skip the same samples instead of training on the data that caused the spike.
"""

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from .checkpoint import TrainState
from .checkpoint_io import Checkpointer, write_atomic

log = logging.getLogger("train")

RECORD_FILE = "rollbacks.json"


@dataclass
class Skip:
    to_step: int  # the checkpoint rolled back to
    start: int  # global samples [start, end) are never trained on
    end: int
    skipped_steps: int  # the run's counters after the rollback
    rollbacks: int


class Rollback:
    def __init__(self, state: TrainState, store: Checkpointer, enabled: bool, is_main: bool):
        self.state, self.store, self.enabled, self.is_main = state, store, enabled, is_main
        self.record = store.folder / RECORD_FILE

    def __call__(self) -> Skip | None:
        """Roll back (collective); None, with a warning, when it cannot (no checkpoint yet, or disabled)."""
        self.store.wait()
        path = self.store.latest()
        if path is None or not self.enabled:
            log.warning("step %d: cannot roll back (%s); continuing without this step's update",
                        self.state.counters.step, "no checkpoint yet" if path is None else "stability.rollback=false")
            return None
        counters, loader = self.state.counters, self.state.loader
        # These two count the whole run, not the checkpoint's part of it.
        kept, end = (counters.skipped_steps, counters.rollbacks + 1), loader.samples_consumed
        saved = self.state.load(path, loader=False)
        skip = Skip(self.state.counters.step, saved["loader"]["samples_consumed"], end, *kept)
        self._apply(skip)
        self._append(skip)
        log.warning("rolled back to %s (step %d); skipped samples [%d, %d)", path.name, skip.to_step, skip.start,
                    skip.end)
        return skip

    def _apply(self, skip: Skip) -> None:
        self.state.loader.samples_consumed = skip.end  # the loader's other state is unchanged
        self.state.counters.skipped_steps, self.state.counters.rollbacks = skip.skipped_steps, skip.rollbacks
        self.state.stability.reset()  # the history no longer describes the weights

    def _append(self, skip: Skip) -> None:
        if self.is_main:
            write_atomic(self.record, json.dumps(self.recorded() + [asdict(skip)], indent=1))

    def recorded(self) -> list[dict]:
        return json.loads(self.record.read_text()) if self.record.is_file() else []

    def reapply(self, resumed_from: Path | None) -> None:
        """After a resume: a rollback recorded against this very checkpoint and loader position
        happened after it was written, so its data is skipped again (the latest such record wins)."""
        if resumed_from is None:
            return
        step, start = self.state.counters.step, self.state.loader.samples_consumed
        matches = [Skip(**r) for r in self.recorded() if r["to_step"] == step and r["start"] == start]
        if matches:
            skip = max(matches, key=lambda s: s.end)
            self._apply(skip)
            log.warning("re-applying the rollback recorded in %s: skipping samples [%d, %d) again", self.record,
                        skip.start, skip.end)

