"""Loss-spike and non-finite detection: decides when a step's update must be skipped and when
the run must roll back to its last good checkpoint."""

import enum
import logging
import math
import statistics
from collections import deque

from ..config import StabilitySection

log = logging.getLogger("train")


class Verdict(enum.Enum):
    OK = "ok"  # apply the update
    SKIP = "skip"  # drop this step's update
    ROLLBACK = "rollback"  # drop it, restore the last checkpoint and skip the data since it


class StabilityMonitor:
    def __init__(self, stability_cfg: StabilitySection):
        self.stability_cfg = stability_cfg
        self.recent = deque(maxlen=stability_cfg.window)  # losses of recent healthy steps
        self.non_finite_in_a_row = 0
        self.spikes = []  # losses of the spikes in a row so far

    def verdict(self, loss: float, finite: bool) -> Verdict:
        if not finite or not math.isfinite(loss):
            self.non_finite_in_a_row += 1
            limit = self.stability_cfg.max_non_finite_in_a_row
            return Verdict.ROLLBACK if limit and self.non_finite_in_a_row >= limit else Verdict.SKIP
        self.non_finite_in_a_row = 0
        if self.is_spike(loss):
            self.spikes.append(loss)
            if len(self.spikes) < self.stability_cfg.spike_patience:
                return Verdict.ROLLBACK
            self._admit_new_level()
            return Verdict.OK
        self.spikes.clear()
        self.recent.append(loss)
        return Verdict.OK

    def _admit_new_level(self) -> None:
        """Spike after spike with no rollback in between (none possible): the loss has moved, and
        skipping every later update would stall the run, so the spikes become the new history."""
        log.warning("%d loss spikes in a row (%.4f ... %.4f) without a rollback: accepting the new loss level "
                    "(stability.spike_patience=%d)", len(self.spikes), self.spikes[0], self.spikes[-1],
                    self.stability_cfg.spike_patience)
        self.recent.clear()
        self.recent.extend(self.spikes)
        self.spikes.clear()

    def is_spike(self, loss: float) -> bool:
        """Loss more than spike_z standard deviations above the mean of the recent window."""
        if not self.stability_cfg.spike_z or len(self.recent) < self.stability_cfg.min_history:
            return False
        mean, std = statistics.fmean(self.recent), statistics.pstdev(self.recent)
        return loss > mean + self.stability_cfg.spike_z * max(std, self.stability_cfg.min_std)

    def reset(self) -> None:
        """After a rollback the history no longer describes the weights."""
        self.recent.clear()
        self.spikes.clear()
        self.non_finite_in_a_row = 0

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "spikes": list(self.spikes),
                "non_finite_in_a_row": self.non_finite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.recent.clear()
        self.recent.extend(state.get("recent", []))
        self.spikes = list(state.get("spikes", []))
        self.non_finite_in_a_row = state.get("non_finite_in_a_row", 0)
