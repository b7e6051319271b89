"""Distributed half of tests/train/interop/test_hf_io.py, run under torchrun on gloo (CPU).

    save <run_dir> <tied 0|1> <sha256>    train one step of an FSDP2 tiny Llama, save a checkpoint
                                          with the real Checkpointer (recording the tokenizer's sha256,
                                          as the trainer does), write <run_dir>/ref_logits.pt
    import <src> <tied 0|1> <out.pt>      init_from(src) into a fresh FSDP2 model, write its logits

Several jobs may follow each other on one command line (one launch instead of several).
"""

import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from model import ModelConfig, build_model  # noqa: E402
from train.interop.hf_import import init_from  # noqa: E402
from train.state.checkpoint_io import Checkpointer  # noqa: E402


def tiny_config(tied: bool) -> ModelConfig:
    # vocab 384: the smallest round size above what a byte-fallback SentencePiece model needs (~320).
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=384, multiple_of=32,
                       max_seq_len=64, tie_embeddings=tied)


def probe_tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))


def sharded_model(cfg: ModelConfig, seed: int):
    model = build_model(cfg, seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(probe_tokens(model.cfg))


def save(run_dir: Path, tied: bool, tokenizer_sha256: str) -> None:
    cfg = tiny_config(tied)
    model = sharded_model(cfg, seed=0)
    # A large step moves every weight (norms included) away from its initial value.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    logits = model(batch[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad()
    state = {"step": 1, "tokens_seen": 64, "world_size": dist.get_world_size(),
             "fingerprint": {"model": asdict(cfg), "tokenizer_sha256": tokenizer_sha256, "data.seq_len": 32}}
    Checkpointer(run_dir / "checkpoints", is_main=dist.get_rank() == 0).save(1, model, optimizer, state)
    ref = logits_of(model)
    if dist.get_rank() == 0:
        torch.save(ref, run_dir / "ref_logits.pt")


def load(src: Path, tied: bool, out: Path) -> None:
    model = sharded_model(tiny_config(tied), seed=123)  # other weights, so a no-op load would show
    init_from(src, model)
    got = logits_of(model)
    if dist.get_rank() == 0:
        torch.save(got, out)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        args = sys.argv[1:]
        while args:
            mode, path, tied = args[0], Path(args[1]), args[2] == "1"
            if mode == "save":
                save(path, tied, args[3])
            else:
                load(path, tied, Path(args[3]))
            args = args[4:]
    finally:
        dist.barrier()
        dist.destroy_process_group()
