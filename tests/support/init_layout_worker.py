"""Run under torchrun by test_build.py: for each layout given (a JSON list of override lists), build the
model through train/parallel/build.py as a training run does, then write each parameter this rank holds, gathered
whole, to OUT/<layout index>/rank<r>.pt, with the largest tensor (elements) any op made during the build."""

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import model.init  # noqa: E402
from model.init import canonical_name  # noqa: E402
from train.config import BatchShape, TrainConfig  # noqa: E402
from train.parallel.build import build_parallel_model, resolve_model_config  # noqa: E402
from train.parallel.distributed import init_distributed  # noqa: E402

# Small tiles that do not line up with any shard's edges: every parameter spans several of them.
model.init.TILE_COLS, model.init.TILE_ELEMENTS = 24, 24 * 5
VOCAB = 256


class LargestAllocation(TorchDispatchMode):
    """The largest tensor (elements) made on a real device by any op while active; a DTensor counts as its
    local tensor (the memory it takes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            t = t.to_local() if isinstance(t, DTensor) else t
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.largest = max(self.largest, t.numel())
        return out


def config(overrides: list[str]) -> TrainConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(overrides)))


def build_and_gather(overrides: list[str], out: Path) -> None:
    cfg = config(overrides)
    env = init_distributed(cfg.parallel.dp_replicate, 120, cfg.parallel.tp, cfg.parallel.pp)
    batch_shape = BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len)
    with LargestAllocation() as seen:
        model_cfg = resolve_model_config(cfg.model, VOCAB, cfg.data.seq_len, cfg.parallel.tp)
        model, pipeline = build_parallel_model(model_cfg, cfg.parallel, batch_shape, env, seed=cfg.seed,
                                               document_masking=cfg.data.document_masking,
                                               evaluates=cfg.val_batches > 0 or bool(cfg.sample_prompt))
    weights = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        whole = p.full_tensor() if hasattr(p, "full_tensor") else p
        weights[canonical_name(name)] = (whole.detach().clone(), local.numel())
    out.mkdir(parents=True, exist_ok=True)
    ropes = [(m.rope_cos, m.rope_sin) for m in ([s.submod for s in pipeline.stages] if pipeline else [model])]
    torch.save({"weights": weights, "largest_allocation": seen.largest, "ropes": ropes}, out / f"rank{env.rank}.pt")


if __name__ == "__main__":
    root, layouts = Path(sys.argv[1]), json.loads(sys.argv[2])
    for i, overrides in enumerate(layouts):
        build_and_gather(overrides, root / str(i))
