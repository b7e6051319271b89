"""Deliberate faults for the tests' drills of the recovery paths, injected into a real run as a loop hook
(train/loop/hooks.py): the override `hooks=[fault_drills:FaultDrills]` with tests/ on PYTHONPATH, and the drills
as JSON in the environment variable FAULT_DRILLS, e.g. {"nan_loss_steps": [3], "crash_after_steps": 12}
(tests/support/helpers.py pretrain(..., drills={...}) sets all three). Each fires once, at the step it names:

    nan_loss_steps     these steps' loss made NaN (each micro-batch's, before its backward)
    spike_data_steps   random tokens instead of these steps' batches (a loss spike)
    stop_at_step       as if a stop signal arrived during this step
    crash_after_steps  SIGKILL (no clean-up at all) once this process has done this many steps, re-done ones
                       included; a checkpoint being written in the background reaches the disk first, so the
                       crash falls between two saves, as a lost node's does when the write was quick
"""

import json
import os
import signal

import torch

ENV = "FAULT_DRILLS"
HOOK = "fault_drills:FaultDrills"
DRILLS = {"nan_loss_steps": list, "spike_data_steps": list, "stop_at_step": int, "crash_after_steps": int}


class FaultDrills:
    def __init__(self):
        drills = json.loads(os.environ.get(ENV, "{}"))
        for key, value in drills.items():
            if key not in DRILLS or not isinstance(value, DRILLS[key]):
                raise ValueError(f"{ENV}: {key}={value!r}: the drills are {', '.join(DRILLS)} (lists of steps, or a "
                                 f"step count)")
        self.nan_steps = set(drills.get("nan_loss_steps", []))
        self.spike_steps = set(drills.get("spike_data_steps", []))
        self.stop_at, self.crash_after = drills.get("stop_at_step", 0), drills.get("crash_after_steps", 0)
        self.steps_done = 0  # by this process, re-done steps included
        self.poison = False  # this step's loss is made NaN

    def on_start(self, trainer) -> None:
        self.vocab_size, self.store, self.stop = trainer.model_cfg.vocab_size, trainer.store, trainer.stop

    def before_step(self, step: int, batch: dict) -> dict:
        self.poison = step in self.nan_steps
        self.nan_steps.discard(step)
        if step == self.stop_at:
            self.stop.request("the stop_at_step drill")
        if step not in self.spike_steps:
            return batch
        self.spike_steps.discard(step)
        seeded = torch.Generator().manual_seed(step)
        noise = torch.randint(0, self.vocab_size, batch["input_ids"].shape, generator=seeded)
        return {**batch, "input_ids": noise, "labels": noise.roll(-1, dims=1)}

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.poison else loss

    def after_step(self, step: int, result) -> None:
        self.steps_done += 1
        if self.steps_done == self.crash_after:
            self.store.wait_written()  # the background write on disk, not yet made visible
            os.kill(os.getpid(), signal.SIGKILL)
