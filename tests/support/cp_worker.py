"""Distributed half of tests/train/parallel/test_context_parallel_step.py, run under torchrun on gloo (2 ranks,
parallel.cp=2): one step of the trainer's LocalStep over packed windows whose documents cross the chunks the ranks
hold, with and without document masking, against one process running the whole windows; then each rank's mask;
with --compile, the step with torch.compile'd blocks too."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import ModelConfig, build_model  # noqa: E402
from model.attention import document_ids  # noqa: E402
from model.loss import IGNORE_INDEX  # noqa: E402
from train.config import BatchShape, OptimSection, ParallelSection  # noqa: E402
from train.loop.step import LocalStep, labelled_tokens, reduce_step  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.parallel.context_parallel import ContextParallel  # noqa: E402
from train.parallel.distributed import init_distributed  # noqa: E402
from train.parallel.parallelize import parallelize  # noqa: E402

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=64)
T = 32  # 4 chunks of 8: rank 0 holds positions 0-7 and 24-31, rank 1 holds 8-23
# Document lengths of each packed row: the second document of row 0 runs from position 5 to 21 (rank 0's chunk into
# rank 1's), its third from 22 to 31 (rank 1's into rank 0's); row 1 crosses at 7|8 and 23|24 likewise.
ROWS = [[5, 17, 10], [12, 3, 17], [32], [7, 2, 9, 14]]


def packed_batch() -> dict:
    """Token ids, positions restarting at each document, labels (one row loses a few): the loader's batch."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, CFG.vocab_size, (len(ROWS), T), generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])
    labels = torch.roll(ids, -1, dims=1)
    labels[torch.roll(positions, -1, dims=1) == 0] = IGNORE_INDEX  # the next token starts another document
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def reference(batch: dict, document_masking: bool) -> tuple[float, dict]:
    """One process, whole windows, mean over labelled tokens, unfused loss: (loss, gradient by parameter name)."""
    model = build_model(CFG, seed=0, document_masking=document_masking)
    logits = model(batch["input_ids"], batch["position_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


def cp_step(env, batch: dict, document_masking: bool, compiled: bool = False) -> tuple[float, int, float, dict]:
    """The trainer's step on cp=2 (two micro-batches: accumulation too): loss, tokens, gradient norm and the
    gradients of the mean loss, whole. compiled: each block torch.compile'd (parallel.compile), K/V all-gather in."""
    parallel_cfg = ParallelSection(dtype="fp32", cp=2, compile=compiled)
    model = parallelize(build_model(CFG, seed=0, document_masking=document_masking), parallel_cfg, env)
    runner = LocalStep(model, parallel_cfg, BatchShape(2, len(ROWS), T), env)
    opt = build_optimizer(model, OptimSection(lr=1e-2, weight_decay=0.0))
    local = runner.forward_backward(batch)
    result = reduce_step(model, opt, local, labelled_tokens(batch), False, 0.0, env)
    # FSDP averaged the gradient sums over its fsdp_size ranks; the trainer divides by tokens / fsdp_size
    scale = env.fsdp_size / result.tokens
    grads = {name: p.grad.full_tensor() * scale for name, p in model.named_parameters()}
    return result.loss, result.tokens, result.grad_norm.item(), grads


def gradients_match(env, batch: dict, document_masking: bool, compiled: bool = False) -> None:
    loss, tokens, norm, grads = cp_step(env, batch, document_masking, compiled)
    ref_loss, ref = reference(batch, document_masking)
    worst = max((grads[name] - ref[name]).abs().max().item() for name in ref)
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref.values()])).item()
    if env.rank == 0:
        assert tokens == labelled_tokens(batch), (tokens, labelled_tokens(batch))  # counted once per CP group
        assert abs(loss - ref_loss) < 1e-5, (loss, ref_loss)
        assert abs(norm - ref_norm) < 1e-5 * ref_norm, (norm, ref_norm)
        assert worst < 1e-5, f"document_masking={document_masking}: gradients differ from one rank's by {worst}"
        how = " compiled" if compiled else ""
        print(f"OK{how} gradients document_masking={document_masking}: loss {loss:.6f} (one rank {ref_loss:.6f}), "
              f"max gradient difference {worst:.1e}")


def allowed_of(env, batch: dict, document_masking: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's window positions (T/2,) and the (B, T/2, T) keys its mask lets each of its queries see."""
    model = build_model(CFG, seed=0, document_masking=document_masking)
    split = ContextParallel(model, env)
    with split.in_flight(batch["input_ids"], batch["labels"], batch["position_ids"]) as (inputs, _, positions):
        here = split.state[0]
        assert torch.equal(positions, batch["position_ids"][:, here])  # rope by the window's positions
        mask = model.sequence_mask(torch.zeros(1), positions)  # from this rank's positions alone, as a stage's
    assert model.sequence_mask(torch.zeros(1), positions) is None  # none in flight: whole windows as usual
    return here, mask[:, 0] == 0


def masks_match(env, batch: dict) -> None:
    """Document masking: each rank's queries see exactly the keys at or before them in their own document, and
    a document cut between the ranks' chunks is seen whole. Causal: every rank has the same number of (query,
    key) pairs to compute (the load balance)."""
    here, allowed = allowed_of(env, batch, document_masking=True)
    docs = document_ids(batch["position_ids"])
    keys = torch.arange(T)
    expected = (keys[None, :] <= here[:, None]) & (docs[:, here, None] == docs[:, None, :])
    assert torch.equal(allowed, expected), f"rank {env.rank}: the document mask differs"
    seen_across = allowed & ~torch.isin(keys, here)[None, None, :]  # keys the other rank holds
    _, causal = allowed_of(env, batch, document_masking=False)
    work = torch.tensor([causal[0].sum().item(), seen_across.sum().item()])
    everyone = [torch.zeros_like(work) for _ in range(env.world_size)]
    dist.all_gather(everyone, work)
    if env.rank == 0:
        pairs = [w[0].item() for w in everyone]
        assert pairs[0] == pairs[1] == T * (T + 1) // 2 // 2, f"causal (query, key) pairs per rank: {pairs}"
        assert all(w[1] > 0 for w in everyone), "no query saw its document's keys on the other rank"
        across = [w[1].item() for w in everyone]
        print(f"OK masks: causal pairs per rank {pairs}, same-document pairs across the ranks {across}")


def main() -> None:
    env = init_distributed(cp=2)
    batch = packed_batch()
    for document_masking in (True, False):
        gradients_match(env, batch, document_masking)
    masks_match(env, batch)
    if "--compile" in sys.argv:  # inductor on the CPU: a C++ compiler, and tens of seconds
        gradients_match(env, batch, document_masking=True, compiled=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
