"""The vocabulary-parallel fused cross-entropy (train/loss_parallel.py) on 2 gloo ranks with real DTensors: loss
and gradients equal model/loss.py's and F.cross_entropy's on the full tensors (tests/loss_parallel_worker.py);
and, in the same launch, compiled tensor-parallel blocks give the eager gradients (tests/tp_compile_worker.py)."""

import subprocess

from helpers import REPO, TORCHRUN, env

CHECKS = ["shard1 vs model.loss", "shard1 vs F.cross_entropy", "same loss on every rank",
          "replicate vs F.cross_entropy", "no_grad loss", "default chunk loss", "replicated weight refused"]


def test_vocab_parallel_loss_matches_single_device():
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "loss_parallel_worker.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for rank in range(2):
        for check in CHECKS:
            assert f"OK rank {rank}: {check}" in proc.stdout, proc.stdout
    assert "OK compiled blocks" in proc.stdout, proc.stdout
