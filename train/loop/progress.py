"""Progress of the loop on rank 0: a live bar on a terminal, else (SLURM, CI, a pipe) a log line per report
(a loop hook, train/loop/hooks.py)."""

import logging
import sys

from .throughput import summary_line

log = logging.getLogger("train")


class Progress:
    def __init__(self, total_steps: int, enabled: bool):
        self.total_steps, self.enabled = total_steps, enabled
        self.bar, self.last, self.live = None, None, False

    def on_start(self, trainer) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=trainer.state.counters.step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout, disable=None)  # None: no bar when stdout is no tty
        self.live = self.bar is not None and not self.bar.disable

    def write(self, record: dict) -> None:
        """A logging window's figures (the records with a training loss) in the bar or a log line."""
        if "loss" not in record:
            return
        self.last = record
        if self.live:
            self.bar.set_postfix_str(summary_line(record), refresh=False)
        else:
            log.info("step %d: %s", record["step"], summary_line(record))

    def after_step(self, step: int, result) -> None:
        self.at(step)

    def on_rollback(self, to_step: int) -> None:
        self.at(to_step)

    def at(self, step: int) -> None:
        """The loop is now after `step` (forward, or back after a rollback)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)  # may be negative; redraws at most every bar.mininterval

    def close(self) -> None:
        if self.bar is None:
            return
        self.bar.close()
        if self.live and self.last:  # the bar is gone from the screen: keep its last figures in the log
            log.info("step %d: %s", self.last["step"], summary_line(self.last))
