"""Progress of the loop on rank 0: a live bar on a terminal, else (SLURM, CI, a pipe) a log line per report."""

import logging
import sys

from .throughput import summary_line

log = logging.getLogger("train")


class Progress:
    def __init__(self, total_steps: int, first_step: int, enabled: bool):
        self.bar, self.last = None, None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, disable=None)  # disable=None: no bar when stdout is no terminal
        self.live = self.bar is not None and not self.bar.disable

    def report(self, figures: dict) -> None:
        self.last = figures
        if self.live:
            self.bar.set_postfix_str(summary_line(figures), refresh=False)
        else:
            log.info("step %d: %s", figures["step"], summary_line(figures))

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
