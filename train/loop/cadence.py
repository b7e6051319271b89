"""When the loop logs, validates and checkpoints. The final step's save and validation are left to
the end of the run, and a stop request saves instead of the periodic save, so no step is saved twice."""

from ..config import TrainConfig


class Cadence:
    def __init__(self, cfg: TrainConfig):
        self.steps, self.log_every = cfg.steps, cfg.log_interval
        self.val_every = cfg.val_interval if cfg.val_batches else 0
        self.save_every = cfg.checkpoint.interval

    def log_due(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0 and step < self.steps

    def validation_due(self, step: int) -> bool:
        return bool(self.val_every) and step % self.val_every == 0 and step < self.steps
