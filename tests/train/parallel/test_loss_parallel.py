"""The vocabulary-parallel fused cross-entropy (train/parallel/loss_parallel.py) on 2 gloo ranks with real DTensors:
loss and gradients equal model/loss.py's and F.cross_entropy's on the full tensors (loss_parallel_worker.py);
and, in the same launch, compiled tensor-parallel blocks give the eager gradients (tp_compile_worker.py)."""

import subprocess

from helpers import REPO, TORCHRUN, env

CHECKS = ["shard1 vs model.loss", "shard1 vs F.cross_entropy", "same loss on every rank",
          "replicate vs F.cross_entropy", "no_grad loss", "default chunk loss", "replicated weight refused"]


def test_vocab_parallel_loss_matches_single_device():
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "support" / "loss_parallel_worker.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for rank in range(2):
        for check in CHECKS:
            assert f"OK rank {rank}: {check}" in proc.stdout, proc.stdout
    assert "OK compiled blocks" in proc.stdout, proc.stdout


def test_compiled_kernels_equal_eager():
    """The vocabulary-parallel loss's kernels as the GPU runs them (torch.compile'd), compiled here on the CPU,
    give eager's figures for a rank holding columns 30-79 of a 101-token vocabulary."""
    import torch

    from train.parallel.loss_parallel import _softmax_grad, _sumexp_and_target, compiled

    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(40, 50, generator=g), torch.randint(0, 101, (40,), generator=g)
    labels[7] = -100
    valid, column = labels != -100, labels - 30
    owned = valid & (column >= 0) & (column < 50)
    column = torch.where(owned, column, torch.zeros_like(column))
    row_max = logits.amax(dim=-1)
    stats = _sumexp_and_target(logits, row_max, column, owned)
    assert torch.allclose(compiled(_sumexp_and_target)(logits, row_max, column, owned), stats, rtol=1e-6)
    lse = row_max + stats[0].log()
    eager = _softmax_grad(logits, lse, column, owned, valid, torch.bfloat16)
    ours = compiled(_softmax_grad)(logits, lse, column, owned, valid, torch.bfloat16)
    assert ours.dtype == torch.bfloat16 and torch.allclose(ours.float(), eager.float(), atol=1e-2)
    assert 0 < owned.sum() < valid.sum()  # some targets on this rank, some elsewhere
