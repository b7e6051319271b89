"""The memory estimate (train/planner/memory.py) against what a compiled block really keeps, and the
trainer's start-up memory gate."""

import pytest
import torch

from model import Llama, preset
from train.config import BatchShape, TrainConfig
from train.parallel.distributed import Dist
from train.parallel.memory_gate import check_memory
from train.parallel.parallelize import apply_activation_checkpointing
from train.planner.memory import block_saved_bytes


@pytest.mark.parametrize("ac_mode", ["none", "selective", "full"])
def test_block_activations_are_what_compile_keeps(ac_mode):
    """Count, tensor by tensor, what autograd keeps for the backward of one compiled bf16 block of the
    Llama-3.2-1B shape; the estimate must match it to 2%."""
    # Equal to no model dimension: a kept tensor with T in its shape is an activation. Each kept tensor is
    # linear in T, so 200 keeps the same bytes per token as 1000 (checked) for a fifth of the forward's slow
    # bf16 matmuls on a CPU; a (T, T) attention matrix kept by mistake would still add 17% or more.
    T = 200
    cfg = preset("tt_1b", n_layers=1, vocab_size=256, max_seq_len=T)
    torch.manual_seed(0)
    model = Llama(cfg)
    apply_activation_checkpointing(model, ac_mode)
    block = model.layers["0"]
    block.compile()
    cos, sin = model.rope_cos[:, None, :], model.rope_sin[:, None, :]  # (T, 1, Hd): the model's, not counted
    constants = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if T in t.shape and storage.data_ptr() not in constants:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randn(1, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        block(x, cos, sin)
    per_token = sum(kept.values()) / T
    assert per_token == pytest.approx(block_saved_bytes(cfg, ac_mode, 2), rel=0.02)


def test_the_start_up_memory_gate_refuses_unless_told_not_to(monkeypatch):
    """70B in fp32 on this CPU is refused before anything is allocated; memory_check=false lets it by."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    one_cpu = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    cfg = TrainConfig(micro_batch_size=1)
    shape = BatchShape(cfg.micro_batch_size, cfg.global_batch_size, cfg.data.seq_len)
    check_memory(preset("debug"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)  # fits
    with pytest.raises(MemoryError, match="memory_check=false"):
        check_memory(preset("70b"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)
    cfg.memory_check = False
    check_memory(preset("70b"), cfg.parallel, shape, one_cpu, False, cfg.memory_check)
