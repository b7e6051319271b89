"""lm-evaluation-harness tasks in the loop (eval.tasks): a hook that runs them on the training model itself, as it
is parallelized (no rank gathers the whole model, no second copy), every eval.interval steps (0: at each
validation) and after the last step, and writes each task's metrics as eval/<task>/<metric> to every sink, with
their cost in seconds as eval_s.

Every rank runs lm-eval whole, in the same order (its seeds are fixed, and it sees one process of one): under FSDP
each forward all-gathers the parameters, so every rank must make the same forwards. The Scorer
(train/evaluation/harness.py) calls the model on whole windows, which FSDP and context parallelism (outside a split
micro-batch) run as one rank would; under TP the window is padded as the sample's is (train/loop/sampling.py) and
the logits gathered. Under pipeline parallelism the windows go through the schedule (eval, as validation's
micro-batches do: the stages keep the shapes of their first step, so windows are padded to data.seq_len and run as
the rows of one step), the last stage's head applied to the span of positions they score only, and its
log-likelihoods and greedy flags broadcast to every rank (train/parallel/pipeline.py PipelineRun.token_scores); a
forward of its own, stage by stage, would need a second set of shapes and send/recv code beside the schedule's. The
tasks are loaded at start-up, so a task that does not exist or does not load fails before step 1 in one line.
lm-eval's seeding is undone after each run (the training's random state goes on as without it), and only rank 0
logs.
"""

import logging
import os
import random
import time
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EvalSection
from ..evaluation.harness import run_tasks, task_manager
from ..parallel.distributed import whole
from ..state.stability import Verdict

log = logging.getLogger("train")


def load_tasks(eval_cfg: EvalSection):
    """lm-eval's TaskManager, once every task is found and loaded (its documents read); else one line naming the
    first that is not."""
    try:
        from lm_eval.tasks import get_task_dict
    except ImportError:
        raise ValueError("eval.tasks needs lm-evaluation-harness: pip install 'lm_eval>=0.4'") from None
    with quiet_lm_eval(False):
        manager = task_manager(eval_cfg.tasks, eval_cfg.task_dir or None, ("eval.tasks", "eval.task_dir"))
        for task in eval_cfg.tasks:
            try:
                get_task_dict([task], manager)
            except Exception as e:  # noqa: BLE001 - a broken YAML, a missing data file, an unreachable dataset
                raise ValueError(f"eval.tasks={task} does not load: {' '.join(str(e).split())[:300]} (fix the task "
                                 f"or its data, or leave it out of eval.tasks)") from None
    return manager


class DownstreamTasks:
    """The hook (train/loop/hooks.py); chat: the run's ChatEncoder under data.format=chat (tasks asked as user
    turns of its template, as llm-eval format=chat does); rows: continuations scored per forward."""

    def __init__(self, eval_cfg: EvalSection, tokenizer, chat, is_main: bool, rows: int = 1):
        self.manager = load_tasks(eval_cfg)  # indexed once: lm-eval's own tasks take seconds
        self.cfg, self.tokenizer, self.chat, self.is_main, self.rows = eval_cfg, tokenizer, chat, is_main, rows
        self.trainer = None

    def on_start(self, trainer) -> None:
        self.trainer = trainer

    def after_step(self, step: int, result) -> None:
        if result.verdict is not Verdict.ROLLBACK and self.due(step):  # a step about to be undone is not scored
            self.trainer.hooks.write(self.evaluate(step))

    def due(self, step: int) -> bool:
        cadence = self.trainer.cadence
        if step == cadence.steps:
            return True
        return step % self.cfg.interval == 0 if self.cfg.interval else cadence.validation_due(step)

    def evaluate(self, step: int) -> dict:
        """Every task on the model as it is after `step`: the record of their metrics and cost."""
        runner, env, t0 = self.trainer.runner, self.trainer.env, time.perf_counter()
        with kept_random_state(env.device), quiet_lm_eval(not self.is_main), as_local_rank_0():
            runner.model.eval()
            try:
                table, _ = run_tasks(runner.model, self.tokenizer, env.device, self.cfg.tasks,
                                     self.cfg.task_dir or None, self.cfg.limit, self.chat, manager=self.manager,
                                     rows=self.rows, **scoring(runner, env.tp, env.pp))
            finally:
                runner.model.train()
        seconds = time.perf_counter() - t0
        record: dict = {"step": step}
        for task, figures in table.items():
            numbers = {k: v for k, v in figures.items()  # sample_len: lm-eval's count, the same as samples
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"}
            log.info("step %d: %s: %s (lm-eval, %d samples)", step, task, ", ".join(
                f"{k} {v:.4f}" for k, v in numbers.items() if k != "samples" and not k.endswith("_stderr")),
                figures["samples"])
            record |= {f"eval/{task}/{k}": v for k, v in numbers.items()}
        log.info("step %d: lm-eval tasks took %.1f s", step, seconds)
        return record | {"eval_s": seconds}


def scoring(runner, tp: int, pp: int) -> dict:
    """run_tasks' keywords for the model as its step runner runs it (also llm-eval's under torchrun): the pipeline
    schedule under pp > 1, else window_logits."""
    return {"pipeline": runner} if pp > 1 else {"forward": partial(window_logits, runner, tp)}


def window_logits(runner, tp: int, window: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of whole windows (B, T) from the rank's training model, run as the step runner runs it (under
    its autocast). Under TP the windows are padded on the right to data.seq_len (or a multiple of tp past it): TP's
    sequence split needs a length divisible by tp, and causal attention keeps the real positions blind to the
    padding; the logits, a DTensor, are gathered."""
    length = window.shape[1]
    padded = max(runner.pad_to, -(-length // tp) * tp) if tp > 1 else length
    autocast = runner.autocast
    with torch.autocast(window.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        logits = runner.model(F.pad(window, (0, padded - length)) if padded > length else window)
    return whole(logits)[:, :length]


@contextmanager
def kept_random_state(device: torch.device):
    """lm-eval seeds Python's, NumPy's and torch's generators: put them back as they were."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@contextmanager
def as_local_rank_0():
    """lm-eval's simple_evaluate returns its results only where LOCAL_RANK is 0 (it takes the other ranks of a node
    for a tensor-parallel model's): every rank here runs it whole and needs them."""
    local_rank = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if local_rank is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = local_rank


@contextmanager
def quiet_lm_eval(silent: bool):
    """lm-eval's own log lines: its warnings on rank 0, nothing on the other ranks (they run the same)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.CRITICAL if silent else logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
