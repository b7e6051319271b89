"""One optimizer step on 2 FSDP2 ranks (gloo) whose ranks hold different numbers of ignored labels
equals one process's step on the whole batch with the mean over labelled tokens; and parallel.cpu_offload's
steps equal those without it (one torchrun for both: tests/support/step_worker.py)."""

import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.fixture(scope="module")
def worker():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "support" / "step_worker.py")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ignored_labels_keep_the_big_batch_update(worker):
    code, out = worker
    assert "OK loss" in out, out


def test_cpu_offload_steps_equal_the_plain_ones(worker):
    code, out = worker
    assert code == 0 and "OK offload" in out, out
