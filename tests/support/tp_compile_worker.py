"""The compile check of test_loss_parallel.py, run by loss_parallel_worker.py under torchrun on gloo:
one forward and backward of a tensor-parallel Llama with compiled blocks (aot_eager: the graph capture the
trainer's compile makes, without generating kernels), against the same model eager. Compiled blocks must
carry the same gradients back through the DTensor residual stream; with local tensors between blocks
the backward used to fail."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import ModelConfig, build_model  # noqa: E402
from train.parallel.tensor_parallel import apply_tensor_parallel  # noqa: E402

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=64)


def loss_and_grads(mesh, backend: str | None) -> tuple[float, dict]:
    model = build_model(CFG, seed=0)
    apply_tensor_parallel(model, mesh, float8=False, async_tp=False)
    if backend:
        for block in model.layers.values():
            block.compile(backend=backend)
    ids = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def check_compiled_blocks(mesh) -> None:
    eager_loss, eager = loss_and_grads(mesh, None)
    compiled_loss, compiled = loss_and_grads(mesh, "aot_eager")
    worst = max((eager[n] - compiled[n]).abs().max().item() for n in eager)
    assert abs(eager_loss - compiled_loss) < 1e-4 and worst < 1e-5, (eager_loss, compiled_loss, worst)
    if dist.get_rank() == 0:
        print(f"OK compiled blocks: loss {compiled_loss:.5f} (eager {eager_loss:.5f}), "
              f"max gradient difference {worst:.1e}")
