"""The loop's side concerns as hooks: small objects the trainer calls around each step, in order.

Built in (Trainer.side_concerns): Throughput, Progress, SampleLedger, StepProfiler, MetricSinks. More come from
the config: `hooks=[module:factory, ...]` names importable callables (the module on the Python path, e.g. through
PYTHONPATH), each called with no arguments to make one hook, as torchtitan's custom imports name modules to
import. A hook reads its own settings (an environment variable, a file) and gets the trainer in on_start; it
runs on every rank. tests/support/fault_drills.py is one: the tests' deliberate faults.

Every method is optional; a hook has those it needs:
    on_start(trainer)         once, before the first step of this process
    before_step(step, batch)  -> the batch the step trains on (the one given, or another)
    on_loss(step, loss)       -> each micro-batch's summed loss, before its backward
    after_step(step, result)  the step is done (a StepResult; it may still be rolled back)
    on_rollback(to_step)      the steps after to_step were undone (their samples are skipped)
    report(step)              -> figures to add to the record of a logging window
    after_validation(step, losses) -> figures to add to the validation record (losses: set name -> loss)
    write(record)             every metrics record: a logging window's, validation, checkpoint, rollback
    close()                   the run is over (also after a failure); the last hook first
A hook named in the config that raises fails the run in one line naming it.
"""

import importlib
from collections.abc import Callable

import torch

from ..config import HOOK_SPEC

METHODS = ("on_start", "before_step", "on_loss", "after_step", "on_rollback", "report", "after_validation", "write",
           "close")


class HookFailed(ValueError):
    """A hook named in the config failed: one line naming it (the entry point prints it without a traceback)."""


class HookList:
    """The hooks in order: the built-in ones, then those the config names (as `module:factory`). Each call goes
    to every hook that has the method."""

    def __init__(self, builtin: list, configured: list[tuple[str, object]] = ()):
        hooks = [(None, hook) for hook in builtin] + list(configured)  # (the config's name, the hook)
        self.calls = {m: [(name, getattr(h, m)) for name, h in hooks if callable(getattr(h, m, None))]
                      for m in METHODS}
        self.closed = False

    def on_start(self, trainer) -> None:
        for name, fn in self.calls["on_start"]:
            _call(name, "on_start", fn, trainer)

    def before_step(self, step: int, batch: dict) -> dict:
        for name, fn in self.calls["before_step"]:
            batch = _call(name, "before_step", fn, step, batch)
            if not isinstance(batch, dict):
                who = name or type(getattr(fn, "__self__", fn)).__name__
                raise HookFailed(f"hooks: {who}: before_step returned {type(batch).__name__}, not the batch (return "
                                 f"the batch it was given, or another)")
        return batch

    def loss_fn(self, step: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The hooks' on_loss as one function for the step runner; None when no hook has one (the common case:
        the step then runs exactly as without hooks)."""
        calls = self.calls["on_loss"]
        if not calls:
            return None

        def on_loss(loss: torch.Tensor) -> torch.Tensor:
            for name, fn in calls:
                loss = _call(name, "on_loss", fn, step, loss)
            return loss

        return on_loss

    def after_step(self, step: int, result) -> None:
        for name, fn in self.calls["after_step"]:
            _call(name, "after_step", fn, step, result)

    def on_rollback(self, to_step: int) -> None:
        for name, fn in self.calls["on_rollback"]:
            _call(name, "on_rollback", fn, to_step)

    def report(self, step: int) -> dict:
        figures: dict = {}
        for name, fn in self.calls["report"]:
            figures |= _call(name, "report", fn, step)
        return figures

    def after_validation(self, step: int, losses: dict[str, float]) -> dict:
        figures: dict = {}
        for name, fn in self.calls["after_validation"]:
            figures |= _call(name, "after_validation", fn, step, losses)
        return figures

    def write(self, record: dict) -> None:
        for name, fn in self.calls["write"]:
            _call(name, "write", fn, record)

    def close(self) -> None:
        """Every hook's close, once, last hook first (as a stack unwinds), even when one of them fails (the first
        failure is raised after)."""
        if self.closed:
            return
        self.closed = True
        failure = None
        for name, fn in reversed(self.calls["close"]):
            try:
                _call(name, "close", fn)
            except Exception as e:  # noqa: BLE001 - the others must still close their files
                failure = failure or e
        if failure is not None:
            raise failure


def _call(name: str | None, method: str, fn, *args):
    """fn(*args); a failure of a hook the config named (name) becomes one line naming it and the method."""
    if name is None:  # a built-in hook: its errors are the project's own one-line errors already
        return fn(*args)
    try:
        return fn(*args)
    except Exception as e:
        raise HookFailed(f"hooks: {name} failed in {method}: {_one_line(e)}") from e


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_hooks(specs: list[str]) -> list[tuple[str, object]]:
    """(spec, hook) for each `module:factory` of the config's hooks, in order."""
    return [(spec, _load(spec)) for spec in specs]


def _load(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not HOOK_SPEC.fullmatch(spec):
        raise HookFailed(f"hooks: {spec!r} is not module:factory (an importable callable that returns a hook)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HookFailed(f"hooks: {spec}: cannot import {module_name} ({_one_line(e)}); the module must be on the "
                         f"Python path (PYTHONPATH)") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise HookFailed(f"hooks: {spec}: {module_name} ({module.__file__}) has no callable {attr!r}")
    hook = _call(spec, "its factory", factory)
    if not any(callable(getattr(hook, m, None)) for m in METHODS):
        raise HookFailed(f"hooks: {spec} made a {type(hook).__name__}, which has none of the hook methods "
                         f"({', '.join(METHODS)})")
    return hook
