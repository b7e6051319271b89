"""The loop's hooks (train/loop/hooks.py): called in order, every method optional; a hook named in the config
(`hooks=[module:factory]`) that cannot be loaded or that raises fails in one line naming it. The hooks at work in
real runs: tests/support/fault_drills.py's drills in test_stability, test_checkpoint, test_wandb, test_report and
test_pipeline_parallel."""

import pytest
import torch
from helpers import REPO

from train.config import TrainConfig, check_overrides
from train.loop.hooks import HookFailed, HookList, load_hooks


class Scale:
    """A hook with a few of the methods."""

    def __init__(self, log: list):
        self.log = log

    def before_step(self, step, batch):
        return {**batch, "seen_by": [*batch.get("seen_by", []), "scale"]}

    def on_loss(self, step, loss):
        return loss * step

    def close(self):
        self.log.append("scale")


class Shift(Scale):
    def before_step(self, step, batch):
        return {**batch, "seen_by": [*batch["seen_by"], "shift"]}

    def on_loss(self, step, loss):
        return loss + 1

    def report(self, step):
        return {"step": step, "shifted": 1}

    def write(self, record):
        self.log.append(record)

    def close(self):
        self.log.append("shift")


def test_hooks_are_called_in_order_and_every_method_is_optional():
    log: list = []
    hooks = HookList([Scale(log)], [("my_hooks:Shift", Shift(log))])
    assert hooks.before_step(3, {})["seen_by"] == ["scale", "shift"]
    assert hooks.loss_fn(3)(torch.tensor(2.0)).item() == 2 * 3 + 1  # scaled, then shifted
    assert HookList([object()]).loss_fn(3) is None  # no hook has on_loss: the step runs as it would without hooks
    assert hooks.report(5) == {"step": 5, "shifted": 1}
    hooks.write({"step": 5})
    hooks.after_step(5, None)  # no hook has it: nothing happens
    hooks.close()
    hooks.close()
    assert log == [{"step": 5}, "shift", "scale"]  # closed once, the last hook first


class Broken:
    def after_step(self, step, result):
        raise KeyError("sample_index")

    def before_step(self, step, batch):
        batch["seen"] = True  # and forgets to return it


def test_a_hook_that_fails_is_one_line_naming_it(monkeypatch):
    hooks = HookList([], [("my_hooks:Broken", Broken())])
    failures = []
    for call in (lambda: hooks.after_step(4, None), lambda: hooks.before_step(4, {})):
        with pytest.raises(HookFailed) as e:
            call()
        failures.append(str(e.value))
    assert failures == ["hooks: my_hooks:Broken failed in after_step: KeyError: 'sample_index'",
                        "hooks: my_hooks:Broken: before_step returned NoneType, not the batch (return the batch it "
                        "was given, or another)"]
    assert issubclass(HookFailed, ValueError)  # the entry point prints a ValueError as its one line, no traceback
    monkeypatch.setenv("FAULT_DRILLS", '{"nan_loss_step": [3]}')  # misspelt
    bad = {"no_such_hooks_module:make": "hooks: no_such_hooks_module:make: cannot import no_such_hooks_module "
                                        "(ModuleNotFoundError: No module named 'no_such_hooks_module')",
           "fault_drills:DRILLS": "hooks: fault_drills:DRILLS: fault_drills (",
           "fault_drills:FaultDrills": "hooks: fault_drills:FaultDrills failed in its factory: ValueError: "
                                       "FAULT_DRILLS: nan_loss_step=[3]: the drills are nan_loss_steps,",
           "collections:OrderedDict": "hooks: collections:OrderedDict made a OrderedDict, which has none of the hook "
                                      "methods (on_start, before_step,"}
    for spec, start in bad.items():
        with pytest.raises(HookFailed) as e:
            load_hooks([spec])
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)


def test_the_config_names_hooks_as_module_colon_factory():
    cfg = TrainConfig(hooks=["fault_drills.FaultDrills"])
    cfg.data.shards = ["a"]
    with pytest.raises(ValueError, match=r"^hooks='fault_drills.FaultDrills' is not module:factory"):
        cfg.check(world_size=1)
    assert check_overrides(["hooks=[fault_drills:FaultDrills]"], REPO / "conf") is None
    assert check_overrides(["faults.stop_at_step=4"], REPO / "conf").startswith(
        "faults.stop_at_step was removed: fault drills are the tests' (tests/support/fault_drills.py), "
        "injected as a loop hook: hooks=[fault_drills:FaultDrills]")
