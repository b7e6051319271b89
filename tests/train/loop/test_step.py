"""One optimizer step on 2 FSDP2 ranks (gloo) whose ranks hold different numbers of ignored labels
equals one process's step on the whole batch with the mean over labelled tokens."""

import os
import subprocess
import sys

from helpers import REPO


def test_ignored_labels_keep_the_big_batch_update():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "support" / "step_worker.py")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK loss" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
