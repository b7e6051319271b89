"""Run under torchrun (2 ranks) by tests/e2e/test_pipeline_parallel.py: the end-of-run sample's next-token logits
through a pp2 pipeline built as a training run builds it (train/loop/step.py build_runner, PipelineRun.next_logits),
and lm-eval's log-likelihoods of windows of several lengths, a step's rows at a time (train/evaluation/harness.py
Scorer, PipelineRun.token_scores), and the next-token logits of windows of several lengths, each at its own end
(lm-eval's greedy requests, PipelineRun.logits_at), against one process's whole model; each rank prints one JSON line:
the largest differences from the whole model's figures and the shapes of every output the last stage made for each.
With the argument cp (4 ranks), each stage's windows split over 2 cp ranks."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import build_model  # noqa: E402
from train.config import BatchShape, TrainConfig  # noqa: E402
from train.evaluation.harness import Scorer  # noqa: E402
from train.loop.step import build_runner  # noqa: E402
from train.parallel.build import resolve_model_config  # noqa: E402
from train.parallel.distributed import init_distributed  # noqa: E402

SEQ, VOCAB = 32, 512
OVERRIDES = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.tie_embeddings=false",
             f"data.seq_len={SEQ}", "global_batch_size=4", "micro_batch_size=2", "parallel.pp=2",
             "parallel.dtype=fp32", "seed=3"]


def main() -> None:
    cp = 2 if sys.argv[1:] == ["cp"] else 1
    overrides = [*OVERRIDES, f"parallel.cp={cp}"]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(overrides)))
    env = init_distributed(1, 120, 1, 2, cp)
    model_cfg = resolve_model_config(cfg.model, VOCAB, cfg.data.seq_len, cfg.parallel.tp)
    batch_shape = BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len)
    pipeline = build_runner(model_cfg, cfg.parallel, batch_shape, env, seed=cfg.seed,
                            document_masking=cfg.data.document_masking,
                            evaluates=cfg.val_batches > 0 or bool(cfg.sample_prompt))
    shapes: list[list[int]] = []
    for stage in pipeline.stages:
        if stage.is_last:
            stage.submod.register_forward_hook(lambda _m, _a, out: shapes.append(list(out.shape)))
    window = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(0))
    logits = pipeline.next_logits(window)  # (1, V) on every rank
    whole = build_model(model_cfg, seed=cfg.seed)
    with torch.no_grad():
        expected = whole(window)[:, -1, :]  # the window unpadded: causal attention ignores the padding anyway
    sample_outputs = list(shapes)
    shapes.clear()
    scores, scores_diff = score_windows(pipeline, whole)
    score_outputs = list(shapes)
    shapes.clear()
    print(json.dumps({"rank": env.rank, "shape": list(logits.shape), "diff": (logits - expected).abs().max().item(),
                      "last_stage_outputs": sample_outputs, "scores": scores, "scores_diff": scores_diff,
                      "score_outputs": score_outputs, "ends_diff": ends_diff(pipeline, whole),
                      "ends_outputs": shapes}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def score_windows(pipeline, whole) -> tuple[int, float]:
    """Seven (ids, n scored) of 6 to 33 ids (a window of up to data.seq_len) through the pipeline's Scorer, four and
    then three (a step has four rows: the second step's last micro-batch holds one real row), and through one
    process's: how many were scored and the largest difference of their log-probabilities (greedy flags that
    differ count as 1)."""
    g = torch.Generator().manual_seed(1)
    asked = [(torch.randint(0, VOCAB, (length,), generator=g).tolist(), n)
             for length, n in [(12, 3), (33, 5), (6, 1), (25, 4), (30, 2), (9, 8), (20, 1)]]
    ours = Scorer(None, None, torch.device("cpu"), pipeline=pipeline).batch_logprobs(asked[:4]) + \
        Scorer(None, None, torch.device("cpu"), pipeline=pipeline).batch_logprobs(asked[4:])
    with torch.no_grad():
        theirs = Scorer(whole, None, torch.device("cpu")).batch_logprobs(asked)
    diff = max(max((a[0] - b[0]).abs().max().item(), float((a[1] != b[1]).any())) for a, b in zip(ours, theirs))
    return len(ours), diff


def ends_diff(pipeline, whole) -> float:
    """Three windows of 32, 17 and 5 ids (ending at positions 31, 16 and 4: under cp=2 held by cp ranks 0, 1 and 0),
    padded to data.seq_len, through the pipeline at once, each's logits at its own end (PipelineRun.logits_at),
    against the whole model's after each window alone: the largest difference."""
    g = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, VOCAB, (n,), generator=g) for n in (32, 17, 5)]
    padded = torch.stack([F.pad(w, (0, SEQ - len(w))) for w in windows])  # (3, SEQ)
    logits = pipeline.logits_at(padded, [len(w) - 1 for w in windows])  # (3, V)
    with torch.no_grad():
        expected = torch.cat([whole(w[None])[:, -1] for w in windows])
    return (logits - expected).abs().max().item()


if __name__ == "__main__":
    main()
