"""Distributed half of test_loss_parallel.py, run under torchrun (2 processes, gloo): the vocabulary-parallel
loss on DTensors against model/loss.py and against plain F.cross_entropy on the full tensors, in fp32; then
compiled tensor-parallel blocks against eager ones (tests/support/tp_compile_worker.py).
Prints one `OK <check>` line per check that passed."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tp_compile_worker import check_compiled_blocks  # noqa: E402

from model.loss import linear_cross_entropy  # noqa: E402
from train.parallel.loss_parallel import LossParallelInputError, vocab_parallel_linear_cross_entropy  # noqa: E402

# chunk 3 over 16 tokens: 6 chunks, the last one partial. V=40 over 2 ranks: ids 0-19 and 20-39.
B, T, D, V, CHUNK, UPSTREAM = 2, 8, 16, 40, 3, 0.37


def full_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same hidden (B, T, D), weight (V, D) and labels (B, T) on every rank; the labels hit both
    ranks' vocabulary halves, their edges, and -100 (one in a chunk of its own, one mid-chunk)."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = torch.tensor([0, 19, 20, 39])
    labels[0, 5] = labels[1, 7] = -100
    assert (labels[labels >= 0] < V // 2).any() and (labels >= V // 2).any()
    return hidden, weight, labels


def expected(hidden, weight, labels, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and gradients (hidden, weight) of loss_fn on plain full tensors, upstream gradient UPSTREAM."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, labels)
    (loss * UPSTREAM).backward()
    return loss.detach(), hidden.grad, weight.grad


def fused(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK)


def unfused(hidden, weight, labels):
    """The full logits (B*T, V) and torch's own cross-entropy: computed independently of model/loss.py."""
    return F.cross_entropy((hidden @ weight.t()).reshape(-1, V), labels.reshape(-1), reduction="sum",
                           ignore_index=-100)


def parallel(mesh, hidden, weight, labels, hidden_placement):
    """Loss and full gradients (hidden, weight) of the vocabulary-parallel loss on DTensors."""
    h = distribute_tensor(hidden, mesh, [hidden_placement]).requires_grad_()
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(h, w, labels, chunk_size=CHUNK)
    assert not hasattr(loss, "placements") and loss.dtype == torch.float32 and loss.dim() == 0
    (loss * UPSTREAM).backward()
    assert tuple(h.grad.placements) == (hidden_placement,) and tuple(w.grad.placements) == (Shard(0),)
    return loss.detach(), h.grad.full_tensor(), w.grad.full_tensor()


def check(name: str, got, want) -> None:
    for part, a, b in zip(("loss", "grad hidden", "grad weight"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, p=part: f"{name} {p}: {m}")
    ok(name)


def ok(name: str) -> None:
    # One write per line: the two ranks share torchrun's stdout.
    print(f"OK rank {dist.get_rank()}: {name}\n", end="", flush=True)


def same_on_every_rank(loss: torch.Tensor) -> None:
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss)
    assert all(torch.equal(x, losses[0]) for x in losses), losses
    ok("same loss on every rank")


def check_refuses_replicated_weight(mesh, hidden, weight, labels) -> None:
    """A weight not split by vocabulary rows is a TP plan error, refused in one line."""
    try:
        vocab_parallel_linear_cross_entropy(distribute_tensor(hidden, mesh, [Shard(1)]),
                                            distribute_tensor(weight, mesh, [Replicate()]), labels)
    except LossParallelInputError as e:
        assert "Shard(0)" in str(e) and "\n" not in str(e), e
        ok("replicated weight refused")
    else:
        raise AssertionError("a replicated weight was accepted")


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    hidden, weight, labels = full_inputs()
    reference, independent = expected(hidden, weight, labels, fused), expected(hidden, weight, labels, unfused)
    got = parallel(mesh, hidden, weight, labels, Shard(1))
    check("shard1 vs model.loss", got, reference)
    check("shard1 vs F.cross_entropy", got, independent)
    same_on_every_rank(got[0])
    check("replicate vs F.cross_entropy", parallel(mesh, hidden, weight, labels, Replicate()), independent)
    with torch.no_grad():
        loss = vocab_parallel_linear_cross_entropy(distribute_tensor(hidden, mesh, [Shard(1)]),
                                                   distribute_tensor(weight, mesh, [Shard(0)]), labels, CHUNK)
    torch.testing.assert_close(loss, independent[0], atol=1e-5, rtol=1e-5)
    ok("no_grad loss")
    default_chunk = vocab_parallel_linear_cross_entropy(distribute_tensor(hidden, mesh, [Shard(1)]),
                                                        distribute_tensor(weight, mesh, [Shard(0)]), labels)
    torch.testing.assert_close(default_chunk, independent[0], atol=1e-5, rtol=1e-5)
    ok("default chunk loss")
    check_refuses_replicated_weight(mesh, hidden, weight, labels)
    check_compiled_blocks(mesh)  # here rather than in a torchrun of its own: each launch costs seconds
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
