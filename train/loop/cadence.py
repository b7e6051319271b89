"""When the loop logs, validates and checkpoints. The final step's save and validation are left to
the end of the run, and a stop request saves instead of the periodic save, so no step is saved twice."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    steps: int  # the run's last step
    log_every: int
    val_every: int  # 0: validation only at the end
    save_every: int  # 0: a checkpoint only at the end

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0 and step < self.steps

    def validation_due(self, step: int) -> bool:
        return bool(self.val_every) and step % self.val_every == 0 and step < self.steps
