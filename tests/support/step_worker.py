"""Distributed half of tests/train/loop/test_step.py, run under torchrun on gloo: one optimizer step of an
FSDP2 model through train/loop/step.py, with a global batch whose ranks hold different numbers of
ignored (-100) labels, compared with one process taking the whole batch and the mean loss. Then a few
steps with parallel.cpu_offload=true (FSDP2's CPUOffloadPolicy, the optimizer on the host) against the same
steps without it."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import ModelConfig, build_model  # noqa: E402
from train.config import OptimSection, ParallelSection  # noqa: E402
from train.loop.step import forward_backward, labelled_tokens, reduce_step  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.config import BatchShape  # noqa: E402
from train.parallel.build import build_parallel_model  # noqa: E402
from train.parallel.distributed import init_distributed  # noqa: E402
from train.parallel.parallelize import parallelize  # noqa: E402

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, max_seq_len=64)
# A large eps: the update depends on the gradient's scale. The clip is above the norm: it does not act.
OPTIM = OptimSection(lr=1e-2, eps=1e-3, grad_clip=10.0)
ROWS, SEQ = 8, 17


def global_batch() -> dict:
    """Rows 0-3 (rank 0) lose 3 labels, rows 4-7 (rank 1) lose 40: the ranks' counts differ a lot."""
    tokens = torch.randint(0, CFG.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 1:].clone()
    labels[0, :3] = -100
    labels[4:, :10] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels}


def reference(batch: dict) -> tuple[float, dict]:
    """One process, the whole batch, mean over labelled tokens, clip_grad_norm_ and AdamW."""
    model = build_model(CFG, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps,
                            weight_decay=0.0)
    logits = model(batch["input_ids"])  # (B, T, V), unfused: an independent computation of the loss
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
    opt.step()
    return loss.item(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def main() -> None:
    env = init_distributed()
    batch = global_batch()
    rows = slice(env.rank * ROWS // 2, (env.rank + 1) * ROWS // 2)
    mine = {k: v[rows] for k, v in batch.items()}
    model = parallelize(build_model(CFG, seed=0), ParallelSection(dtype="fp32"), env)
    opt = build_optimizer(model, OptimSection(**{**OPTIM.__dict__, "weight_decay": 0.0}))
    local = forward_backward(model, mine, 2, env.device, None)  # two micro-batches: accumulation too
    result = reduce_step(model, opt, local, labelled_tokens(mine), False, OPTIM.grad_clip, env)
    opt.step()
    ours = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if env.rank == 0:
        ref_loss, ref = reference(batch)
        assert result.tokens == ROWS * (SEQ - 1) - 43, result.tokens
        assert abs(result.loss - ref_loss) < 1e-5, (result.loss, ref_loss)
        worst = max((ours[k] - ref[k]).abs().max().item() for k in ref)
        assert worst < 2e-6, f"parameters differ from the big-batch update by {worst}"
        print(f"OK loss {result.loss:.6f} reference {ref_loss:.6f} max parameter difference {worst:.2e}")
    offload_matches(env, mine)
    dist.barrier()
    dist.destroy_process_group()


def train_steps(env, mine: dict, cpu_offload: bool) -> tuple[list, dict, bool]:
    """3 steps of the trainer's path (build_parallel_model, two micro-batches, clip at 0.5: below the norm, so it
    acts, and weight decay): the losses and gradient norms, the whole weights, and whether FSDP offloaded."""
    parallel_cfg = ParallelSection(dtype="fp32", cpu_offload=cpu_offload)
    model, _ = build_parallel_model(CFG, parallel_cfg, BatchShape(2, ROWS, SEQ - 1), env, seed=0,
                                    document_masking=False, evaluates=False)
    opt = build_optimizer(model, OptimSection(**{**OPTIM.__dict__, "weight_decay": 0.1, "grad_clip": 0.5}))
    curve = []
    for _ in range(3):
        local = forward_backward(model, mine, 2, env.device, None)
        result = reduce_step(model, opt, local, labelled_tokens(mine), False, 0.5, env)
        opt.step()
        opt.zero_grad()
        curve.append((result.loss, result.grad_norm.item()))
    group = model.layers["0"]._get_fsdp_state()._fsdp_param_group
    offloaded = all(p.offload_to_cpu for p in group.fsdp_params)
    return curve, {k: v.full_tensor() for k, v in model.state_dict().items()}, offloaded


def offload_matches(env, mine: dict) -> None:
    """cpu_offload changes where the state lives, not the arithmetic, except the order of one sum: each
    micro-batch's gradients are reduced and added on the host instead of added and reduced once, a few fp32
    roundings (~1e-7 relative). A step gone wrong (gradients not summed, the scale or clip not applied) moves
    the weights by the learning rate (1e-2), so 1e-5 tells them apart with 100x margin over the roundings."""
    plain, plain_weights, plain_offloaded = train_steps(env, mine, cpu_offload=False)
    curve, weights, offloaded = train_steps(env, mine, cpu_offload=True)
    if env.rank == 0:
        assert offloaded and not plain_offloaded, (offloaded, plain_offloaded)
        worst_loss = max(abs(a - b) for step, ref in zip(curve, plain) for a, b in zip(step, ref))
        assert worst_loss < 1e-5, (curve, plain)
        worst = max((weights[k] - plain_weights[k]).abs().max().item() for k in weights)
        assert worst < 1e-5, f"offloaded weights differ from the plain run's by {worst}"
        print(f"OK offload: losses {[round(loss, 5) for loss, _ in curve]}, max weight difference {worst:.1e}")


if __name__ == "__main__":
    main()
