"""The planner's per-rank memory estimate (train/parallel/memory_gate.py rank_estimate, train/planner/memory.py)
against each rank's measured peak of live tensor bytes in real training steps on 2 gloo ranks, through
benchmarks/memory_check.py: the model built and stepped as the trainer does, under dp_shard 2, tp 2 and pp 2."""

import importlib.util

import pytest
from helpers import REPO

# Tiny, but the weights' share is large enough that the state check below sees FSDP's sharding. One torchrun, the
# three layouts in turn; no activation checkpointing (benchmarks/memory_check.py runs full AC too).
ARGS = ["dp2", "tp2", "pp2", "--ac", "none", "--dim", "128", "--layers", "2", "--heads", "4", "--vocab", "512",
        "--seq", "256", "--micro", "2", "--steps", "2"]
# The estimate's tolerance on the whole peak: at this shape estimated / measured is dp2 0.99, tp2 1.01, pp2 0.93 and
# 0.96 (at dim 256, 4 layers, 2 x 512 tokens, with and without full AC, 0.92-1.02; the estimate before its CPU terms
# were modelled: 0.73 here).
PEAK_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def rows():
    spec = importlib.util.spec_from_file_location("memory_check", REPO / "benchmarks" / "memory_check.py")
    memory_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_check)
    found = memory_check.run_layouts(memory_check.parse(ARGS), ARGS)
    assert {(r["layout"], r["rank"]) for r in found} == {(k, r) for k in ("dp2", "tp2", "pp2") for r in (0, 1)}
    return found


def test_each_ranks_peak_is_within_the_tolerance_of_its_estimate(rows):
    for r in rows:
        assert r["estimated"] == pytest.approx(r["measured"], rel=PEAK_TOLERANCE), r


def test_the_sharded_state_is_what_the_estimate_says(rows):
    """After a step a rank holds its fp32 weights and AdamW's two moments: under dp_shard 2 and tp 2 half of the
    model's, under pp 2 its stage's and the stage's two receive buffers (a micro-batch's fp32 activations and their
    gradient; the rope tables and a few scalars aside: 2%). Dropping FSDP's or TP's split from the estimate doubles
    it."""
    receive_buffers = 2 * 2 * 256 * 128 * 4  # micro x seq x dim, fp32, input and gradient
    for r in rows:
        state = r["terms"]["params"] + r["terms"]["optimizer"] + receive_buffers * (r["layout"] == "pp2")
        assert state == pytest.approx(r["steady"], rel=0.02), r
