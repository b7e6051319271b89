"""Throughput (train/loop/throughput.py): a logging window's tokens/s is the training's own, its time without
the evaluation (validation, lm-eval tasks) that ran inside it, as the records of those say."""

import time
from types import SimpleNamespace

import pytest
import torch

from train.loop.hooks import HookList
from train.loop.throughput import Throughput

STEP_S, EVAL_S = 0.05, 0.4


def window(records: list[dict]) -> dict:
    """Two steps of STEP_S each, with `records` written (and their time spent) between them."""
    meter = Throughput(tokens_per_step=1000, world_size=2, flops_per_token=1.0, peak_tflops=None,
                       device=torch.device("cpu"))
    hooks = HookList([meter])
    for step in (1, 2):
        time.sleep(STEP_S)
        hooks.after_step(step, SimpleNamespace(loss=1.0, data_wait_s=0.0))
        if step == 1:
            for record in records:
                time.sleep(record.get("val_s", 0.0) + record.get("eval_s", 0.0))
                hooks.write(record)
    return hooks.report(2)


def test_evaluation_time_is_left_out_of_tokens_per_second():
    plain = window([])["tokens_per_s"]
    evaluated = window([{"step": 1, "val_s": EVAL_S / 2}, {"step": 1, "eval_s": EVAL_S / 2}])["tokens_per_s"]
    # The evaluation takes 4x the steps' time: counted in, tokens/s would fall to a fifth.
    assert evaluated == pytest.approx(plain, rel=0.3)
