"""Deliberate faults from the config's `faults` section, for tests and recovery drills. Each fires
once, at the step it names; real runs leave the section empty and nothing here touches the data."""

import os
import signal

import torch

from ..config import FaultSection


class FaultDrills:
    def __init__(self, cfg: FaultSection, vocab_size: int):
        self.nan_steps, self.spike_steps = set(cfg.nan_loss_steps), set(cfg.spike_data_steps)
        self.crash_after, self.stop_at, self.vocab_size = cfg.crash_after_steps, cfg.stop_at_step, vocab_size
        self.steps_done = 0  # by this process, re-done steps included

    def batch(self, step: int, batch: dict) -> dict:
        """Random tokens instead of the batch at a spike step (a loss spike)."""
        if step not in self.spike_steps:
            return batch
        self.spike_steps.discard(step)
        seeded = torch.Generator().manual_seed(step)
        noise = torch.randint(0, self.vocab_size, batch["input_ids"].shape, generator=seeded)
        return {**batch, "input_ids": noise, "labels": noise.roll(-1, dims=1)}

    def poison_loss(self, step: int) -> bool:
        """Whether this step's loss is made NaN."""
        if step in self.nan_steps:
            self.nan_steps.discard(step)
            return True
        return False

    def stop_requested(self, step: int) -> bool:
        """Act as if a stop signal arrived during this step."""
        return step == self.stop_at

    def step_done(self, before_crash=lambda: None) -> None:
        """A crash (SIGKILL, no clean-up at all) once this process has done `crash_after_steps` steps; a
        checkpoint being written in the background reaches the disk first (`before_crash`), so the crash
        falls between two saves, as a lost node's does when the write was quick."""
        self.steps_done += 1
        if self.steps_done == self.crash_after:
            before_crash()
            os.kill(os.getpid(), signal.SIGKILL)
