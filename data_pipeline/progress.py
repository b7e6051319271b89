"""Progress of a long step (building shards, evaluating, exporting) on the main process: a live bar on a terminal
(stderr), else (SLURM, CI, a pipe) a log line every LOG_EVERY_S seconds and one at the end, as the training
loop's train/loop/progress.py does with its bar and log lines."""

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0  # without a terminal: often enough to show the step is alive, seldom enough for a log file


class Meter:
    """`done` of `total` units (None: unknown, or an estimate set later), with a note of other figures (files,
    documents). Not enabled (other ranks, progress=false): shows and logs nothing."""

    def __init__(self, desc: str, log, total: float | None = None, unit: str = "it", enabled: bool = True):
        self.desc, self.log, self.unit, self.enabled = desc, log, unit, enabled
        self.total, self.done, self.note = total, 0, ""
        self.started = self.logged = time.monotonic()
        self.bar = None
        if enabled:  # disable=None: no bar when stderr is no terminal; the log lines stand in for it
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}" if unit != "B" else unit, unit_scale=True,
                            dynamic_ncols=True, file=sys.stderr, disable=None)
        self.live = self.bar is not None and not self.bar.disable

    def set_total(self, total: float | None) -> None:
        """A better estimate of the total (a text source's tokens, from its bytes and the tokens per byte so far)."""
        self.total = total
        if self.live:
            self.bar.total = total

    def update(self, n: float, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        if self.live:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)  # redraws at most every bar.mininterval
        elif self.enabled and time.monotonic() - self.logged >= LOG_EVERY_S:
            self.log.info(self.line())
            self.logged = time.monotonic()

    def line(self) -> str:
        """`desc: 1.20M of 4.50M tokens (27%), 12.3k tokens/s, 04:26 left, note`: the figures of a log line."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [self.amount(self.done)]
        if self.total:
            done = tqdm.format_sizeof(self.done) if self.unit != "B" else parts[0]  # 1.20M of 4.50M tokens
            parts[0] = f"{done} of {self.amount(self.total)} ({min(100.0, 100 * self.done / self.total):.0f}%)"
        parts.append(f"{self.amount(rate)}/s")
        if self.total and rate > 0:
            parts.append(f"{tqdm.format_interval(max(0.0, self.total - self.done) / rate)} left")
        return f"{self.desc}: {', '.join(parts + [self.note] if self.note else parts)}"

    def amount(self, n: float) -> str:
        return tqdm.format_sizeof(n, "B") if self.unit == "B" else f"{tqdm.format_sizeof(n)} {self.unit}"

    def close(self, complete: bool = True) -> None:
        """End the bar (complete: its total is what was done) and, without a bar, log a completed step's line."""
        if not self.enabled:
            return
        if complete:
            self.set_total(self.done)
        if self.bar is not None:
            self.bar.close()
        if complete and not self.live:  # an interrupted step's last line is the last periodic one
            elapsed = time.monotonic() - self.started
            note = f", {self.note}" if self.note else ""
            self.log.info(f"{self.desc}: {self.amount(self.done)} in {tqdm.format_interval(elapsed)} "
                          f"({self.amount(self.done / max(elapsed, 1e-9))}/s){note}")
