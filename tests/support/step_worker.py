"""Distributed half of tests/train/loop/test_step.py, run under torchrun on gloo: one optimizer step of an
FSDP2 model through train/loop/step.py, with a global batch whose ranks hold different numbers of
ignored (-100) labels, compared with one process taking the whole batch and the mean loss."""

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
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
