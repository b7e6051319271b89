"""Loss-spike and non-finite detection: decides when a step's update must be skipped and when
the run must roll back to its last good checkpoint."""

import math
import statistics
from collections import deque

from .config import StabilitySection


class StabilityMonitor:
    def __init__(self, cfg: StabilitySection):
        self.cfg = cfg
        self.recent = deque(maxlen=cfg.window)  # losses of recent healthy steps
        self.non_finite_in_a_row = 0

    def verdict(self, loss: float, finite: bool) -> str | None:
        """None for a healthy step; "skip" to drop its update; "rollback" to also restore the last
        checkpoint and skip the data since it."""
        if not finite or not math.isfinite(loss):
            self.non_finite_in_a_row += 1
            limit = self.cfg.max_non_finite_in_a_row
            return "rollback" if limit and self.non_finite_in_a_row >= limit else "skip"
        self.non_finite_in_a_row = 0
        if self.is_spike(loss):
            return "rollback"
        self.recent.append(loss)
        return None

    def is_spike(self, loss: float) -> bool:
        """Loss more than spike_z standard deviations above the mean of the recent window."""
        if not self.cfg.spike_z or len(self.recent) < self.cfg.min_history:
            return False
        mean, std = statistics.fmean(self.recent), statistics.pstdev(self.recent)
        return loss > mean + self.cfg.spike_z * max(std, self.cfg.min_std)

    def reset(self) -> None:
        """After a rollback the history no longer describes the weights."""
        self.recent.clear()
        self.non_finite_in_a_row = 0
