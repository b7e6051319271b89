"""Rolling back after a loss spike or repeated non-finite steps: restore the last checkpoint and
skip the data read since it.

Each rollback is recorded in `<run>/checkpoints/rollbacks.json` (written atomically) before training
goes on: a job that dies before its next checkpoint resumes from the same checkpoint, and the
record makes it skip the same samples instead of training on the data that caused the spike.

Rollbacks are bounded: a checkpoint whose weights give non-finite losses straight after a rollback to it
is passed over for the one before; `stability.max_rollbacks` rollbacks to one checkpoint, or as many
non-finite verdicts in a row with no checkpoint to go back to, stop the run in one line naming the likely
cause (a learning rate that diverges, or the data) rather than loop for ever.
"""

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import StabilitySection
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


class Diverged(ValueError):
    """The loss keeps turning non-finite or spiking whatever the rollbacks: the run stops."""


class Rollback:
    def __init__(self, state: TrainState, store: Checkpointer, stability_cfg: StabilitySection, is_main: bool):
        self.state, self.store, self.stability_cfg, self.is_main = state, store, stability_cfg, is_main
        self.record = store.folder / RECORD_FILE
        self.times = Counter()  # rollbacks to each checkpoint (by name) in this job
        self.last_to: str | None = None  # the checkpoint the last rollback of this job went to
        self.unhealthy: set[str] = set()  # checkpoints whose weights gave non-finite losses at once
        self.unanswered = 0  # non-finite rollback verdicts in a row that found no checkpoint to go back to

    def __call__(self) -> Skip | None:
        """Roll back (collective); None, with a warning, when it cannot (no healthy checkpoint, or disabled).
        Raises Diverged when rolling back does not help."""
        self.store.wait()
        if self.last_to is not None and not self.state.stability.recent:  # not one healthy step since
            log.warning("%s gave non-finite losses straight after the rollback to it: passing it over", self.last_to)
            self.unhealthy.add(self.last_to)
            self.last_to = None
        path = self._target()
        if path is None or not self.stability_cfg.rollback:
            self._cannot("stability.rollback=false" if path is not None else
                         "no checkpoint yet" if self.store.latest() is None else "no healthy checkpoint")
            return None
        if self.times[path.name] >= self.stability_cfg.max_rollbacks:
            raise Diverged(self._diverged(f"rolled back to {path.name} {self.times[path.name]} times and the loss "
                                          f"still turns {self._how()}"))
        self.times[path.name] += 1
        self.last_to = path.name
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

    def _target(self) -> Path | None:
        """The newest checkpoint not known to be unhealthy (the one before when the latest is)."""
        path = self.store.latest()
        while path is not None and path.name in self.unhealthy:
            path = self.store.before(path)
        return path

    def _cannot(self, why: str) -> None:
        """No rollback: go on without the update, unless non-finite losses have now outlasted
        stability.max_rollbacks such verdicts (the weights do not change: they would go on for ever)."""
        stability = self.state.stability
        if stability.non_finite_in_a_row:
            fresh = stability.non_finite_in_a_row == self.stability_cfg.max_non_finite_in_a_row  # a new run of them
            self.unanswered = 1 if fresh else self.unanswered + 1
            if self.unanswered >= self.stability_cfg.max_rollbacks:
                raise Diverged(self._diverged(f"{stability.non_finite_in_a_row} non-finite losses in a row and no "
                                              f"rollback possible ({why})"))
        log.warning("step %d: cannot roll back (%s); continuing without this step's update",
                    self.state.counters.step, why)

    def _how(self) -> str:
        return "non-finite" if self.state.stability.non_finite_in_a_row else "into spikes"

    def _diverged(self, what: str) -> str:
        """The one-line reason the run stops, with the likely causes."""
        return (f"step {self.state.counters.step}: {what} (stability.max_rollbacks="
                f"{self.stability_cfg.max_rollbacks}); the run stops: the likely cause is the learning rate (optim.lr="
                f"{self.state.optim_cfg.lr:g}: lower it or lengthen optim.warmup_steps) or the data read since the "
                f"last checkpoint (samples up to {self.state.loader.samples_consumed})")

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

